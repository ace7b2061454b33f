"""The training loop on a tiny regression model: log windows, NaN stop/skip, early stopping, the
on_eval hook, best-checkpoint retention."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from r1jax import configlib
from r1jax.model import axes
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import loop
from r1jax.train import mesh as mesh_lib
from r1jax.train import metrics as metrics_lib
from r1jax.train import optim
from r1jax.train import steps

B = 8


def init_params(rng):
  return {"w": nn.LogicallyPartitioned(jax.random.normal(rng, (4, 1)), (axes.EMBED, None))}


def loss_fn(params, batch, extras, rng, deterministic):
  del rng, deterministic
  pred = batch["x"] @ params["w"]
  err = ((pred[:, 0] - batch["y"]) ** 2) * batch["scale"]
  return err.mean(), ({"mse": steps.metric(err.sum(), err.size)}, extras)


class Batches:
  """Deterministic batches with get_state/set_state; `nan_at` puts a NaN into that step's batch."""

  def __init__(self, nan_at=()):
    self.step, self.nan_at = 0, set(nan_at)

  def __next__(self):
    rng = np.random.default_rng(self.step)
    self.step += 1
    x = rng.normal(size=(B, 4)).astype(np.float32)
    scale = np.full((B,), np.nan if self.step in self.nan_at else 1.0, np.float32)
    return {"x": x, "y": x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32), "scale": scale}

  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = state["step"]


@pytest.fixture(scope="module")
def engine():
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=1)))
  train = configlib.train_section(learning_rate=0.3, warmup_steps=0, schedule="constant")
  tx = optim.build_optimizer(train, jax.eval_shape(init_params, jax.random.PRNGKey(0)),
                             num_steps=100)
  return steps.Engine(mesh=mesh, rules=axes.DEFAULT_RULES, loss_fn=loss_fn, tx=tx,
                      init_params=init_params, init_extras=lambda: {}, batch_size=B,
                      lr_schedule=optim.make_schedule(train, 100))


def _fit(engine, tmp_path, batches, evaluate=None, **options):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=1, keep_best=1)
  writer = metrics_lib.MetricsWriter(str(tmp_path), enabled=True, tensorboard=False)
  opts = dict(num_steps=12, log_every=4, checkpoint_every=5, progress_bar=False)
  opts.update(options)
  try:
    return loop.fit(engine, engine.init_state(jax.random.PRNGKey(0)), batches,
                    options=loop.LoopOptions(**opts), checkpointer=ckpt, writer=writer,
                    evaluate=evaluate), ckpt
  finally:
    writer.close()


def test_log_records_average_their_window(engine, tmp_path):
  result, ckpt = _fit(engine, tmp_path, Batches())
  records = metrics_lib.read_metrics(str(tmp_path), "train")
  assert [r["step"] for r in records] == [4, 8, 12]
  # Recompute the per-step losses of steps 5..8 and compare with the second record's mean.
  state = engine.init_state(jax.random.PRNGKey(0))
  data, losses = Batches(), []
  for _ in range(8):
    state, m = engine.train_step(state, next(data))
    losses.append(steps.normalize(jax.device_get(m))["loss"])
  assert records[1]["loss"] == pytest.approx(np.mean(losses[4:8]), rel=1e-6)
  assert records[-1]["loss"] < records[0]["loss"]
  assert result.step == 12 and ckpt.all_steps() == [12]  # last 1 kept (no eval, so no best)
  ckpt.close()


def test_nonfinite_stops_naming_step_and_last_good_checkpoint(engine, tmp_path):
  with pytest.raises(loop.NonFiniteError) as info:
    _fit(engine, tmp_path, Batches(nan_at={7}))
  msg = str(info.value)
  assert "Non-finite loss or gradient at step 7" in msg
  assert "last good checkpoint is step 5" in msg and "skip_nonfinite=True" in msg


def test_nonfinite_skip_mode_counts_and_continues(engine, tmp_path):
  result, ckpt = _fit(engine, tmp_path, Batches(nan_at={3, 7}), skip_nonfinite=True)
  assert result.step == 12 and result.loop.nonfinite_skips == 2
  assert int(result.state.nonfinite_skips) == 2
  assert np.isfinite(np.asarray(result.state.params["w"])).all()
  records = metrics_lib.read_metrics(str(tmp_path), "train")
  assert records[-1]["nonfinite_skips"] == 2 and all(np.isfinite(r["loss"]) for r in records)
  ckpt.close()


def test_early_stopping_after_patience_keeps_best(engine, tmp_path):
  evals = iter([3.0, 2.0, 2.5, 2.4, 2.6, 1.0])
  result, ckpt = _fit(engine, tmp_path, Batches(), evaluate=lambda p: {"loss": next(evals)},
                      num_steps=100, eval_every=2, checkpoint_every=50, early_stopping_patience=3)
  # Evals at 2, 4 (best: 2.0), 6, 8, 10 -> three without improvement: stop at 10.
  assert result.step == 10 and result.loop.stopped_early
  assert result.loop.best_step == 4 and result.loop.best_eval_loss == 2.0
  assert ckpt.all_steps() == [4, 10]  # the best, and the last (saved when stopping)
  ckpt.close()


def test_on_eval_hook_can_stop(engine, tmp_path):
  seen = []

  def hook(step, metrics):
    seen.append((step, metrics["loss"]))
    return step >= 6
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"))
  writer = metrics_lib.MetricsWriter(str(tmp_path), enabled=True, tensorboard=False)
  result = loop.fit(engine, engine.init_state(jax.random.PRNGKey(0)), Batches(),
                    options=loop.LoopOptions(num_steps=50, eval_every=3, progress_bar=False),
                    checkpointer=ckpt, writer=writer, on_eval=hook,
                    evaluate=lambda p: {"loss": float(jnp.sum(p["w"] ** 2))})
  writer.close()
  ckpt.close()
  assert [s for s, _ in seen] == [3, 6] and result.step == 6 and result.loop.stopped_early
