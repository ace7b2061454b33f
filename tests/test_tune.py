"""Hyperparameter search stage: up-front errors, budget and requeue rules, pruning hook, best-config
round trip, and (slow) real searches: pruning + reproduction, kill and resume, two workers."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import optuna
from optuna.trial import TrialState
import pytest

from r1jax import configlib
from r1jax import run_dir
from r1jax.stages import finetune
from r1jax.stages import tune
from r1jax.stages import tune_space
from r1jax.stages import tune_storage

import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUNE = os.path.join(ROOT, "configs", "tune.py")

# Short trials: 1-layer tiny model, 12 steps, an eval every 4 (3 reports per trial), loss objective
# (it moves from the first steps; accuracy sits at the majority class for a while).
FAST = {
    "base.train.num_steps": 12, "base.eval.every_steps": 4, "base.checkpoint.every_steps": 4,
    "base.train.log_every_steps": 4, "base.model.n_layer": 1, "base.task.seq_len": 16,
    "base.report.latency_repeats": 1, "base.report.latency_warmup": 0,
    "objective.metric": "loss", "objective.direction": "minimize",
}


def tiny_config(**overrides):
  config = configlib.load_config(f"{TUNE}:variant=tiny")
  for key, value in {**FAST, **overrides}.items():
    configlib.set_path(config, key, value)
  return config


def _no_study_started(workdir):
  return not os.path.exists(os.path.join(workdir, "study.db")) and not os.path.exists(
      os.path.join(workdir, "trials"))


# --------------------------------------------------------------------------------------------------
# Up-front validation.


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_configs_validate(stage, variant):
  config = configlib.load_config(f"{TUNE}:variant={variant},stage={stage}")
  assert config.base.stage == stage and config.tune.stage == stage
  tune.validate(config, num_devices=jax.device_count(), process_count=1)


@pytest.mark.parametrize("overrides,message", [
    ({"space.learning_rate.low": 1e-2, "space.learning_rate.high": 1e-3},
     "space.learning_rate: the range [low=0.01, high=0.001] is inverted"),
    ({"space.dropout.low": 0.3, "space.dropout.high": 0.3},
     "space.dropout: the range [low=0.3, high=0.3] is empty"),
    ({"space.dropout.field": "model.dropuot"},
     "'model.dropuot' is not a field of the base finetune config; did you mean 'model.dropout'"),
    ({"space.dropout.field": "train"}, "'train' is not a field of the base finetune config"),
    ({"objective.metric": "f1"}, "objective.metric: 'f1' is not reported by any finetune eval; "
                                 "choose one of ['accuracy', 'loss', 'nll']"),
    ({"space.learning_rate.low": 0.0}, "space.learning_rate.low: 0: a log scale needs low > 0"),
    ({"space.batch_size.low": 48}, "type=pow2 needs low and high that are powers of two"),
    ({"space.batch_size.type": "float"}, "'float' does not fit train.batch_size (type int); use "
                                         "type=int or type=pow2"),
    ({"space.dropout.type": "categorical"}, "space.dropout.choices: is empty"),
    ({"space.dropout.type": "categorical", "space.dropout.choices": "0.1,high"},
     "space.dropout.choices: '0.1,high'"),
    ({"space.dropout.field": "train.learning_rate"},
     "'train.learning_rate' is already searched by space."),
    ({"enqueue": "train.learning_rate=0.5"}, "the first trial's train.learning_rate=0.5 is outside"),
    ({"enqueue": "train.nope=1"}, "is not field=value with a searched field"),
    ({"storage": "study.db"}, "storage: 'study.db' is not ''"),
    ({"sampler.name": "cmaes"}, "sampler.name: 'cmaes' is not one of"),
    ({"n_trials": 0}, "n_trials: 0 must be >= 1"),
    ({"keep_trial_workdirs": "some"}, "keep_trial_workdirs: 'some' is not one of"),
])
def test_bad_input_fails_before_any_trial(tmp_path, overrides, message):
  config = tiny_config(**overrides)
  workdir = str(tmp_path / "search")
  with pytest.raises(configlib.ConfigError) as info:
    tune.run(config, workdir)
  assert message in str(info.value)
  assert _no_study_started(workdir)


def test_every_problem_reported_at_once():
  config = tiny_config(**{"space.learning_rate.low": 1.0, "objective.metric": "f1",
                          "space.dropout.field": "model.nope"})
  with pytest.raises(configlib.ConfigError, match=r"3 problem\(s\)"):
    tune.validate(config)


def test_range_end_that_breaks_the_stage_config_is_named(tmp_path):
  # 4 rows cannot be split over the 8 test devices: the stage's own check, before any trial.
  config = tiny_config(**{"space.batch_size.low": 4, "enqueue": ""})
  with pytest.raises(configlib.ConfigError) as info:
    tune.run(config, str(tmp_path))
  text = str(info.value)
  assert "space.batch_size at train.batch_size=4" in text and "not divisible" in text
  assert "--config.base." in text  # how to fix it from the tune command line
  assert _no_study_started(str(tmp_path))


def test_bad_base_config_is_reported_with_base_prefix():
  config = tiny_config(**{"base.checkpoint.every_steps": 0})
  with pytest.raises(configlib.ConfigError, match=r"(?s)base: .*checkpoint.every_steps: 0 must be"):
    tune.validate(config)


def test_stage_mismatch_is_rejected():
  config = tiny_config()
  config.tune.stage = "pretrain"
  with pytest.raises(configlib.ConfigError, match=r"configs/tune.py:stage=pretrain"):
    tune.validate(config)


def test_unknown_config_arg_is_rejected():
  with pytest.raises(configlib.ConfigError, match="stage='distill' is not one of"):
    configlib.load_config(f"{TUNE}:variant=tiny,stage=distill")


# --------------------------------------------------------------------------------------------------
# Search space, configs, metrics.


def test_space_parsing_and_sampling():
  config = tiny_config(**{"space.dropout.type": "categorical", "space.dropout.choices": "0.1, 0.2"})
  params = {p.name: p for p in tune_space.parse_space(config, configlib.Validator(config))}
  assert params["batch_size"].optuna_name == "log2_batch_size"
  assert params["dropout"].choices == (0.1, 0.2)
  study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
  seen = set()
  for _ in range(30):
    trial = study.ask()
    values = {p.field: p.suggest(trial) for p in params.values()}
    assert values["train.batch_size"] in (32, 64, 128)
    assert 1e-4 <= values["train.learning_rate"] <= 3e-2
    assert all(p.contains(values[p.field]) for p in params.values())
    seen.add(values["train.batch_size"])
    study.tell(trial, 0.0)
  assert seen == {32, 64, 128}
  assert params["batch_size"].to_optuna(64) == 6 and params["batch_size"].from_optuna(6) == 64


def test_trial_config_sets_fields_and_keeps_base():
  config = tiny_config(init_from="")
  cfg = tune.trial_config(config, {"train.learning_rate": 1e-3, "train.batch_size": 64,
                                   "model.dropout": 0.2})
  assert (cfg.train.learning_rate, cfg.train.batch_size, cfg.model.dropout) == (1e-3, 64, 0.2)
  assert config.base.train.batch_size == 32  # the base is untouched
  finetune.validate(cfg)


def test_best_config_py_round_trip(tmp_path):
  config = tiny_config()
  cfg = tune.trial_config(config, {"train.learning_rate": 1.5e-3, "train.batch_size": 64,
                                   "model.dropout": 0.25})
  path = tmp_path / "best_config.py"
  path.write_text(configlib.render_config_py(cfg, "test"))
  loaded = configlib.load_config(str(path))
  assert configlib.to_dict(loaded) == configlib.to_dict(cfg)
  # Placeholders keep their types, so command-line overrides work as on configs/finetune.py.
  assert loaded.model.get_type("d_model") is int and loaded.model.d_model is None
  loaded.model.d_model = 32
  with pytest.raises(TypeError):
    loaded.train.batch_size = 1.5
  finetune.validate(loaded)


def test_eval_metric_table_matches_the_loss_functions():
  """The objective check trusts tune.eval_metrics; it must list what the evals really report
  (the loss functions' metrics plus the engine's "loss"; shapes only, nothing is computed)."""
  from r1jax.model import heads
  from r1jax.model import losses
  from r1jax.model import transformer_xl as txl
  rng = jax.random.PRNGKey(0)
  tokens = jnp.ones((2, 8), jnp.int32)

  def metric_names(model, loss_fn, batch, extras, **init_kw):
    def go():
      params = model.init(rng, tokens, **init_kw)["params"]
      return loss_fn(params, batch, extras, rng, True)[1][0]
    return set(jax.eval_shape(go)) | {"loss"}

  mcfg = txl.get_variant("tiny", n_layer=1)
  for multi in (False, True):
    model = heads.Classifier(mcfg, 3, multi_label=multi)
    label = jnp.array([[1, 0, 1], [0, 1, 0]], jnp.float32) if multi else jnp.array([0, 2])
    batch = {"tokens": tokens, "token_mask": tokens > 0, "label": label}
    names = metric_names(model, losses.classification_loss_fn(model, multi_label=multi), batch,
                         {})
    base = ml_collections.ConfigDict({"task": {"multi_label": multi}})
    assert names == set(tune.eval_metrics("finetune", base))
  model = heads.PretrainModel(txl.get_variant("tiny", n_layer=1, n_token_types=2))
  batch = {"tokens": tokens, "token_mask": tokens > 0, "token_types": jnp.zeros_like(tokens),
           "mlm_positions": jnp.zeros((2, 2), jnp.int32), "mlm_ids": jnp.ones((2, 2), jnp.int32),
           "mlm_weights": jnp.ones((2, 2)), "nsp_label": jnp.array([0, 1]),
           "reset_memory": jnp.array([True, True])}
  names = metric_names(model, losses.pretrain_loss_fn(model), batch,
                       {"memory": txl.init_memory(model.config, 2)},
                       token_types=jnp.zeros_like(tokens))
  base = ml_collections.ConfigDict({"data": {"nsp": True, "knowledge_file": ""}})
  assert names == set(tune.eval_metrics("pretrain", base))


# --------------------------------------------------------------------------------------------------
# Budget, dead workers, pruning hook (real optuna studies in memory).


def _study_with(states):
  study = optuna.create_study(direction="minimize")
  for i, state in enumerate(states):
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    if state == "pruned":
      trial.report(1.0, 4)
      study.tell(trial, state=TrialState.PRUNED)
    elif state == "complete":
      study.tell(trial, float(i))
    elif state == "fail":
      study.tell(trial, state=TrialState.FAIL)
  return study


def test_budget_counts_finished_and_running_but_not_requeued_failures():
  study = _study_with(["complete", "pruned", "fail", "fail", "running"])
  trials = study.get_trials()
  assert tune_storage.budget_used(trials) == 5
  tune_storage.requeue(study, trials[3])  # trial 3 died with its worker: its retry counts instead
  trials = study.get_trials()
  assert trials[-1].state == TrialState.WAITING and trials[-1].user_attrs["retry_of"] == 3
  assert trials[-1].params == trials[3].params
  assert tune_storage.budget_used(trials) == 4


def test_running_trial_of_a_dead_worker_is_failed_and_requeued():
  study = optuna.create_study(direction="minimize")
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  alive = run_dir.process_info()
  for pid_info in (dict(alive, pid=dead.pid), alive):
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    trial.report(0.5, 4)
    trial.set_user_attr("worker", pid_info)
  assert tune_storage.recover_trials(study) == [0]
  trials = study.get_trials()
  assert trials[0].state == TrialState.FAIL and "died" in trials[0].user_attrs["fail_reason"]
  assert trials[1].state == TrialState.RUNNING  # this process: alive
  retry = trials[2]
  assert retry.state == TrialState.WAITING and retry.user_attrs["retry_of"] == 0
  assert retry.intermediate_values == {4: 0.5}
  assert tune_storage.recover_trials(study) == []  # nothing left to recover


def test_interrupted_trial_is_requeued_once():
  study = _study_with(["complete"])
  trial = study.ask()
  trial.suggest_float("x", 0.0, 1.0)
  trial.set_user_attr("interrupted", True)
  study.tell(trial, state=TrialState.FAIL)
  assert tune_storage.recover_trials(study) == [1]
  assert tune_storage.recover_trials(study) == []
  trials = study.get_trials()
  assert trials[2].user_attrs["retry_of"] == 1 and tune_storage.budget_used(trials) == 1


@pytest.mark.parametrize("keep,kept", [("all", {0, 1, 2, 3, 4}), ("best", {0, 3, 4}),
                                       ("none", {3, 4})])
def test_finished_trial_workdirs_are_kept_or_cleaned(tmp_path, keep, kept):
  # 0 best, 1 worse, 2 pruned, 3 failed with its retry (4) still running: 3 and 4 always stay.
  study = _study_with(["complete", "complete", "pruned", "fail", "running"])
  study._storage.set_trial_user_attr(study.get_trials()[4]._trial_id, "retry_of", 3)
  for n in range(5):
    os.makedirs(tune.trial_dir(str(tmp_path), n))
  search = tune._Search(config=tiny_config(keep_trial_workdirs=keep), workdir=str(tmp_path),
                        params=[], module=None, lock=None)
  tune._cleanup(search, study)
  assert {int(d) for d in os.listdir(tmp_path / "trials")} == kept


def test_pruning_hook_reports_and_prunes():
  study = optuna.create_study(direction="minimize",
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
  first = study.ask()
  hook = tune.PruningHook(first, "loss")
  assert hook(4, {"loss": 1.0, "accuracy": 0.5}) is False
  hook(4, {"loss": 1.0})  # the same step again (a resumed run) is not reported twice
  study.tell(first, 1.0)
  second = study.ask()
  hook = tune.PruningHook(second, "loss")
  with pytest.raises(optuna.TrialPruned, match="pruned at step 4"):
    hook(4, {"loss": 3.0})
  assert second.user_attrs["pruned_at_step"] == 4
  with pytest.raises(ValueError, match="objective.metric='loss' is not among"):
    tune.PruningHook(study.ask(), "loss")(4, {"accuracy": 0.1})


def test_storage_spec():
  assert tune_storage.storage_spec("", "/w") == ("rdb", "sqlite:////w/study.db")
  assert tune_storage.storage_spec("journal", "/w") == ("journal", "/w/study.journal")
  assert tune_storage.storage_spec("journal:/s/j.log", "/w") == ("journal", "/s/j.log")
  assert tune_storage.storage_spec("postgresql://u:p@h/db", "/w") == (
      "rdb", "postgresql://u:p@h/db")
  with pytest.raises(ValueError, match="is not ''"):
    tune_storage.storage_spec("mysql", "/w")


def test_startup_trials_sized_to_budget():
  config = tiny_config(n_trials=10)
  assert tune.startup_trials(config) == 2  # not optuna's 10: that would be pure random search
  config.n_trials = 40
  assert tune.startup_trials(config) == 10
  sampler = tune.make_sampler(config, seed=0)
  assert isinstance(sampler, optuna.samplers.TPESampler)
  config.sampler.name = "gp"  # torch is installed here (the reference extra)
  tune.validate(config)
  assert isinstance(tune.make_sampler(config, seed=0), optuna.samplers.GPSampler)
  config.pruner.name = "hyperband"
  assert isinstance(tune.make_pruner(config), optuna.pruners.HyperbandPruner)


# --------------------------------------------------------------------------------------------------
# Real searches.


def test_tiny_search_end_to_end(tmp_path):
  """Two 4-step trials in this process: the study, its outputs and a no-op rerun."""
  workdir = str(tmp_path / "search")
  config = tiny_config(n_trials=2, keep_trial_workdirs="none", **{
      "base.train.num_steps": 4, "base.eval.every_steps": 2, "base.checkpoint.every_steps": 2,
      "pruner.name": "none"})  # evals are still reported (for the report's curves)
  summary = tune.run(config, workdir)
  assert summary["budget_used"] == 2 and summary["states"]["COMPLETE"] == 2
  trials = summary["trials"]
  assert trials[0]["notes"] == "enqueued (base)"
  assert trials[0]["values"] == {f: configlib.get_path(config.base, f) for f in (
      "train.learning_rate", "train.batch_size", "model.dropout")}  # the base config's values
  for t in trials:
    assert sorted(t["intermediate"]) == [2, 4]  # reported at each eval through on_eval
    assert t["value"] == pytest.approx(t["intermediate"][t["value_step"]])
    assert not os.path.exists(t["workdir"])  # keep_trial_workdirs=none
  best = summary["best"]
  assert best["value"] == min(t["value"] for t in trials)
  for name in ("report.md", "history.png", "best_config.py", "best_config.json", "summary.json",
               "config.json", "study.db"):
    assert os.path.exists(os.path.join(workdir, name)), name
  report = open(os.path.join(workdir, "report.md")).read()
  assert "## Trials" in report and f"--config={workdir}/best_config.py" in report
  with open(os.path.join(workdir, "best_config.json")) as f:
    best_json = json.load(f)
  assert best_json["train"]["batch_size"] == best["config_values"]["train.batch_size"]
  # Rerunning a finished search starts no trial.
  again = tune.run(config, workdir)
  assert again["trials_run_by_this_worker"] == 0 and again["budget_used"] == 2


def _env():
  env = dict(os.environ)
  # One CPU device, as the CLI runs for a user, compiled at conftest's fast settings (the trials'
  # time is mostly compiling: 12-step runs of a 1-layer model).
  env["XLA_FLAGS"] = xla_env.flags(1)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _cli(workdir, **overrides):
  flags = {**FAST, **overrides}
  return [sys.executable, "-m", "r1jax.main", f"--config={TUNE}:variant=tiny",
          f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()]


def _trials(workdir, storage=""):
  kind, where = tune_storage.storage_spec(storage, workdir)
  store = (optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(where))
           if kind == "journal" else where)
  return optuna.load_study(study_name="tune", storage=store).get_trials()


@pytest.mark.slow
def test_search_prunes_and_best_config_reproduces(tmp_path):
  workdir = str(tmp_path / "search")
  os.makedirs(workdir)
  # Queue two reasonable trials and then a hopeless one (learning rate 1e-4 barely moves the loss
  # in 12 steps): with the median pruner active after 2 trials, the third is pruned at its first
  # eval; so is the fourth. The fifth is TPE's.
  study = optuna.create_study(study_name="tune", storage=f"sqlite:///{workdir}/study.db",
                              direction="minimize")
  for lr, bs in ((3e-3, 5), (1e-2, 5), (1e-4, 5), (1e-4, 6)):
    study.enqueue_trial({"learning_rate": lr, "log2_batch_size": bs, "dropout": 0.1})
  started = time.time()
  subprocess.run(_cli(workdir, n_trials=5, **{"pruner.startup_trials": 2}), cwd=ROOT, env=_env(),
                 check=True, capture_output=True)
  search_secs = time.time() - started
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  states = summary["states"]
  assert states["COMPLETE"] + states["PRUNED"] == 5, states
  assert states["PRUNED"] >= 1 and states["COMPLETE"] >= 2, states
  pruned = [t for t in summary["trials"] if t["state"] == "PRUNED"]
  assert all(t["steps"] < 12 for t in pruned)  # stopped before the end
  for name in ("report.md", "history.png", "importances.png", "best_config.py"):
    assert os.path.exists(os.path.join(workdir, name)), name

  # The best trial's config, run on its own, reproduces its score.
  best = summary["best"]
  rerun = str(tmp_path / "best_alone")
  started = time.time()
  subprocess.run([sys.executable, "-m", "r1jax.main", f"--config={workdir}/best_config.py",
                  f"--workdir={rerun}"], cwd=ROOT, env=_env(), check=True, capture_output=True)
  with open(os.path.join(rerun, "summary.json")) as f:
    alone = json.load(f)
  value, _ = tune.trial_value("finetune", alone, rerun, "loss")
  assert value == pytest.approx(best["value"], rel=1e-5, abs=1e-6)
  print(f"search of 5 trials: {search_secs:.0f} s; best alone: {time.time() - started:.0f} s; "
        f"states {states}; best {best['value']:.5f} -> alone {value:.5f}")


@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_completed_trials(tmp_path):
  workdir = str(tmp_path / "search")
  # 24 steps (checkpoints every 4): trial 1 must still be running when it is killed, which
  # 12 steps did not guarantee on a quiet machine (it finished between two polls).
  cmd = _cli(workdir, n_trials=3, **{"pruner.name": "none", "base.train.num_steps": 24})
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  # Kill it once trial 0 is complete and trial 1 has saved a checkpoint.
  deadline = time.time() + 900
  ckpts = os.path.join(workdir, "trials", "1", "phases", "0_full", "checkpoints")
  while time.time() < deadline:
    time.sleep(0.05)
    if os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts)):
      break
    assert proc.poll() is None, "the search ended before it could be killed"
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  before = _trials(workdir)
  assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.RUNNING]
  completed_at = before[0].datetime_complete

  subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, capture_output=True)
  after = _trials(workdir)
  assert len(after) > len(before)
  assert after[0].state == TrialState.COMPLETE and after[0].datetime_complete == completed_at
  assert after[1].state == TrialState.FAIL and "died" in after[1].user_attrs["fail_reason"]
  retry = after[2]
  assert retry.user_attrs["retry_of"] == 1 and retry.params == after[1].params
  assert retry.state == TrialState.COMPLETE
  assert [t.state for t in after[3:]] == [TrialState.COMPLETE]
  assert tune_storage.budget_used(after) == 3
  # The retry took over the killed trial's workdir and resumed from its checkpoint.
  assert not os.path.exists(os.path.join(workdir, "trials", "1"))
  with open(os.path.join(workdir, "trials", "2", "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if '"eval"' in line]
  assert steps == sorted(set(steps)) and steps[-1] == 24


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["", "journal"])
def test_two_workers_share_one_budget(tmp_path, storage):
  workdir = str(tmp_path / "search")
  cmd = _cli(workdir, n_trials=4, storage=storage, **{"base.train.num_steps": 8})
  started = time.time()
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for _ in range(2)]
  outputs = [p.communicate(timeout=1800)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
    assert "database is locked" not in out and "Traceback" not in out
  trials = _trials(workdir, storage)
  assert len(trials) == 4 and tune_storage.budget_used(trials) == 4
  assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
  workers = [t.user_attrs["worker"]["pid"] for t in trials]
  assert set(workers) == {p.pid for p in procs}  # both worked, each trial by exactly one
  for t in trials:  # one run per trial workdir, not two interleaved
    with open(os.path.join(workdir, "trials", str(t.number), "metrics.jsonl")) as f:
      evals = [json.loads(line)["step"] for line in f if '"eval"' in line]
    assert evals == sorted(set(evals))
  print(f"two workers ({storage or 'sqlite'}): 4 trials in {time.time() - started:.0f} s")
