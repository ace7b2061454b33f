"""Damaged checkpoints: one file of a real run's newest step truncated, emptied, bit-flipped,
overwritten, appended to or deleted (or a whole item directory deleted), then restored.

`corruption_trial` restores a damaged copy through `Checkpointer.restore`: it must fall back to the
previous step and say so naming both ("fallback"), or restore values identical to the intact
checkpoint ("harmless": bytes nothing reads); anything else is "silent" (wrong values restored),
"refused" (a shape error) or "crash". `end_to_end_corruption` damages an interrupted run's newest
step and reruns the command, which must fall back and still finish bitwise identical.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import logging
import os
import random
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from r1jax import run_dir
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train.state import TrainState

from fault_harness import command


def abstract_state_of(ckpt_dir: str, step: int):
  """A restore target for a saved TrainState, from the checkpoint's own metadata (one device)."""
  with command.quiet_absl():
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
  def leaf(m):
    return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding)
  abstract = {k: jax.tree.map(leaf, t) for k, t in trees.items()}
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
  """The intact checkpoint directory, restored once: what every trial's restore is compared with."""
  latest: int                # the newest step (the one each trial damages)
  previous: int              # the step a detected damage must fall back to
  abstract: Any              # the restore target (`abstract_state_of`)
  values: dict[str, Any]     # the intact restore's values (`_restored_values`)


def _restored_values(restored) -> dict[str, Any]:
  leaves = {run_dir.path_str(p): np.asarray(x).tobytes()
            for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(restored.state))[0]}
  return {"step": restored.step, "state": leaves, "data": restored.data_state,
          "loop": restored.meta.get("loop")}


def corruption_baseline(ckpt_dir: str) -> Baseline:
  steps = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  abstract = abstract_state_of(ckpt_dir, steps[-1])
  with command.quiet_absl():
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


def end_to_end_corruption(harness: command.Harness, snapshot: str, reference: str, work: str,
                          rng: random.Random, kind: str = "truncate") -> list[str]:
  """Corrupts the newest checkpoint of a copy of an interrupted run, reruns the command: it must
  say it falls back (naming both steps) and finish identical to the reference."""
  shutil.rmtree(work, ignore_errors=True)
  shutil.copytree(snapshot, work, symlinks=True)
  finalized, _ = command.checkpoint_entries(work)
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
    problems += [f"{description}: {p}"
                 for p in command.compare_runs(work, reference, harness.num_steps)]
  return problems

