"""Pretraining stage end to end: outputs, exact resume after preemption, finished runs, init_from,
config errors before compiling, the workdir lock, and (slow) the real command with SIGKILL/SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from r1jax import configlib
from r1jax import run_dir
from r1jax.data import builtin
from r1jax.data import shards
from r1jax.data import sources
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.stages import pretrain
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import loop as loop_lib
from r1jax.train import metrics

import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "pretrain.py")
TIMING = loop_lib.TIMING_FIELDS
TRAIN_FIELDS = {"step", "split", "loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy",
                "learning_rate", "tokens_per_sec", "mfu", "real_token_fraction", "mfu_real_tokens"}


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
  tokenizer_lib.Tokenizer.train(builtin.texts("general"), 1000).save(path)
  return path


def tiny_config(tokenizer_path, **train):
  config = configlib.load_config(f"{CONFIG}:variant=tiny")
  config.data.tokenizer = tokenizer_path
  config.train.update(dict(num_steps=12, log_every_steps=3, warmup_steps=2, progress_bar=False))
  config.train.update(train)
  config.eval.update(dict(every_steps=6, num_batches=2))
  config.checkpoint.every_steps = 4
  # Smaller than tiny: these tests are about the stage's mechanics, and compiling dominates.
  config.model.update(dict(n_layer=1, d_model=32, n_head=2, d_head=16, d_inner=64, mem_len=16))
  return config


def _records(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics.read_metrics(workdir)]


def _final_params(workdir):
  with open(os.path.join(workdir, "config.json")) as f:
    num_steps = json.load(f)["resolved"]["num_steps"]
  params, step = ckpt_lib.restore_params(workdir)
  assert step == num_steps
  return params


def _assert_params_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight(tokenizer_path, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  summary = pretrain.run(tiny_config(tokenizer_path), workdir)
  return workdir, summary


def test_tiny_end_to_end_outputs(straight):
  workdir, summary = straight
  assert summary["status"] == "complete" and summary["step"] == 12
  for name in ("config.json", "summary.json", "metrics.jsonl", "tokenizer.model"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "12"))
  assert not os.path.exists(os.path.join(workdir, ".lock"))
  train = metrics.read_metrics(workdir, "train")
  evals = metrics.read_metrics(workdir, "eval")
  assert [r["step"] for r in train] == [3, 6, 9, 12]
  assert [r["step"] for r in evals] == [6, 12]
  assert TRAIN_FIELDS <= set(train[-1]), set(train[-1])
  assert {"loss", "mlm_accuracy", "nsp_accuracy"} <= set(evals[-1])
  assert summary["final_eval"]["loss"] == evals[-1]["loss"]
  assert summary["num_params"] > 0 and 0 < summary["final_train"]["mfu"] < 1
  train_fill = summary["final_train"]["real_token_fraction"]
  assert 0 < train_fill <= 1 and summary["final_train"]["mfu_real_tokens"] == pytest.approx(
      summary["final_train"]["mfu"] * train_fill)
  with open(os.path.join(workdir, "config.json")) as f:
    resolved = json.load(f)
  assert resolved["train"]["num_steps"] == 12 and resolved["resolved"]["vocab_size"] == 1000
  assert resolved["resolved"]["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}


def test_finished_run_is_not_redone(straight, tokenizer_path):
  workdir, summary = straight
  before = open(os.path.join(workdir, "metrics.jsonl")).read()
  again = pretrain.run(tiny_config(tokenizer_path), workdir)
  assert again == json.loads(json.dumps(summary))
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == before


def test_preempted_run_resumes_exactly(straight, tokenizer_path, tmp_path):
  """Save-and-exit at step 5 (between checkpoints and inside a log window), then rerun: the
  metrics.jsonl losses and the final parameters are bitwise those of the uninterrupted run."""
  workdir, _ = straight
  resumed = str(tmp_path / "resumed")
  ckpt_lib.request_preemption(at_step=5)
  with pytest.raises(SystemExit) as info:
    pretrain.run(tiny_config(tokenizer_path), resumed)
  assert info.value.code == ckpt_lib.PREEMPTED_EXIT_CODE
  assert not os.path.exists(os.path.join(resumed, "summary.json"))
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["4", "5"]
  summary = pretrain.run(tiny_config(tokenizer_path), resumed)
  assert summary["resumed_from_step"] == 5 and summary["step"] == 12
  assert _records(resumed) == _records(workdir)
  _assert_params_equal(_final_params(resumed), _final_params(workdir))


def test_time_budget_sizes_the_run_from_the_measured_step_rate(tokenizer_path, tmp_path):
  """A run planned for far more steps than its budget holds: the step rate measured at the start
  cuts num_steps, training stops inside the budget's hard stop, and a rerun keeps the decision."""
  config = tiny_config(tokenizer_path, num_steps=200_000, warmup_steps=10, log_every_steps=20,
                       time_budget_minutes=0.25)
  config.eval.every_steps = 50
  config.checkpoint.every_steps = 50
  workdir = str(tmp_path / "budget")
  summary = pretrain.run(config, workdir)
  budget = json.load(open(os.path.join(workdir, "config.json")))["resolved"]["budget"]
  # What the 15 s left after start-up and the rate measurement hold (on a busy machine, little).
  assert budget["planned_steps"] == 200_000 and budget["secs_left"] < 15.0
  assert budget["num_steps"] == max(1, int(budget["steps_per_sec"] * max(budget["secs_left"], 0)
                                           * loop_lib.BUDGET_TRAIN_SHARE))
  assert summary["num_steps"] == budget["num_steps"] < 200_000
  # Within the hard stop (1.25 x 15 s) plus the final eval and checkpoint.
  assert summary["wall_secs"] < 15.0 * loop_lib.BUDGET_HARD_STOP + 5.0, summary["wall_secs"]
  assert summary["status"] == "complete" or summary["stopped_by"] == "time_budget"
  assert loop_lib.budget_steps(config, workdir, 200_000, lambda: 1e9) == (
      budget["num_steps"], budget)  # a rerun reuses the first decision, measures nothing


def test_packed_rows_without_nsp(tokenizer_path, tmp_path):
  """data.nsp=False (no segment-type table, no NSP loss) with packed rows: every position holds a
  real token, and the metrics carry no NSP figures."""
  config = tiny_config(tokenizer_path, num_steps=6)
  config.data.update(nsp=False, pack=True)
  summary = pretrain.run(config, str(tmp_path / "packed"))
  assert summary["status"] == "complete"
  assert summary["final_train"]["real_token_fraction"] == 1.0
  assert "nsp_loss" not in summary["final_train"] and "nsp_loss" not in summary["final_eval"]
  bad = tiny_config(tokenizer_path, num_steps=6)
  bad.data.pack = True
  with pytest.raises(configlib.ConfigError, match=r"data.pack: True needs data.nsp=False"):
    pretrain.run(bad, str(tmp_path / "bad"))


def test_init_from_starts_from_other_runs_params(straight, tokenizer_path, tmp_path):
  workdir, _ = straight
  config = tiny_config(tokenizer_path, num_steps=2, learning_rate=1e-12, warmup_steps=0)
  config.data.tokenizer = ""  # taken from init_from
  config.init_from = workdir
  config.eval.every_steps = 0
  # The model it starts from sets the architecture: the tiny variant's own sizes (d_model 64,
  # 2 layers) would not fit the 32-wide, 1-layer checkpoint.
  for field in ("n_layer", "d_model", "n_head", "d_head", "d_inner"):
    config.model[field] = None
  inherited = pretrain.model_config(config)
  assert (inherited.n_layer, inherited.d_model, inherited.d_inner) == (1, 32, 64)
  dapt = str(tmp_path / "dapt")
  pretrain.run(config, dapt)
  with open(os.path.join(dapt, "tokenizer.model"), "rb") as a, open(tokenizer_path, "rb") as b:
    assert a.read() == b.read()
  for x, y in zip(jax.tree.leaves(_final_params(dapt)), jax.tree.leaves(_final_params(workdir))):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_bad_config_fails_before_compiling(tokenizer_path, tmp_path):
  compiles = []

  def listener(name, *args, **kwargs):
    del args, kwargs
    if "compile" in name:
      compiles.append(name)
  jax.monitoring.register_event_duration_secs_listener(listener)
  config = tiny_config(tokenizer_path, batch_size=30)
  workdir = str(tmp_path / "bad")
  try:
    with pytest.raises(configlib.ConfigError, match=r"train.batch_size: 30 is not divisible by "
                                                    r"data-parallel size .* = 8; use e.g. 32"):
      pretrain.run(config, workdir)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == [] and not os.path.exists(workdir)


def test_second_run_on_a_live_workdir_is_refused(tokenizer_path, tmp_path):
  workdir = str(tmp_path / "busy")
  with run_dir.WorkdirLock(workdir):
    with pytest.raises(run_dir.WorkdirLocked, match="in use by a live run"):
      pretrain.run(tiny_config(tokenizer_path), workdir)
  assert os.listdir(workdir) == []  # refused before writing anything


# --------------------------------------------------------------------------------------------------
# The real command in subprocesses (slow: each start imports JAX and compiles), on one CPU device
# as a user's CPU runs it: quicker to compile and step. The exact resume of a run sharded over 8
# devices is test_preempted_run_resumes_exactly's.


def _command(workdir, *overrides):
  return [sys.executable, "-m", "r1jax.main", f"--config={CONFIG}:variant=tiny",
          f"--workdir={workdir}", "--config.train.progress_bar=False", *overrides]


def _env(devices=1):
  """The test process's environment, with `devices` forced CPU devices (its own: 8)."""
  return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
              XLA_FLAGS=xla_env.flags(devices))


SUBPROCESS_OVERRIDES = ("--config.train.num_steps=60", "--config.train.log_every_steps=1",
                        "--config.checkpoint.every_steps=8", "--config.eval.every_steps=20",
                        "--config.eval.num_batches=2", "--config.train.warmup_steps=5")


def _wait_for_step(workdir, step, proc, timeout=300):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, "the run ended before it could be interrupted"
    if os.path.exists(path):
      steps = [r["step"] for r in metrics.read_metrics(workdir, "train")]
      if steps and steps[-1] >= step:
        return steps[-1]
    time.sleep(0.005)
  raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_bitwise(tokenizer_path, tmp_path):
  """N steps straight vs killed with SIGKILL after step >= 13 (checkpoint at 8), then the same
  command again: identical losses in metrics.jsonl and identical final parameters."""
  tok = f"--config.data.tokenizer={tokenizer_path}"
  straight_dir, killed_dir = str(tmp_path / "straight"), str(tmp_path / "killed")
  subprocess.run(_command(straight_dir, tok, *SUBPROCESS_OVERRIDES), env=_env(), check=True,
                 capture_output=True)
  proc = subprocess.Popen(_command(killed_dir, tok, *SUBPROCESS_OVERRIDES), env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  killed_at = _wait_for_step(killed_dir, 13, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert killed_at < 60 and not os.path.exists(os.path.join(killed_dir, "summary.json"))
  assert os.path.exists(os.path.join(killed_dir, ".lock"))  # stale: taken over by the rerun
  subprocess.run(_command(killed_dir, tok, *SUBPROCESS_OVERRIDES), env=_env(), check=True,
                 capture_output=True)
  with open(os.path.join(killed_dir, "summary.json")) as f:
    assert json.load(f)["resumed_from_step"] in (8, 16, 24, 32, 40, 48, 56)
  assert _records(killed_dir) == _records(straight_dir)
  _assert_params_equal(_final_params(killed_dir), _final_params(straight_dir))


@pytest.mark.slow
def test_sigkill_on_tokenized_shards_resumes_bitwise_like_the_texts(tokenizer_path, tmp_path):
  """A data stage's layout (clean JSONL, tokenized shards beside it): straight from the texts in
  memory vs killed with SIGKILL while streaming the shards, then rerun: the same losses and final
  parameters, so a resume continues at the same record and the two inputs are interchangeable."""
  clean = tmp_path / "data" / "clean"
  clean.mkdir(parents=True)
  texts = builtin.texts("general")
  for i in range(2):
    with open(clean / f"part-{i:05d}.jsonl", "w", encoding="utf-8") as f:
      f.writelines(json.dumps({"text": t}) + "\n" for t in texts[i * 3000:(i + 1) * 3000])
  shards.write_shards(sources.expand_spec(str(clean)), tokenizer_path,
                      str(tmp_path / "data" / "tokenized"), worker_count=0, progress=False)
  common = (f"--config.data.tokenizer={tokenizer_path}", f"--config.data.corpus={clean}",
            *SUBPROCESS_OVERRIDES)
  straight_dir, killed_dir = str(tmp_path / "straight"), str(tmp_path / "killed")
  subprocess.run(_command(straight_dir, "--config.data.input=memory", *common), env=_env(),
                 check=True, capture_output=True)
  command = _command(killed_dir, "--config.data.input=shards", *common)
  proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  killed_at = _wait_for_step(killed_dir, 13, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert killed_at < 60 and not os.path.exists(os.path.join(killed_dir, "summary.json"))
  subprocess.run(command, env=_env(), check=True, capture_output=True)
  for workdir, expected in ((straight_dir, "memory"), (killed_dir, "shards")):
    with open(os.path.join(workdir, "config.json")) as f:
      assert json.load(f)["resolved"]["input"] == expected
  with open(os.path.join(killed_dir, "summary.json")) as f:
    assert json.load(f)["resumed_from_step"] in (8, 16, 24, 32, 40, 48, 56)
  assert _records(killed_dir) == _records(straight_dir)
  _assert_params_equal(_final_params(killed_dir), _final_params(straight_dir))


@pytest.mark.slow
def test_sigterm_saves_and_exits_within_grace_then_resumes(tokenizer_path, tmp_path):
  tok = f"--config.data.tokenizer={tokenizer_path}"
  workdir = str(tmp_path / "term")
  overrides = (tok, *SUBPROCESS_OVERRIDES, "--config.checkpoint.sigterm_grace_secs=30")
  proc = subprocess.Popen(_command(workdir, *overrides), env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  at_signal = _wait_for_step(workdir, 10, proc)
  start = time.time()
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == ckpt_lib.PREEMPTED_EXIT_CODE, err[-2000:]
  assert time.time() - start < 30
  saved = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).latest_step()
  # The preemption save (not only the periodic ones, every 8 steps): at the step the run stopped
  # on (its last metrics record), at or after the step it had reached when signalled.
  stopped = metrics.read_metrics(workdir, "train")[-1]["step"]
  assert saved == stopped >= at_signal >= 10, (saved, stopped, at_signal)
  assert "SIGTERM: saving a checkpoint" in err
  done = subprocess.run(_command(workdir, *overrides), env=_env(), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["resumed_from_step"] == saved and summary["status"] == "complete"


@pytest.mark.slow
def test_tiny_command_learns(tmp_path):
  """The README command on one CPU device, as a user's CPU runs it: held-out MLM accuracy far
  above chance (1/vocab) and above always predicting the most frequent token."""
  workdir = str(tmp_path / "tiny")
  start = time.time()
  subprocess.run(_command(workdir), env=_env(), check=True, capture_output=True)
  wall = time.time() - start
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  accuracy = summary["final_eval"]["mlm_accuracy"]
  print(f"tiny pretraining: {wall:.0f} s wall, held-out MLM accuracy {accuracy:.3f}")
  assert summary["status"] == "complete"
  assert accuracy > 0.15 and accuracy > 100 * summary["mlm_chance_accuracy"]


def test_bad_config_exits_2_with_the_problem_not_a_traceback(tmp_path):
  proc = subprocess.run(_command(tmp_path / "w", "--config.train.batch_size=30"), env=_env(8),
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "train.batch_size: 30 is not divisible by data-parallel size" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_short_run_warms_up_for_a_share_of_it(tmp_path):
  """A user shortens the tiny run below its 100 warmup steps: the command runs, warming up for
  train.warmup_fraction of the 60 steps, and says so in one line; nothing else about noise from
  JAX's backend probe or Orbax reaches the log."""
  workdir = tmp_path / "short"
  proc = subprocess.run(_command(workdir, "--config.train.num_steps=60"), env=_env(),
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert ("train.warmup_steps=100 is not shorter than this run's 60 steps: warming up for 6 "
          "(train.warmup_fraction=0.1 of them)") in proc.stderr
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  assert summary["status"] == "complete" and summary["step"] == 60
  assert "tensorboard --logdir" in summary["tensorboard"]
  assert "Unable to initialize backend" not in proc.stderr and "orbax" not in proc.stderr
