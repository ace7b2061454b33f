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
from r1jax.model import losses as losses_lib
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
  return err.mean(), ({"mse": losses_lib.metric(err.sum(), err.size)}, extras)


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


def make_engine(steps_per_call=1, adjustable_lr=False):
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=1)))
  train = configlib.train_section(learning_rate=0.3, warmup_steps=0, schedule="constant")
  tx = optim.build_optimizer(train, jax.eval_shape(init_params, jax.random.PRNGKey(0)),
                             num_steps=100, adjustable_lr=adjustable_lr)
  return steps.Engine(mesh=mesh, rules=axes.DEFAULT_RULES, loss_fn=loss_fn, tx=tx,
                      init_params=init_params, init_extras=lambda: {}, batch_size=B,
                      lr_schedule=optim.make_schedule(train, 100), steps_per_call=steps_per_call)


@pytest.fixture(scope="module")
def engine():
  return make_engine()


class CountingEngine:
  """An engine with steps_per_call=3 that records how many steps each dispatched call ran."""

  def __init__(self):
    self._engine = make_engine(steps_per_call=3)
    self.calls = []

  def __getattr__(self, name):
    return getattr(self._engine, name)

  def train_step(self, state, batch):
    self.calls.append(1)
    return self._engine.train_step(state, batch)

  def train_steps(self, state, batches):
    self.calls.append(len(batches))
    return self._engine.train_steps(state, batches)


@pytest.fixture(scope="module")
def engine3():
  return CountingEngine()


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


def test_best_metric_accuracy_picks_and_stops_by_accuracy(engine, tmp_path):
  # The loss rises from step 4 on while the accuracy still climbs to step 8 (an over-confident
  # classifier): by accuracy, the best step is 8 and patience counts from there.
  evals = iter([(1.0, 0.5), (0.8, 0.6), (0.9, 0.65), (1.1, 0.7), (1.2, 0.69), (1.3, 0.6),
                (1.4, 0.6), (0.1, 0.99)])
  result, ckpt = _fit(engine, tmp_path, Batches(),
                      evaluate=lambda p: dict(zip(("loss", "accuracy"), next(evals))),
                      num_steps=100, eval_every=2, checkpoint_every=50, early_stopping_patience=3,
                      best_metric="accuracy")
  assert result.step == 14 and result.loop.stop_reason == "early_stopping"
  assert result.loop.best_step == 8 and result.loop.best_score == -0.7
  assert result.loop.best_eval_loss == 1.1  # the loss at the best step, for the record
  assert ckpt.all_steps() == [8, 14]
  ckpt.close()
  # A tie (an accuracy seen again) keeps the earlier step, in the loop and on disk.
  evals = iter([0.5, 0.5])
  result, ckpt = _fit(engine, tmp_path / "tie", Batches(),
                      evaluate=lambda p: {"loss": 1.0, "accuracy": next(evals)},
                      num_steps=4, eval_every=2, checkpoint_every=50, best_metric="accuracy")
  assert result.loop.best_step == 2 and ckpt.all_steps() == [2, 4]
  ckpt.close()
  assert loop.selection_score({"loss": 2.0}, "loss") == 2.0
  assert loop.selection_score({"nll": 2.0, "micro_f1": 0.4}, "micro_f1") == -0.4
  with pytest.raises(ValueError, match=r"eval.best_metric='f1' is not among .*\['loss'\]"):
    loop.selection_score({"loss": 2.0}, "f1")


def test_min_delta_gains_keep_the_best_but_not_the_patience(engine, tmp_path):
  # Accuracy 0.70, then gains of 0.002: each is the new best, none is 0.005 above the 0.70 that
  # last reset the patience, so the run stops 3 evals after 0.70 with its best at 0.704.
  accs = [0.70, 0.702, 0.704, 0.703, 0.9]
  evals = iter(accs)
  run = lambda path, **kw: _fit(engine, path, Batches(),
                                evaluate=lambda p: {"loss": 1.0, "accuracy": next(evals)},
                                num_steps=100, eval_every=2, checkpoint_every=50,
                                early_stopping_patience=3, best_metric="accuracy", **kw)
  result, ckpt = run(tmp_path / "delta", early_stopping_min_delta=0.005)
  assert result.step == 8 and result.loop.stop_reason == "early_stopping"
  assert result.loop.best_step == 6 and result.loop.best_score == -0.704
  assert result.loop.patience_score == -0.70
  ckpt.close()
  # Without min_delta each small gain resets the patience and the run reaches the jump to 0.9.
  evals = iter(accs + [0.9] * 10)
  result, ckpt = run(tmp_path / "plain")
  assert result.loop.best_score == -0.9 and result.loop.best_step == 10
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


def test_deadline_stops_evaluated_and_checkpointed(engine, tmp_path, monkeypatch):
  """Past the deadline the loop stops like early stopping: one more eval, a checkpoint, and the
  reason recorded; before it, nothing changes."""
  clock = {"now": 1000.0}
  monkeypatch.setattr(loop.time, "time", lambda: clock["now"])
  evals = []

  def evaluate(params):
    evals.append(1)
    clock["now"] += 10.0  # each eval "takes" 10 s: the third one passes the deadline
    return {"loss": 1.0 / len(evals)}

  result, ckpt = _fit(engine, tmp_path, Batches(), evaluate=evaluate, num_steps=100,
                      eval_every=2, checkpoint_every=50, deadline=1025.0)
  assert result.loop.stopped_early and result.loop.stop_reason == "time_budget"
  # Evals at 2, 4, 6 (the clock reads 1030 after it); the clock is read at log / eval /
  # checkpoint steps, so step 8 (an eval step: that eval is the stopping one) ends the run.
  assert result.step == 8 and len(evals) == 4
  assert ckpt.latest_step() == 8
  ckpt.close()
  assert loop.deadline_of(_loop_config(4, 8, 0), 50.0) == 0.0


def test_several_steps_per_call_log_and_checkpoint_like_one(engine, engine3, tmp_path):
  """steps_per_call=3: calls stop at every log/checkpoint point; same records, same checkpoints."""
  _, ckpt1 = _fit(engine, tmp_path / "one", Batches())
  engine3.calls.clear()
  result, ckpt3 = _fit(engine3, tmp_path / "three", Batches())
  # 0-3 in one call, 4 (log), 5 (checkpoint), 6-8 in one call (log), 9, 10 (checkpoint), 11, 12.
  assert engine3.calls == [3, 1, 1, 3, 1, 1, 1, 1] and result.step == 12
  one = metrics_lib.read_metrics(str(tmp_path / "one"), "train")
  three = metrics_lib.read_metrics(str(tmp_path / "three"), "train")
  assert [r["step"] for r in three] == [r["step"] for r in one] == [4, 8, 12]
  for a, b in zip(three, one):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["learning_rate"] == b["learning_rate"]
  assert ckpt3.all_steps() == ckpt1.all_steps() == [12]
  ckpt1.close()
  ckpt3.close()


def test_nonfinite_inside_a_multi_step_call_names_its_step(engine3, tmp_path):
  with pytest.raises(loop.NonFiniteError) as info:
    _fit(engine3, tmp_path, Batches(nan_at={7}))  # steps 6-8 run in one call
  msg = str(info.value)
  assert "Non-finite loss or gradient at step 7" in msg and "last good checkpoint is step 5" in msg
  result, ckpt = _fit(engine3, tmp_path / "skip", Batches(nan_at={2, 7}), skip_nonfinite=True)
  assert result.loop.nonfinite_skips == 2 and int(result.state.nonfinite_skips) == 2
  assert np.isfinite(np.asarray(result.state.params["w"])).all()
  ckpt.close()


def test_data_running_out_inside_a_call_trains_what_there_is(engine3, tmp_path):
  class Seven(Batches):
    def __next__(self):
      if self.step == 7:
        raise StopIteration
      return super().__next__()
  engine3.calls.clear()
  result, ckpt = _fit(engine3, tmp_path, Seven())
  assert result.step == 7 and engine3.calls == [3, 1, 1, 1, 1]  # 6 and 7 one at a time
  ckpt.close()


def _loop_config(log, ckpt, eval_every, requested=0):
  return ml_collections.ConfigDict(dict(
      train=dict(steps_per_call=requested, log_every_steps=log),
      checkpoint=dict(every_steps=ckpt), eval=dict(every_steps=eval_every)))


@pytest.mark.parametrize("log, ckpt, eval_every, platform, expected", [
    (10, 500, 100, "cpu", 10),   # the default periods
    (20, 200, 500, "cpu", 10),   # configs/pretrain.py
    (16, 64, 32, "cpu", 16),
    (48, 96, 0, "cpu", 16),      # at most MAX_AUTO_STEPS_PER_CALL
    (7, 700, 0, "cpu", 7),       # eval disabled: not a period
    (9, 500, 100, "cpu", 1),     # no common divisor above 1
    (10, 500, 100, "gpu", 1),
    (10, 500, 100, "tpu", 1),
])
def test_steps_per_call_automatic_choice(log, ckpt, eval_every, platform, expected):
  assert loop.steps_per_call(_loop_config(log, ckpt, eval_every), platform) == expected


def test_steps_per_call_explicit_and_invalid():
  assert loop.steps_per_call(_loop_config(10, 500, 100, requested=3), "gpu") == 3
  with pytest.raises(ValueError, match="train.steps_per_call=-1"):
    loop.steps_per_call(_loop_config(10, 500, 100, requested=-1), "cpu")
  with pytest.raises(ValueError, match="steps_per_call=0"):
    make_engine(steps_per_call=0)
