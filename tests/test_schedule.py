"""The plateau controller (issue #26 part 2's rule-based piece): a forced plateau makes loop.fit
leave the stage at the right eval, and every eval's decision is kept with its numbers."""
import jax
import pytest

from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import loop
from r1jax.train import metrics as metrics_lib
from r1jax.train import schedule
from test_train_loop import Batches
from test_train_loop import _fit
from test_train_loop import engine  # noqa: F401  (fixture)


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
