"""Pipeline: config built from the stage configs, stage selection and input checks, skipping of
finished stages, refusal of changed or stale ones, the final report, and (slow) killing the
pipeline mid-stage twice and rerunning gives the same final numbers as an uninterrupted run."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from r1jax import configlib
from r1jax import run_dir
from r1jax.data import builtin
from r1jax.stages import pipeline
from r1jax.stages import pipeline_report
from r1jax.stages import pipeline_schedule
from r1jax.stages import pipeline_stages

import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "configs", "pipeline.py")


def _config(**overrides):
  config = configlib.load_config(f"{PIPELINE}:variant=tiny")
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def _corpus(tmp_path, name, n):
  """The first n documents of an embedded corpus as a JSONL file (quick to clean)."""
  path = tmp_path / f"{name}.jsonl"
  with gzip.open(builtin.path(name), "rt") as src, open(path, "w") as dst:
    for _, line in zip(range(n), src):
      dst.write(line)
  return str(path)


# --------------------------------------------------------------------------------------------------
# Config and selection.


def test_stage_configs_come_from_the_stage_files(tmp_path, monkeypatch):
  config = _config()
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("pipeline_config", PIPELINE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert tuple(module.STAGE_CONFIGS) == pipeline_stages.STAGES
  # Its stage files are shipped beside it, so the pipeline loads from the package (a wheel) too.
  assert set(module.STAGE_CONFIGS.values()) <= set(configlib.shipped_configs())
  monkeypatch.chdir(tmp_path)
  assert configlib.load_config("pipeline:variant=tiny").to_dict() == config.to_dict()
  assert tuple(config.pipeline) == tuple(sorted(pipeline_stages.STAGES))
  pretrain = configlib.load_config(os.path.join(ROOT, "configs", "pretrain.py:variant=tiny"))
  nested = config.pipeline.pretrain_general
  # Defaults from configs/pretrain.py, plus the pipeline's few overrides.
  assert nested.train.batch_size == pretrain.train.batch_size
  assert nested.data.mlm_prob == pretrain.data.mlm_prob
  assert nested.train.num_steps == 6000 != pretrain.train.num_steps
  assert config.pipeline.data_general.data.inputs == "builtin:general"
  assert config.pipeline.data_domain.tokenizer.train is False
  base = configlib.load_config(f"{PIPELINE}:variant=base")
  assert base.pipeline.pretrain_general.train.num_steps == configlib.load_config(
      os.path.join(ROOT, "configs", "pretrain.py:variant=base")).train.num_steps


def test_stage_config_connects_stages(tmp_path):
  config = _config(**{"sources.quantize": "distill", "seed": 3})
  wd = str(tmp_path)
  pg = pipeline.stage_config(config, "pretrain_general", wd)
  assert pg.data.corpus == os.path.join(wd, "data_general", "data", "clean")
  assert pg.data.tokenizer == os.path.join(wd, "data_general", "tokenizer.model")
  assert pg.seed == config.pipeline.pretrain_general.seed + 3
  pd = pipeline.stage_config(config, "pretrain_domain", wd)
  assert pd.init_from == os.path.join(wd, "pretrain_general")
  assert pd.data.corpus == os.path.join(wd, "data_domain", "data", "clean")
  assert pipeline.stage_config(config, "finetune_domain", wd).init_from == os.path.join(
      wd, "pretrain_domain")
  assert pipeline.stage_config(config, "compare", wd).workdirs == ",".join(
      [os.path.join(wd, "finetune_general"), os.path.join(wd, "finetune_domain")])
  assert pipeline.stage_config(config, "quantize", wd).init_from == os.path.join(wd, "distill")
  # The nested config itself is left as the user set it.
  assert config.pipeline.pretrain_domain.init_from == ""


def test_default_selection_and_order():
  assert pipeline.selected_stages(_config()) == [s for s in pipeline_stages.STAGES if s != "tune"]
  assert "tune" in pipeline.selected_stages(_config(run_tune=True))
  # Quantizing the pruned model puts prune before quantize.
  order = pipeline.selected_stages(_config(**{"sources.quantize": "prune"}))
  assert order.index("prune") < order.index("quantize")
  # Listed order does not matter; the run order follows the dependencies.
  assert pipeline.selected_stages(_config(stages="finetune_general,data_general,pretrain_general")
                                  ) == ["data_general", "pretrain_general", "finetune_general"]


@pytest.mark.parametrize("overrides,message", [
    ({"stages": "data,pretrain"}, r"\['data', 'pretrain'\] not among the pipeline stages"),
    ({"sources.quantize": "data_general"}, r"sources.quantize: 'data_general' is not one of"),
    ({"pipeline.pretrain_general.train.learning_rate": -1.0},
     r"fix with --config.<key>=<value>:\n  pipeline.pretrain_general.train.learning_rate: -1.0 "
     r"is outside"),
    ({"init_from": "/nonexistent/pretrain"}, r"init_from: '/nonexistent/pretrain' is not a dir"),
    ({"budget_minutes": 3.0}, r"budget_minutes: 3 is too small to train anything: the 10 selected "
                              r"stages need at least 5 minutes"),
])
def test_bad_configs_are_refused_up_front(overrides, message):
  with pytest.raises(configlib.ConfigError, match=message):
    pipeline.validate(_config(**overrides), num_devices=8, process_count=1)


def _task_files(tmp_path, labels=("ab", "ab", "ab")):
  """train/dev/test JSONL with fields "note"/"code"; split i draws its labels from labels[i]."""
  paths = {}
  for split, names in zip(("train", "dev", "test"), labels):
    rows = [{"note": f"{split} note {i} about storage", "code": names[i % len(names)]}
            for i in range(12)]
    paths[split] = tmp_path / f"{split}.jsonl"
    paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
  return {k: str(v) for k, v in paths.items()}


def test_task_keys_reach_every_stage_that_reads_the_task(tmp_path):
  files = _task_files(tmp_path)
  notes = tmp_path / "notes.txt"
  notes.write_text("storage arrays and their controllers\n")
  config = _config(**{f"task.{k}": v for k, v in files.items()},
                   **{"task.text_field": "note", "task.label_field": "code",
                      "domain_corpus": str(notes), "run_tune": True})
  for stage in ("finetune_general", "finetune_domain"):
    task = pipeline.stage_config(config, stage, "/w").task
    assert (task.train, task.dev, task.test) == (files["train"], files["dev"], files["test"])
    assert (task.text_field, task.label_field) == ("note", "code")
  assert pipeline.stage_config(config, "tune", "/w").base.task.train == files["train"]
  # Domain pretraining reads the domain text and the task's train and dev text, never its test.
  domain = pipeline.stage_config(config, "data_domain", "/w").data
  assert domain.inputs.split(",") == [str(notes), files["train"], files["dev"]]
  assert domain.text_field == "note"
  assert files["test"] not in pipeline.stage_config(config, "data_domain", "/w").data.inputs
  # The vocabulary learns from the same text (domain_vocab), and never from the test split.
  vocab = pipeline.stage_config(config, "data_general", "/w").tokenizer.extra_inputs
  assert vocab == domain.inputs and files["test"] not in vocab
  assert not pipeline.stage_config(_config(**{"task.train": files["train"], "domain_vocab": False}),
                                   "data_general", "/w").tokenizer.extra_inputs
  # Your train split without dev/test: dev is carved from it and test is dev, never the embedded
  # task's splits.
  only_train = pipeline.stage_config(_config(**{"task.train": files["train"]}),
                                     "finetune_domain", "/w").task
  assert (only_train.dev, only_train.test) == ("", "")
  pipeline.validate(config, num_devices=8, process_count=1)
  # Compression stages read the task from their finetuned source's config.json.
  assert all(not pipeline.stage_config(config, s, "/w").task.train
             for s in ("distill", "quantize", "prune"))


@pytest.mark.parametrize("case,message", [
    ("one_class", r"task: task.train has a single class \['a'\]"),
    ("unseen_test_label", r"task: task.test has label\(s\) never seen in the training data: 'z'"),
    ("empty_domain", r"domain_corpus: '.*empty.txt': Input file .* is empty"),
    ("blank_domain", r"domain_corpus: '.*blank.txt' holds no non-empty documents"),
    ("no_domain_text", r"domain_corpus: your task .* comes with no domain text"),
    ("dev_without_train", r"task.train: is empty while task.dev is set"),
])
def test_bad_task_or_domain_text_is_refused_before_anything_runs(tmp_path, case, message):
  labels = {"one_class": ("a", "a", "a"), "unseen_test_label": ("ab", "ab", "az")}.get(
      case, ("ab", "ab", "ab"))
  files = _task_files(tmp_path, labels)
  overrides = {f"task.{k}": v for k, v in files.items()}
  overrides.update({"task.text_field": "note", "task.label_field": "code"})
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "blank.txt").write_text("\n   \n")
  if case == "empty_domain":
    overrides["domain_corpus"] = str(tmp_path / "empty.txt")
  elif case == "blank_domain":
    overrides["domain_corpus"] = str(tmp_path / "blank.txt")
  elif case == "no_domain_text":
    overrides["tapt"] = False
  elif case == "dev_without_train":
    overrides = {"task.dev": files["dev"]}
  wd = tmp_path / "run"
  with pytest.raises(configlib.ConfigError, match=message):
    pipeline.run(_config(**overrides), str(wd))
  assert not wd.exists() or not os.listdir(wd)


def test_budget_shares_the_time_left_among_the_stages_still_to_run():
  config = _config(budget_minutes=30.0)
  order = pipeline.selected_stages(config)
  rest = order[order.index("pretrain_general"):]
  weights = sum(pipeline_schedule.BUDGET_WEIGHTS[s] for s in rest)
  first = pipeline_schedule.stage_minutes(config, "pretrain_general", 60.0, rest)
  assert first == pytest.approx(29.0 * pipeline_schedule.BUDGET_WEIGHTS["pretrain_general"] / weights)
  # A stage that starts late gets its share of what is left, never of the whole budget.
  late = pipeline_schedule.stage_minutes(config, "finetune_domain", 25 * 60.0, order[-4:])
  assert late < 5.0 * pipeline_schedule.BUDGET_WEIGHTS["finetune_domain"] / sum(
      pipeline_schedule.BUDGET_WEIGHTS[s] for s in order[-4:]) + 1e-9
  assert pipeline_schedule.stage_minutes(config, "finetune_domain", 40 * 60.0, order[-4:]) == 0.05
  # Stages that do not size their training, and runs without a budget, get none.
  assert pipeline_schedule.stage_minutes(config, "quantize", 60.0, ["quantize"]) is None
  assert pipeline_schedule.stage_minutes(config, "data_general", 0.0, order) is None
  assert pipeline_schedule.stage_minutes(_config(), "pretrain_general", 0.0, order) is None


def test_init_from_replaces_general_pretraining(tmp_path):
  config = _config(init_from=str(tmp_path))
  assert "pretrain_general" not in pipeline.selected_stages(config)
  assert pipeline.stage_config(config, "finetune_general", "/w").init_from == str(tmp_path)
  with pytest.raises(configlib.ConfigError, match="pretrain_general is selected but init_from"):
    pipeline.selected_stages(_config(init_from=str(tmp_path), stages="pretrain_general"))


def test_missing_inputs_are_refused_before_anything_runs(tmp_path):
  config = _config(stages="finetune_domain,quantize")
  with pytest.raises(pipeline.PipelineError) as e:
    pipeline.plan(config, str(tmp_path))
  assert "finetune_domain needs the output of pretrain_domain" in str(e.value)
  assert "add pretrain_domain to --config.stages or run it first" in str(e.value)
  assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------------------------------
# Running, skipping, refusing, reporting (data + a few pretraining steps on small corpora).


def _small_config(tmp_path, **overrides):
  values = {
      "stages": "data_general,data_domain,pretrain_general",
      "tapt": False,  # the small domain corpus only (TAPT adds the embedded task's 4,600 rows)
      "pipeline.data_general.data.inputs": _corpus(tmp_path, "general", 300),
      "pipeline.data_domain.data.inputs": _corpus(tmp_path, "domain", 200),
      "pipeline.data_general.tokenizer.vocab_size": 500,
      "pipeline.data_general.data.progress_bar": False,
      "pipeline.data_domain.data.progress_bar": False,
      "pipeline.pretrain_general.train.num_steps": 4,
      "pipeline.pretrain_general.train.warmup_steps": 1,
      "pipeline.pretrain_general.train.batch_size": 8,
      "pipeline.pretrain_general.train.log_every_steps": 2,
      "pipeline.pretrain_general.eval.every_steps": 2,
      "pipeline.pretrain_general.eval.num_batches": 1,
      "pipeline.pretrain_general.checkpoint.every_steps": 2,
      "pipeline.pretrain_general.train.progress_bar": False,
      "pipeline.pretrain_general.checkpoint.async_save": False,
  }
  values.update(overrides)
  return _config(**values)


def test_run_skip_refuse_and_report(tmp_path, capsys):
  wd = str(tmp_path / "run")
  config = _small_config(tmp_path)
  summary = pipeline.run(config, wd)
  assert summary["ran"] == ["data_general", "data_domain", "pretrain_general"]
  for name in summary["ran"]:
    assert os.path.exists(os.path.join(wd, name, "summary.json"))
    assert os.path.exists(os.path.join(wd, name, "config.json"))
    state = run_dir.read_json(pipeline_stages.state_path(wd, name))
    assert state["status"] == "finished" and state["wall_secs"] > 0
  assert json.load(open(os.path.join(wd, "pretrain_general", "config.json")))[
      "data"]["corpus"] == os.path.join(wd, "data_general", "data", "clean")
  assert f"Pipeline report: {os.path.join(wd, 'report.md')}" in capsys.readouterr().out

  report = open(os.path.join(wd, "report.md")).read()
  for text in ("## Stages", "| 1 | [data_general](data_general)", "## Data", "dropped by rule",
               "## Loss curves", "![loss curves](loss_curves.png)", "## Pretraining",
               "wall time"):
    assert text in report, text
  assert "| 5 | finetune_general |" in report and "not run" in report
  assert os.path.getsize(os.path.join(wd, "loss_curves.png")) > 1000
  html = open(os.path.join(wd, "report.html")).read()
  assert "<table>" in html and '<img src="loss_curves.png"' in html

  # Rerun: everything is skipped, nothing is rewritten; cosmetic keys do not count as changes.
  before = {n: os.path.getmtime(os.path.join(wd, n, "summary.json")) for n in summary["ran"]}
  again = pipeline.run(_small_config(tmp_path, **{
      "pipeline.pretrain_general.train.progress_bar": True,
      "pipeline.pretrain_general.mesh.data": 2, "pipeline.pretrain_general.mesh.fsdp": -1}), wd)
  assert again["ran"] == []
  assert all(s["action"] == "skip" for s in again["stages"].values())
  assert before == {n: os.path.getmtime(os.path.join(wd, n, "summary.json")) for n in before}

  # A later stage can be selected alone once its inputs are finished; a finished stage with a
  # changed config is refused with what to delete (itself and what was made from it).
  assert [p.name for p in pipeline.plan(_small_config(tmp_path, stages="pretrain_domain"), wd)
          ] == ["pretrain_domain"]
  changed = _small_config(tmp_path, **{"pipeline.data_general.clean.min_chars": 20})
  with pytest.raises(pipeline.PipelineError) as e:
    pipeline.plan(changed, wd)
  assert "clean.min_chars: 10 -> 20" in str(e.value)
  assert f"Delete {os.path.join(wd, 'data_general')}, {os.path.join(wd, 'pretrain_general')}" in (
      str(e.value))

  # Redoing an input makes what was built from it stale: refused before anything runs.
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(wd, "data_general"))
  with pytest.raises(pipeline.PipelineError, match=r"pretrain_general was made from earlier "
                     r"outputs of \['data_general'\], which will be redone"):
    pipeline.plan(config, wd)


def test_report_of_an_empty_workdir(tmp_path):
  paths = pipeline_report.write_report(str(tmp_path), {"variant": "tiny"})
  text = open(paths["markdown"]).read()
  assert "stages finished: 0 of 11" in text and paths["loss_curves"] is None


@pytest.mark.slow
def test_budget_minutes_bounds_the_run(tmp_path):
  """A run planned for 100,000 pretraining steps with budget_minutes=1: the measured step rate
  sizes the pretraining to what is left after the data stage, and the whole run ends in time."""
  config = _small_config(tmp_path, **{
      "budget_minutes": 1.0, "pipeline.pretrain_general.train.num_steps": 100_000,
      "pipeline.pretrain_general.train.log_every_steps": 50,
      "pipeline.pretrain_general.eval.every_steps": 500,
      "pipeline.pretrain_general.checkpoint.every_steps": 500,
      "stages": "data_general,pretrain_general"})
  started = time.time()
  pipeline.run(config, str(tmp_path / "run"))
  wall = time.time() - started
  summary = run_dir.read_json(str(tmp_path / "run" / "pretrain_general" / "summary.json"))
  # Sized down from 100,000 to what fits; how far depends on the machine's load (a loaded 2-core
  # CPU left time for 1 step after the data stage and the rate measurement, session 20).
  assert 0 < summary["num_steps"] < 100_000
  # The budget, plus the hard stop's margin on the training share, plus the final report (88 s
  # seen with the slow suite's two workers and other jobs on 2 cores); 100,000 steps would take
  # hours.
  assert wall < 60.0 * 1.25 + 60.0, wall


# --------------------------------------------------------------------------------------------------
# Slow: kill in the middle of two stages, rerun, compare with an uninterrupted run.


def _cli_args(tmp_path, wd):
  general = _corpus(tmp_path, "general", 600)
  domain = _corpus(tmp_path, "domain", 600)
  s = "--config.pipeline."
  args = [
      f"{s}data_general.data.inputs={general}", f"{s}data_domain.data.inputs={domain}",
      f"{s}data_general.tokenizer.vocab_size=500", "--config.tapt=False",
  ]
  for stage, steps, every in (("pretrain_general", 24, 8), ("pretrain_domain", 24, 8),
                              ("finetune_domain", 24, 6)):
    args += [f"{s}{stage}.train.num_steps={steps}", f"{s}{stage}.eval.every_steps={every}",
             f"{s}{stage}.checkpoint.every_steps={every}", f"{s}{stage}.train.log_every_steps=2",
             f"{s}{stage}.train.progress_bar=False"]
    if stage.startswith("pretrain"):
      args += [f"{s}{stage}.train.warmup_steps=2", f"{s}{stage}.eval.num_batches=2"]
  args += [f"{s}quantize.report.latency_repeats=2", f"{s}quantize.report.latency_warmup=1",
           f"{s}quantize.quant.modes=dynamic",  # one int8 mode to compile and measure, not three
           f"{s}quantize.export.enabled=False", f"{s}quantize.quant.calibration_batches=2",
           f"{s}finetune_domain.report.latency_repeats=2",
           # 64-token rows: two length-bucket widths to compile per phase, not the 8 of FOLDOC's 256.
           f"{s}finetune_domain.task.seq_len=64",
           # Two phases, so that the second kill lands in a later phase than the first one.
           f"{s}finetune_domain.schedule=a_then_b"]
  # The stages on the path through the two killed ones, plus one compression stage after them.
  args.append("--config.stages=data_general,data_domain,pretrain_general,pretrain_domain,"
              "finetune_domain,quantize")
  return [sys.executable, "-m", "r1jax.main", f"--config={PIPELINE}", f"--workdir={wd}"] + args


def _final_numbers(wd):
  """Everything the pipeline computes that does not depend on timing."""
  out = {}
  for name in ("pretrain_general", "pretrain_domain"):
    s = json.load(open(os.path.join(wd, name, "summary.json")))
    out[name] = s["final_eval"]
  s = json.load(open(os.path.join(wd, "finetune_domain", "summary.json")))
  out["finetune_domain"] = {k: s["test"][k] for k in ("accuracy", "macro_f1")} | {
      "best_eval_loss": s["best_eval_loss"], "best_step": s["best_step"]}
  for name in ("quantize",):
    s = json.load(open(os.path.join(wd, name, "summary.json")))
    out[name] = {a["name"]: (a["accuracy"], a["macro_f1"], a["params"], a["bytes"])
                 for a in s["artifacts"]}
  return out


def _run_until(cmd, env, ready, timeout=900):
  """Starts cmd; SIGKILLs it (no chance to save) as soon as ready() is true. Returns True if killed."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  deadline = time.time() + timeout
  try:
    while proc.poll() is None and time.time() < deadline:
      if ready():
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True
      time.sleep(0.2)
    assert proc.poll() is not None, "pipeline did not finish in time"
    return False
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()


def _has_checkpoint(directory, at_least):
  ckpt = os.path.join(directory, "checkpoints")
  if not os.path.isdir(ckpt):
    return False
  return any(n.isdigit() and int(n) >= at_least for n in os.listdir(ckpt))


@pytest.mark.slow
def test_kill_mid_stage_and_rerun_gives_the_same_numbers(tmp_path):
  # One CPU device per run (the test process forces 8): quicker to compile, same code path.
  env = dict(os.environ, R1JAX_DISTRIBUTED="off", XLA_FLAGS=xla_env.flags(1))
  reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
  subprocess.run(_cli_args(tmp_path, reference), cwd=ROOT, env=env, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)

  cmd = _cli_args(tmp_path, resumed)
  # Kill once pretrain_domain has saved step 8 of 24, then once finetune_domain has saved step 18
  # (in its second phase, 12-24), rerunning the same command after each kill.
  assert _run_until(cmd, env, lambda: _has_checkpoint(os.path.join(resumed, "pretrain_domain"), 8))
  state = run_dir.read_json(pipeline_stages.state_path(resumed, "pretrain_domain"))
  assert state["status"] == "running"
  assert _run_until(cmd, env, lambda: _has_checkpoint(
      os.path.join(resumed, "finetune_domain", "phases", "1_stage_b"), 18))
  assert not _run_until(cmd, env, lambda: False, timeout=1800)

  assert _final_numbers(resumed) == _final_numbers(reference)
  state = run_dir.read_json(pipeline_stages.state_path(resumed, "pretrain_domain"))
  assert state["attempts"] == 2
  assert run_dir.read_json(pipeline_stages.state_path(resumed, "finetune_domain"))["attempts"] == 2
  report = open(os.path.join(resumed, "report.md")).read()
  assert "## Compression trade-off" in report
  assert "| 4 | [pretrain_domain](pretrain_domain) |" in report
  assert "| 2 |" in report.split("| 4 | [pretrain_domain]")[1].splitlines()[0]  # attempts
