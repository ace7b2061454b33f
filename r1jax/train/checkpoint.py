"""Checkpoints that resume exactly and are never restored half-written; preemption; workdir lock.

Layout of `DIR/checkpoints/<step>/` (one Orbax `CheckpointManager` step):
- `params/`  the parameters (restorable alone: `restore_params`, used by `init_from`);
- `train/`   everything else in the TrainState: step, opt_state, rng, extras (memory), skips;
- `data/`    the data iterator state, one JSON file per process (Grain `get_state()`);
- `meta/`    JSON: host-side loop state (log window sums, best eval, patience) and a checksum of every
             state leaf, recomputed and compared on restore.

Safety:
- Orbax writes each step to a temporary directory and renames it when complete (atomic finalize), so a
  process killed mid-save leaves only a tmp dir that is ignored and cleaned up.
- `restore()` goes from the newest step backwards: a step that fails to read, or whose restored values
  do not match the saved checksums, is skipped with a warning naming it and the step used instead.
  The JSON items (meta/, data/) carry a sha256 of their content, so a damaged loop or iterator
  state is a failed read too. Skipped steps are renamed `<step>.unrestorable` (kept for inspection),
  so the resumed run can save those steps again.
- A target whose shapes differ from the saved ones raises ValueError naming the leaf and both shapes.
- `PreemptionWatcher` turns SIGTERM into "save now, then exit" (`Preempted`, exit code 143) and
  hard-exits if that takes longer than the grace period.
- `WorkdirLock` (DIR/.lock: pid + host) refuses a second live run on the same workdir and takes over
  a lock left by a dead process.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging as std_logging
import os
import signal
import socket
import threading
import time
from typing import Any, Mapping

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from r1jax.train import optim
from r1jax.train.state import TrainState


class _BenignOrbaxNotices(std_logging.Filter):
  """Drops Orbax's warnings about what r1jax does on purpose: reading only the `params` item of a
  checkpoint that also holds train/data/meta items, through a read-only manager. A pipeline run
  printed 136 of them; every other Orbax message still gets through."""
  BENIGN = ("was found in the checkpoint, but could not be restored",
            "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0",
            "Given directory is read only=")

  def filter(self, record: std_logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(text in message for text in self.BENIGN)


std_logging.getLogger("absl").addFilter(_BenignOrbaxNotices())

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class Preempted(SystemExit):
  """Raised after the preemption checkpoint is saved; exits the process with code 143."""

  def __init__(self, step: int):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.step = step

  def __str__(self):
    return f"preempted (SIGTERM): saved step {self.step}; rerun the same command to resume"


class WorkdirLocked(RuntimeError):
  """Another live run holds the workdir."""


class CheckpointShapeError(ValueError):
  """A checkpoint's shapes do not match the model being restored into."""


# ------------------------------------------------------------------------------------------------
# Data iterator state: one JSON file per process (Grain iterators are per-process).


def json_digest(value: Any) -> str:
  """sha256 of the canonical JSON of `value` (what a JSON item must still hash to when read)."""
  text = json.dumps(value, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


class IteratorStateHandler(ocp.CheckpointHandler):
  """Saves/restores a JSON-able iterator state as `process_<i>-of-<n>.json`, with its digest
  (`{"state": ..., "sha256": ...}`) so that a damaged file is not restored as a wrong position."""

  def save(self, directory: epath.Path, args: "IteratorStateSave"):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    wrapped = {"state": args.state, "sha256": json_digest(args.state)}
    (directory / name).write_text(json.dumps(wrapped, sort_keys=True))

  def restore(self, directory: epath.Path, args: "IteratorStateRestore | None" = None):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    path = directory / name
    if not path.exists():
      raise FileNotFoundError(f"{path} is missing: the checkpoint was written by a different number "
                              f"of processes, or is incomplete.")
    data = json.loads(path.read_text())
    if isinstance(data, dict) and set(data) == {"state", "sha256"}:
      if json_digest(data["state"]) != data["sha256"]:
        raise ValueError(f"{path} is corrupt: its content does not match its sha256.")
      return data["state"]
    return data  # written before digests were added

  def metadata(self, directory: epath.Path):
    return None

  def structure(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
  pass


# ------------------------------------------------------------------------------------------------
# Checksums: a uint32 sum of each leaf's bit pattern, exact and independent of the sharding.


def _leaf_checksum(x: jax.Array) -> jax.Array:
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  elif jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    words = jax.random.key_data(x).astype(jnp.uint32)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  # Weighting by a position-dependent odd factor also catches swapped or shifted chunks.
  weights = (jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2654435761)) | jnp.uint32(1)
  return jnp.sum(words.reshape(-1) * weights, dtype=jnp.uint32)


@jax.jit
def _checksums(tree: Any) -> Any:
  return jax.tree.map(_leaf_checksum, tree)


def checksums(tree: Any) -> dict[str, int]:
  """{leaf path: uint32 checksum} for every array leaf of `tree` (one small host fetch per set of
  devices the leaves live on; normally one)."""
  groups: dict[Any, list[tuple[str, Any]]] = {}
  for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    sharding = getattr(x, "sharding", None)
    key = None if sharding is None else frozenset(d.id for d in sharding.device_set)
    groups.setdefault(key, []).append((optim.path_str(p), x))
  out = {}
  for items in groups.values():
    sums = jax.device_get(_checksums([x for _, x in items]))
    out.update({path: int(v) for (path, _), v in zip(items, sums)})
  return out


def _split(state: TrainState) -> tuple[Any, dict[str, Any]]:
  return state.params, {"step": state.step, "opt_state": state.opt_state, "rng": state.rng,
                        "extras": state.extras, "nonfinite_skips": state.nonfinite_skips}


def _join(params: Any, train: Mapping[str, Any]) -> TrainState:
  return TrainState(params=params, **train)


def _check_shapes(saved: Any, target: Any, what: str, step: int) -> None:
  """Raises CheckpointShapeError naming every leaf whose saved shape differs from the target's."""
  saved_flat = {optim.path_str(p): getattr(m, "shape", None)
                for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
  problems = []
  for p, t in jax.tree_util.tree_flatten_with_path(target)[0]:
    path = optim.path_str(p)
    if path not in saved_flat:
      problems.append(f"{path}: missing in the checkpoint (model expects {tuple(t.shape)})")
    elif saved_flat[path] is not None and tuple(saved_flat[path]) != tuple(t.shape):
      problems.append(f"{path}: checkpoint has {tuple(saved_flat[path])}, model expects "
                      f"{tuple(t.shape)}")
  if problems:
    raise CheckpointShapeError(
        f"Checkpoint step {step} ({what}) does not fit the model: {len(problems)} leaf/leaves "
        f"differ:\n  " + "\n  ".join(problems[:20]) + "\nUse the same model config as the run "
        f"that wrote it, or a new workdir.")


@dataclasses.dataclass
class Restored:
  step: int
  state: TrainState
  data_state: Any           # the iterator state saved by this process, or None
  meta: dict[str, Any]      # host-side loop state saved with it
  skipped_steps: list[int]  # newer steps that could not be restored


def _all_processes_ok(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray([int(ok)]))))


class _QuietOrbax:
  """Drops Orbax's INFO lines (dozens per save) from absl logging; its warnings still show."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "/orbax/" not in record.pathname.replace("\\", "/")


def quiet_orbax_logging() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
    handler.addFilter(_QuietOrbax())


# Replicated arrays are written by one replica unless a slice per replica would be at least this big:
# Orbax's default (split every replicated array across its replicas) compiles a slice per device and
# per shape, which costs more than it saves for small arrays and on one host.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 4 << 20


def _pytree_handler() -> ocp.PyTreeCheckpointHandler:
  th = ocp.type_handlers
  registry = th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()), (bytes, th.ScalarHandler()),
      (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()), (str, th.StringHandler()),
      (jax.Array, th.ArrayHandler(
          min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL)))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _restore_args(abstract: Any) -> ocp.args.PyTreeRestore:
  return ocp.args.PyTreeRestore(item=abstract,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


class Checkpointer:
  """Orbax CheckpointManager with the items above, retention and verified restore with fallback.

  Retention: the newest `max_to_keep` steps, plus the `keep_best` steps with the lowest eval loss
  (steps saved with `eval_loss`).
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2, keep_best: int = 1,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    quiet_orbax_logging()
    policies = [cm.LatestN(n=max_to_keep)]
    if keep_best:
      policies.append(cm.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=keep_best,
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=cm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
        read_only=read_only, create=not read_only)
    handlers = {"params": _pytree_handler(), "train": _pytree_handler(),
                "data": IteratorStateHandler(), "meta": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, *, data_state: Any = None, meta: Mapping[str, Any] | None = None,
           eval_loss: float | None = None) -> int:
    """Saves `state` at its step (async when enabled: returns once arrays are copied off-device)."""
    step = int(jax.device_get(state.step))
    params, train = _split(state)
    meta = dict(meta or {}, step=step, checksums=checksums(state), saved_at=time.time(),
                has_data=data_state is not None)
    meta["meta_sha256"] = json_digest(meta)
    items = dict(params=ocp.args.PyTreeSave(params), train=ocp.args.PyTreeSave(train),
                 meta=ocp.args.JsonSave(meta))
    if data_state is not None:
      items["data"] = IteratorStateSave(data_state)
    metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    return step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def _restore_step(self, step: int, abstract: TrainState, with_data: bool) -> Restored:
    metadata = self.manager.item_metadata(step)
    abstract_params, abstract_train = _split(abstract)
    _check_shapes(metadata["params"].tree if hasattr(metadata["params"], "tree") else
                  metadata["params"], abstract_params, "params", step)
    _check_shapes(metadata["train"].tree if hasattr(metadata["train"], "tree") else
                  metadata["train"], abstract_train, "optimizer/train state", step)
    items = dict(params=_restore_args(abstract_params), train=_restore_args(abstract_train),
                 meta=ocp.args.JsonRestore())
    has_data = (epath.Path(self.directory) / str(step) / "data").exists()
    if with_data and has_data:
      items["data"] = IteratorStateRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = _join(restored.params, restored["train"])
    meta = dict(restored.meta)
    digest = meta.pop("meta_sha256", None)
    if digest is not None and json_digest(meta) != digest:
      raise ValueError(f"checkpoint step {step} is corrupt: meta/ does not match its sha256")
    if meta.get("has_data") and with_data and not has_data:
      raise ValueError(f"checkpoint step {step} is incomplete: its data/ item (the data iterator "
                       f"state) is missing")
    expected = meta.get("checksums")
    if not expected:
      raise ValueError(f"checkpoint step {step} has no checksums in meta/")
    actual = checksums(state)
    bad = sorted(k for k in expected if actual.get(k) != expected[k])
    if bad or set(actual) != set(expected):
      raise ValueError(f"checkpoint step {step} is corrupt: restored values differ from the saved "
                       f"checksums in {bad[:5] or 'the leaf set'}")
    data_state = restored.get("data") if with_data and has_data else None
    return Restored(step=step, state=state, data_state=data_state, meta=meta, skipped_steps=[])

  def _move_aside(self, steps: list[int]) -> None:
    """Renames unrestorable steps to `<step>.unrestorable[.<n>]` (kept for inspection, no longer a
    step), so training can save those steps again."""
    if self.read_only:
      return
    if jax.process_index() == 0:
      for step in steps:
        path = os.path.join(self.directory, str(step))
        target, n = f"{path}.unrestorable", 0
        while os.path.exists(target):
          n += 1
          target = f"{path}.unrestorable.{n}"
        os.rename(path, target)
        logging.warning("Moved the unrestorable checkpoint step %d to %s.", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("r1jax_checkpoint_move_aside")
    self.manager.reload()

  def restore(self, abstract: TrainState, *, with_data: bool = True) -> Restored | None:
    """Restores the newest good step into `abstract` (ShapeDtypeStructs with shardings).

    Returns None when there is no checkpoint. Falls back past unreadable or corrupt steps (logging
    each, then the step used); raises CheckpointShapeError if the model does not fit the checkpoint,
    and RuntimeError if no step can be restored.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    skipped = []
    for step in steps:
      error = None
      try:
        restored = self._restore_step(step, abstract, with_data)
      except CheckpointShapeError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (any read failure means "unusable")
        error = e
      if _all_processes_ok(error is None):
        if skipped:
          logging.warning("Restored checkpoint step %d instead of the newer step(s) %s, which could "
                          "not be restored (see warnings above).", step, skipped)
          self._move_aside(skipped)
        restored.skipped_steps = skipped
        return restored
      logging.warning("Checkpoint step %d in %s cannot be restored (%s: %s); trying an older one.",
                      step, self.directory, type(error).__name__ if error else "another process",
                      error)
      skipped.append(step)
    if steps:
      raise RuntimeError(f"No checkpoint in {self.directory} could be restored (tried steps "
                         f"{skipped}); move the directory away to start over.")
    return None


def _open_params(workdir_or_ckpt_dir: str, step: int | None
                 ) -> tuple[ocp.CheckpointManager, str, int, Any]:
  """(read-only manager, checkpoints dir, step, params metadata tree) of a workdir's checkpoint."""
  directory = workdir_or_ckpt_dir
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={"params": ocp.PyTreeCheckpointHandler()})
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {directory}: finish (or resume) that run first.")
    saved = manager.item_metadata(step)["params"]
  except BaseException:
    manager.close()
    raise
  return manager, directory, step, saved.tree if hasattr(saved, "tree") else saved


def saved_param_shapes(workdir_or_ckpt_dir: str, step: int | None = None
                       ) -> tuple[dict[str, tuple[int, ...]], int]:
  """({"backbone/layer_0/ff_in/kernel": shape, ...}, step) without reading any array."""
  manager, _, step, saved = _open_params(workdir_or_ckpt_dir, step)
  manager.close()
  return {optim.path_str(p): tuple(m.shape)
          for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}, step


def restore_params(workdir_or_ckpt_dir: str, target: Any = None, *, step: int | None = None
                   ) -> tuple[Any, int]:
  """Restores (a subtree of) the parameters of another run, e.g. for `init_from`.

  Args:
    workdir_or_ckpt_dir: a stage workdir (its `checkpoints/` is used) or a checkpoints directory.
    target: ShapeDtypeStructs with shardings; may hold only some top-level keys (e.g.
      {"backbone": ...}): only those are read. None: every parameter, as host numpy arrays.
    step: which step (default: the newest).
  Returns (params, step).
  """
  manager, directory, step, saved = _open_params(workdir_or_ckpt_dir, step)
  try:
    if target is None:
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
      args = ocp.args.PyTreeRestore(restore_args=restore_args)
    else:
      subset = {k: saved[k] for k in target if k in saved} if isinstance(saved, Mapping) else saved
      _check_shapes(subset, target, f"params of {directory}", step)
      args = ocp.args.PyTreeRestore(item=target,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                    partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(params=args))
    return restored.params, step
  finally:
    manager.close()


# ------------------------------------------------------------------------------------------------
# Preemption.


_requested_step: int | None = None


def request_preemption(at_step: int = 0) -> None:
  """Asks the running (or next) training loop to save and exit as on SIGTERM, once it has reached
  `at_step` (0: at the next step). For notebooks, drivers and tests; cleared when honoured. With
  several processes, every process must make the same request."""
  global _requested_step
  _requested_step = int(at_step)


class PreemptionWatcher:
  """Notices SIGTERM (or the multi-host preemption sync point) so the loop can save and exit.

  Single process: a Python SIGTERM handler sets a flag, and starts a watchdog that hard-exits the
  process if saving has not finished within `grace_secs`. Several processes: JAX's preemption sync
  manager (started by `jax.distributed.initialize`) makes every process agree on the same step.
  """

  def __init__(self, grace_secs: float):
    self.grace_secs = float(grace_secs)
    self._flag = threading.Event()
    self._previous = None
    self._watchdog: threading.Timer | None = None
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    if self._flag.is_set():
      return
    logging.warning("SIGTERM: saving a checkpoint, then exiting (grace %.0f s).", self.grace_secs)
    self._flag.set()
    self._watchdog = threading.Timer(self.grace_secs, self._too_late)
    self._watchdog.daemon = True
    self._watchdog.start()

  def _too_late(self):
    logging.error("Preemption save did not finish within %.0f s; exiting without it (the previous "
                  "checkpoint is intact).", self.grace_secs)
    logging.flush()
    os._exit(PREEMPTED_EXIT_CODE)  # pylint: disable=protected-access

  def should_stop(self, step: int) -> bool:
    global _requested_step
    if self._flag.is_set():
      return True
    if _requested_step is not None and step >= _requested_step:
      _requested_step = None
      return True
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # preemption service not running (e.g. not started by jax.distributed)
        return False
    return False

  def close(self) -> None:
    if self._watchdog is not None:
      self._watchdog.cancel()
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


# ------------------------------------------------------------------------------------------------
# Workdir lock.


def _proc_start_time(pid: int) -> str | None:
  """The kernel's start time of `pid` (to tell a reused pid from the lock owner), if known."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return fields[19]  # field 22 of /proc/<pid>/stat, counted after the command name
  except (OSError, IndexError):
    return None


def _proc_alive(pid: int, start_time: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:
    with open(f"/proc/{pid}/stat") as f:
      state = f.read().rsplit(")", 1)[1].split()[0]
    if state in ("Z", "X"):  # killed but not yet reaped: gone for our purposes
      return False
  except OSError:
    pass
  return start_time is None or _proc_start_time(pid) in (None, start_time)


class WorkdirLock:
  """`DIR/.lock` holding {pid, host, start_time}; one live run per workdir."""

  def __init__(self, workdir: str, name: str = ".lock"):
    self.path = os.path.join(workdir, name)
    self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                 "start_time": _proc_start_time(os.getpid()), "since": time.time()}
    self.held = False

  def _read(self) -> dict[str, Any] | None:
    for _ in range(20):  # the owner may be between create and write
      try:
        with open(self.path) as f:
          return json.load(f)
      except FileNotFoundError:
        return None
      except (ValueError, OSError):
        time.sleep(0.05)
    return {}

  @staticmethod
  def _read_file(path: str) -> dict[str, Any]:
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def acquire(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(100):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        other = self._read()
        if other is None:
          continue
        same_host = other.get("host") == self.info["host"]
        if other and not same_host:
          raise WorkdirLocked(
              f"{os.path.dirname(self.path)} is in use by pid {other.get('pid')} on host "
              f"{other.get('host')} (lock {self.path}). Wait for it, use another --workdir, or "
              f"delete the lock if that run is gone.")
        if other and _proc_alive(int(other.get("pid", -1)), other.get("start_time")):
          raise WorkdirLocked(
              f"{os.path.dirname(self.path)} is in use by a live run (pid {other['pid']} on "
              f"{other['host']}, lock {self.path}). Wait for it or use another --workdir.")
        stale = f"{self.path}.stale.{os.getpid()}"
        try:
          os.rename(self.path, stale)  # atomic: only one contender takes a stale lock over
        except FileNotFoundError:
          continue
        if self._read_file(stale) != other:
          # Between our read and the rename another contender took the stale lock over and wrote
          # its own: that one is live. Put it back (unless a third has created one meanwhile).
          try:
            os.link(stale, self.path)
          except FileExistsError:
            pass
          os.unlink(stale)
          continue
        os.unlink(stale)
        logging.warning("Took over the stale workdir lock of pid %s on %s (that process is gone).",
                        other.get("pid"), other.get("host"))
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(self.info, f)
      self.held = True
      return self
    raise WorkdirLocked(f"Could not take {self.path} (contended).")

  def release(self) -> None:
    if self.held:
      other = self._read()
      if other and other.get("pid") == self.info["pid"] and other.get("host") == self.info["host"]:
        os.unlink(self.path)
      self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
