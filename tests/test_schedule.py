"""The plateau controller (issue #26 part 2's rule-based piece): a forced plateau makes loop.fit
leave the stage at the right eval, lower the learning rate first (the rate really drops, and a
run killed after it resumes bitwise), or unfreeze while layers are frozen; every eval's decision
is kept with its numbers."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from r1jax import configlib
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import loop
from r1jax.train import metrics as metrics_lib
from r1jax.train import optim
from r1jax.train import schedule
from test_train_loop import Batches
from test_train_loop import _fit
from test_train_loop import engine  # noqa: F401  (fixture)
from test_train_loop import make_engine


def test_rate_per_compute_decides_and_every_decision_is_recorded():
  controller = schedule.PlateauController(metric="loss", window=2, min_gain_per_kstep=50.0)
  # Evals every 10 steps; the best loss improves 2.0 -> 1.0 -> 0.6 -> 0.55 -> 0.54.
  answers = [controller(step, {"loss": value}) for step, value in
             ((10, 2.0), (20, 1.0), (30, 0.6), (40, 0.7), (50, 0.55), (60, 0.54))]
  # Rates (per 1000 steps) over two evals: step 30: 1.4/20 -> 70, step 40: 0.4/20 -> 20 (< 50).
  assert answers == [False, False, False, True, True, True]
  gains = [d.gain_per_kstep for d in controller.decisions]
  assert gains[:2] == [None, None]
  assert gains[2] == pytest.approx(70.0) and gains[3] == pytest.approx(20.0)
  assert [d.best for d in controller.decisions][:4] == [2.0, 1.0, 0.6, 0.6]
  assert controller.decisions[3].action == "leave_stage"
  assert "improved 0.4 over steps 20-40" in controller.decisions[3].reason
  table = controller.table()
  assert table.count("\n") == 2 + 6 and "leave_stage" in table
  # An accuracy counts up: the best is reported as the accuracy, the rate from its gain.
  up = schedule.PlateauController(metric="accuracy", window=1, min_gain_per_kstep=1.0)
  assert [up(s, {"accuracy": a, "loss": 0.0}) for s, a in ((100, 0.5), (200, 0.7), (300, 0.7005))
          ] == [False, False, True]
  assert up.decisions[-1].best == pytest.approx(0.7005) and up.decisions[1].gain_per_kstep == (
      pytest.approx(2.0))
  with pytest.raises(ValueError, match="window=0"):
    schedule.PlateauController(window=0)


def test_forced_plateau_leaves_the_stage_at_the_right_eval(engine, tmp_path):  # noqa: F811
  # The eval loss falls, then stays flat from the eval at step 12 on (a forced plateau): the
  # rate over two evals is (2.0 - 1.0) / 8 steps at step 16, then 0 at step 20 (< 10 per 1000).
  losses = iter([4.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
  controller = schedule.PlateauController(metric="loss", window=2, min_gain_per_kstep=10.0)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=1, keep_best=1)
  writer = metrics_lib.MetricsWriter(str(tmp_path), enabled=True, tensorboard=False)
  try:
    result = loop.fit(engine, engine.init_state(jax.random.PRNGKey(0)), Batches(),
                      options=loop.LoopOptions(num_steps=100, eval_every=4, checkpoint_every=50,
                                               progress_bar=False),
                      checkpointer=ckpt, writer=writer, evaluate=lambda p: {"loss": next(losses)},
                      on_eval=controller)
  finally:
    writer.close()
    ckpt.close()
  assert result.step == 20 and result.loop.stop_reason == "on_eval"
  assert [(d.step, d.action) for d in controller.decisions] == [
      (4, "continue"), (8, "continue"), (12, "continue"), (16, "continue"), (20, "leave_stage")]
  assert controller.decisions[3].gain_per_kstep == pytest.approx(125.0)
  assert controller.decisions[4].gain_per_kstep == 0.0
  assert result.loop.best_step == 12  # the best checkpoint is still the one the stage keeps


def test_adaptive_policy_leaves_under_a_fraction_of_the_best_rate():
  # Window 1, evals every 100 steps; best loss 10 -> 6 -> 4 -> 3.5 -> 3.3: rates 40, 20, 5, 2.
  controller = schedule.PlateauController(metric="loss", window=1, policy="adaptive",
                                          relative=0.25, min_gain_per_kstep=100.0)
  answers = [controller(s, {"loss": v}) for s, v in
             ((100, 10.0), (200, 6.0), (300, 4.0), (400, 3.5), (500, 3.3))]
  # 40 is its own best (threshold 10); 20 >= 10; 5 < 0.25 x 40 = 10: leave at step 400. The rule's
  # minimum (100) would have left at the first rate.
  assert answers == [False, False, False, True, True]
  assert [d.threshold for d in controller.decisions][1:4] == pytest.approx([10.0, 10.0, 10.0])
  assert controller.decisions[3].policy == "adaptive" and controller.left_at == 400
  assert "0.25 x the best rate 40" in controller.decisions[3].reason
  # A stage that has not gained anything yet falls back to the rule's minimum.
  flat = schedule.PlateauController(metric="accuracy", window=1, policy="adaptive",
                                    min_gain_per_kstep=0.5)
  assert [flat(s, {"accuracy": 0.5}) for s in (10, 20)] == [False, True]
  assert flat.decisions[1].policy == "rule" and flat.decisions[1].threshold == 0.5
  with pytest.raises(ValueError, match="policy='bandit'"):
    schedule.PlateauController(policy="bandit")


def test_decision_log_resumes_with_the_same_decisions(tmp_path):
  evals = [(s, {"loss": 4.0 / (1 + s / 10)}) for s in range(10, 110, 10)]
  evals[6:] = [(s, {"loss": evals[5][1]["loss"] - 0.0001 * i}) for i, (s, _) in
               enumerate(evals[6:])]
  kw = dict(metric="loss", window=2, policy="adaptive", relative=0.3, stage="pretrain_general")
  reference = schedule.PlateauController(**kw)
  for s, m in evals:
    if reference(s, m):
      break
  path = str(tmp_path / "log.json")
  first = schedule.PlateauController(log_path=path, **kw)
  for s, m in evals[:6]:  # killed after the eval at step 60; its last checkpoint was step 40
    first(s, m)
  assert [d["step"] for d in schedule.read_log(path)["decisions"]] == [10, 20, 30, 40, 50, 60]
  resumed = schedule.PlateauController(log_path=path, **kw)
  assert len(resumed.decisions) == 6
  for s, m in evals[4:]:  # the resumed run evaluates again from step 50
    if resumed(s, m):
      break
  assert resumed.to_json() == reference.to_json()
  assert resumed.left_at == reference.left_at is not None
  log = schedule.read_log(path)
  assert log["decisions"] == reference.to_json() and log["left_at"] == reference.left_at
  assert log["settings"]["policy"] == "adaptive"


@pytest.fixture(scope="module")
def lr_engine():
  """test_train_loop's engine (constant learning rate 0.3) with a learning-rate factor."""
  return make_engine(adjustable_lr=True)


def test_first_plateau_lowers_the_learning_rate_and_the_next_one_leaves(lr_engine, tmp_path):
  # test_forced_plateau's evals: the rate over two evals is 0 at step 20, a plateau. With one
  # drop allowed it lowers the rate (x0.3) there; from step 20 on the rate is measured afresh, and
  # the eval at step 24 (still flat) leaves.
  losses = iter([4.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
  controller = schedule.PlateauController(metric="loss", window=2, min_gain_per_kstep=10.0,
                                          lr_factor=0.3, max_lr_drops=1)
  assert schedule.lowers_lr(controller)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=1, keep_best=1)
  writer = metrics_lib.MetricsWriter(str(tmp_path), enabled=True, tensorboard=False)
  try:
    result = loop.fit(lr_engine, lr_engine.init_state(jax.random.PRNGKey(0)), Batches(),
                      options=loop.LoopOptions(num_steps=100, eval_every=4, log_every=4,
                                               checkpoint_every=50, progress_bar=False),
                      checkpointer=ckpt, writer=writer, evaluate=lambda p: {"loss": next(losses)},
                      on_eval=controller)
  finally:
    writer.close()
  assert result.step == 24 and result.loop.stop_reason == "on_eval"
  assert [(d.step, d.action) for d in controller.decisions] == [
      (4, "continue"), (8, "continue"), (12, "continue"), (16, "continue"), (20, "lower_lr"),
      (24, "leave_stage")]
  lowered, left = controller.decisions[4], controller.decisions[5]
  assert lowered.lr_factor == 0.3 and lowered.learning_rate == pytest.approx(0.09)
  assert "learning rate x0.3 (drop 1 of 1): 0.3 -> 0.09" in lowered.reason
  assert "over steps 20-24" in left.reason and left.learning_rate == pytest.approx(0.09)
  # The rate really dropped: the factor is optimizer state, and the logged rate is the one used.
  assert float(optim.lr_factor(result.state.opt_state)) == pytest.approx(0.3)
  rates = {r["step"]: r["learning_rate"] for r in metrics_lib.read_metrics(str(tmp_path), "train")}
  assert [rates[s] for s in (16, 20)] == pytest.approx([0.3, 0.3])
  assert rates[24] == pytest.approx(0.09)
  ckpt.close()
  # An optimizer built without the factor cannot be lowered (one clear error).
  plain = optim.build_optimizer(configlib.train_section(), {"w": jnp.zeros((2, 2))}, num_steps=10)
  state = plain.init({"w": jnp.zeros((2, 2))})
  assert optim.lr_factor(state) == 1.0
  with pytest.raises(ValueError, match="adjustable_lr=True"):
    optim.scale_lr(state, 0.3)


def test_a_plateau_unfreezes_while_layers_are_frozen_then_lowers_then_leaves():
  # A finetuning with one more phase to go (it sets unfreezes_left): the first plateau unfreezes;
  # in the last phase the next lowers the rate, the one after leaves. Evals every 100 steps.
  controller = schedule.PlateauController(metric="accuracy", window=1, min_gain_per_kstep=0.3,
                                          max_lr_drops=1, lr_factor=0.5)
  controller.unfreezes_left = 1
  answers = []
  for step, accuracy in ((100, 0.5), (200, 0.7), (300, 0.7001), (400, 0.75), (500, 0.7502),
                         (600, 0.80), (700, 0.8001)):
    answers.append(controller(step, {"accuracy": accuracy, "learning_rate": 1e-3}))
    if controller.decisions[-1].action == "unfreeze":
      controller.unfreezes_left = 0  # the finetuning's last phase
  assert [d.action for d in controller.decisions] == [
      "continue", "continue", "unfreeze", "continue", "lower_lr", "continue", "leave_stage"]
  assert answers[2] is True and answers[4] == loop.EvalAction(lr_factor=0.5)
  assert answers[-1] is True and controller.left_at == 700
  assert "unfreeze: the next phase trains more layers (1 left)" in controller.decisions[2].reason
  assert controller.decisions[4].learning_rate == pytest.approx(5e-4)
  with pytest.raises(ValueError, match="lr_factor=1.5"):
    schedule.PlateauController(lr_factor=1.5)


class _Killed(Exception):
  pass


def test_run_killed_after_lowering_the_rate_resumes_bitwise(lr_engine, tmp_path):
  """Killed right after the lower_lr decision at step 8 (its last checkpoint: step 6), then
  resumed: the same decisions, the same logged rates and the same final state, bit for bit."""
  config = ml_collections.ConfigDict(dict(checkpoint=configlib.checkpoint_section(
      async_save=False, max_to_keep=2, keep_best=1)))
  options = loop.LoopOptions(num_steps=40, eval_every=4, log_every=2, checkpoint_every=6,
                             progress_bar=False)
  x = np.random.default_rng(99).normal(size=(16, 4)).astype(np.float32)

  def evaluate(params):  # a real held-out loss: the resumed run evaluates the same numbers
    w = np.asarray(jax.device_get(params["w"]))
    return {"loss": float(np.mean(((x @ w)[:, 0] - x @ np.array([1.0, -2.0, 0.5, 3.0])) ** 2))}

  def run(workdir, kill_at=None):
    # The rule's minimum no rate reaches: lower_lr at the first rate (step 8), leave at step 12.
    controller = schedule.PlateauController(
        metric="loss", window=1, min_gain_per_kstep=1e9, max_lr_drops=1, lr_factor=0.3,
        log_path=str(workdir / "schedule.json"))

    def hook(step, metrics):
      answer = controller(step, metrics)
      if step == kill_at:
        raise _Killed(step)
      return answer
    return loop.resume_and_fit(
        config, engine=lr_engine, train_iter=Batches(), options=options,
        init_state=lambda: lr_engine.init_state(jax.random.PRNGKey(0)),
        checkpoint_dir=str(workdir / "ckpt"), metrics_dir=str(workdir), evaluate=evaluate,
        on_eval=hook)[0]

  reference = run(tmp_path / "reference")
  with pytest.raises(_Killed):
    run(tmp_path / "resumed", kill_at=8)
  log = schedule.read_log(str(tmp_path / "resumed" / "schedule.json"))
  assert [d["action"] for d in log["decisions"]] == ["continue", "lower_lr"]
  resumed = run(tmp_path / "resumed")
  assert reference.step == resumed.step == 12
  want = schedule.read_log(str(tmp_path / "reference" / "schedule.json"))
  assert [(d["step"], d["action"]) for d in want["decisions"]] == [
      (4, "continue"), (8, "lower_lr"), (12, "leave_stage")]
  assert schedule.read_log(str(tmp_path / "resumed" / "schedule.json")) == want
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(reference.state),
               jax.device_get(resumed.state))
  assert float(optim.lr_factor(resumed.state.opt_state)) == pytest.approx(0.3)

  def rates(wd):
    return [(r["step"], r["learning_rate"]) for r in metrics_lib.read_metrics(str(wd), "train")]
  assert rates(tmp_path / "resumed") == rates(tmp_path / "reference")
  assert dict(rates(tmp_path / "reference"))[10] == pytest.approx(0.09)


def test_an_unlowered_factor_trains_bit_for_bit_like_no_factor(engine, lr_engine):  # noqa: F811
  # Until the rate is lowered, a stage under schedule=auto trains exactly as under fixed.
  data_a, data_b = Batches(), Batches()
  a = engine.init_state(jax.random.PRNGKey(0))
  b = lr_engine.init_state(jax.random.PRNGKey(0))
  for _ in range(5):
    a, _ = engine.train_step(a, next(data_a))
    b, _ = lr_engine.train_step(b, next(data_b))
  np.testing.assert_array_equal(np.asarray(a.params["w"]), np.asarray(b.params["w"]))
