"""schedule=auto in the pipeline (issue #26 part 2): on a forced plateau each pretraining stage is
left at the right eval and the pipeline moves on, every decision is in the log, summary.json and
the report; a forced domain-shift verdict skips or runs domain pretraining, its decision taken
back on a rerun; bad auto settings are one error; (slow) a pipeline killed mid-stage resumes
with the same decisions as an uninterrupted run."""
import json
import os
import subprocess

import pytest

from r1jax import configlib
from r1jax import run_dir
from r1jax.stages import pipeline
from r1jax.stages import pipeline_report
from r1jax.stages import pipeline_schedule
from r1jax.stages import pipeline_stages
from r1jax.train import metrics as metrics_lib
from r1jax.train import schedule as schedule_lib
from test_pipeline import _cli_args
from test_pipeline import _config
from test_pipeline import _run_until
from test_pipeline import _small_config
from test_pipeline import ROOT
import xla_env


@pytest.mark.parametrize("overrides,message", [
    ({"auto.finetune.metric": "bleu"}, r"auto.finetune.metric: 'bleu' is not among the eval "
     r"metrics \['accuracy', 'loss', 'nll'\] that finetune_general and finetune_domain report"),
    ({"auto.pretrain.metric": "accuracy"}, r"auto.pretrain.metric: 'accuracy' is not among"),
    ({"auto.policy": "bandit"}, r"auto.policy: 'bandit' is not one of \('adaptive', 'rule'\)"),
    ({"auto.pretrain.relative": 1.5}, r"auto.pretrain.relative: 1.5 is outside \(0.0, 1.0\)"),
    ({"auto.lr_factor": 1.0}, r"auto.lr_factor: 1.0 is outside \(0.0, 1.0\)"),
    ({"auto.max_lr_drops": -1}, r"auto.max_lr_drops: -1"),
    ({"pipeline.pretrain_domain.eval.every_steps": 0},
     r"pipeline.pretrain_domain.eval.every_steps: 0: schedule=auto decides at each eval"),
    ({"auto.diagnose.low_word_coverage": 1.5},
     r"auto.diagnose.low_word_coverage: 1.5 is outside \[0.0, 1.0\]"),
])
def test_bad_auto_settings_are_one_error(overrides, message):
  with pytest.raises(configlib.ConfigError, match=message) as e:
    pipeline.validate(_config(schedule="auto", **overrides), num_devices=8, process_count=1)
  assert str(e.value).count("\n") == 1  # one problem, one line
  with pytest.raises(configlib.ConfigError, match=r"schedule: 'sometimes' is not one of"):
    pipeline.validate(_config(schedule="sometimes"), num_devices=8, process_count=1)


def _auto(tmp_path, **overrides):
  """data + both pretraining stages, 12 steps each with an eval every 2; policy rule with a
  minimum no gain reaches (a forced plateau): each stage lowers its learning rate at its second
  eval's rate (auto.max_lr_drops=1) and leaves at the next."""
  values = {"stages": "data_general,data_domain,pretrain_general,pretrain_domain",
            "schedule": "auto", "auto.policy": "rule", "auto.window": 1,
            "auto.pretrain.min_gain": 1e6, "auto.max_lr_drops": 1,
            "pipeline.pretrain_general.train.num_steps": 12}
  s = "pipeline.pretrain_domain."
  for key, value in (("train.num_steps", 12), ("train.warmup_steps", 1), ("train.batch_size", 8),
                     ("train.log_every_steps", 2), ("eval.every_steps", 2), ("eval.num_batches", 1),
                     ("checkpoint.every_steps", 2), ("train.progress_bar", False),
                     ("checkpoint.async_save", False)):
    values[s + key] = value
  values.update(overrides)
  return _small_config(tmp_path, **values)


def test_auto_schedule_moves_on_at_a_forced_plateau_and_records_why(tmp_path):
  wd = str(tmp_path / "run")
  summary = pipeline.run(_auto(tmp_path), wd)
  for name in ("pretrain_general", "pretrain_domain"):
    stage = run_dir.read_json(os.path.join(wd, name, "summary.json"))
    # Evals at 2 (no rate yet), 4 (a rate, under the minimum: the learning rate x0.3) and 6 (the
    # rate since step 4, under it again): left at step 6 of 12.
    assert (stage["step"], stage["num_steps"], stage["stopped_by"]) == (6, 12, "on_eval"), name
    log = schedule_lib.read_log(pipeline_schedule.log_path(wd, name))
    assert [(d["step"], d["action"]) for d in log["decisions"]] == [
        (2, "continue"), (4, "lower_lr"), (6, "leave_stage")]
    assert log["left_at"] == 6 and log["settings"]["metric"] == "mlm_loss"
    lowered = log["decisions"][1]
    assert "per 1000 steps < 1e+06 (the rule's minimum)" in lowered["reason"]
    assert "learning rate x0.3 (drop 1 of 1)" in lowered["reason"]
    # The rate from step 4 on is the (decaying) schedule's x0.3: the logged rates show it.
    assert lowered["lr_factor"] == 0.3 and 0 < lowered["learning_rate"]
    rates = {r["step"]: r["learning_rate"] for r in
             metrics_lib.read_metrics(os.path.join(wd, name), "train")}
    assert 0 < rates[6] < 0.31 * rates[4]
    assert summary["schedule_decisions"][name]["left_at"] == 6
  # The domain stage started from the general one's last (step 6) checkpoint.
  assert json.load(open(os.path.join(wd, "pretrain_domain", "config.json")))["init_from"] == (
      os.path.join(wd, "pretrain_general"))
  assert summary["schedule"] == "auto"
  report = open(os.path.join(wd, "report.md")).read()
  section = report.split("## Stage transitions (schedule=auto)")[1]
  assert "### pretrain_general" in section and "### pretrain_domain" in section
  assert "left at step 6, 50% of its planned 12 steps saved" in section
  assert section.count("| leave_stage |") == 2 and section.count("| lower_lr |") == 2
  assert "learning rate x0.3 (drop 1 of 1)" in section

  # The same workdir under schedule=fixed: the finished stages were made by another schedule.
  with pytest.raises(pipeline.PipelineError, match=r"schedule_auto.policy: 'rule' -> None"):
    pipeline.plan(_auto(tmp_path, schedule="fixed"), wd)
  # Rerun as it was: nothing to redo, the decisions stay.
  again = pipeline.run(_auto(tmp_path), wd)
  assert again["ran"] == [] and again["schedule_decisions"]["pretrain_domain"]["left_at"] == 6


def test_auto_schedule_skips_domain_pretraining_when_the_diagnostic_finds_no_shift(tmp_path):
  """The same data under verdict thresholds where it counts as no shift, then as a shift: the
  first skips pretrain_domain (finetune_domain would read the general model) with the numbers in
  pipeline_state/, summary.json and the report; a rerun takes the decision back rather than
  measuring again; the second decides afresh and runs it."""
  same = {"auto.diagnose.moderate_ppl_ratio": 1e6, "auto.diagnose.large_ppl_ratio": 1e6}
  no_shift = _auto(tmp_path, **same, **{"auto.diagnose.low_word_coverage": 0.0})
  wd = str(tmp_path / "run")
  summary = pipeline.run(no_shift, wd)
  assert summary["ran"] == ["data_general", "data_domain", "pretrain_general"]
  assert summary["stages"]["pretrain_domain"]["action"] == "skip"
  assert not os.path.exists(os.path.join(wd, "pretrain_domain"))
  decision = run_dir.read_json(pipeline_schedule.decision_path(wd))
  assert (decision["action"], decision["level"]) == ("skip_stage", "small")
  m = decision["measures"]
  assert 0.0 < m["word_token_coverage"] < 1.0 and m["perplexity_ratio"] > 0
  assert m["eval_rows_per_corpus"] == 4 * 16 and decision["general_model"]["step"] == 6
  assert summary["schedule_decisions"]["domain_pretraining"] == decision
  assert "finetune directly" in decision["reason"]
  # The adapted model's finetuning now reads the general model, and depends on it.
  general = os.path.join(wd, "pretrain_general")
  assert pipeline.stage_config(no_shift, "finetune_domain", wd).init_from == general
  assert pipeline.needs(no_shift, "finetune_domain", wd) == ("pretrain_general",)
  report = open(os.path.join(wd, "report.md")).read()
  section = report.split("## Stage transitions (schedule=auto)")[1]
  assert "### pretrain_domain: run or skip" in section and "**Skipped.**" in section
  assert "finetune_domain (the \"domain-adapted\" model) starts from the general model" in section
  assert "| 4 | pretrain_domain |  |  | skipped by schedule=auto (no domain shift) |" in report

  # A rerun (after a kill, say) takes the logged decision back: its numbers are not measured
  # again (an edited number stays), and nothing runs.
  ratio, m["perplexity_ratio"] = m["perplexity_ratio"], 123.0
  run_dir.write_json(pipeline_schedule.decision_path(wd), decision)
  again = pipeline.run(no_shift, wd)
  assert again["ran"] == [] and again["stages"]["pretrain_domain"]["action"] == "skip"
  assert run_dir.read_json(pipeline_schedule.decision_path(wd))["measures"][
      "perplexity_ratio"] == 123.0

  # Thresholds under which the same data is a (large) shift: decided again (the settings
  # differ), and pretrain_domain runs (the pipeline's next step; not trained here).
  shift = _auto(tmp_path, **same, **{"auto.diagnose.low_word_coverage": 1.0})
  assert pipeline.plan(shift, wd)[3].action == "run"
  assert not pipeline_schedule.skips(shift, wd, "pretrain_domain",
                                     pipeline.stage_config(shift, "pretrain_domain", wd))
  decision = run_dir.read_json(pipeline_schedule.decision_path(wd))
  assert (decision["action"], decision["level"]) == ("run_stage", "large")
  assert decision["measures"]["perplexity_ratio"] == pytest.approx(ratio)
  assert pipeline.stage_config(shift, "finetune_domain", wd).init_from == os.path.join(
      wd, "pretrain_domain")
  pipeline_report.write_report(wd)
  assert "**Run.** Decided from the general model" in open(os.path.join(wd, "report.md")).read()


@pytest.mark.slow
def test_killed_auto_pipeline_resumes_with_the_same_decisions(tmp_path):
  """General then domain pretraining under schedule=auto (adaptive policy, every eval a
  decision), killed once pretrain_domain has logged a decision past its last checkpoint, then
  rerun: every stage's decisions (and where it left) are those of an uninterrupted run."""
  env = dict(os.environ, R1JAX_DISTRIBUTED="off", XLA_FLAGS=xla_env.flags(1))
  stages = "--config.stages=data_general,data_domain,pretrain_general,pretrain_domain"

  def cmd(wd):
    args = [a for a in _cli_args(tmp_path, wd) if not a.startswith("--config.stages=")]
    s = "--config.pipeline."
    return args + [stages, "--config.schedule=auto", "--config.auto.window=1",
                   "--config.auto.pretrain.relative=0.9", "--config.auto.pretrain.metric=loss",
                   f"{s}pretrain_general.eval.every_steps=4",
                   f"{s}pretrain_domain.eval.every_steps=2",
                   f"{s}pretrain_domain.checkpoint.every_steps=4"]

  def decisions(wd):
    return {name: schedule_lib.read_log(pipeline_schedule.log_path(wd, name))["decisions"]
            for name in ("pretrain_general", "pretrain_domain")}

  reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
  subprocess.run(cmd(reference), cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, timeout=900)
  want = decisions(reference)
  left = run_dir.read_json(pipeline_schedule.log_path(reference, "pretrain_domain"))["left_at"]
  # The domain stage decides at every eval (2, 4, 6, ...) and checkpoints every 4 steps: kill it
  # once it has logged the decision at step 6 (its checkpoint is step 4's), or earlier if the
  # uninterrupted run left before.
  kill_at = 6 if left is None or left > 6 else left - 2
  log = pipeline_schedule.log_path(resumed, "pretrain_domain")
  assert _run_until(cmd(resumed), env, lambda: any(
      d["step"] == kill_at for d in (schedule_lib.read_log(log) or {}).get("decisions", [])))
  state = run_dir.read_json(pipeline_stages.state_path(resumed, "pretrain_domain"))
  assert state["status"] == "running"
  assert not _run_until(cmd(resumed), env, lambda: False, timeout=900)
  assert decisions(resumed) == want
  summary = run_dir.read_json(os.path.join(resumed, "summary.json"))
  assert summary["schedule_decisions"]["pretrain_domain"]["left_at"] == left
  assert run_dir.read_json(pipeline_stages.state_path(resumed, "pretrain_domain"))[
      "attempts"] == 2
