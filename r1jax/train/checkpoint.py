"""Checkpoints that resume exactly and are never restored half-written; preemption.

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
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging as std_logging
import os
import signal
import threading
import time
from typing import Any, Mapping

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from r1jax import console
from r1jax import distributed
from r1jax import errors
from r1jax import run_dir
from r1jax.train.state import TrainState


class _BenignOrbaxNotices(std_logging.Filter):
  """Drops Orbax's warnings about what r1jax does on purpose: reading only the `params` item of a
  checkpoint that also holds train/data/meta items, through a read-only manager. A pipeline run
  printed 136 of them; every other Orbax message still gets through."""
  BENIGN = ("was found in the checkpoint, but could not be restored",
            "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0",
            "Given directory is read only=",
            # Steps saved without a score (final and preemption saves) are kept by LatestN only.
            "Requested `tracked_metric`; did not provide metrics.")

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


class CheckpointShapeError(errors.UserError, ValueError):
  """A checkpoint's shapes do not match the model being restored into (init_from names a run
  of another architecture, or a workdir is reused for another model)."""


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
    groups.setdefault(key, []).append((run_dir.path_str(p), x))
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
  saved_flat = {run_dir.path_str(p): getattr(m, "shape", None)
                for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
  problems = []
  for p, t in jax.tree_util.tree_flatten_with_path(target)[0]:
    path = run_dir.path_str(p)
    if path not in saved_flat:
      problems.append(f"{path}: missing in the checkpoint (model expects {tuple(t.shape)})")
    elif saved_flat[path] is not None and tuple(saved_flat[path]) != tuple(t.shape):
      problems.append(f"{path}: checkpoint has {tuple(saved_flat[path])}, model expects "
                      f"{tuple(t.shape)}")
  if problems:
    raise CheckpointShapeError(
        f"Checkpoint step {step} ({what}) does not fit the model: {len(problems)} leaf/leaves "
        "differ:\n  " + "\n  ".join(problems[:20]) + "\nUse the same model config as the run "
        "that wrote it, or a new workdir.")


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
  return bool(np.all(multihost_utils.process_allgather(np.asarray([int(ok)]))))


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

  Retention: the newest `max_to_keep` steps, plus the `keep_best` steps with the lowest selection
  score (steps saved with `score`: the eval loss, or a negated accuracy; see loop.selection_score).
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2, keep_best: int = 1,
               async_save: bool = True, read_only: bool = False):
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self.read_only = read_only
    console.quiet_library_logs()
    policies = [cm.LatestN(n=max_to_keep)]
    score = None
    if keep_best:
      # Ties (an accuracy seen twice) keep the earlier step, as the loop's best_step does.
      score = lambda m: (m["eval_loss"], m.get("step", 0))  # pylint: disable=unnecessary-lambda-assignment
      policies.append(cm.BestN(get_metric_fn=score, reverse=True, n=keep_best,
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        # Orbax writes a step's metrics to disk (and reads them back when a resumed run opens the
        # directory) only when `best_fn` is set: without it, BestN saw no score for the steps saved
        # before a restart and deleted the best one.
        best_fn=score, best_mode="min",
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
           score: float | None = None) -> int:
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
    metrics = (None if score is None else  # "eval_loss": the key older runs wrote
               {"eval_loss": float(score), "step": step})
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
        path = epath.Path(self.directory) / str(step)  # a local directory or a gs:// URL
        target, n = epath.Path(f"{path}.unrestorable"), 0
        while target.exists():
          n += 1
          target = epath.Path(f"{path}.unrestorable.{n}")
        path.rename(target)
        logging.warning("Moved the unrestorable checkpoint step %d to %s.", step, target)
    distributed.sync("r1jax_checkpoint_move_aside")
    self.manager.reload()

  def restore(self, abstract: TrainState, *, with_data: bool = True) -> Restored | None:
    """Restores the newest good step into `abstract` (ShapeDtypeStructs with shardings).

    Returns None when there is no checkpoint. Falls back past unreadable or corrupt steps (logging
    each, then the step used); raises CheckpointShapeError if the model fits no step (a newer step
    whose damaged metadata alone disagrees with the model is corruption: it is skipped like any
    other), and RuntimeError if no step can be restored.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    skipped, warnings, shape_error = [], [], None
    for step in steps:
      error = None
      try:
        restored = self._restore_step(step, abstract, with_data)
      except CheckpointShapeError as e:
        error, shape_error = e, shape_error or e
      except Exception as e:  # pylint: disable=broad-except  (any read failure means "unusable")
        error = e
      if _all_processes_ok(error is None):
        for message in warnings:
          logging.warning("%s", message)
        if skipped:
          logging.warning("Restored checkpoint step %d instead of the newer step(s) %s, which could "
                          "not be restored (see warnings above).", step, skipped)
          self._move_aside(skipped)
        restored.skipped_steps = skipped
        return restored
      warnings.append(f"Checkpoint step {step} in {self.directory} cannot be restored "
                      f"({type(error).__name__ if error else 'another process'}: {error}); "
                      "trying an older one.")
      skipped.append(step)
    if shape_error is not None:
      raise shape_error
    for message in warnings:
      logging.warning("%s", message)
    if steps:
      raise RuntimeError(f"No checkpoint in {self.directory} could be restored (tried steps "
                         f"{skipped}); move the directory away to start over.")
    return None


def on_one_device(abstract: Any, device: Any = None) -> Any:
  """ShapeDtypeStructs like `abstract` (arrays or ShapeDtypeStructs), each placed whole on `device`
  (default: this process's first device): a `restore_params` target for evaluation, latency and
  export, where every process reads the full arrays."""
  sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)


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
  manager, directory, step, saved = run_dir.open_params(workdir_or_ckpt_dir, step)
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
