"""Checkpoints: exact round trip, verified restore with fallback, retention, shape errors, partial
params restore, preemption requests, workdir lock."""
import glob
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from r1jax import configlib
from r1jax import run_dir
from r1jax.model import axes
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import mesh as mesh_lib
from r1jax.train import optim
from r1jax.train import state as state_lib

B = 8


def _init_params(width):
  def init(rng):
    k1, k2 = jax.random.split(rng)
    return {"backbone": {"dense": {
        "kernel": nn.LogicallyPartitioned(jax.random.normal(k1, (16, width)), (axes.EMBED, axes.MLP)),
        "bias": nn.LogicallyPartitioned(jnp.zeros((width,)), (axes.MLP,))}},
        "head": {"kernel": nn.LogicallyPartitioned(jax.random.normal(k2, (width, 4)),
                                                   (axes.MLP, axes.CLASSES))}}
  return init


def _make_state(width=8, seed=0):
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  init = _init_params(width)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  tx = optim.build_optimizer(configlib.train_section(warmup_steps=0), abstract, num_steps=10,
                             rules=[("head/.*", "frozen")])
  extras = lambda: {"memory": jnp.zeros((B, 3, 16)), "mask": jnp.zeros((B, 3), bool)}
  state, _ = state_lib.create_train_state(jax.random.PRNGKey(seed), init_params=init, tx=tx,
                                          init_extras=extras, mesh=mesh, rules=axes.DEFAULT_RULES,
                                          batch_size=B)
  return state


def _advance(state, step, value=0.5):
  """A state that differs everywhere from the initial one (as after `step` updates)."""
  bump = lambda x: x + value if jnp.issubdtype(x.dtype, jnp.floating) else x
  return state.replace(step=jnp.asarray(step, jnp.int32), params=jax.tree.map(bump, state.params),
                       opt_state=jax.tree.map(bump, state.opt_state),
                       extras=jax.tree.map(bump, state.extras))


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert x.sharding == y.sharding


def test_round_trip_is_exact(tmp_path):
  state = _advance(_make_state(), 3)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2)
  data = {"step": 3, "cursor": [1, 2, 3]}
  meta = {"loop": {"window": {"loss": [0.1 + 0.2, 3.0]}, "best_eval_loss": 1.25}}
  ckpt.save(state, data_state=data, meta=meta, score=1.25)
  ckpt.wait()
  restored = ckpt.restore(state_lib.abstract_like(state))
  assert restored.step == 3 and restored.skipped_steps == []
  _assert_same(restored.state, state)
  assert restored.data_state == data
  assert restored.meta["loop"] == meta["loop"]  # floats round-trip exactly through JSON
  # Frozen "head" leaves have no optimizer state at all.
  paths = optim.param_paths(restored.state.opt_state)
  assert not any("head" in p for p in paths)
  ckpt.close()


def test_no_checkpoint_gives_none(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpts"))
  assert ckpt.restore(state_lib.abstract_like(_make_state())) is None


def _two_steps(tmp_path):
  base = _make_state()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=5)
  s1, s2 = _advance(base, 1, 0.25), _advance(base, 2, 0.5)
  ckpt.save(s1, data_state={"step": 1})
  ckpt.save(s2, data_state={"step": 2})
  ckpt.close()
  return s1, s2


@pytest.mark.parametrize("damage", ["checksum", "truncated_array_file", "garbled_json",
                                    "missing_data_file"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage, caplog):
  s1, _ = _two_steps(tmp_path)
  step_dir = tmp_path / "2"
  if damage == "checksum":
    meta_file = step_dir / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    key = next(iter(meta["checksums"]))
    meta["checksums"][key] ^= 1
    meta_file.write_text(json.dumps(meta))
  elif damage == "truncated_array_file":
    for f in glob.glob(str(step_dir / "params" / "**" / "d" / "*"), recursive=True):
      with open(f, "r+b") as fh:
        fh.truncate(max(0, os.path.getsize(f) // 2))
  elif damage == "garbled_json":
    (step_dir / "meta" / "metadata").write_text("{not json")
  else:
    for f in (step_dir / "data").glob("*.json"):
      f.unlink()
  caplog.set_level(logging.WARNING)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  restored = ckpt.restore(state_lib.abstract_like(s1))
  assert restored.step == 1 and restored.skipped_steps == [2]
  _assert_same(restored.state, s1)
  assert restored.data_state == {"step": 1}
  text = caplog.text
  assert "Checkpoint step 2" in text and "Restored checkpoint step 1 instead of" in text
  ckpt.close()


def test_half_written_step_is_ignored_and_cleaned(tmp_path):
  s1, s2 = _two_steps(tmp_path)
  partial = tmp_path / "3.orbax-checkpoint-tmp"  # what a kill mid-save leaves
  (partial / "params").mkdir(parents=True)
  (partial / "params" / "junk").write_text("half")
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  assert ckpt.all_steps() == [1, 2]
  assert ckpt.restore(state_lib.abstract_like(s2)).step == 2
  ckpt.close()
  assert not partial.exists()  # removed (in the background) once the manager starts


def test_all_corrupt_raises(tmp_path):
  s1, _ = _two_steps(tmp_path)
  for step in ("1", "2"):
    (tmp_path / step / "meta" / "metadata").write_text("{")
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  with pytest.raises(RuntimeError, match=r"No checkpoint .* could be restored \(tried steps \[2, 1\]"):
    ckpt.restore(state_lib.abstract_like(s1))


def test_different_model_shape_names_both_shapes(tmp_path):
  _two_steps(tmp_path)
  wider = _make_state(width=12)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  with pytest.raises(ckpt_lib.CheckpointShapeError) as info:
    ckpt.restore(state_lib.abstract_like(wider))
  msg = str(info.value)
  assert "backbone/dense/kernel: checkpoint has (16, 8), model expects (16, 12)" in msg
  assert "step 2" in msg


def test_keeps_last_n_plus_best(tmp_path):
  base = _make_state()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2, keep_best=1)
  losses = {2: 1.0, 4: 3.0, 6: 2.0}
  for step in range(1, 8):
    ckpt.save(_advance(base, step), score=losses.get(step))
  ckpt.close()
  assert ckpt_lib.Checkpointer(str(tmp_path), read_only=True).all_steps() == [2, 6, 7]


def test_best_step_survives_a_restart(tmp_path):
  """A resumed run still knows the scores saved before the restart: the best step, older than the
  newest `max_to_keep`, is kept (Orbax writes the scores to disk only when told to track them)."""
  base = _make_state()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2, keep_best=1)
  for step, score in [(2, -0.5), (4, -0.8), (6, -0.7)]:  # negated accuracies: step 4 is best
    ckpt.save(_advance(base, step), score=score)
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2, keep_best=1)
  for step, score in [(8, -0.7), (10, -0.8), (11, None)]:  # 10 ties 4: the earlier step stays
    ckpt.save(_advance(base, step), score=score)
  ckpt.close()
  assert ckpt_lib.Checkpointer(str(tmp_path), read_only=True).all_steps() == [4, 10, 11]


def test_restore_params_subtree_from_workdir(tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  state = _advance(_make_state(), 5)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(state)
  ckpt.close()
  target = {"backbone": state_lib.abstract_like(state.params["backbone"])}
  params, step = ckpt_lib.restore_params(str(tmp_path), target)
  assert step == 5 and set(params) == {"backbone"}
  _assert_same(params["backbone"], state.params["backbone"])
  shapes, _ = run_dir.saved_param_shapes(str(tmp_path))
  assert shapes == {"backbone/dense/bias": (8,), "backbone/dense/kernel": (16, 8),
                    "head/kernel": (8, 4)}
  full, _ = ckpt_lib.restore_params(str(tmp_path))  # everything, as host numpy arrays
  for x, y in zip(jax.tree.leaves(full), jax.tree.leaves(state.params)):
    assert isinstance(x, np.ndarray)
    np.testing.assert_array_equal(x, np.asarray(y))
  bad = {"backbone": {"dense": {"kernel": jax.ShapeDtypeStruct((16, 3), jnp.float32),
                                "bias": jax.ShapeDtypeStruct((3,), jnp.float32)}}}
  with pytest.raises(ckpt_lib.CheckpointShapeError, match=r"checkpoint has \(16, 8\), model "
                                                          r"expects \(16, 3\)"):
    ckpt_lib.restore_params(str(tmp_path), bad)
  # Reading only `params` of a checkpoint that also holds train/data/meta is what restore_params
  # is for: Orbax's per-item "could not be restored" notices are not shown to the user.
  assert "could not be restored" not in caplog.text and "read only" not in caplog.text


def test_checksums_are_sharding_independent():
  state = _advance(_make_state(), 1)
  host = jax.device_get(state.params)
  one_device = jax.device_put(host, jax.devices()[0])
  assert ckpt_lib.checksums(state.params) == ckpt_lib.checksums(one_device)
  flipped = jax.tree.map(lambda x: x, host)
  flipped["head"]["kernel"] = flipped["head"]["kernel"].copy()
  flipped["head"]["kernel"][0, 0] = np.nextafter(flipped["head"]["kernel"][0, 0], np.inf)
  diff = ckpt_lib.checksums(state.params).items() ^ ckpt_lib.checksums(flipped).items()
  assert {k for k, _ in diff} == {"head/kernel"}


def test_preemption_watcher_sigterm_and_requests():
  previous = signal.getsignal(signal.SIGTERM)
  watcher = ckpt_lib.PreemptionWatcher(grace_secs=60)
  try:
    assert not watcher.should_stop(1)
    ckpt_lib.request_preemption(at_step=5)
    assert not watcher.should_stop(4)
    assert watcher.should_stop(5)
    assert not watcher.should_stop(6)  # a request is honoured once
    os.kill(os.getpid(), signal.SIGTERM)  # our handler: sets the flag, does not exit
    assert watcher.should_stop(7)
  finally:
    watcher.close()
  assert signal.getsignal(signal.SIGTERM) == previous


def test_workdir_lock(tmp_path):
  lock = run_dir.WorkdirLock(str(tmp_path)).acquire()
  info = json.loads((tmp_path / ".lock").read_text())
  assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
  with pytest.raises(run_dir.WorkdirLocked, match=f"in use by a live run \\(pid {os.getpid()}"):
    run_dir.WorkdirLock(str(tmp_path)).acquire()
  lock.release()
  assert not (tmp_path / ".lock").exists()

  # A lock left by a process that has exited is taken over.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                              "start_time": "1"}))
  with run_dir.WorkdirLock(str(tmp_path)):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  assert not (tmp_path / ".lock").exists()

  # Another host's lock cannot be checked: refuse, saying how to proceed.
  (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
  with pytest.raises(run_dir.WorkdirLocked, match="on host elsewhere .* delete the lock"):
    run_dir.WorkdirLock(str(tmp_path)).acquire()
