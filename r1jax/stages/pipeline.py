r"""Pipeline stage: the whole recipe, one stage after another, each in its own DIR/<stage>/.

    python -m r1jax.main --config=configs/pipeline.py --workdir=DIR [--config.stages=a,b,...]

`run(config, workdir)`:
1. validates the pipeline keys and, before anything is computed, every selected stage's config
   (`config.pipeline.<stage>`, with the keys the pipeline connects filled by stand-ins);
2. plans: the selected stages in dependency order, each either skipped (finished before with the
   same config from the same inputs) or run; a finished stage whose config or inputs changed is
   refused with the directories to delete, and a selected stage whose inputs are neither selected
   nor finished in DIR is refused before anything runs;
3. runs each planned stage through its own `r1jax.stages.<module>.run(config, DIR/<stage>)`, which
   resumes an interrupted attempt from its checkpoints; DIR/pipeline_state/<stage>.json records the
   config fingerprint, the inputs it was made from and the wall time;
4. writes DIR/summary.json, DIR/config.json and the final report (DIR/report.md, DIR/report.html,
   DIR/loss_curves.png, DIR/compression_tradeoff.png; see `pipeline_report`) and prints the
   report's path (`python -m r1jax.stages.pipeline_report DIR` rebuilds it at any time).

Stages and their inputs (the table `pipeline_stages.SPECS`; `config.sources.<stage>` picks the
input of tune and the compression stages; `config.init_from` replaces pretrain_general by an
existing pretraining workdir):

    data_general, data_domain                                  (none)
    pretrain_general  <- data_general (cleaned corpus, tokenizer)
    pretrain_domain   <- pretrain_general (init_from), data_domain (corpus)
    finetune_general  <- pretrain_general;  finetune_domain <- pretrain_domain
    compare           <- finetune_general, finetune_domain
    tune              <- sources.tune;  distill / quantize / prune <- sources.<stage>

Pipeline-level keys fill the stage configs: `task.*` (every stage that reads the task),
`domain_corpus` and `tapt` (data_domain's inputs: the domain text plus the task's train and dev
splits, never test), `domain_vocab` (data_general's tokenizer also learns from that text), and
`budget_minutes` (`pipeline_schedule.stage_minutes`: each budgeted stage's share of the time
left, as its `train.time_budget_minutes`; the stage record keeps the planned config), and
`schedule=auto` (`pipeline_schedule`: each pretraining and finetuning stage is left when its eval
metric plateaus, and pretrain_domain is skipped when the general model's domain-shift diagnostic
says no shift, the later stages then reading the general model; every decision in
DIR/pipeline_state/, summary.json and the report); `multimodal.enabled`: the finetunings run the
image+text task (tune, distill, prune: text only). Task and domain text are checked first.

"Same config" ignores keys that do not change results (progress bars, worker counts, the mesh,
async checkpointing), so a run can be resumed on another machine or slice.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import fnmatch
import importlib
import inspect
import os
import tempfile
import time
from typing import Any, Mapping, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections

from r1jax import configlib
from r1jax import errors
from r1jax import run_dir
from r1jax.data import sources
from r1jax.data import task as task_lib
from r1jax.stages import finetune_multimodal
from r1jax.stages import pipeline_report
from r1jax.stages import pipeline_schedule
from r1jax.stages import pipeline_stages

OPTIONAL = ("tune",)  # not in the default selection unless config.run_tune
# Which stages config.sources.<stage> may name.
SOURCE_CHOICES = {
    "tune": ("pretrain_general", "pretrain_domain"),
    "distill": ("finetune_general", "finetune_domain"),
    "quantize": ("finetune_general", "finetune_domain", "distill", "prune"),
    "prune": ("finetune_general", "finetune_domain", "distill"),
}
# Flattened config keys (fnmatch patterns) that do not change a stage's results.
IGNORED_KEYS = ("*progress_bar", "*worker_count", "mesh.*", "checkpoint.async_save",
                "checkpoint.sigterm_grace_secs")
DIR_TOKEN = "$DIR"
# The pipeline-level task keys (config.task.*) applied to every stage that reads the task.
TASK_KEYS = ("train", "dev", "test", "text_field", "label_field")


class PipelineError(errors.UserError, ValueError):
  """A stage selection or workdir state the pipeline cannot continue from; says how to fix it
  (a UserError: the command prints it in one message, without a traceback)."""


# --------------------------------------------------------------------------------------------------
# Selection and dependencies.


def needs(config: ml_collections.ConfigDict, name: str, workdir: str = "") -> tuple[str, ...]:
  """The stages whose outputs `name` reads (pretrain_general is external with config.init_from;
  it stands for a pretrain_domain that schedule=auto skipped in `workdir`)."""
  deps = pipeline_stages.SPEC[name].needs
  if name in SOURCE_CHOICES:
    deps = deps + (config.sources[name],)
  deps = tuple(dict.fromkeys(pipeline_schedule.source(config, workdir, d) for d in deps))
  if config.init_from:
    deps = tuple(d for d in deps if d != "pretrain_general")
  return deps


def selected_stages(config: ml_collections.ConfigDict) -> list[str]:
  """The stages to consider, in an order where every stage comes after the ones it needs."""
  spec = str(config.stages).strip()
  if spec in ("", "all"):
    chosen = [s for s in pipeline_stages.STAGES if s not in OPTIONAL or config.run_tune]
    chosen = [s for s in chosen if s not in pipeline_stages.left_out(config)]
    if config.init_from:
      chosen.remove("pretrain_general")
  else:
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in pipeline_stages.SPEC]
    if unknown:
      raise configlib.ConfigError(f"stages: {unknown} not among the pipeline stages "
                                  f"{list(pipeline_stages.STAGES)} (comma-separated; '' or 'all' = "
                                  "every stage).")
    if config.init_from and "pretrain_general" in chosen:
      raise configlib.ConfigError("stages: pretrain_general is selected but init_from="
                                  f"{config.init_from!r} replaces it; drop one of the two.")
    if bad := [s for s in chosen if s in pipeline_stages.left_out(config)]:
      raise configlib.ConfigError(f"stages: {', '.join(bad)} take text classifiers only; drop "
                                  "them with multimodal.enabled.")
  # Stable topological order: the canonical order, but inputs (config.sources) first.
  order, placed = [], set()

  def place(name, path=()):
    if name in placed or name not in chosen:
      return
    if name in path:
      raise configlib.ConfigError(f"sources: the stages {list(path)} depend on each other in a "
                                  "cycle; point config.sources at earlier stages.")
    for dep in needs(config, name):
      place(dep, path + (name,))
    placed.add(name)
    order.append(name)

  for name in pipeline_stages.STAGES:
    place(name)
  return order


def stage_dir(config: ml_collections.ConfigDict, name: str, workdir: str) -> str:
  return pipeline_stages.stage_dir(workdir, name, config.init_from)


# --------------------------------------------------------------------------------------------------
# Stage configs.


def stage_config(config: ml_collections.ConfigDict, name: str, workdir: str, *,
                 stand_in: str | None = None) -> ml_collections.ConfigDict:
  """`config.pipeline.<name>` with the keys that connect it to earlier stages filled in.

  `stand_in`: an existing directory used for every earlier stage's workdir (validation before
  those workdirs exist); files inside them are then left unset.
  """
  cfg = copy.deepcopy(config.pipeline[name])
  cfg.seed = int(cfg.seed) + int(config.seed)

  def d(stage):  # a skipped pretrain_domain's output is the general model
    return stand_in or stage_dir(config, pipeline_schedule.source(config, workdir, stage), workdir)

  def file_in(stage, *parts):
    return "" if stand_in else os.path.join(d(stage), *parts)

  task = task_overrides(config)
  if name in ("finetune_general", "finetune_domain"):
    cfg.task.update(task)
    cfg.multimodal.enabled = cfg.multimodal.enabled or pipeline_stages.multimodal(config)
  elif name == "tune" and "task" in cfg.base:
    cfg.base.task.update(task)
  elif name == "data_domain":
    cfg.data.inputs = domain_inputs(config)
    if task.get("text_field"):
      cfg.data.text_field = task["text_field"]

  if name == "data_general" and config.get("domain_vocab", False):
    # One vocabulary for the general, domain and task text (never the test split): the general
    # corpus alone splits domain terms into pieces the classifier's n-grams cannot use.
    cfg.tokenizer.extra_inputs = ",".join(
        p for p in [cfg.tokenizer.extra_inputs, domain_inputs(config)] if p)

  if name == "pretrain_general":
    cfg.data.corpus = os.path.join(d("data_general"), "data", "clean")
    train_tok = config.pipeline.data_general.tokenizer.train
    cfg.data.tokenizer = file_in("data_general", "tokenizer.model") if train_tok else ""
  elif name == "pretrain_domain":
    cfg.init_from = d("pretrain_general")
    cfg.data.corpus = os.path.join(d("data_domain"), "data", "clean")
    cfg.data.tokenizer = ""  # the general model's, copied from init_from
  elif name == "finetune_general":
    cfg.init_from = d("pretrain_general")
  elif name == "finetune_domain":
    cfg.init_from = d("pretrain_domain")
  elif name == "compare":
    cfg.workdirs = ",".join((d("finetune_general"), d("finetune_domain")))
  elif name in SOURCE_CHOICES:
    cfg.init_from = d(config.sources[name])
  return cfg


def task_overrides(config: ml_collections.ConfigDict) -> dict[str, str]:
  """The pipeline-level task keys the user set ({} = every stage keeps its own task). With your
  own train split, an unset dev/test split is "" (carved from train / reported on dev), never the
  embedded task's."""
  out = {k: v for k, v in (config.get("task") or {}).items() if k in TASK_KEYS and v}
  if out.get("train"):
    out.setdefault("dev", "")
    out.setdefault("test", "")
  return out


def effective_task(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The task section the finetuning stages train on: finetune_domain's, with the overrides."""
  task = copy.deepcopy(config.pipeline.finetune_domain.task)
  task.update(task_overrides(config))
  return task


def domain_inputs(config: ml_collections.ConfigDict) -> str:
  """data_domain's inputs: the domain corpus, plus (tapt) the task's train and dev splits.

  The domain corpus is `config.domain_corpus`, else data_domain's own inputs (the embedded FOLDOC
  corpus) when the task is the embedded one, else none. The test split is never added.
  """
  own_task = bool(task_overrides(config).get("train"))
  corpus = config.get("domain_corpus") or ("" if own_task else
                                           config.pipeline.data_domain.data.inputs)
  parts = [p.strip() for p in corpus.split(",") if p.strip()]
  if config.get("tapt", False):
    task = effective_task(config)
    parts += [spec for spec in (task.train, task.dev) if spec and spec not in parts]
  return ",".join(parts)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def fingerprint_dict(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The flattened config that decides a stage's results (paths relative to the workdir), JSON-ready
  (`run_dir.json_ready`: as it reads back from DIR/pipeline_state/<stage>.json)."""
  flat = _flatten(configlib.to_dict(cfg))
  out = {}
  for key, value in sorted(flat.items()):
    if any(fnmatch.fnmatch(key, p) for p in IGNORED_KEYS):
      continue
    if isinstance(value, str) and workdir:
      value = value.replace(workdir, DIR_TOKEN)
    out[key] = value
  return run_dir.json_ready(out)


def stage_fingerprint(config: ml_collections.ConfigDict, name: str,
                      cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`fingerprint_dict` of stage `name`'s config plus, under schedule=auto, the controller
  settings that end it (`auto.*`): a stage finished under another schedule is not reused."""
  out = fingerprint_dict(cfg, workdir)
  auto = pipeline_schedule.settings(config, name)
  out.update({f"schedule_auto.{k}": v for k, v in (auto or {}).items()})
  return out


# --------------------------------------------------------------------------------------------------
# Validation.


def _module(name: str):
  return importlib.import_module(f"r1jax.stages.{pipeline_stages.SPEC[name].module}")


def _problems(message: str) -> list[str]:
  """The "key: message" lines of a Validator's ConfigError (the whole text if it has none)."""
  lines = message.splitlines()
  if lines and lines[0].startswith("Invalid ") and len(lines) > 1:
    return [line.strip() for line in lines[1:] if line.strip()]
  return [f"config: {message}"]


def _check_data(config: ml_collections.ConfigDict, chosen: Sequence[str],
                v: configlib.Validator) -> None:
  """The task and the domain text, read before any stage runs: a task a classifier cannot learn
  from (one class, a dev/test label never seen in train, no usable rows) or no domain text is a
  one-line error now, not a traceback after pretraining."""
  if "data_domain" in chosen:
    if not domain_inputs(config):
      v.add("domain_corpus", f"your task (task.train={config.task.train!r}) comes with no domain "
            "text: name unlabelled text with --config.domain_corpus=PATHS, or set tapt=True to "
            "pretrain on the task's own train and dev text.")
    text_field = task_overrides(config).get("text_field", "text")
    for spec in filter(None, (p.strip() for p in str(config.domain_corpus).split(","))):
      try:
        empty = not any(str(r.get("text") or "").strip()
                        for r in sources.read_records(spec, text_field=text_field))
      except (ValueError, OSError) as e:
        v.add("domain_corpus", f"{spec!r}: {e}")
        continue
      v.require(not empty, "domain_corpus", f"{spec!r} holds no non-empty documents (field "
                f"{text_field!r}); name a file with text, or drop it and rely on tapt=True.")
  if any(n in chosen for n in ("finetune_general", "finetune_domain", "tune")):
    try:
      # The image+text task is read as the finetuning stages read it.
      (finetune_multimodal.load_task(stage_config(config, "finetune_domain", "", stand_in="."))
       if pipeline_stages.multimodal(config) else task_lib.load_task(effective_task(config)))
    except (ValueError, OSError) as e:
      v.add("task", str(e).splitlines()[0] if str(e) else type(e).__name__)


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             process_count: int | None = None) -> configlib.Validator:
  """Pipeline keys, the selection, and every selected stage's config; one ConfigError for all."""
  v = configlib.Validator(config)
  v.stage("pipeline")
  v.int_at_least("seed", 0)
  v.init_from("name a finished pretraining workdir to use instead of the pretrain_general "
              "stage, or '' to run it")
  v.string("stages")
  v.boolean("run_tune")
  v.boolean("report.html")
  v.positive_int("report.max_points")
  for name, choices in SOURCE_CHOICES.items():
    v.choice(f"sources.{name}", choices)
  v.boolean("multimodal.enabled")
  v.require(not pipeline_stages.multimodal(config)
            or config.sources.quantize.startswith("finetune_"), "sources.quantize",
            f"{config.sources.quantize!r}: with multimodal.enabled, name finetune_general or "
            "finetune_domain (their fused model).")
  for key in TASK_KEYS:
    v.string(f"task.{key}")
  stray = [k for k in TASK_KEYS[1:] if (config.get("task") or {}).get(k)]
  v.require(not stray or bool(config.task.get("train")), "task.train",
            f"is empty while task.{stray[0] if stray else ''} is set: name your training split "
            "too (the embedded task's splits and yours do not mix).")
  v.string("domain_corpus")
  v.boolean("tapt")
  v.boolean("domain_vocab")
  budget = v.number_in("budget_minutes", 0.0, 1e6)
  missing = [s for s in pipeline_stages.STAGES if s not in config.get("pipeline", {})]
  v.require(not missing, "pipeline", f"lacks the stage configs {missing}; build the config with "
            "configs/pipeline.py.")
  v.raise_if_any("pipeline config")
  try:
    chosen = selected_stages(config)
  except configlib.ConfigError as e:
    v.add("stages", str(e))
    v.raise_if_any("pipeline config")
  _check_data(config, chosen, v)
  pipeline_schedule.validate(config, v, chosen)
  if budget:
    each = pipeline_schedule.MIN_STAGE_MINUTES
    v.require(budget >= each * len(chosen), "budget_minutes",
              f"{budget:g} is too small to train anything: the {len(chosen)} selected stages need "
              f"at least {each * len(chosen):g} minutes ({each:g} each for start-up, compilation, "
              "evaluation and reports); raise it or select fewer stages with --config.stages.")
  v.raise_if_any("pipeline config")
  kwargs = {k: x for k, x in (("num_devices", num_devices), ("process_count", process_count))
            if x is not None}
  stand_in = tempfile.gettempdir()
  for name in chosen:
    cfg = stage_config(config, name, "", stand_in=stand_in)
    validate_stage = _module(name).validate
    accepted = inspect.signature(validate_stage).parameters
    try:
      validate_stage(cfg, **{k: x for k, x in kwargs.items() if k in accepted})
    except configlib.ConfigError as e:
      for problem in _problems(str(e)):
        v.problems.append(f"pipeline.{name}.{problem}")
  v.raise_if_any("pipeline config")
  return v


# --------------------------------------------------------------------------------------------------
# Plan: what to skip, what to run, what is refused.


@dataclasses.dataclass
class Planned:
  name: str
  directory: str
  config: ml_collections.ConfigDict
  action: str          # "run" | "skip"
  reason: str


def summary_finished(directory: str) -> bool:
  """A stage workdir whose summary.json says it finished (compare writes no status)."""
  summary = run_dir.read_json(os.path.join(directory, run_dir.SUMMARY_FILE))
  return bool(summary) and summary.get("status", "complete") in pipeline_stages.FINISHED


def _finished_state(workdir: str, name: str, directory: str) -> dict[str, Any] | None:
  """The pipeline's record of a finished `name` whose summary.json is still the one it made."""
  state = run_dir.read_json(pipeline_stages.state_path(workdir, name))
  if not state or state.get("status") != "finished":
    return None
  if state.get("summary_sha") != pipeline_stages.summary_sha(directory):
    return None
  return state


def _downstream(config, name: str, among: Sequence[str], workdir: str) -> list[str]:
  """The stages in `among` that read `name`'s output, directly or through other stages."""
  reached = {name}
  grew = True
  while grew:
    grew = False
    for other in among:
      if other not in reached and any(d in reached for d in needs(config, other, workdir)):
        reached.add(other)
        grew = True
  return [s for s in pipeline_stages.STAGES if s in reached and s != name]


def plan(config: ml_collections.ConfigDict, workdir: str) -> list[Planned]:
  """Decides skip/run for each selected stage; raises PipelineError with every problem."""
  chosen = selected_stages(config)
  problems = []
  for name in chosen:
    for dep in needs(config, name, workdir):
      ddir = stage_dir(config, dep, workdir)
      if dep == "pretrain_general" and config.init_from:
        continue
      if dep not in chosen and not summary_finished(ddir):
        problems.append(f"{name} needs the output of {dep} ({ddir}), which is not finished: add "
                        f"{dep} to --config.stages or run it first.")
  if problems:
    raise PipelineError("Cannot run the selected stages:\n  " + "\n  ".join(problems))

  finished_here = [s for s in pipeline_stages.STAGES
                   if _finished_state(workdir, s, stage_dir(config, s, workdir))]
  out: list[Planned] = []
  actions: dict[str, str] = {}
  for name in chosen:
    directory = stage_dir(config, name, workdir)
    cfg = stage_config(config, name, workdir)
    state = _finished_state(workdir, name, directory)
    if pipeline_schedule.source(config, workdir, name) != name:
      actions[name] = "skip"
      out.append(Planned(name, directory, cfg, "skip", pipeline_schedule.SKIP_REASON))
      continue
    if state is None:
      actions[name] = "run"
      resumed = os.path.isdir(directory) and os.listdir(directory)
      out.append(Planned(name, directory, cfg, "run",
                         "resuming an interrupted attempt" if resumed else "not run yet"))
      continue
    redo = [directory] + [stage_dir(config, s, workdir)
                          for s in _downstream(config, name, finished_here, workdir)]
    how = (f"Delete {', '.join(redo)} to redo {'them' if len(redo) > 1 else 'it'} with the new "
           "settings, or use a new --workdir.")
    old, new = state.get("config", {}), stage_fingerprint(config, name, cfg, workdir)
    # A key only one side has counts as None there: a config field added since (a placeholder
    # left at None, e.g. a new model override) does not make a finished stage stale.
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if keys:
      changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:8])
      problems.append(f"{directory} finished with a different config ({changes}). {how}")
      continue
    inputs = needs(config, name, workdir)
    rerun = [d for d in inputs if actions.get(d) == "run"]
    changed = [d for d in inputs if d not in rerun and state.get("inputs", {}).get(d)
               != pipeline_stages.summary_sha(stage_dir(config, d, workdir))]
    if rerun or changed:
      problems.append(f"{directory} was made from earlier outputs of {rerun + changed}, which "
                      f"{'will be redone' if rerun else 'changed since'}. {how}")
      continue
    actions[name] = "skip"
    out.append(Planned(name, directory, cfg, "skip", "finished before with the same config"))
  if problems:
    raise PipelineError("The workdir holds finished stages that no longer match:\n  " +
                        "\n  ".join(problems))
  return out


# --------------------------------------------------------------------------------------------------
# Running.


def _sync(tag: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(tag)


def _device_line() -> str:
  """The devices the stages run on, for the report's wall-time line."""
  devices = jax.devices()
  return (f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}), "
          f"{os.cpu_count()} CPU cores")


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_stage(config: ml_collections.ConfigDict, item: Planned, workdir: str,
              run_config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """Runs one planned stage and records it in DIR/pipeline_state/<stage>.json. `run_config`
  (default item.config) is what runs; item.config is what the record's fingerprint holds."""
  path = pipeline_stages.state_path(workdir, item.name)
  previous = run_dir.read_json(path) or {}
  attempts = int(previous.get("attempts", 0)) + 1
  run_dir.write_json(path, {"stage": item.name, "status": "running", "attempts": attempts,
                            "started_at": _now()})
  inputs = {d: pipeline_stages.summary_sha(stage_dir(config, d, workdir))
            for d in needs(config, item.name, workdir)}
  started = time.perf_counter()
  on_eval = pipeline_schedule.controller(config, item.name, workdir)  # schedule=auto
  summary = _module(item.name).run(run_config or item.config, item.directory,
                                   **({"on_eval": on_eval} if on_eval else {}))
  wall = time.perf_counter() - started
  _sync(f"r1jax_pipeline_{item.name}")
  state = {"stage": item.name, "status": "finished", "attempts": attempts,
           "finished_at": _now(), "wall_secs": wall,
           "config": stage_fingerprint(config, item.name, item.config, workdir),
           "inputs": inputs,
           "summary_sha": pipeline_stages.summary_sha(item.directory)}
  run_dir.write_json(path, state)
  _sync(f"r1jax_pipeline_{item.name}_state")
  return summary


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes, or re-reports) the pipeline in `workdir`; returns DIR/summary.json's dict."""
  validate(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  lock = run_dir.WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
  try:
    return _run(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  planned = plan(config, workdir)
  if jax.process_index() == 0:
    configlib.write_config_json(config, workdir, stages=[p.name for p in planned])
  started = time.perf_counter()
  logging.info("Pipeline in %s: %s", workdir,
               ", ".join(f"{p.name} ({p.action})" for p in planned))
  ran = []
  for i, item in enumerate(planned, 1):
    if item.action == "skip":
      logging.info("[%d/%d] %s: skipped, %s (%s).", i, len(planned), item.name, item.reason,
                   item.directory)
      continue
    if pipeline_schedule.skips(config, workdir, item.name, item.config):  # decided now
      item.action, item.reason = "skip", pipeline_schedule.SKIP_REASON
      for later in planned[i:]:  # the later stages read the general model instead
        later.config = stage_config(config, later.name, workdir)
      continue
    minutes = pipeline_schedule.stage_minutes(config, item.name, time.perf_counter() - started,
                            [p.name for p in planned[i - 1:] if p.action == "run"])
    run_config = None
    if minutes is not None:  # the stage's config as it runs; its record keeps the planned one
      run_config = copy.deepcopy(item.config)
      run_config.train.time_budget_minutes = minutes
      if item.name in pipeline_schedule.FILL_BUDGET:  # as many steps as its share holds
        run_config.train.num_steps = max(int(run_config.train.num_steps),
                                         pipeline_schedule.BUDGET_FILL_STEPS)
      logging.info("%s: %.2f minutes of budget_minutes=%g.", item.name, minutes,
                   config.budget_minutes)
    logging.info("[%d/%d] %s: %s; %s -> %s", i, len(planned), item.name,
                 pipeline_stages.SPEC[item.name].description, item.reason, item.directory)
    run_stage(config, item, workdir, run_config)
    ran.append(item.name)
  wall = time.perf_counter() - started

  stages = {}
  for item in planned:
    state = run_dir.read_json(pipeline_stages.state_path(workdir, item.name)) or {}
    stages[item.name] = {"directory": item.directory, "action": item.action,
                         "wall_secs": state.get("wall_secs"), "attempts": state.get("attempts")}
  summary = {"stage": "pipeline", "status": "complete", "variant": config.variant,
             "stages": stages, "ran": ran, "wall_secs_this_run": wall,
             "schedule": config.get("schedule", "fixed"), **({"schedule_decisions": (
                 pipeline_schedule.summary(workdir))} if pipeline_schedule.is_auto(config) else {})}
  if jax.process_index() == 0:
    paths = pipeline_report.write_report(workdir, config=config, device=_device_line())
    summary.update(report=paths["markdown"], report_html=paths.get("html"),
                   loss_curves=paths.get("loss_curves"), tradeoff=paths.get("tradeoff"))
    run_dir.write_json(os.path.join(workdir, run_dir.SUMMARY_FILE), summary)
    print(f"Pipeline report: {paths['markdown']}" +
          (f" (HTML: {paths['html']})" if paths.get("html") else ""), flush=True)
  _sync("r1jax_pipeline_done")
  return summary
