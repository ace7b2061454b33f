"""A stage's workdir: the one home for what every stage does with it.

    result = run_dir.run_once(config, workdir, _run)           # lock, finished-run shortcut, body
    cfg = run_dir.model_config_of(init_from)                   # "which model is in this workdir?"
    shapes, step = run_dir.saved_param_shapes(init_from)       # without reading an array
    run_dir.write_json(os.path.join(workdir, "summary.json"), summary)   # atomic, process 0

What a workdir holds (ARCHITECTURE.md, "Stages and workdirs"): `config.json` (the config plus the
values resolved at run time under "resolved"), `summary.json` (written last: a stage is finished when
its summary says so), `checkpoints/<step>/params` (Orbax), `tokenizer.model`, and `.lock` while a
process runs in it (for a gs:// workdir's staging directory, also in the bucket: `BucketLock`).

This module sits below the training engine (`train/` imports it) and above `model/`: it reads
checkpoints' metadata and config files but runs nothing.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from r1jax import distributed
from r1jax import errors
from r1jax import remote
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.model import transformer_xl as txl

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_FILE = "tokenizer.model"
LABELS_FILE = "labels.txt"          # a classifier's class names in id order, one per line
LOCK_FILE = ".lock"
# A gs:// workdir's lock not refreshed for this long is its owner's only sign of being gone when the
# owner ran on another machine (it is refreshed every quarter of it while the run lives).
LOCK_STALE_SECS = "R1JAX_LOCK_STALE_SECS"  # environment variable; default 600
# summary.json "status" values of a run that ended by design (data_exhausted is not one: more
# steps were asked for than the data gave, and a rerun with more data may continue).
FINISHED_STATUSES = ("complete", "stopped_early")
# TransformerXLConfig fields that describe the trained function (and so must match a checkpoint);
# the others (dropout, dtype, remat, attention_impl, ...) are choices of the run that loads it.
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "n_layer", "n_head", "d_head", "d_inner",
                       "mem_len", "clamp_len", "same_length", "attention", "pre_lnorm",
                       "activation", "layer_norm_eps", "untie_r", "n_token_types", "layer_heads",
                       "layer_d_inner")


# --------------------------------------------------------------------------------------------------
# Files: JSON and text, written atomically.


def json_ready(value: Any) -> Any:
  """JSON-ready: numpy scalars -> Python, NaN/inf -> "nan"/"inf" strings (JSON has neither)."""
  if isinstance(value, Mapping):
    return {k: json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_ready(v) for v in value]
  if isinstance(value, (np.floating, np.integer, np.bool_)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def read_json(path: str) -> dict[str, Any] | None:
  """The JSON object in `path`, or None when the file is missing or not (yet) valid JSON."""
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, ValueError):
    return None


def write_text(path: str, text: str) -> str:
  """Writes `path` atomically (a temporary file renamed over it); returns `path`."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)
  return path


def write_json(path: str, data: Mapping[str, Any]) -> None:
  """Atomic, sorted, indented JSON of `data` (numpy values converted); primary process only."""
  if jax.process_index() != 0:
    return
  write_text(path, json.dumps(json_ready(data), indent=2, sort_keys=True, default=str) + "\n")


# --------------------------------------------------------------------------------------------------
# Lock and process liveness.


class WorkdirLocked(errors.UserError, RuntimeError):
  """Another live process holds the workdir."""


def proc_start_time(pid: int) -> str | None:
  """The kernel's start time of `pid` (to tell a reused pid from the lock owner), if known."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return fields[19]  # field 22 of /proc/<pid>/stat, counted after the command name
  except (OSError, IndexError):
    return None


def proc_alive(pid: int, start_time: str | None) -> bool:
  """Whether `pid` runs and is the process that started at `start_time` (None: any)."""
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
  return start_time is None or proc_start_time(pid) in (None, start_time)


def process_info() -> dict[str, Any]:
  """{pid, host, start_time, since} of this process, as a lock or a claim records it."""
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "start_time": proc_start_time(os.getpid()), "since": time.time()}


class WorkdirLock:
  """`DIR/.lock` holding {pid, host, start_time}; one live run per workdir."""

  def __init__(self, workdir: str, name: str = LOCK_FILE):
    self.path = os.path.join(workdir, name)
    self.info = process_info()
    self.held = False
    url = remote.url_of(workdir)  # a staging directory: the bucket holds the lock that counts
    self.bucket = BucketLock(f"{url}/{name}") if url else None

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
        if other and proc_alive(int(other.get("pid", -1)), other.get("start_time")):
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
      if self.bucket is not None:
        try:
          self.bucket.acquire()
        except BaseException:
          self.release()
          raise
      return self
    raise WorkdirLocked(f"Could not take {self.path} (contended).")

  def release(self) -> None:
    if self.bucket is not None:
      self.bucket.release()
    if self.held:
      other = self._read()
      if other and other.get("pid") == self.info["pid"] and other.get("host") == self.info["host"]:
        os.unlink(self.path)
      self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


class BucketLock:
  """The lock object `gs://.../.lock` of a gs:// workdir (WorkdirLock takes it for a staging
  directory): created only if absent (GCS precondition ifGenerationMatch=0), so two machines
  starting the same workdir cannot both run. A thread rewrites it every quarter of `stale_secs`
  (R1JAX_LOCK_STALE_SECS, 600) while the run lives. A lock whose owner is gone is taken over
  (again with a precondition: its generation, so one contender wins): on the owner's host when its
  process is gone, from another host when it was not refreshed for `stale_secs` (by the bucket's
  clock against this machine's). Released (deleted if still ours) at the end."""

  def __init__(self, url: str, stale_secs: float | None = None):
    self.url = url
    self.stale_secs = (float(os.environ.get(LOCK_STALE_SECS, "600")) if stale_secs is None
                       else stale_secs)
    self.info = process_info()
    self.generation: int | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _payload(self) -> bytes:
    return json.dumps({**self.info, "refreshed": time.time()}).encode()

  def acquire(self) -> "BucketLock":
    workdir = self.url.rsplit("/", 1)[0]
    for _ in range(100):
      try:
        self.generation = remote.write_object(self.url, self._payload(), if_generation=0)
        break
      except FileExistsError:
        pass
      held = remote.read_object(self.url)
      if held is None:
        continue
      try:
        other = json.loads(held[0])
      except ValueError:
        other = {}
      generation, age = held[1], held[2]
      mine = ("pid", "host", "start_time")
      if other and all(other.get(k) == self.info[k] for k in mine):  # a retried create of ours
        self.generation = generation
        break
      if other.get("host") == self.info["host"]:
        gone = not proc_alive(int(other.get("pid", -1)), other.get("start_time"))
        if not gone:
          raise WorkdirLocked(f"{workdir} is in use by a live run (pid {other['pid']} on "
                              f"{other['host']}, lock {self.url}). Wait for it or use another "
                              f"--workdir.")
      elif age < self.stale_secs:
        raise WorkdirLocked(
            f"{workdir} is in use by pid {other.get('pid')} on host {other.get('host')} (its lock "
            f"{self.url} was refreshed {max(age, 0):.0f} s ago). Wait for it or use another "
            f"--workdir; if that run is gone, its lock is taken over once {self.stale_secs:.0f} s "
            f"old ({LOCK_STALE_SECS}), or delete it now: gcloud storage rm {self.url}")
      try:
        self.generation = remote.write_object(self.url, self._payload(), if_generation=generation)
      except FileExistsError:  # another contender took it over first
        continue
      logging.warning("Took over the lock %s of pid %s on %s (%s).", self.url, other.get("pid"),
                      other.get("host"), "that process is gone" if other.get("host") ==
                      self.info["host"] else f"not refreshed for {age:.0f} s")
      break
    else:
      raise WorkdirLocked(f"Could not take {self.url} (contended).")
    self._stop.clear()
    self._thread = threading.Thread(target=self._refresh_loop, name="r1jax-bucket-lock",
                                    daemon=True)
    self._thread.start()
    return self

  def _refresh_loop(self) -> None:
    while not self._stop.wait(self.stale_secs / 4):
      try:
        self.generation = remote.write_object(self.url, self._payload(),
                                              if_generation=self.generation)
      except FileExistsError:
        logging.error("The lock %s was taken over by another run (this one did not refresh it "
                      "for %g s): two runs now write %s; stop one of them.", self.url,
                      self.stale_secs, self.url.rsplit("/", 1)[0])
        self.generation = None
        return
      except Exception as e:  # pylint: disable=broad-except  # a network hiccup: next round
        logging.warning("Refreshing the lock %s failed (retried): %s", self.url, e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self.generation is not None:
      held = remote.read_object(self.url)  # checked here too: not every server honours the
      if held is not None and held[1] == self.generation:  # delete's precondition (fake-gcs-server)
        remote.delete_object(self.url, if_generation=self.generation)
      self.generation = None


# --------------------------------------------------------------------------------------------------
# The stage protocol: run once, resume, or return the finished summary.


def finished(workdir: str, config: Any, *, requires: Sequence[str] = ()) -> dict[str, Any] | None:
  """The summary of a finished run of this same stage and step budget in `workdir`, else None.

  Finished: summary.json names `config.stage`, has a status in FINISHED_STATUSES, the same
  `train.num_steps` setting (so raising num_steps continues a finished run; stages without a
  `train` section record None), and every key in `requires` (what the stage writes last, e.g. the
  test metrics of finetuning or the artifacts of a compression stage).
  """
  summary = read_json(os.path.join(workdir, SUMMARY_FILE))
  if summary is None:
    return None
  num_steps = config.train.num_steps if "train" in config else None
  if (summary.get("stage") == config.stage and summary.get("status") in FINISHED_STATUSES and
      summary.get("config_num_steps") == num_steps and all(k in summary for k in requires)):
    return summary
  return None


def run_once(config: Any, workdir: str, body: Callable[[Any, str], dict[str, Any]], *,
             requires: Sequence[str] = ()) -> dict[str, Any]:
  """Every stage's `run`: takes the workdir lock (process 0), returns the summary of a finished run
  of this config (`finished`), else runs `body(config, workdir)` and returns its summary."""
  os.makedirs(workdir, exist_ok=True)
  lock = WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
  try:
    done = finished(workdir, config, requires=requires)
    if done is not None:
      logging.info("%s in %s already finished; nothing to do.", config.stage, workdir)
      return done
    return body(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def tokenizer_of(workdir: str) -> str:
  """The path of an earlier run's DIR/tokenizer.model (it comes with every training workdir)."""
  path = os.path.join(os.path.expanduser(workdir), TOKENIZER_FILE)
  if not os.path.exists(path):
    raise errors.InputNotFound(f"init_from={workdir!r} has no {TOKENIZER_FILE}; name the workdir "
                               "of a finished training run (pretraining, DAPT or finetuning).")
  return path


def provide_tokenizer(workdir: str, *, source: str = "",
                      train: Callable[[], tokenizer_lib.Tokenizer]) -> tokenizer_lib.Tokenizer:
  """DIR/tokenizer.model, loaded: kept if present (a resumed run), else a copy of the file
  `source`, else the tokenizer `train()` returns. Process 0 makes it while the others wait."""
  path = os.path.join(workdir, TOKENIZER_FILE)
  how = "kept from an earlier attempt of this run"
  if not os.path.exists(path):
    how = f"a copy of {source}" if source else "trained on this run's training documents"
  if jax.process_index() == 0 and not os.path.exists(path):
    if source:
      shutil.copyfile(os.path.expanduser(source), path + ".tmp")
      os.replace(path + ".tmp", path)
    else:
      train().save(path)
  distributed.sync("r1jax_tokenizer")
  tok = tokenizer_lib.Tokenizer.load(path)
  logging.info("Tokenizer %s: %d pieces, %s.", path, tok.vocab_size, how)
  return tok


# --------------------------------------------------------------------------------------------------
# What is saved: parameter shapes and the model.


def path_str(path: Sequence[Any]) -> str:
  """'a/b/c' for a jax key path (DictKey/GetAttrKey/SequenceKey entries): how parameters are named
  in saved shapes, optimizer rules and error messages."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def checkpoints_dir(workdir_or_ckpt_dir: str) -> str:
  """A workdir's checkpoints/ directory (or the argument itself when it is one)."""
  directory = os.path.expanduser(workdir_or_ckpt_dir)
  if os.path.isdir(os.path.join(directory, CHECKPOINTS_DIR)):
    directory = os.path.join(directory, CHECKPOINTS_DIR)
  return directory


def open_params(workdir_or_ckpt_dir: str, step: int | None = None
                ) -> tuple[ocp.CheckpointManager, str, int, Any]:
  """(read-only manager, checkpoints dir, step, params metadata tree) of a workdir's checkpoint;
  the caller closes the manager."""
  directory = checkpoints_dir(workdir_or_ckpt_dir)
  if not os.path.isdir(directory) or (
      directory == os.path.expanduser(workdir_or_ckpt_dir) and
      os.path.basename(os.path.normpath(directory)) != CHECKPOINTS_DIR and
      not any(name.isdigit() for name in os.listdir(directory))):
    raise errors.InputNotFound(f"init_from={workdir_or_ckpt_dir!r} has no {CHECKPOINTS_DIR}/ "
                               "directory; name the workdir of a finished training run.")
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={"params": ocp.PyTreeCheckpointHandler()})
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise errors.InputNotFound(
          f"No checkpoint in {directory}: finish (or resume) that run first.")
    saved = manager.item_metadata(step)["params"]
  except BaseException:
    manager.close()
    raise
  return manager, directory, step, saved.tree if hasattr(saved, "tree") else saved


def saved_param_shapes(workdir_or_ckpt_dir: str, step: int | None = None
                       ) -> tuple[dict[str, tuple[int, ...]], int]:
  """({"backbone/layer_0/ff_in/kernel": shape, ...}, step) without reading any array."""
  manager, _, step, saved = open_params(workdir_or_ckpt_dir, step)
  manager.close()
  return {path_str(p): tuple(m.shape)
          for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}, step


def _model_fields(data: Any) -> dict[str, Any]:
  names = {f.name for f in dataclasses.fields(txl.TransformerXLConfig)}
  return {k: v for k, v in dict(data or {}).items() if k in names and v is not None}


def model_config_of(workdir: str, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
                    prefix: str = "") -> txl.TransformerXLConfig:
  """The Transformer-XL config of the model saved in a training workdir: the one answer to "which
  model is here?".

  Sizes (vocab, width, layers, heads and inner size per layer, untied biases, token types) come
  from the newest checkpoint's parameter shapes, which are authoritative; the other fields from
  DIR/config.json:
  `resolved.model` where the stage recorded the full config, else the `model` section (variant +
  explicit overrides) over the variant's values. `prefix` selects a sub-model ("student/" in a
  distillation workdir); `shapes` saves re-reading them.
  """
  if shapes is None:
    shapes, _ = saved_param_shapes(workdir)
  config = read_json(os.path.join(os.path.expanduser(workdir), CONFIG_FILE)) or {}
  section = dict(config.get("model") or {})
  resolved = (config.get("resolved") or {}).get("model")
  fields = dict(txl.VARIANTS.get(section.get("variant"), txl.VARIANTS["tiny"]))
  fields.update(_model_fields(section))
  fields.update(_model_fields(resolved if isinstance(resolved, Mapping) else None))
  b = f"{prefix}backbone/"
  if b + "word_emb/embedding" not in shapes:
    raise ValueError(f"{workdir!r}: the checkpoint has no {b}word_emb/embedding; it does not hold "
                     "a Transformer-XL backbone.")
  vocab, d_model = shapes[b + "word_emb/embedding"]
  layers = sorted({int(p[len(b) + 6:].split("/")[0]) for p in shapes if p.startswith(b + "layer_")})
  if not layers or layers != list(range(len(layers))):
    raise ValueError(f"checkpoint backbone layers {layers} are not layer_0..layer_{{n-1}}.")
  _, _, n_head, d_head = shapes[b + "layer_0/attn/qkv/kernel"]
  fields.update(vocab_size=vocab, d_model=d_model, n_layer=len(layers), n_head=n_head,
                d_head=d_head, d_inner=shapes[b + "layer_0/ff_in/kernel"][1], layer_heads=(),
                layer_d_inner=(), untie_r=(b + "layer_0/attn/r_w_bias") in shapes,
                n_token_types=(shapes[b + "type_emb/embedding"][0]
                               if (b + "type_emb/embedding") in shapes else 0))
  # Per-layer sizes differ after structured pruning.
  return txl.TransformerXLConfig(**fields).with_layer_sizes(
      [shapes[f"{b}layer_{i}/attn/qkv/kernel"][2] for i in layers],
      [shapes[f"{b}layer_{i}/ff_in/kernel"][1] for i in layers])


def architecture_of(workdir: str, **kwargs: Any) -> dict[str, Any]:
  """{field: value} of ARCHITECTURE_FIELDS for the model in `workdir` (`model_config_of`)."""
  cfg = model_config_of(workdir, **kwargs)
  return {name: getattr(cfg, name) for name in ARCHITECTURE_FIELDS}


def variant_of(workdir: str) -> str | None:
  """The `model.variant` the run in `workdir` was configured with (None if unknown)."""
  config = read_json(os.path.join(os.path.expanduser(workdir), CONFIG_FILE)) or {}
  return (config.get("model") or {}).get("variant")
