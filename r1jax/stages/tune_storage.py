"""Where a hyperparameter study lives and how several workers share it.

    lock = tune_storage.make_lock(config, workdir)          # DIR/study.lock, or one in the database
    with lock:
      storage = tune_storage.make_storage(config, workdir)  # config.storage: SQLite, journal, URL
    ran = tune_storage.run_trials(study, lock, n_trials, objective)  # until the budget is used

The budget is checked and the next trial created while holding the study's lock; the objective
releases it once its trial is RUNNING and recorded, so a trial counts before any other worker
looks. With SQLite or a journal file (workers sharing DIR) the lock is the file DIR/study.lock
(`StudyLock`); with a PostgreSQL URL it is a session-level advisory lock in the database itself
(`DatabaseLock`), so workers on any number of machines that share only the URL never overrun the
budget, and a worker that dies holding it releases it with its connection.

A trial records its worker (`run_dir.process_info()`: host, pid, process start time). A RUNNING
trial whose worker is gone is marked FAILED (user attr `fail_reason`) and re-queued as a WAITING
copy with the same parameters and user attr `retry_of`; on this host that is seen at once (the
process is gone), elsewhere by the database heartbeat (`heartbeat_secs`). A failed-and-requeued
trial does not count towards the budget, its retry does.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
import warnings
from typing import Callable, Iterable, Iterator, Sequence

from absl import logging
import ml_collections
import optuna
from optuna.trial import TrialState
import sqlalchemy

from r1jax import configlib
from r1jax import errors
from r1jax import run_dir

STUDY_LOCK = "study.lock"
# The extra that installs each database's driver (SQLAlchemy's default driver for the dialect).
DRIVER_EXTRAS = {"postgresql": "postgres"}
CONNECT_TIMEOUT_SECS = 15  # a server that does not answer: give up and say so
LOCK_WAIT_WARNING_SECS = 60


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


def masked(url: str) -> str:
  """`url` with its password as ***, for messages and reports."""
  try:
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
  except (sqlalchemy.exc.ArgumentError, ValueError):
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _dialect(url: str) -> str:
  return sqlalchemy.engine.make_url(url).get_backend_name()


def url_problem(url: str) -> str | None:
  """Why the database URL `url` cannot be opened from this installation (no connection tried):
  not a SQLAlchemy URL, an unknown database, or its driver missing (naming the extra)."""
  hint = ("a SQLAlchemy database URL such as postgresql://USER:PASSWORD@HOST:5432/DB or "
          "sqlite:///PATH/study.db")
  try:
    parsed = sqlalchemy.engine.make_url(url)
    dialect = parsed.get_dialect()
  except sqlalchemy.exc.NoSuchModuleError:
    scheme = url.split("://", 1)[0]
    fix = " (write postgresql://)" if scheme == "postgres" else ""
    return f"{masked(url)}: SQLAlchemy knows no database {scheme!r}{fix}; use {hint}."
  except (sqlalchemy.exc.ArgumentError, ValueError) as e:
    return f"{masked(url)} is not a database URL ({e}); use {hint}."
  try:
    dialect.import_dbapi()
  except ImportError as e:
    extra = DRIVER_EXTRAS.get(parsed.get_backend_name())
    if extra:
      return str(errors.missing_extra(e, extra=extra, what=f"The study database {masked(url)}"))
    return (f"The study database {masked(url)} needs the Python driver {e.name or dialect.driver}, "
            f"which is not installed: pip install it, or name another driver in the URL.")
  return None


def _engine_kwargs(url: str) -> dict:
  if url.startswith("sqlite"):
    # Several processes on one SQLite file: wait for the write lock instead of failing with
    # "database is locked".
    return {"connect_args": {"timeout": 600}}
  kwargs: dict = {"pool_pre_ping": True}
  if _dialect(url) == "postgresql":
    kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_SECS}
  return kwargs


@contextlib.contextmanager
def _reaching(url: str) -> Iterator[None]:
  """Turns a failure to connect to (or set up) the study database into one ConfigError naming the
  URL (password masked), the server's answer and the fix."""
  try:
    yield
  except sqlalchemy.exc.OperationalError as e:
    answer = " ".join(str(getattr(e, "orig", None) or e).split()).rstrip(".")
    answer += "" if answer.endswith("?") else "."
    raise configlib.ConfigError(
        f"Cannot open the study database {masked(url)}: {answer} Fix --config.storage (user, "
        f"password, host, port and database of a running server, e.g. "
        f"postgresql://USER:PASSWORD@HOST:5432/DB; the database must exist), or start the "
        f"server.") from None


def make_storage(config: ml_collections.ConfigDict, workdir: str) -> optuna.storages.BaseStorage:
  kind, where = storage_spec(config.storage, workdir)
  if kind == "journal":
    os.makedirs(os.path.dirname(where), exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(where))
  beat = config.heartbeat_secs or None
  with warnings.catch_warnings(), _reaching(where):
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    return optuna.storages.RDBStorage(
        where, engine_kwargs=_engine_kwargs(where), heartbeat_interval=beat,
        grace_period=3 * beat if beat else None,
        heartbeat_stale_trial_callback=requeue if beat else None)


def make_lock(config: ml_collections.ConfigDict, workdir: str) -> "StudyLock | DatabaseLock":
  """The lock that makes the budget check and the next trial's creation one step: in the database
  for PostgreSQL (workers anywhere), else DIR/study.lock (workers sharing DIR)."""
  kind, where = storage_spec(config.storage, workdir)
  if kind == "rdb" and not where.startswith("sqlite"):
    if _dialect(where) == "postgresql":
      return DatabaseLock(where, config.study_name)
    logging.warning("Study database %s: the budget is enforced by DIR/study.lock, so workers with "
                    "other workdirs may overrun it by one trial each (the lock in the database "
                    "needs PostgreSQL).", masked(where))
  return StudyLock(workdir)


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


class DatabaseLock:
  """A PostgreSQL session-level advisory lock on (r1jax tune, study name): StudyLock's role for
  workers that share only the database URL.

  Held on a connection of its own (not optuna's pool), opened by `acquire` and closed by
  `release`: the server releases the lock when that connection ends, so a worker killed while
  holding it leaves nothing behind. Waiting polls pg_try_advisory_lock and logs every minute the
  holder's client (its application_name names host and pid). Acquiring again while held is a no-op.
  """

  def __init__(self, url: str, study_name: str):
    self.url = url
    digest = hashlib.blake2b(f"r1jax.tune:{study_name}".encode(), digest_size=8).digest()
    self.key = int.from_bytes(digest, "big", signed=True)  # pg advisory locks take a bigint
    info = run_dir.process_info()
    self._engine = sqlalchemy.create_engine(
        url, poolclass=sqlalchemy.pool.NullPool, connect_args={
            "connect_timeout": CONNECT_TIMEOUT_SECS,
            "application_name": f"r1jax tune {info['host']} pid {info['pid']}"[:63]})
    self._conn: sqlalchemy.Connection | None = None

  @property
  def held(self) -> bool:
    return self._conn is not None

  def _holder(self, conn: sqlalchemy.Connection) -> str:
    row = conn.execute(sqlalchemy.text(
        "SELECT a.application_name, a.client_addr, a.pid FROM pg_locks l JOIN pg_stat_activity a "
        "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :hi AND "
        "l.objid = :lo AND l.objsubid = 1"),
        {"hi": (self.key >> 32) & 0xFFFFFFFF, "lo": self.key & 0xFFFFFFFF}).first()
    return (f"{row[0] or 'a client'} from {row[1] or 'a local socket'} (server pid {row[2]})"
            if row else "nobody any more")

  def acquire(self, timeout: float | None = None) -> "DatabaseLock":
    """Waits for the lock (at most `timeout` seconds, then returns with `held` False)."""
    if self.held:
      return self
    with _reaching(self.url):
      conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
      started = warned = time.monotonic()
      try_lock = sqlalchemy.text("SELECT pg_try_advisory_lock(:key)")
      while not conn.execute(try_lock, {"key": self.key}).scalar():
        if timeout is not None and time.monotonic() - started >= timeout:
          conn.close()
          return self
        if time.monotonic() - warned > LOCK_WAIT_WARNING_SECS:
          logging.warning("Still waiting for study lock %d in %s, held by %s.", self.key,
                          masked(self.url), self._holder(conn))
          warned = time.monotonic()
        time.sleep(0.05)
    except BaseException:
      conn.close()
      raise
    self._conn = conn
    return self

  def release(self) -> None:
    if self._conn is None:
      return
    conn, self._conn = self._conn, None
    try:
      conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
    finally:
      conn.close()  # ends the session, which would release the lock anyway

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def run_trials(study: optuna.Study, lock: "StudyLock | DatabaseLock", n_trials: int,
               objective: Callable[[optuna.Trial], float], *, timeout_secs: float = 0.0,
               catch: Sequence[type[Exception]] = (),
               callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = (),
               gc_after_trial: bool = True) -> int:
  """Runs trials one at a time until the study's budget (`budget_used` >= n_trials, over every
  worker) is used or `timeout_secs` (0 = none) have passed; returns how many this worker ran.
  `catch`, `callbacks` and `gc_after_trial` are `study.optimize`'s.

  Each round takes `lock`, re-queues dead workers' trials, counts the budget and starts a trial;
  `objective` must call `lock.release()` as soon as its trial is RUNNING and recorded, so no other
  worker counts the budget between this count and that trial.
  """
  started, ran = time.time(), 0
  while True:
    if timeout_secs and time.time() - started > timeout_secs:
      logging.info("timeout_secs=%g reached; starting no more trials.", timeout_secs)
      return ran
    lock.acquire()
    try:
      recover_trials(study)
      if budget_used(study.get_trials(deepcopy=False)) >= n_trials:
        return ran
      study.optimize(objective, n_trials=1, catch=tuple(catch), gc_after_trial=gc_after_trial,
                     callbacks=list(callbacks))
      ran += 1
    finally:
      lock.release()


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
