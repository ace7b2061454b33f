"""Where a hyperparameter study lives and how several workers share it.

    storage = tune_storage.make_storage(config, workdir)   # config.storage: SQLite, journal, URL
    with tune_storage.StudyLock(workdir):   # the budget check and the next trial's creation
      tune_storage.recover_trials(study)    # dead workers' RUNNING trials: FAILED and re-queued
      used = tune_storage.budget_used(study.get_trials(deepcopy=False))

A trial records its worker (`run_dir.process_info()`: host, pid, process start time). A RUNNING
trial whose worker is gone is marked FAILED (user attr `fail_reason`) and re-queued as a WAITING
copy with the same parameters and user attr `retry_of`; on this host that is seen at once (the
process is gone), elsewhere by the database heartbeat (`heartbeat_secs`). A failed-and-requeued
trial does not count towards the budget, its retry does.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Iterable

from absl import logging
import ml_collections
import optuna
from optuna.trial import TrialState

from r1jax import run_dir

STUDY_LOCK = "study.lock"


def storage_spec(storage: str, workdir: str) -> tuple[str, str]:
  """("rdb", URL) or ("journal", PATH) for config.storage; ValueError for anything else."""
  if not storage:
    return "rdb", f"sqlite:///{os.path.join(workdir, 'study.db')}"
  if storage == "journal":
    return "journal", os.path.join(workdir, "study.journal")
  if storage.startswith("journal:"):
    path = storage[len("journal:"):]
    if not path:
      raise ValueError("'journal:' needs a file path, e.g. journal:/shared/study.journal.")
    return "journal", os.path.abspath(os.path.expanduser(path))
  if "://" in storage:
    return "rdb", storage
  raise ValueError(f"{storage!r} is not '' (sqlite:///DIR/study.db), 'journal' (DIR/study.journal), "
                   f"'journal:PATH' or a database URL such as postgresql://user:pass@host/db or "
                   f"sqlite:///path/study.db.")


def make_storage(config: ml_collections.ConfigDict, workdir: str) -> optuna.storages.BaseStorage:
  kind, where = storage_spec(config.storage, workdir)
  if kind == "journal":
    os.makedirs(os.path.dirname(where), exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(where))
  if where.startswith("sqlite"):
    # Several processes on one SQLite file: wait for the write lock instead of failing with
    # "database is locked".
    engine_kwargs = {"connect_args": {"timeout": 600}}
  else:
    engine_kwargs = {"pool_pre_ping": True}
  beat = config.heartbeat_secs or None
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    return optuna.storages.RDBStorage(
        where, engine_kwargs=engine_kwargs, heartbeat_interval=beat,
        grace_period=3 * beat if beat else None,
        heartbeat_stale_trial_callback=requeue if beat else None)


class StudyLock(run_dir.WorkdirLock):
  """DIR/study.lock, held while the budget is checked and the next trial is created (the objective
  releases it as soon as its trial is RUNNING).

  A `run_dir.WorkdirLock` (file with the holder's pid, host and start time; a dead holder on this
  host is taken over) that waits for a live holder instead of raising WorkdirLocked, since every
  worker of a study takes it in turn; acquiring it again while held is a no-op. A holder on another
  host (workers sharing DIR over a network file system) cannot be checked for liveness: it is
  waited for, with a warning every minute naming the lock to delete if that worker is gone.
  """

  def __init__(self, workdir: str):
    super().__init__(workdir, STUDY_LOCK)

  def acquire(self) -> "StudyLock":
    warned = time.monotonic()
    while not self.held:
      try:
        super().acquire()
      except run_dir.WorkdirLocked as e:
        if time.monotonic() - warned > 60:
          logging.warning("Still waiting for the study lock: %s", e)
          warned = time.monotonic()
        time.sleep(0.05)
    return self


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial,
            reason: str = "its worker stopped sending heartbeats") -> None:
  """Re-queues a trial whose worker died: a WAITING copy (same parameters and intermediate values)
  with user attr retry_of=<its number>. Also optuna's failed_trial_callback for heartbeats."""
  attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("worker", "fail_reason")}
  attrs["retry_of"] = trial.number
  study.add_trial(optuna.trial.create_trial(
      state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
      user_attrs=attrs, intermediate_values=trial.intermediate_values))
  logging.warning("Trial %d failed because %s: re-queued with the same parameters (the retry "
                  "resumes from the trial's last checkpoint).", trial.number, reason)


def recover_trials(study: optuna.Study) -> list[int]:
  """Marks FAILED and re-queues the RUNNING trials of dead processes on this host (SIGKILL, a
  crash, SIGTERM's SystemExit), and re-queues interrupted (Ctrl-C) ones; returns their numbers."""
  host, failed = run_dir.process_info()["host"], []
  storage = study._storage  # pylint: disable=protected-access
  study_id = storage.get_study_id_from_name(study.study_name)
  trials = study.get_trials(deepcopy=False)
  retried = {t.user_attrs.get("retry_of") for t in trials}
  for t in trials:
    if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried:
      requeue(study, t, "it was interrupted")
      failed.append(t.number)
  for t in trials:
    if t.state != TrialState.RUNNING:
      continue
    worker = t.user_attrs.get("worker") or {}
    if worker.get("host") != host or worker.get("pid") == os.getpid():
      continue
    if run_dir.proc_alive(int(worker["pid"]), worker.get("start_time")):
      continue
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
    try:
      storage.set_trial_user_attr(trial_id, "fail_reason",
                                  f"worker pid {worker['pid']} on {host} died")
      storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
      continue  # finished meanwhile
    requeue(study, t, f"its worker (pid {worker['pid']}) is gone")
    failed.append(t.number)
  return failed


def budget_used(trials: Iterable[optuna.trial.FrozenTrial]) -> int:
  """Trials that count towards n_trials: finished or running, except failures that were requeued
  (their retry counts instead). WAITING trials count once they run."""
  trials = list(trials)
  retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
  return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED,
                                              TrialState.RUNNING)
             or (t.state == TrialState.FAIL and t.number not in retried))
