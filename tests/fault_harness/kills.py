"""Interrupted and concurrent runs of one workdir: kills, preemptions, a second run, lock races.

`KillCampaign` starts the command on one workdir again and again, each time interrupting it one way
(`KillCampaign.MODES`), then runs it to completion (`finish`). Every restart must resume from the
newest finalized checkpoint (never a half-written one) and take over the stale lock a killed run
left; the finished run must match an uninterrupted one bitwise (`command.compare_runs`).
`run_lock_races` has several processes take over the same stale lock at the same instant.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from r1jax import run_dir

from fault_harness import command
from fault_harness import source


@dataclasses.dataclass
class Attempt:
  mode: str
  signal_sent: bool = False
  returncode: int | None = None
  step_at_signal: int | None = None
  finalized_after: list[int] = dataclasses.field(default_factory=list)
  tmp_after: list[str] = dataclasses.field(default_factory=list)
  resumed_from: int | None = None
  expected_resume: int | None = None
  notes: list[str] = dataclasses.field(default_factory=list)


class KillCampaign:
  """Interrupts one workdir's run in random ways, restarting the same command each time."""

  MODES = ("mid_save", "at_step", "after_save", "random_time", "sigterm", "sigterm_short_grace",
           "second_run")

  def __init__(self, harness: command.Harness, workdir: str, log_dir: str, rng: random.Random,
               grace: float = 30.0, typical_secs: float = 20.0):
    self.h = harness
    self.workdir = workdir
    self.log_dir = log_dir
    self.rng = rng
    self.grace = grace
    self.typical_secs = typical_secs
    self.attempts: list[Attempt] = []
    self.problems: list[str] = []
    self.bad_attempts: set[int] = set()  # restarts that did not resume correctly
    self.counts = collections.Counter()
    self.finished_early = False
    os.makedirs(log_dir, exist_ok=True)

  # -- one interrupted attempt ---------------------------------------------------------------------
  def interrupt(self, mode: str, target: int | None = None) -> Attempt:
    """One start of the command, interrupted by `mode` (see MODES) around step `target`."""
    i = len(self.attempts)
    log = os.path.join(self.log_dir, f"attempt{i:02d}_{mode}.log")
    stale_lock = os.path.exists(os.path.join(self.workdir, run_dir.LOCK_FILE))
    metrics_path = os.path.join(self.workdir, "metrics.jsonl")
    metrics_before = command.file_state(metrics_path)
    finalized, _ = command.checkpoint_entries(self.workdir)
    attempt = Attempt(mode, expected_resume=max(finalized) if finalized else None)

    def reached(step):  # this process has trained to `step` (the file is rewritten on start)
      return (command.file_state(metrics_path) != metrics_before and
              command.last_train_step(self.workdir) >= step)

    extra = (f"--config.checkpoint.sigterm_grace_secs="
             f"{0.01 if mode == 'sigterm_short_grace' else self.grace}",)
    proc = self.h.start(self.workdir, log, *extra)
    resume = attempt.expected_resume or 0
    if target is None:  # at most about one checkpoint interval past the resume point
      target = self.rng.randint(resume + 1, max(resume + 1, min(self.h.num_steps - 1,
                                                                 resume + self.h.every + 2)))
    started = time.time()
    if mode == "mid_save":
      attempt.signal_sent = command.poll(
          proc, lambda: bool(command.checkpoint_entries(self.workdir)[1]), interval=0.0005)
      if attempt.signal_sent:
        if self.rng.random() < 0.5:  # at once, or a little later in the save
          time.sleep(self.rng.uniform(0, 0.02))
        command.kill(proc)
    elif mode == "after_save":  # the instant a new step is finalized (old ones being deleted)
      newest = attempt.expected_resume if attempt.expected_resume is not None else -1
      attempt.signal_sent = command.poll(
          proc, lambda: max(command.checkpoint_entries(self.workdir)[0], default=-1) > newest,
          interval=0.0005)
      if attempt.signal_sent:
        command.kill(proc)
    elif mode == "at_step":
      if command.poll(proc, lambda: reached(target)):
        time.sleep(self.rng.uniform(0, 0.05))
        attempt.step_at_signal = command.last_train_step(self.workdir)
        attempt.signal_sent = True
        command.kill(proc)
    elif mode == "random_time":  # anywhere in a restart's life: import, compile, restore, train
      deadline = started + self.rng.uniform(0.2, self.typical_secs)
      command.poll(proc, lambda: time.time() >= deadline)
      attempt.signal_sent = proc.poll() is None
      command.kill(proc)
    elif mode in ("sigterm", "sigterm_short_grace"):
      if command.poll(proc, lambda: reached(target)):
        attempt.step_at_signal = command.last_train_step(self.workdir)
        attempt.signal_sent = True
        sent = time.time()
        command.kill(proc, signal.SIGTERM)
        try:
          proc.wait(timeout=self.grace + 30)
        except subprocess.TimeoutExpired:
          attempt.notes.append("did not exit within grace + 30 s; killed")
          command.kill(proc)
        took = time.time() - sent
        limit = self.grace if mode == "sigterm" else 0.01
        self.counts[f"{mode}_tried"] += 1
        ok = proc.returncode == 143 and took <= limit + 2.0  # + process teardown
        if mode == "sigterm":
          finalized, _ = command.checkpoint_entries(self.workdir)
          saved = max(finalized) if finalized else -1
          ok = ok and saved >= attempt.step_at_signal and "SIGTERM: saving a checkpoint" in (
              command.read_text(log))
          attempt.notes.append(f"exit {proc.returncode} after {took:.2f} s, saved step {saved}")
        else:
          attempt.notes.append(f"exit {proc.returncode} after {took:.2f} s (grace 0.01 s)")
        if ok:
          self.counts[f"{mode}_ok"] += 1
        else:
          self.problems.append(f"attempt {i} ({mode}): {attempt.notes[-1]}")
    elif mode == "second_run":
      if command.poll(proc, lambda: reached(target)):
        os.kill(proc.pid, signal.SIGSTOP)  # held: alive, not progressing
        before = command.workdir_files(self.workdir)
        second_log = os.path.join(self.log_dir, f"attempt{i:02d}_second.log")
        code, text = self.h.run(self.workdir, second_log, *extra)
        after = command.workdir_files(self.workdir)
        self.counts["second_run_tried"] += 1
        refused = code not in (0, None) and f"in use by a live run (pid {proc.pid}" in text
        if refused and before == after:
          self.counts["second_run_refused"] += 1
        else:
          self.problems.append(f"attempt {i}: second run exit {code}, refused={refused}, workdir "
                               f"changed={before != after}")
        attempt.step_at_signal = command.last_train_step(self.workdir)
        attempt.signal_sent = True
        command.kill(proc)  # while held: a stopped process dies of SIGKILL too
        command.kill(proc, signal.SIGCONT)
    if proc.poll() is None and not attempt.signal_sent:
      command.kill(proc)
    proc.wait()
    if attempt.signal_sent and mode in ("at_step", "mid_save", "after_save"):  # restarts' lives
      self.typical_secs = 0.5 * self.typical_secs + 0.5 * (time.time() - started)
    attempt.returncode = proc.returncode
    attempt.finalized_after, attempt.tmp_after = command.checkpoint_entries(self.workdir)
    self._check_restart(attempt, command.read_text(log), stale_lock, metrics_before, i)
    if attempt.signal_sent and mode not in ("sigterm",):
      self.counts["kills_tried"] += 1
      if attempt.tmp_after:
        self.counts["kills_leaving_half_written_checkpoint"] += 1
    self.attempts.append(attempt)
    return attempt

  def interrupt_until_finalized(self, count: int, tries: int = 3) -> bool:
    """Restarts and kills the command the instant a new step is finalized ("after_save") until the
    unfinished workdir holds `count` finalized checkpoints (a copy of it serves corruption trials).
    Returns whether it does; False after `tries` restarts, or if the run finished meanwhile."""
    def enough():
      return len(command.checkpoint_entries(self.workdir)[0]) >= count

    def finished():
      return os.path.exists(os.path.join(self.workdir, "summary.json"))

    for _ in range(tries):
      if enough() or finished():
        break
      self.interrupt("after_save")
    return enough() and not finished()

  def describe(self) -> str:
    """One line per attempt: mode, exit code, finalized and half-written steps after it."""
    return "\n".join(f"attempt {i} ({a.mode}): exit {a.returncode}, finalized {a.finalized_after}, "
                     f"half-written {a.tmp_after}" for i, a in enumerate(self.attempts))

  def _check_restart(self, attempt: Attempt, text: str, stale_lock: bool,
                     metrics_before: tuple[int, int, int] | None, i: int) -> None:
    """The attempt resumed from the newest finalized step (or did not get that far) and took over
    the lock a killed run left."""
    problems = []
    m = command.RESUME_RE.search(text)
    attempt.resumed_from = int(m.group(1)) if m else None
    if m and attempt.resumed_from != attempt.expected_resume:
      problems.append(f"resumed from step {attempt.resumed_from}, the newest finalized checkpoint "
                      f"was {attempt.expected_resume}")
    metrics_after = command.file_state(os.path.join(self.workdir, "metrics.jsonl"))
    if attempt.expected_resume is not None and not m and metrics_after != metrics_before:
      problems.append(f"wrote metrics without resuming from step {attempt.expected_resume}")
    if "cannot be restored" in text:
      problems.append("a finalized checkpoint could not be restored after a kill")
    if (stale_lock and command.STARTED_TRAINING in text and
        "Took over the stale workdir lock" not in text):
      problems.append("no stale-lock takeover logged")
    if "Traceback" in text and not attempt.signal_sent:
      problems.append(f"crashed:\n{text[-1500:]}")
    if problems:
      self.bad_attempts.add(i)
      self.problems += [f"attempt {i} ({attempt.mode}): {p}" for p in problems]

  def survived(self) -> int:
    """Kills after which the restart resumed correctly (0 if the finished run does not match)."""
    if self.final_problems:
      return 0
    return sum(1 for i, a in enumerate(self.attempts)
               if a.signal_sent and a.mode != "sigterm" and i + 1 not in self.bad_attempts)

  def finish(self, reference: str) -> list[str]:
    """Runs the command to completion and compares with the uninterrupted reference run."""
    log = os.path.join(self.log_dir, "final.log")
    stale_lock = os.path.exists(os.path.join(self.workdir, run_dir.LOCK_FILE))
    metrics_before = command.file_state(os.path.join(self.workdir, "metrics.jsonl"))
    finalized, _ = command.checkpoint_entries(self.workdir)
    attempt = Attempt("final", expected_resume=max(finalized) if finalized else None)
    code, text = self.h.run(self.workdir, log)
    attempt.returncode = code
    self._check_restart(attempt, text, stale_lock, metrics_before, len(self.attempts))
    self.attempts.append(attempt)
    self.final_problems = []
    if code != 0:
      self.final_problems.append(f"final run failed ({code}):\n{text[-3000:]}")
    else:
      _, tmp = command.checkpoint_entries(self.workdir)
      if tmp:
        self.final_problems.append(f"half-written checkpoints left after the final run: {tmp}")
      self.final_problems += command.compare_runs(self.workdir, reference, self.h.num_steps)
    self.problems += self.final_problems
    return self.problems


def run_kill_campaign(harness: command.Harness, reference: str, workdir: str, log_dir: str, *,
                      kills: int, rng: random.Random, modes: tuple[str, ...] | None = None,
                      snapshot_to: str | None = None, typical_secs: float = 20.0) -> KillCampaign:
  """`kills` interrupted attempts (each mode at least once, then random ones), then the final run.

  snapshot_to: copy the workdir there after the first interruption that leaves 2+ finalized
  checkpoints (for corruption trials on a real interrupted run); if none did, more "after_save"
  kills are made until one does (`KillCampaign.interrupt_until_finalized`).
  """
  modes = modes or KillCampaign.MODES
  campaign = KillCampaign(harness, workdir, log_dir, rng, typical_secs=typical_secs)
  plan = list(modes[:kills]) + [rng.choice(modes) for _ in range(kills - len(modes))]
  for mode in plan:
    attempt = campaign.interrupt(mode)
    if snapshot_to and not os.path.exists(snapshot_to) and len(attempt.finalized_after) >= 2:
      shutil.copytree(workdir, snapshot_to, symlinks=True)
    if attempt.returncode == 0:  # finished before it could be interrupted
      campaign.finished_early = True
      break
  if snapshot_to and not os.path.exists(snapshot_to) and not campaign.finished_early:
    if campaign.interrupt_until_finalized(2):  # no interruption of the plan left two
      shutil.copytree(workdir, snapshot_to, symlinks=True)
  campaign.finish(reference)
  return campaign


# --------------------------------------------------------------------------------------------------
# Lock races.

LOCK_RACE = r"""
import json, sys, time
from r1jax import run_dir
workdir, t0, trials, gap = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
for t in range(trials):
  time.sleep(max(0.0, t0 + t * gap - time.time()))
  try:
    lock = run_dir.WorkdirLock(workdir).acquire()
  except run_dir.WorkdirLocked:
    print(json.dumps({"trial": t, "won": False}), flush=True)
    continue
  print(json.dumps({"trial": t, "won": True}), flush=True)
  time.sleep(gap / 2)
  lock.release()
"""


def run_lock_races(contenders: int, trials: int, scratch: str) -> dict[str, Any]:
  """`contenders` processes take over the same stale lock at the same instant, `trials` times."""
  workdir = os.path.join(scratch, "race")
  os.makedirs(workdir, exist_ok=True)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  stale = json.dumps({"pid": dead.pid, "host": socket.gethostname(), "start_time": "1"})
  gap = 3.0
  t0 = time.time() + 25.0  # after every contender has imported jax
  env = dict(os.environ, PYTHONPATH=source.pythonpath(os.environ))
  procs = [subprocess.Popen([sys.executable, "-c", LOCK_RACE, workdir, str(t0), str(trials),
                             str(gap)], env=env, stdout=subprocess.PIPE, text=True)
           for _ in range(contenders)]
  for t in range(trials):  # a fresh stale lock before each trial
    time.sleep(max(0.0, t0 + t * gap - 1.0 - time.time()))
    with open(os.path.join(workdir, run_dir.LOCK_FILE), "w") as f:
      f.write(stale)
  winners = collections.Counter()
  for p in procs:
    out, _ = p.communicate(timeout=t0 - time.time() + trials * gap + 120)
    for line in out.splitlines():
      record = json.loads(line)
      winners[record["trial"]] += int(record["won"])
  bad = {t: winners[t] for t in range(trials) if winners[t] != 1}
  return {"trials": trials, "contenders": contenders, "exactly_one_winner": trials - len(bad),
          "problems": [f"trial {t}: {n} winners" for t, n in bad.items()]}

