r"""Fault campaign: kills, preemption, corrupt checkpoints, concurrent runs, NaN, bad configs, fuzz.

    python bench/faults.py                 # the full campaign, fixed seed (~10 min on 2 busy cores)
    python bench/faults.py --kills 4 --corruptions 8 --fuzz 40 --configs 30 --nan 1 --races 1

Everything runs the real command, `python -m r1jax.main --config=configs/pretrain.py:variant=tiny
--workdir=W` with a smaller model and a short schedule, in subprocesses on 8 forced CPU devices
(mesh 2x2x2, so checkpoints are sharded), sharing a JAX persistent compilation cache so that a restart
costs an import, not a compile. Random choices come from `--seed`.

  kills        SIGKILL at random moments (at a random training step, the instant a checkpoint's tmp
               directory appears, i.e. mid-save, or at a random time after start: import, compile,
               restore), SIGTERM preemptions with the configured grace and with a grace too short to
               finish the save, and a second run started on the workdir while the first is held
               (SIGSTOP) - then the same command again, until done. Every restart must resume from
               the newest finalized checkpoint (never a half-written one) and take over the stale
               lock; the finished run must match an uninterrupted one bitwise: metrics.jsonl (timing
               fields aside), the checksums of every state leaf and the parameters.
  corruptions  one random file of the newest checkpoint of a real run truncated, emptied, bit-flipped,
               overwritten, appended to or deleted (or a whole item directory deleted), then restored
               through `Checkpointer.restore`: it must fall back to the previous step and say so
               naming both, or restore values identical to the intact checkpoint ("harmless");
               anything else is "silent" (restored wrong values) or "crash". Plus end-to-end trials:
               corrupt a killed run's newest checkpoint, rerun the command, match the reference.
  nan          NaN mlm_weights / out-of-vocabulary token ids injected into the batch of a random step
               (through `r1jax.data.examples.pretrain_iterator`): the run must stop naming that step
               and the last good checkpoint, keep only checkpoints before it, and resume with
               train.skip_nonfinite=True to completion with one skip counted.
  configs      random invalid `--config.*` overrides parsed by the real flag parser: each must fail
               before anything is compiled or written, with a message naming the key.
  races        several processes take over the same stale workdir lock at the same instant: exactly
               one may win.
  fuzz         the hostile-input properties of tests/test_fuzz.py with --fuzz examples each.

Prints the counts (kills survived / tried, corruptions detected / tried, fuzz inputs tried,
documents lost) and writes them to --out as JSON.

Measured 2026-11-28 (seed 0, defaults: 64 steps, 24 interruptions; 536 s on the 2-core development
machine at load average 6-9), after the fixes this campaign prompted (fallback past a corrupt step,
digests for the JSON items, the stale-lock race):
  kills survived / tried              20 / 20 (9 left a half-written checkpoint; the finished run was
                                      bitwise the uninterrupted one)
  preemptions saved+exited in grace   4 / 4; grace too short: 1 / 1 exited (143) at once
  second runs on a held workdir       5 / 5 refused, workdir untouched
  corrupt-and-rerun end to end        2 / 2 fell back naming both steps, finished bitwise identical
  corruptions detected / tried        17 / 40, the other 23 harmless (bytes nothing reads, e.g.
                                      commit_success.txt, superseded OCDBT files: restored values
                                      identical); 0 silent, 0 crashes
  NaN injections caught / tried       2 / 2 (step and last good checkpoint named)
  invalid configs failed well         125 / 125 (before compiling or writing, key named)
  lock races with exactly one winner  4 / 4 (6 processes each)
  fuzz inputs tried                   3,000 (500 per property); documents in 7,554 = out 3,773 +
                                      dropped 3,781 (with reasons); lost 0
Before the fixes the same campaign found: a rerun after falling back past a corrupt checkpoint
crashed at that step (StepAlreadyExistsError); a damaged data/ or meta/ JSON, or a deleted data/
item, was restored silently (wrong data position / log window); two contenders could both take over
a stale lock; a JSONL lone-surrogate escape crashed cleaning; a non-UTF-8 knowledge file raised a
bare UnicodeDecodeError.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run as a script, bench/ comes first on sys.path, where bench/compression.py would shadow the
# standard library's `compression` package that jax imports.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.join(ROOT, "bench"):
  sys.path.pop(0)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
# Where the code under test lives: the checkout, or a snapshot of it (main() copies r1jax/ and
# configs/ so that edits made to the checkout while the campaign runs do not change what it tests).
SOURCE = {"root": ROOT}


def config_path() -> str:
  return os.path.join(SOURCE["root"], "configs", "pretrain.py")


def snapshot_source(directory: str) -> str:
  """Copies r1jax/ and configs/ to `directory` and makes it the code under test (here and in the
  subprocesses); call before anything imports r1jax."""
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in ("r1jax", "configs"):
    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, name), os.path.join(directory, name), ignore=ignore)
  SOURCE["root"] = directory
  sys.path.insert(0, directory)
  return directory
TIMING_FIELDS = ("tokens_per_sec", "steps_per_sec", "mfu")
TINY_MODEL = dict(n_layer=1, d_model=32, n_head=2, d_head=16, d_inner=64, mem_len=16)
TMP_MARK = ".orbax-checkpoint-tmp"
RESUME_RE = re.compile(r"Resuming from checkpoint step (\d+)")
STARTED_TRAINING = "Pretraining tiny model"


def set_cpu_devices(count: int) -> None:
  """XLA_FLAGS for `count` CPU devices (before jax is imported)."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


# --------------------------------------------------------------------------------------------------
# Running the real command.

# Runs the CLI with a fault injected into the training batches: R1JAX_FAULTS_INJECT="KIND@STEP"
# (KIND nan_weights: NaN mlm_weights; bad_tokens: token ids outside the vocabulary) changes the
# batch of optimizer step STEP (1-based) of the first iterator the stage opens (the training stream;
# the held-out stream is opened later). Everything else is the unmodified command.
INJECT = r"""
import os, sys
import numpy as np
from r1jax.data import examples
kind, at = os.environ["R1JAX_FAULTS_INJECT"].split("@")
at = int(at)
real = examples.pretrain_iterator
opened = []

class Injected:
  def __init__(self, it):
    self._it = it
  def __iter__(self):
    return self
  def __next__(self):
    batch = next(self._it)
    if self._it.get_state()["step"] == at:
      batch = dict(batch)
      if kind == "nan_weights":
        batch["mlm_weights"] = np.full_like(batch["mlm_weights"], np.nan)
      else:
        batch["tokens"] = np.where(batch["token_mask"], 10**6, 0).astype(np.int32)
    return batch
  def get_state(self):
    return self._it.get_state()
  def set_state(self, state):
    self._it.set_state(state)

def patched(*args, **kwargs):
  opened.append(1)
  it = real(*args, **kwargs)
  return Injected(it) if len(opened) == 1 else it

examples.pretrain_iterator = patched
from r1jax import main
sys.argv[0] = "r1jax.main"
main.cli()
"""


@dataclasses.dataclass
class Harness:
  """The tiny pretraining command, its environment and its outputs."""
  tokenizer: str
  cache_dir: str
  num_steps: int = 24
  every: int = 4
  eval_every: int = 8
  devices: int = 8
  mesh: tuple[int, int, int] = (2, 2, 2)
  batch_size: int = 8

  def overrides(self) -> list[str]:
    out = [f"--config.data.tokenizer={self.tokenizer}", "--config.train.progress_bar=False",
           f"--config.train.num_steps={self.num_steps}", "--config.train.log_every_steps=1",
           f"--config.train.batch_size={self.batch_size}", "--config.train.warmup_steps=2",
           f"--config.checkpoint.every_steps={self.every}",
           f"--config.eval.every_steps={self.eval_every}", "--config.eval.num_batches=1"]
    out += [f"--config.mesh.{a}={n}" for a, n in zip(("data", "fsdp", "tensor"), self.mesh)]
    out += [f"--config.model.{k}={v}" for k, v in TINY_MODEL.items()]
    return out

  def command(self, workdir: str, *extra: str, inject: str | None = None) -> list[str]:
    prefix = [sys.executable, "-c", INJECT] if inject else [sys.executable, "-m", "r1jax.main"]
    return prefix + [f"--config={config_path()}:variant=tiny", f"--workdir={workdir}",
                     *self.overrides(),
                     *extra]

  def env(self, inject: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env.update(
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={self.devices}".strip(),
        JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=SOURCE["root"] + os.pathsep + env.get("PYTHONPATH", ""),
        JAX_COMPILATION_CACHE_DIR=self.cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("R1JAX_FAULTS_INJECT", None)
    if inject:
      env["R1JAX_FAULTS_INJECT"] = inject
    return env

  def start(self, workdir: str, log_path: str, *extra: str,
            inject: str | None = None) -> subprocess.Popen:
    with open(log_path, "wb") as log:
      return subprocess.Popen(self.command(workdir, *extra, inject=inject), cwd=SOURCE["root"],
                              env=self.env(inject), stdout=log, stderr=subprocess.STDOUT)

  def run(self, workdir: str, log_path: str, *extra: str, inject: str | None = None,
          timeout: float = 900) -> tuple[int, str]:
    proc = self.start(workdir, log_path, *extra, inject=inject)
    try:
      proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    return proc.returncode, read_text(log_path)


def read_text(path: str) -> str:
  with open(path, "rb") as f:
    return f.read().decode("utf-8", errors="replace")


def checkpoint_entries(workdir: str) -> tuple[list[int], list[str]]:
  """(finalized steps, names of half-written tmp directories) in DIR/checkpoints."""
  try:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
  except FileNotFoundError:
    return [], []
  return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if TMP_MARK in n)


def last_train_step(workdir: str) -> int:
  """The newest step in DIR/metrics.jsonl (0 if none); tolerates a line being written."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
      lines = f.read().split(b"\n")
  except FileNotFoundError:
    return 0
  for line in reversed(lines):
    try:
      return int(json.loads(line)["step"])
    except (ValueError, KeyError):
      continue
  return 0


def metrics_records(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def final_checksums(workdir: str, step: int) -> dict[str, int]:
  with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as f:
    return json.load(f)["checksums"]


def compare_runs(workdir: str, reference: str, num_steps: int) -> list[str]:
  """Differences between two finished runs: metrics.jsonl, state checksums, parameters."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from r1jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  problems = []
  if not os.path.exists(os.path.join(workdir, "summary.json")):
    return ["no summary.json: the run did not finish"]
  a, b = metrics_records(workdir), metrics_records(reference)
  if a != b:
    diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    problems.append(f"metrics.jsonl differs from record {diff} ({len(a)} vs {len(b)} records): "
                    f"{a[diff] if diff < len(a) else None} vs {b[diff] if diff < len(b) else None}")
  if final_checksums(workdir, num_steps) != final_checksums(reference, num_steps):
    problems.append(f"state checksums of step {num_steps} differ")
  with quiet_absl():
    pa, sa = ckpt_lib.restore_params(workdir, step=num_steps)
    pb, sb = ckpt_lib.restore_params(reference, step=num_steps)
  import jax  # pylint: disable=g-import-not-at-top
  same = (sa == sb and jax.tree.structure(pa) == jax.tree.structure(pb) and
          all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb))))
  if not same:
    problems.append("final parameters differ")
  return problems


def _poll(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 600,
          interval: float = 0.002) -> bool:
  """Waits until condition() (True) or the process exits / time runs out (False)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return True
    if proc.poll() is not None:
      return condition()
    time.sleep(interval)
  return False


def _kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
  try:
    os.kill(proc.pid, sig)
  except ProcessLookupError:
    pass


# --------------------------------------------------------------------------------------------------
# Kill campaign.


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

  def __init__(self, harness: Harness, workdir: str, log_dir: str, rng: random.Random,
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

  # -- one interrupted attempt ----------------------------------------------------------------------
  def interrupt(self, mode: str, target: int | None = None) -> Attempt:
    """One start of the command, interrupted by `mode` (see MODES) around step `target`."""
    i = len(self.attempts)
    log = os.path.join(self.log_dir, f"attempt{i:02d}_{mode}.log")
    stale_lock = os.path.exists(os.path.join(self.workdir, ".lock"))
    metrics_path = os.path.join(self.workdir, "metrics.jsonl")
    metrics_before = _file_state(metrics_path)
    finalized, _ = checkpoint_entries(self.workdir)
    attempt = Attempt(mode, expected_resume=max(finalized) if finalized else None)

    def reached(step):  # this process has trained to `step` (the file is rewritten on start)
      return _file_state(metrics_path) != metrics_before and last_train_step(self.workdir) >= step

    extra = (f"--config.checkpoint.sigterm_grace_secs="
             f"{0.01 if mode == 'sigterm_short_grace' else self.grace}",)
    proc = self.h.start(self.workdir, log, *extra)
    resume = attempt.expected_resume or 0
    if target is None:  # at most about one checkpoint interval past the resume point
      target = self.rng.randint(resume + 1, max(resume + 1, min(self.h.num_steps - 1,
                                                                 resume + self.h.every + 2)))
    started = time.time()
    if mode == "mid_save":
      attempt.signal_sent = _poll(proc, lambda: bool(checkpoint_entries(self.workdir)[1]),
                                  interval=0.0005)
      if attempt.signal_sent:
        if self.rng.random() < 0.5:  # at once, or a little later in the save
          time.sleep(self.rng.uniform(0, 0.02))
        _kill(proc)
    elif mode == "after_save":  # the instant a new step is finalized (old ones being deleted)
      newest = attempt.expected_resume if attempt.expected_resume is not None else -1
      attempt.signal_sent = _poll(
          proc, lambda: max(checkpoint_entries(self.workdir)[0], default=-1) > newest,
          interval=0.0005)
      if attempt.signal_sent:
        _kill(proc)
    elif mode == "at_step":
      if _poll(proc, lambda: reached(target)):
        time.sleep(self.rng.uniform(0, 0.05))
        attempt.step_at_signal = last_train_step(self.workdir)
        attempt.signal_sent = True
        _kill(proc)
    elif mode == "random_time":  # anywhere in a restart's life: import, compile, restore, train
      deadline = started + self.rng.uniform(0.2, self.typical_secs)
      _poll(proc, lambda: time.time() >= deadline)
      attempt.signal_sent = proc.poll() is None
      _kill(proc)
    elif mode in ("sigterm", "sigterm_short_grace"):
      if _poll(proc, lambda: reached(target)):
        attempt.step_at_signal = last_train_step(self.workdir)
        attempt.signal_sent = True
        sent = time.time()
        _kill(proc, signal.SIGTERM)
        try:
          proc.wait(timeout=self.grace + 30)
        except subprocess.TimeoutExpired:
          attempt.notes.append("did not exit within grace + 30 s; killed")
          _kill(proc)
        took = time.time() - sent
        limit = self.grace if mode == "sigterm" else 0.01
        self.counts[f"{mode}_tried"] += 1
        ok = proc.returncode == 143 and took <= limit + 2.0  # + process teardown
        if mode == "sigterm":
          finalized, _ = checkpoint_entries(self.workdir)
          saved = max(finalized) if finalized else -1
          ok = ok and saved >= attempt.step_at_signal and "SIGTERM: saving a checkpoint" in (
              read_text(log))
          attempt.notes.append(f"exit {proc.returncode} after {took:.2f} s, saved step {saved}")
        else:
          attempt.notes.append(f"exit {proc.returncode} after {took:.2f} s (grace 0.01 s)")
        if ok:
          self.counts[f"{mode}_ok"] += 1
        else:
          self.problems.append(f"attempt {i} ({mode}): {attempt.notes[-1]}")
    elif mode == "second_run":
      if _poll(proc, lambda: reached(target)):
        os.kill(proc.pid, signal.SIGSTOP)  # held: alive, not progressing
        before = _snapshot(self.workdir)
        second_log = os.path.join(self.log_dir, f"attempt{i:02d}_second.log")
        code, text = self.h.run(self.workdir, second_log, *extra)
        after = _snapshot(self.workdir)
        self.counts["second_run_tried"] += 1
        refused = code not in (0, None) and f"in use by a live run (pid {proc.pid}" in text
        if refused and before == after:
          self.counts["second_run_refused"] += 1
        else:
          self.problems.append(f"attempt {i}: second run exit {code}, refused={refused}, workdir "
                               f"changed={before != after}")
        attempt.step_at_signal = last_train_step(self.workdir)
        attempt.signal_sent = True
        _kill(proc)  # while held: a stopped process dies of SIGKILL too
        _kill(proc, signal.SIGCONT)
    if proc.poll() is None and not attempt.signal_sent:
      _kill(proc)
    proc.wait()
    if attempt.signal_sent and mode in ("at_step", "mid_save", "after_save"):  # restarts' lives
      self.typical_secs = 0.5 * self.typical_secs + 0.5 * (time.time() - started)
    attempt.returncode = proc.returncode
    attempt.finalized_after, attempt.tmp_after = checkpoint_entries(self.workdir)
    self._check_restart(attempt, read_text(log), stale_lock, metrics_before, i)
    if attempt.signal_sent and mode not in ("sigterm",):
      self.counts["kills_tried"] += 1
      if attempt.tmp_after:
        self.counts["kills_leaving_half_written_checkpoint"] += 1
    self.attempts.append(attempt)
    return attempt

  def _check_restart(self, attempt: Attempt, text: str, stale_lock: bool,
                     metrics_before: tuple[int, int, int] | None, i: int) -> None:
    """The attempt resumed from the newest finalized step (or did not get that far) and took over
    the lock a killed run left."""
    problems = []
    m = RESUME_RE.search(text)
    attempt.resumed_from = int(m.group(1)) if m else None
    if m and attempt.resumed_from != attempt.expected_resume:
      problems.append(f"resumed from step {attempt.resumed_from}, the newest finalized checkpoint "
                      f"was {attempt.expected_resume}")
    metrics_after = _file_state(os.path.join(self.workdir, "metrics.jsonl"))
    if attempt.expected_resume is not None and not m and metrics_after != metrics_before:
      problems.append(f"wrote metrics without resuming from step {attempt.expected_resume}")
    if "cannot be restored" in text:
      problems.append("a finalized checkpoint could not be restored after a kill")
    if stale_lock and STARTED_TRAINING in text and "Took over the stale workdir lock" not in text:
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
    stale_lock = os.path.exists(os.path.join(self.workdir, ".lock"))
    metrics_before = _file_state(os.path.join(self.workdir, "metrics.jsonl"))
    finalized, _ = checkpoint_entries(self.workdir)
    attempt = Attempt("final", expected_resume=max(finalized) if finalized else None)
    code, text = self.h.run(self.workdir, log)
    attempt.returncode = code
    self._check_restart(attempt, text, stale_lock, metrics_before, len(self.attempts))
    self.attempts.append(attempt)
    self.final_problems = []
    if code != 0:
      self.final_problems.append(f"final run failed ({code}):\n{text[-3000:]}")
    else:
      _, tmp = checkpoint_entries(self.workdir)
      if tmp:
        self.final_problems.append(f"half-written checkpoints left after the final run: {tmp}")
      self.final_problems += compare_runs(self.workdir, reference, self.h.num_steps)
    self.problems += self.final_problems
    return self.problems


def _file_state(path: str) -> tuple[int, int, int] | None:
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return None
  return st.st_ino, st.st_size, st.st_mtime_ns


def _snapshot(workdir: str) -> dict[str, tuple[int, int]]:
  """{relative path: (size, mtime_ns)} of every file (the lock excepted)."""
  out = {}
  for dirpath, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(dirpath, name)
      if name == ".lock":
        continue
      try:
        st = os.stat(path)
      except FileNotFoundError:
        continue
      out[os.path.relpath(path, workdir)] = (st.st_size, st.st_mtime_ns)
  return out


def run_kill_campaign(harness: Harness, reference: str, workdir: str, log_dir: str, *,
                      kills: int, rng: random.Random, modes: tuple[str, ...] | None = None,
                      snapshot_to: str | None = None, typical_secs: float = 20.0) -> KillCampaign:
  """`kills` interrupted attempts (each mode at least once, then random ones), then the final run.

  snapshot_to: copy the workdir there after the first interruption that leaves 2+ finalized
  checkpoints (for corruption trials on a real interrupted run).
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
  campaign.finish(reference)
  return campaign


# --------------------------------------------------------------------------------------------------
# Checkpoint corruption.


class quiet_absl:  # pylint: disable=invalid-name
  """Raises the absl logger to ERROR inside the block (Orbax's read-only-manager warnings)."""

  def __enter__(self):
    import logging  # pylint: disable=g-import-not-at-top
    self._logger = logging.getLogger("absl")
    self._level = self._logger.level
    self._logger.setLevel(logging.ERROR)

  def __exit__(self, *exc):
    self._logger.setLevel(self._level)


def abstract_state_of(ckpt_dir: str, step: int):
  """A restore target for a saved TrainState built from the checkpoint's own metadata (one device)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from r1jax.train.state import TrainState  # pylint: disable=g-import-not-at-top
  with quiet_absl():
    manager = ocp.CheckpointManager(
        ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers={"params": ocp.PyTreeCheckpointHandler(),
                       "train": ocp.PyTreeCheckpointHandler()})
    try:
      metadata = manager.item_metadata(step)
      trees = {k: getattr(metadata[k], "tree", metadata[k]) for k in ("params", "train")}
    finally:
      manager.close()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), t)
              for k, t in trees.items()}
  return TrainState(params=abstract["params"], **abstract["train"])


CORRUPTIONS = ("truncate", "empty", "flip_bytes", "overwrite_span", "append", "delete_file",
               "delete_item", "digit")


def corrupt(step_dir: str, rng: random.Random, kind: str | None = None,
            path: str | None = None) -> str:
  """Damages one file of a checkpoint step (or a whole item directory); returns a description."""
  files = sorted(p for p in glob.glob(os.path.join(step_dir, "**", "*"), recursive=True)
                 if os.path.isfile(p))
  path = path or rng.choice(files)
  kind = kind or rng.choice(CORRUPTIONS)
  rel = os.path.relpath(path, step_dir)
  size = os.path.getsize(path)
  if kind == "truncate":
    new = rng.randrange(0, max(1, size))
    with open(path, "r+b") as f:
      f.truncate(new)
    return f"truncate {rel} {size} -> {new} bytes"
  if kind == "empty":
    open(path, "wb").close()
    return f"empty {rel} ({size} bytes)"
  if kind in ("flip_bytes", "overwrite_span") and size:
    with open(path, "r+b") as f:
      data = bytearray(f.read())
      if kind == "flip_bytes":
        for _ in range(rng.randint(1, 4)):
          i = rng.randrange(size)
          data[i] ^= rng.randint(1, 255)
        what = "flip bytes in"
      else:
        start = rng.randrange(size)
        span = min(size - start, rng.randint(1, 64))
        data[start:start + span] = bytes(rng.randrange(256) for _ in range(span))
        what = f"overwrite {span} bytes of"
      f.seek(0)
      f.write(data)
    return f"{what} {rel}"
  if kind == "digit":  # plausible-looking: one digit of the file's text changes
    with open(path, "rb") as f:
      data = bytearray(f.read())
    digits = [i for i, c in enumerate(data) if 48 <= c <= 57]
    if digits:
      i = rng.choice(digits)
      data[i] = 48 + (data[i] - 48 + rng.randint(1, 9)) % 10
      with open(path, "wb") as f:
        f.write(data)
      return f"change one digit of {rel}"
    kind = "append"
  if kind == "append":
    with open(path, "ab") as f:
      f.write(bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
    return f"append to {rel}"
  if kind == "delete_item":
    item = rel.split(os.sep)[0]
    target = os.path.join(step_dir, item)
    if os.path.isdir(target):
      shutil.rmtree(target)
      return f"delete item {item}/"
  os.unlink(path)
  return f"delete {rel}"


@dataclasses.dataclass
class Baseline:
  latest: int
  previous: int
  abstract: Any
  values: dict[str, Any]


def _restored_values(restored) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from r1jax.train import optim  # pylint: disable=g-import-not-at-top
  leaves = {optim.path_str(p): np.asarray(x).tobytes()
            for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(restored.state))[0]}
  return {"step": restored.step, "state": leaves, "data": restored.data_state,
          "loop": restored.meta.get("loop")}


def corruption_baseline(ckpt_dir: str) -> Baseline:
  from r1jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  steps = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  abstract = abstract_state_of(ckpt_dir, steps[-1])
  with quiet_absl():
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
    try:
      restored = checkpointer.restore(abstract)
    finally:
      checkpointer.close()
  assert restored.step == steps[-1] and not restored.skipped_steps
  return Baseline(steps[-1], steps[-2], abstract, _restored_values(restored))


class _Capture:
  """Collects absl/python log records (the fallback warnings) while attached."""

  def __init__(self):
    import logging  # pylint: disable=g-import-not-at-top
    self.records = []
    self._handler = logging.Handler()
    self._handler.emit = lambda record: self.records.append(record.getMessage())
    self._logger = logging.getLogger("absl")

  def __enter__(self):
    self._logger.addHandler(self._handler)
    return self

  def __exit__(self, *exc):
    self._logger.removeHandler(self._handler)

  @property
  def text(self) -> str:
    return "\n".join(self.records)


def corruption_trial(ckpt_dir: str, baseline: Baseline, rng: random.Random, scratch: str,
                     kind: str | None = None, path_in_step: str | None = None
                     ) -> tuple[str, str, str]:
  """Corrupts a copy of the newest step and restores. Returns (outcome, description, log text):
  outcome is fallback | harmless | silent | refused | crash."""
  from r1jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  copy = os.path.join(scratch, "ckpt")
  shutil.rmtree(copy, ignore_errors=True)
  shutil.copytree(ckpt_dir, copy)
  step_dir = os.path.join(copy, str(baseline.latest))
  path = os.path.join(step_dir, path_in_step) if path_in_step else None
  description = corrupt(step_dir, rng, kind, path)
  with _Capture() as capture:
    checkpointer = None
    try:
      checkpointer = ckpt_lib.Checkpointer(copy, read_only=True)
      restored = checkpointer.restore(baseline.abstract)
    except ckpt_lib.CheckpointShapeError as e:
      return "refused", description, str(e)
    except Exception as e:  # pylint: disable=broad-except
      return "crash", description, f"{type(e).__name__}: {e}"
    finally:
      if checkpointer is not None:
        try:
          checkpointer.close()
        except Exception:  # pylint: disable=broad-except
          pass
  text = capture.text
  if restored.step == baseline.previous:
    named = (f"Checkpoint step {baseline.latest}" in text and
             f"Restored checkpoint step {baseline.previous} instead of the newer step(s) "
             f"[{baseline.latest}]" in text)
    return ("fallback" if named else "fallback_unnamed"), description, text
  if restored.step == baseline.latest:
    same = _restored_values(restored) == baseline.values
    return ("harmless" if same else "silent"), description, text
  return "crash", description, f"restored step {restored.step}"


def run_corruption_campaign(ckpt_dir: str, trials: int, rng: random.Random) -> dict[str, Any]:
  baseline = corruption_baseline(ckpt_dir)
  outcomes = collections.Counter()
  bad, log = [], []
  with tempfile.TemporaryDirectory() as scratch:
    for i in range(trials):
      kind = CORRUPTIONS[i % len(CORRUPTIONS)] if i < len(CORRUPTIONS) else None
      outcome, description, text = corruption_trial(ckpt_dir, baseline, rng, scratch, kind)
      outcomes[outcome] += 1
      log.append(f"{outcome}: {description}")
      if outcome not in ("fallback", "harmless"):
        bad.append(f"{outcome}: {description}: {text[-300:]}")
  return {"tried": trials, "outcomes": dict(outcomes), "problems": bad, "trials": log,
          "detected": outcomes["fallback"] + outcomes["refused"]}


def end_to_end_corruption(harness: Harness, snapshot: str, reference: str, work: str,
                          rng: random.Random, kind: str = "truncate") -> list[str]:
  """Corrupts the newest checkpoint of a copy of an interrupted run, reruns the command: it must
  say it falls back (naming both steps) and finish identical to the reference."""
  shutil.rmtree(work, ignore_errors=True)
  shutil.copytree(snapshot, work, symlinks=True)
  finalized, _ = checkpoint_entries(work)
  latest, previous = finalized[-1], finalized[-2]
  step_dir = os.path.join(work, "checkpoints", str(latest))
  arrays = sorted(glob.glob(os.path.join(step_dir, "params", "d", "*")))
  description = corrupt(step_dir, rng, kind, arrays[0] if arrays else None)
  code, text = harness.run(work, os.path.join(os.path.dirname(work), "e2e_corruption.log"))
  problems = []
  if f"Checkpoint step {latest}" not in text or (
      f"Restored checkpoint step {previous} instead of the newer step(s) [{latest}]" not in text):
    problems.append(f"{description}: the log does not name steps {latest} and {previous}")
  if code != 0:
    problems.append(f"{description}: rerun failed ({code}): {text[-1500:]}")
  else:
    problems += [f"{description}: {p}" for p in compare_runs(work, reference, harness.num_steps)]
  return problems


# --------------------------------------------------------------------------------------------------
# NaN injection.


def nan_trial(harness: Harness, reference: str, work_root: str, kind: str, at: int,
              skip_rerun: bool = True) -> list[str]:
  """Injects `kind` at step `at`; the run must stop naming it and the last good checkpoint, then
  resume with skip_nonfinite=True and finish with one skip."""
  workdir = os.path.join(work_root, f"nan_{kind}_{at}")
  shutil.rmtree(workdir, ignore_errors=True)
  code, text = harness.run(workdir, workdir + ".log", inject=f"{kind}@{at}")
  problems = []
  finalized, _ = checkpoint_entries(workdir)
  good = max(finalized) if finalized else None
  if code == 0:
    return [f"{kind}@{at}: the run did not stop"]
  if f"Non-finite loss or gradient at step {at} " not in text:
    problems.append(f"{kind}@{at}: the error does not name step {at}: {text[-800:]}")
  expected = (f"the last good checkpoint is step {good}" if good is not None else
              "no checkpoint was saved yet")
  if expected not in text:
    problems.append(f"{kind}@{at}: the error does not say '{expected}'")
  if any(s >= at for s in finalized):
    problems.append(f"{kind}@{at}: checkpoints at or after the NaN step: {finalized}")
  ref = [r for r in metrics_records(reference) if r["step"] < at]
  got = [r for r in metrics_records(workdir) if r["step"] < at]
  if got != ref:
    problems.append(f"{kind}@{at}: metrics before the NaN step differ from the reference")
  if not skip_rerun:
    return problems
  code, text = harness.run(workdir, workdir + ".skip.log", "--config.train.skip_nonfinite=True",
                           inject=f"{kind}@{at}")
  if code != 0:
    return problems + [f"{kind}@{at}: the skip_nonfinite rerun failed: {text[-800:]}"]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  if summary["nonfinite_skips"] != 1 or summary["resumed_from_step"] != good:
    problems.append(f"{kind}@{at}: skip rerun summary {summary['nonfinite_skips']} skips, resumed "
                    f"from {summary['resumed_from_step']} (expected 1, {good})")
  return problems


# --------------------------------------------------------------------------------------------------
# Invalid configs.

# (key, kind, arguments): kinds int_min (minimum, allowed values below it), float_range (low, high,
# low_open, high_open), choice, bool.
CONFIG_KEYS = (
    ("seed", "int_min", (0, ())), ("train.num_steps", "int_min", (1, (-1,))),
    ("train.batch_size", "int_min", (1, ())), ("train.grad_accum_steps", "int_min", (1, ())),
    ("train.log_every_steps", "int_min", (1, ())), ("train.warmup_steps", "int_min", (0, (-1,))),
    ("eval.every_steps", "int_min", (0, ())), ("eval.num_batches", "int_min", (1, ())),
    ("eval.early_stopping_patience", "int_min", (0, ())),
    ("checkpoint.every_steps", "int_min", (1, ())), ("checkpoint.max_to_keep", "int_min", (1, ())),
    ("checkpoint.keep_best", "int_min", (0, ())), ("data.seq_len", "int_min", (8, (-1,))),
    ("data.max_predictions", "int_min", (1, (-1,))), ("data.kg_seq_len", "int_min", (8, ())),
    ("data.eval_every_nth_doc", "int_min", (2, ())), ("data.worker_count", "int_min", (0, ())),
    ("mesh.data", "int_min", (1, (-1,))), ("mesh.fsdp", "int_min", (1, (-1,))),
    ("model.d_model", "int_min", (1, ())), ("model.n_layer", "int_min", (1, ())),
    ("model.n_head", "int_min", (1, ())), ("model.d_head", "int_min", (1, ())),
    ("model.d_inner", "int_min", (1, ())), ("model.mem_len", "int_min", (0, ())),
    ("train.learning_rate", "float_range", (0.0, 10.0, True, False)),
    ("train.warmup_fraction", "float_range", (0.0, 1.0, False, False)),
    ("train.weight_decay", "float_range", (0.0, 1.0, False, False)),
    ("train.b1", "float_range", (0.0, 1.0, False, True)),
    ("train.b2", "float_range", (0.0, 1.0, False, True)),
    ("train.eps", "float_range", (0.0, 1.0, True, False)),
    ("train.grad_clip_norm", "float_range", (0.0, 1e9, False, False)),
    ("train.label_smoothing", "float_range", (0.0, 1.0, False, True)),
    ("data.mlm_prob", "float_range", (0.0, 1.0, True, True)),
    ("data.kg_weight", "float_range", (0.0, 1e3, False, False)),
    ("checkpoint.sigterm_grace_secs", "float_range", (0.0, 1e6, True, False)),
    ("model.dropout", "float_range", (0.0, 1.0, False, True)),
    ("model.dropatt", "float_range", (0.0, 1.0, False, True)),
    ("train.schedule", "choice", ()), ("data.tokenizer_type", "choice", ()),
    ("model.attention", "choice", ()), ("model.activation", "choice", ()),
    ("model.dtype", "choice", ()),
    ("train.skip_nonfinite", "bool", ()), ("data.nsp", "bool", ()),
    ("checkpoint.async_save", "bool", ()),
)


def invalid_value(kind: str, args: tuple, rng: random.Random) -> str:
  """A command-line value that is invalid for a key of this kind."""
  if kind == "int_min":
    minimum, allowed = args
    choices = [str(v) for v in (minimum - rng.randint(1, 10**6), minimum - 1) if v not in allowed]
    return rng.choice(choices + ["abc", "1.5", "True", "", "1e3"])
  if kind == "float_range":
    low, high, low_open, high_open = args
    choices = ["nan", "inf", "-inf", "abc", repr(low - rng.uniform(1e-6, 1e6)),
               repr(high + rng.uniform(1e-6, 1e6))]
    if low_open:
      choices.append(repr(low))
    if high_open:
      choices.append(repr(high))
    return rng.choice(choices)
  if kind == "choice":
    return rng.choice(["", "linear ", "COSINE", "relu7", "float8", "sideways", "x" * 40, "none"])
  return rng.choice(["maybe", "2", "yes please", "-1", "nan"])


def parse_command_line(overrides: list[str]):
  """The config the real flag parser builds from configs/pretrain.py:variant=tiny + overrides."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ["r1jax.main", f"--config={config_path()}:variant=tiny", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


_COMPILES: list[str] = []


def _compile_listener(name, *args, **kwargs):
  del args, kwargs
  if "compile" in name:
    _COMPILES.append(name)


def install_compile_listener() -> list[str]:
  import jax  # pylint: disable=g-import-not-at-top
  if not getattr(install_compile_listener, "done", False):
    jax.monitoring.register_event_duration_secs_listener(_compile_listener)
    install_compile_listener.done = True
  return _COMPILES


def config_trial(key: str, value: str, workdir: str) -> str | None:
  """Runs the stage with one bad override; None if it failed well, else what went wrong."""
  from r1jax.stages import pretrain  # pylint: disable=g-import-not-at-top
  compiles = install_compile_listener()
  before = len(compiles)
  override = f"--config.{key}={value}"
  try:
    config = parse_command_line([override])
    pretrain.run(config, workdir)
  except Exception as e:  # pylint: disable=broad-except
    message = str(e)
  else:
    return f"{override}: accepted"
  problems = []
  field = key.split(".")[-1]
  if key not in message and not (key.startswith("model.") and
                                 f"TransformerXLConfig.{field}" in message) and field not in message:
    problems.append(f"message does not name {key}: {message[:200]!r}")
  if len(compiles) != before:
    problems.append(f"compiled {compiles[before:]} before failing")
  if os.path.exists(workdir):
    problems.append("wrote the workdir before failing")
  return f"{override}: " + "; ".join(problems) if problems else None


def run_config_campaign(trials: int, rng: random.Random, scratch: str) -> dict[str, Any]:
  problems = []
  for i in range(trials):
    key, kind, args = CONFIG_KEYS[i % len(CONFIG_KEYS)] if i < len(CONFIG_KEYS) else (
        rng.choice(CONFIG_KEYS))
    value = invalid_value(kind, args, rng)
    problem = config_trial(key, value, os.path.join(scratch, f"cfg{i}"))
    if problem:
      problems.append(problem)
  # Typos of real keys, and impossible combinations.
  extra = [("train.lerning_rate", "0.1"), ("model.d_modle", "64"), ("checkpoint.every", "5"),
           ("mesh.data", "16"), ("train.batch_size", "6"), ("data.worker_count", "3"),
           ("model.vocab_size", "10")]
  for key, value in extra:
    problem = config_trial(key, value, os.path.join(scratch, f"cfg_{key}"))
    if problem:
      problems.append(problem)
  tried = trials + len(extra)
  return {"tried": tried, "failed_well": tried - len(problems), "problems": problems}


# --------------------------------------------------------------------------------------------------
# Lock races.

LOCK_RACE = r"""
import json, sys, time
from r1jax.train import checkpoint as ckpt_lib
workdir, t0, trials, gap = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
for t in range(trials):
  time.sleep(max(0.0, t0 + t * gap - time.time()))
  try:
    lock = ckpt_lib.WorkdirLock(workdir).acquire()
  except ckpt_lib.WorkdirLocked:
    print(json.dumps({"trial": t, "won": False}), flush=True)
    continue
  print(json.dumps({"trial": t, "won": True}), flush=True)
  time.sleep(gap / 2)
  lock.release()
"""


def run_lock_races(contenders: int, trials: int, scratch: str) -> dict[str, Any]:
  """`contenders` processes take over the same stale lock at the same instant, `trials` times."""
  import socket  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(scratch, "race")
  os.makedirs(workdir, exist_ok=True)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  stale = json.dumps({"pid": dead.pid, "host": socket.gethostname(), "start_time": "1"})
  gap = 3.0
  t0 = time.time() + 25.0  # after every contender has imported jax
  env = dict(os.environ, PYTHONPATH=SOURCE["root"] + os.pathsep + os.environ.get("PYTHONPATH", ""))
  procs = [subprocess.Popen([sys.executable, "-c", LOCK_RACE, workdir, str(t0), str(trials),
                             str(gap)], env=env, stdout=subprocess.PIPE, text=True)
           for _ in range(contenders)]
  for t in range(trials):  # a fresh stale lock before each trial
    time.sleep(max(0.0, t0 + t * gap - 1.0 - time.time()))
    with open(os.path.join(workdir, ".lock"), "w") as f:
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


# --------------------------------------------------------------------------------------------------
# Fuzz (the properties of tests/test_fuzz.py with a bigger budget).


def run_fuzz(examples_per_property: int, seed: int) -> dict[str, Any]:
  import hypothesis  # pylint: disable=g-import-not-at-top
  from hypothesis import strategies as st  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("r1jax_test_fuzz",
                                                os.path.join(ROOT, "tests", "test_fuzz.py"))
  fuzz = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fuzz)
  from r1jax.data import builtin  # pylint: disable=g-import-not-at-top
  from r1jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.Tokenizer.train(builtin.texts("general")[:3000], 400)
  totals = collections.Counter()
  settings = hypothesis.settings(max_examples=examples_per_property, deadline=None, database=None,
                                 suppress_health_check=list(hypothesis.HealthCheck))

  def count(name, result=None):
    totals["inputs"] += 1
    totals[f"inputs:{name}"] += 1
    if isinstance(result, dict):
      for k in ("in", "out", "dropped"):
        totals[f"docs_{k}"] += result.get(k, 0)
      if result.get("complete", 1):
        totals["docs_lost"] += result.get("in", 0) - result.get("out", 0) - result.get("dropped", 0)

  scratch = tempfile.mkdtemp()
  properties = {
      "cleaning": (fuzz.CORPUS, lambda items: fuzz.check_cleaning(items)),
      "source_files": (st.tuples(fuzz.FILE_BYTES, st.sampled_from(["txt", "jsonl", "csv", "tsv"])),
                       lambda a: fuzz.check_source_file(a[0], a[1], scratch)),
      "tokenizer": (fuzz.TEXT, lambda text: fuzz.check_tokenizer(tok, text)),
      "pretrain_stream": (
          st.tuples(st.lists(st.one_of(fuzz.SHORT_TEXT, fuzz.LONG_LINE.map(lambda t: t[:600])),
                             max_size=7), st.integers(8, 24), st.integers(1, 4), st.booleans(),
                    st.booleans(), st.floats(0.05, 0.95), st.integers(0, 2**31 - 1)),
          lambda a: fuzz.check_pretrain_stream(tok, a[0], seq_len=a[1], batch_size=a[2], nsp=a[3],
                                               whole_word=a[4], mlm_prob=a[5], seed=a[6],
                                               max_steps=3000)),
      "classification": (
          st.lists(st.fixed_dictionaries({"text": fuzz.TEXT, "label": st.sampled_from("ab")}),
                   min_size=1, max_size=10),
          lambda records: fuzz.check_classification(tok, records)),
      "knowledge": (st.tuples(st.lists(fuzz.SHORT_TEXT, max_size=6), fuzz.TEXT),
                    lambda a: fuzz.check_knowledge(a[0], a[1])),
  }
  def make_property(name, strategy, check):
    @hypothesis.seed(seed)
    @settings
    @hypothesis.given(strategy)
    def prop(value):
      count(name, check(value))
    return prop

  failures = []
  for name, (strategy, check) in properties.items():
    try:
      make_property(name, strategy, check)()
    except Exception as e:  # pylint: disable=broad-except  (hypothesis re-raises the minimal case)
      failures.append(f"{name}: {type(e).__name__}: {str(e)[:500]}")
  shutil.rmtree(scratch, ignore_errors=True)
  return {"inputs_tried": totals["inputs"],
          "per_property": {k.split(":", 1)[1]: v for k, v in totals.items() if k.startswith("inputs:")},
          "documents_in": totals["docs_in"], "documents_out": totals["docs_out"],
          "documents_dropped": totals["docs_dropped"], "documents_lost": totals["docs_lost"],
          "problems": failures}


# --------------------------------------------------------------------------------------------------
# Main.


def prepare_tokenizer(path: str) -> str:
  from r1jax.data import builtin  # pylint: disable=g-import-not-at-top
  from r1jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    tokenizer_lib.Tokenizer.train(builtin.texts("general"), 1000).save(path)
  return path


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--kills", type=int, default=24)
  parser.add_argument("--steps", type=int, default=64, help="num_steps of the pretraining run")
  parser.add_argument("--corruptions", type=int, default=40)
  parser.add_argument("--e2e-corruptions", type=int, default=2)
  parser.add_argument("--nan", type=int, default=2, help="NaN injection trials")
  parser.add_argument("--configs", type=int, default=120)
  parser.add_argument("--races", type=int, default=4, help="lock race trials (6 contenders)")
  parser.add_argument("--fuzz", type=int, default=500, help="examples per fuzz property")
  parser.add_argument("--workdir", default="", help="keep everything here (default: a temp dir)")
  parser.add_argument("--out", default="", help="write the results as JSON here")
  parser.add_argument("--no-snapshot", action="store_true",
                      help="test the checkout as it is now (default: a copy taken at the start)")
  args = parser.parse_args(argv)
  set_cpu_devices(8)

  rng = random.Random(args.seed)
  root = args.workdir or tempfile.mkdtemp(prefix="r1jax_faults_")
  os.makedirs(root, exist_ok=True)
  if not args.no_snapshot:
    snapshot_source(os.path.join(root, "src"))
  results: dict[str, Any] = {"seed": args.seed}
  started = time.time()

  def section(name):
    print(f"[{time.time() - started:7.1f} s] {name}", flush=True)

  harness = Harness(tokenizer=prepare_tokenizer(os.path.join(root, "tokenizer.model")),
                    cache_dir=os.path.join(root, "jax_cache"), num_steps=args.steps)
  section("reference run (uninterrupted)")
  reference = os.path.join(root, "reference")
  shutil.rmtree(reference, ignore_errors=True)
  t = time.time()
  code, text = harness.run(reference, os.path.join(root, "reference.log"))
  if code != 0:
    raise RuntimeError(f"reference run failed:\n{text[-3000:]}")
  results["reference_secs"] = round(time.time() - t, 1)

  if args.kills:
    section(f"kill campaign: {args.kills} interruptions")
    workdir, snapshot = os.path.join(root, "killed"), os.path.join(root, "killed_snapshot")
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(snapshot, ignore_errors=True)
    campaign = run_kill_campaign(harness, reference, workdir, os.path.join(root, "kill_logs"),
                                 kills=args.kills, rng=rng, snapshot_to=snapshot,
                                 typical_secs=results.get("reference_secs", 20.0))
    c = campaign.counts
    results["kills"] = {
        "tried": c["kills_tried"],
        "survived": campaign.survived(),
        "final_run_identical_to_reference": not campaign.final_problems,
        "finished_before_all_kills": campaign.finished_early,
        "left_half_written_checkpoint": c["kills_leaving_half_written_checkpoint"],
        "preemptions_saved_and_exited_in_grace": f"{c['sigterm_ok']}/{c['sigterm_tried']}",
        "preemptions_over_grace_exited": (f"{c['sigterm_short_grace_ok']}/"
                                          f"{c['sigterm_short_grace_tried']}"),
        "second_runs_refused": f"{c['second_run_refused']}/{c['second_run_tried']}",
        "attempts": [dataclasses.asdict(a) for a in campaign.attempts],
        "problems": campaign.problems}
    if args.e2e_corruptions and os.path.exists(snapshot):
      section(f"end-to-end corruption: {args.e2e_corruptions} reruns")
      problems = []
      for i in range(args.e2e_corruptions):
        kind = ("truncate", "flip_bytes", "delete_item")[i % 3]
        problems += end_to_end_corruption(harness, snapshot, reference,
                                          os.path.join(root, f"e2e_corrupt{i}"), rng, kind)
      results["e2e_corruptions"] = {"tried": args.e2e_corruptions, "problems": problems}

  if args.corruptions:
    section(f"corruption campaign: {args.corruptions} trials")
    results["corruptions"] = run_corruption_campaign(
        os.path.join(reference, "checkpoints"), args.corruptions, rng)

  if args.nan:
    section(f"NaN injection: {args.nan} trials")
    problems = []
    for i in range(args.nan):
      kind = ("nan_weights", "bad_tokens")[i % 2]
      problems += nan_trial(harness, reference, root, kind, rng.randint(2, args.steps - 1))
    results["nan"] = {"tried": args.nan, "caught": args.nan if not problems else None,
                      "problems": problems}

  if args.configs:
    section(f"invalid configs: {args.configs} random overrides")
    results["configs"] = run_config_campaign(args.configs, rng, os.path.join(root, "configs"))

  if args.races:
    section(f"lock races: {args.races} trials")
    results["lock_races"] = run_lock_races(6, args.races, root)

  if args.fuzz:
    section(f"fuzz: {args.fuzz} examples per property")
    results["fuzz"] = run_fuzz(args.fuzz, args.seed)

  results["wall_secs"] = round(time.time() - started, 1)
  print_summary(results)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2, default=str)
  return results


def print_summary(r: dict[str, Any]) -> None:
  print("\n=== fault campaign (seed %d, %.0f s) ===" % (r["seed"], r["wall_secs"]))
  if "kills" in r:
    k = r["kills"]
    print(f"kills survived / tried:            {k['survived']} / {k['tried']} "
          f"({k['left_half_written_checkpoint']} left a half-written checkpoint; final run "
          f"{'identical to' if k['final_run_identical_to_reference'] else 'DIFFERENT from'} the "
          f"uninterrupted one)")
    print(f"preemptions saved+exited in grace: {k['preemptions_saved_and_exited_in_grace']}; "
          f"over-grace exits: {k['preemptions_over_grace_exited']}")
    print(f"second runs refused:               {k['second_runs_refused']}")
  if "e2e_corruptions" in r:
    e = r["e2e_corruptions"]
    print(f"end-to-end corrupt-and-rerun:      {e['tried'] - len(e['problems'])} / {e['tried']} ok")
  if "corruptions" in r:
    c = r["corruptions"]
    print(f"corruptions detected / tried:      {c['detected']} / {c['tried']} "
          f"(outcomes {c['outcomes']})")
  if "nan" in r:
    n = r["nan"]
    print(f"NaN injections caught / tried:     {n['caught'] if n['caught'] is not None else 'NOT ALL'}"
          f" / {n['tried']}")
  if "configs" in r:
    print(f"invalid configs failed well:       {r['configs']['failed_well']} / {r['configs']['tried']}")
  if "lock_races" in r:
    lr = r["lock_races"]
    print(f"lock races with exactly 1 winner:  {lr['exactly_one_winner']} / {lr['trials']} "
          f"({lr['contenders']} contenders)")
  if "fuzz" in r:
    f = r["fuzz"]
    print(f"fuzz inputs tried:                 {f['inputs_tried']} {f['per_property']}")
    print(f"documents in / out / dropped / lost: {f['documents_in']} / {f['documents_out']} / "
          f"{f['documents_dropped']} / {f['documents_lost']}")
  for name in ("kills", "e2e_corruptions", "corruptions", "nan", "configs", "lock_races", "fuzz"):
    for p in (r.get(name) or {}).get("problems", []):
      print(f"PROBLEM [{name}] {p}")


if __name__ == "__main__":
  main()
