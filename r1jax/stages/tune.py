r"""Hyperparameter search: an optuna study whose trials are short runs of a training stage.

    python -m r1jax.main --config=configs/tune.py:variant=tiny --workdir=DIR
    python -m r1jax.main --config=DIR/best_config.py --workdir=BEST   # the winner, on its own

`run(config, workdir)`:
1. validates everything before any trial starts: the tune settings, the base stage config, every
   searched field (it must exist in `base` with a matching type; a range must be non-empty and,
   for log scales, positive; each end of each range must still give a valid stage config), the
   objective metric (it must be one the stage's evals report), the storage and the first trial
   (the search space itself: `tune_space`);
2. opens (or creates) the study in its storage: `sqlite:///DIR/study.db` by default, a journal
   file, or any database URL several workers share;
3. runs trials until the study holds `n_trials` of them (over every worker and rerun): each trial
   samples `space`, builds the stage config (`base` + the sampled values) and calls
   `r1jax.stages.<stage>.run(trial_config, DIR/trials/<number>, on_eval=hook)`; the hook reports
   the objective metric at every eval (`trial.report`) and stops a trial the pruner rejects by
   raising `optuna.TrialPruned` from inside the training loop;
4. writes DIR/summary.json and, by `tune_report`, DIR/report.md (trials table, history,
   intermediate values and parameter importance PNGs), DIR/best_config.py and .json.

Sampling: TPE by default (`sampler.name=gp` for the Gaussian-process sampler, which needs torch),
with `n_startup_trials` random trials sized to the budget (max(2, n_trials // 4), not optuna's
fixed 10, which would turn a 10-trial budget into random search). A known good configuration (the
base config's own values by default) is enqueued as trial 0 of a new study.

A trial's value is the objective metric of the model the stage delivers, read from the trial's
DIR/trials/<n>/metrics.jsonl: finetuning keeps the best dev-loss checkpoint, so its value is the
metric at that eval step; pretraining delivers the last step. Pruned trials keep their last
reported value (optuna's rule) but never become the best trial.

Resuming and several workers (`tune_storage`). The budget is checked and the next trial is created
while holding the study's lock: DIR/study.lock for workers sharing DIR (SQLite or journal file), an
advisory lock in the database for workers anywhere that share a PostgreSQL URL; neither overruns
the budget. (Other database URLs keep the lock in DIR: workers with their own DIR may overrun it by
one trial each.) Each trial records its worker (host, pid, process start time, trial workdir). A trial left RUNNING by a killed worker is detected on this host
at once (its process is gone) and elsewhere by the database heartbeat (`heartbeat_secs`); it is
marked FAILED (user attr `fail_reason`) and re-queued as a new trial with the same parameters and
user attr `retry_of`, which takes over the killed trial's workdir and so resumes from its last
checkpoint. Completed trials are never rerun; a failed-and-requeued trial does not count towards
the budget, its retry does.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import inspect
import json
import os
import shutil
import time
import warnings
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
import jax
import ml_collections
import optuna
from optuna.trial import TrialState

from r1jax import configlib
from r1jax import run_dir
from r1jax.stages import tune_report
from r1jax.stages import tune_space
from r1jax.stages import tune_storage
from r1jax.train import loop as loop_lib

STAGES = ("finetune", "pretrain")
SAMPLERS = ("tpe", "gp", "random")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("maximize", "minimize")
KEEP_WORKDIRS = ("all", "best", "none")
TRIALS_DIR = "trials"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# --------------------------------------------------------------------------------------------------
# Configs.


def stage_module(stage: str):
  return importlib.import_module(f"r1jax.stages.{stage}")


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An unlocked copy of `base` with the tune-level init_from applied (absolute path)."""
  cfg = copy.deepcopy(config.base)
  cfg.unlock()
  init_from = config.init_from or cfg.get("init_from", "")
  if init_from and "://" not in init_from:
    init_from = os.path.abspath(os.path.expanduser(init_from))
  cfg.init_from = init_from
  return cfg


def trial_config(config: ml_collections.ConfigDict, values: Mapping[str, Any]
                 ) -> ml_collections.ConfigDict:
  """`base` with `values` ({field path: value}) set; types checked by ml_collections."""
  cfg = base_config(config)
  for path, value in values.items():
    configlib.set_path(cfg, path, value)
  return cfg


# --------------------------------------------------------------------------------------------------
# Validation.


def _check_stage_config(module: Any, cfg: ml_collections.ConfigDict, what: str, num_devices: int,
                        process_count: int) -> str | None:
  try:
    module.validate(cfg, num_devices=num_devices, process_count=process_count)
  except configlib.ConfigError as e:
    return f"{what}: {e}".replace("--config.", "--config.base.")
  return None


def eval_metrics(stage: str, base: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Names of the metrics each eval of `stage` reports (what the objective may name).

  Kept in step with the stages' loss functions (`losses.classification_loss_fn`,
  `losses.pretrain_loss_fn` plus the engine's "loss"); tests/test_tune.py checks finetuning's.
  """
  if stage == "finetune":
    names = ["accuracy", "loss", "nll"]
    if base.task.get("multi_label"):
      names.append("micro_f1")
  else:
    names = ["loss", "mlm_accuracy", "mlm_loss"]
    if base.data.get("nsp"):
      names += ["nsp_accuracy", "nsp_loss"]
    if base.data.get("knowledge_file"):
      names += ["kg_accuracy", "kg_loss"]
  return tuple(names)


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             process_count: int | None = None) -> configlib.Validator:
  """Every check that needs no training; raises ConfigError naming each bad key and its fix."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  v = configlib.Validator(config)
  v.stage("tune")
  v.int_at_least("seed", 0)
  v.init_from("name the workdir of an earlier run, or ''", url_ok=True)
  stage = v.choice("tune.stage", STAGES)
  if stage and not (v.has("base.stage") and config.base.stage == stage):
    v.add("base.stage", f"{config.base.get('stage') if v.has('base') else None!r} does not match "
          f"tune.stage={stage!r}; build the config with configs/tune.py:stage={stage}.")
    stage = None
  v.positive_int("n_trials")
  v.number_in("timeout_secs", 0.0, 1e12)
  sampler = v.choice("sampler.name", SAMPLERS)
  v.int_at_least("sampler.startup_trials", 0, allow=(-1,))
  v.boolean("sampler.multivariate")
  if sampler == "gp":
    try:
      importlib.import_module("torch")
    except ImportError:
      v.add("sampler.name", "'gp' needs torch (pip install torch, or the project's 'reference' "
            "extra); or use sampler.name=tpe.")
  v.choice("pruner.name", PRUNERS)
  v.int_at_least("pruner.startup_trials", 0, allow=(-1,))
  v.int_at_least("pruner.warmup_steps", 0)
  v.int_at_least("pruner.min_resource", 1, allow=(-1,))
  v.int_at_least("pruner.max_resource", 1, allow=(-1,))
  v.int_at_least("pruner.reduction_factor", 2)
  storage = v.string("storage")
  if storage is not None:
    try:
      kind, where = tune_storage.storage_spec(storage, "DIR")
    except ValueError as e:
      v.add("storage", str(e))
    else:
      problem = tune_storage.url_problem(where) if kind == "rdb" else None
      if problem:
        v.add("storage", problem)
  name = v.string("study_name")
  v.require(bool(name), "study_name", "is empty; name the study, e.g. 'tune'.")
  v.int_at_least("heartbeat_secs", 0)
  v.string("enqueue")
  v.choice("keep_trial_workdirs", KEEP_WORKDIRS)
  v.choice("objective.direction", DIRECTIONS)
  metric = v.string("objective.metric")
  if process_count > 1:
    v.add("stage", f"tune runs its trials in one process per worker, but this job has "
          f"{process_count} processes; start several single-process workers on one study instead "
          f"(same --workdir or --config.storage=URL).")
  if stage is None:
    v.raise_if_any("tune config")
    return v

  module = stage_module(stage)
  reported = eval_metrics(stage, config.base)
  if metric is not None and metric not in reported:
    close = difflib.get_close_matches(metric, reported, n=1)
    v.add("objective.metric", f"{metric!r} is not reported by any {stage} eval; choose one of "
          f"{list(reported)}" + (f" (did you mean {close[0]!r}?)" if close else "") + ".")
  if metric and config.objective.get("direction") in DIRECTIONS:
    lower_better = "loss" in metric or metric == "nll"
    if lower_better != (config.objective.direction == "minimize"):
      logging.warning("objective %s with direction=%s: is that the intended direction?", metric,
                      config.objective.direction)
  params = tune_space.parse_space(config, v)
  if not v.problems:
    tune_space.parse_enqueue(config, params, v)
  v.raise_if_any("tune config")

  # The stage's own checks, on the base config and on each end of every range.
  problems = []
  base = base_config(config)
  problem = _check_stage_config(module, base, "base", num_devices, process_count)
  if problem:
    problems.append(problem)
  else:
    for p in params:
      for value in p.extremes():
        problem = _check_stage_config(module, trial_config(config, {p.field: value}),
                                      f"space.{p.name} at {p.field}={value!r}", num_devices,
                                      process_count)
        if problem:
          problems.append(problem)
  if problems:
    raise configlib.ConfigError(
        "Invalid tune config: the trial configs would fail the stage's checks (narrow the search "
        "range or fix base with --config.base.<key>=<value>):\n  " + "\n  ".join(problems))
  return v


# --------------------------------------------------------------------------------------------------
# Sampler and pruner.


def startup_trials(config: ml_collections.ConfigDict) -> int:
  n = config.sampler.startup_trials
  return max(2, config.n_trials // 4) if n == -1 else n


def make_sampler(config: ml_collections.ConfigDict, seed: int) -> optuna.samplers.BaseSampler:
  n = startup_trials(config)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    if config.sampler.name == "tpe":
      return optuna.samplers.TPESampler(n_startup_trials=n, seed=seed,
                                        multivariate=config.sampler.multivariate)
    if config.sampler.name == "gp":
      return optuna.samplers.GPSampler(n_startup_trials=n, seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(config: ml_collections.ConfigDict) -> optuna.pruners.BasePruner:
  p, base = config.pruner, config.base
  if p.name == "median":
    startup = max(2, config.n_trials // 5) if p.startup_trials == -1 else p.startup_trials
    return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=p.warmup_steps)
  if p.name == "hyperband":
    min_resource = base.eval.every_steps if p.min_resource == -1 else p.min_resource
    max_resource: int | str = p.max_resource
    if max_resource == -1:
      max_resource = base.train.num_steps if base.train.num_steps > 0 else "auto"
    return optuna.pruners.HyperbandPruner(min_resource=max(1, min_resource),
                                          max_resource=max_resource,
                                          reduction_factor=p.reduction_factor)
  return optuna.pruners.NopPruner()


def describe_search(config: ml_collections.ConfigDict, pruner: optuna.pruners.BasePruner) -> str:
  s = config.sampler
  if s.name == "random":
    text = "random sampler"
  else:
    rule = "max(2, n_trials // 4)" if s.startup_trials == -1 else "sampler.startup_trials"
    text = (f"{s.name.upper()} sampler: {startup_trials(config)} random startup trials of "
            f"{config.n_trials} (n_startup_trials = {rule}), then model-based")
  if isinstance(pruner, optuna.pruners.MedianPruner):
    text += (f"; median pruner after {pruner._n_startup_trials} finished trial(s), from step "  # pylint: disable=protected-access
             f"{pruner._n_warmup_steps}")  # pylint: disable=protected-access
  elif isinstance(pruner, optuna.pruners.HyperbandPruner):
    text += (f"; Hyperband pruner (min_resource {pruner._min_resource}, max_resource "  # pylint: disable=protected-access
             f"{pruner._max_resource}, reduction factor {pruner._reduction_factor})")  # pylint: disable=protected-access
  else:
    text += "; no pruning"
  return text


# --------------------------------------------------------------------------------------------------
# Trials.


def trial_dir(workdir: str, number: int) -> str:
  return os.path.join(workdir, TRIALS_DIR, str(number))


def read_evals(workdir: str) -> dict[int, dict[str, Any]]:
  """{step: eval record} from DIR/metrics.jsonl (the last record of a step wins)."""
  path = os.path.join(workdir, "metrics.jsonl")
  out = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if record.get("split") == "eval":
          out[int(record["step"])] = record
  return out


def trial_value(stage: str, summary: Mapping[str, Any], workdir: str, metric: str
                ) -> tuple[float, int]:
  """(value, step): `metric` at the eval of the model the stage delivers."""
  if stage == "finetune":
    step = summary["best_step"]
    record = read_evals(workdir).get(step)
  else:
    record = summary.get("final_eval") or {}
    step = record.get("step", summary.get("step"))
  if not record or metric not in record:
    raise configlib.ConfigError(
        f"The {stage} run in {workdir} has no eval of {metric!r} at step {step} (eval record: "
        f"{record}); objective.metric must be one its evals report.")
  return float(record[metric]), int(step)


class PruningHook:
  """`on_eval(step, metrics)` for the training loop: reports the objective metric to the trial and
  raises optuna.TrialPruned when the pruner says so (this stops the whole stage run)."""

  def __init__(self, trial: optuna.Trial, metric: str, reported: Iterable[int] = ()):
    self.trial = trial
    self.metric = metric
    self.reported = set(reported)

  def __call__(self, step: int, metrics: Mapping[str, Any]) -> bool:
    if self.metric not in metrics:
      raise configlib.ConfigError(f"objective.metric={self.metric!r} is not among this run's eval "
                                  f"metrics {sorted(metrics)}.")
    value = float(metrics[self.metric])
    if step not in self.reported:
      self.trial.report(value, step)
      self.reported.add(step)
    if self.trial.should_prune():
      self.trial.set_user_attr("pruned_at_step", int(step))
      raise optuna.TrialPruned(f"pruned at step {step} ({self.metric}={value:.4g}).")
    return False


@dataclasses.dataclass
class _Search:
  """What every trial of one worker shares."""
  config: ml_collections.ConfigDict
  workdir: str
  params: list[tune_space.Param]
  module: Any
  lock: tune_storage.StudyLock | tune_storage.DatabaseLock

  @property
  def stage(self) -> str:
    return self.config.tune.stage

  def values_of(self, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {p.field: p.from_optuna(trial.params[p.optuna_name]) for p in self.params
            if p.optuna_name in trial.params}


def _adopt_workdir(study: optuna.Study, trial: optuna.Trial, tdir: str) -> list[int]:
  """A retry takes over the killed trial's workdir (to resume from its checkpoint); returns the
  steps already reported there."""
  retry_of = trial.user_attrs.get("retry_of")
  if retry_of is None:
    return []
  previous = {t.number: t for t in study.get_trials(deepcopy=False)}
  old = (previous[retry_of].user_attrs.get("worker", {}).get("workdir") if retry_of in previous
         else None) or trial_dir(os.path.dirname(os.path.dirname(tdir)), retry_of)
  if os.path.isdir(old) and not os.path.exists(tdir):
    shutil.move(old, tdir)  # another worker's workdir may be on another file system
    logging.info("Trial %d continues trial %d's run (moved %s -> %s).", trial.number, retry_of,
                 old, tdir)
  return list(previous[retry_of].intermediate_values) if retry_of in previous else []


def _objective(search: _Search, study: optuna.Study, trial: optuna.Trial) -> float:
  tdir = trial_dir(search.workdir, trial.number)
  try:
    trial.set_user_attr("worker", {**run_dir.process_info(), "workdir": os.path.abspath(tdir)})
  finally:
    search.lock.release()  # the trial is RUNNING and recorded: other workers may go on
  values = {p.field: p.suggest(trial) for p in search.params}
  trial.set_user_attr("config_values", values)
  reported = _adopt_workdir(study, trial, tdir)
  cfg = trial_config(search.config, values)
  logging.info("Trial %d: %s -> %s", trial.number,
               ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in values.items()), tdir)
  kwargs = {}
  if "on_eval" in inspect.signature(search.module.run).parameters:  # report even with no pruner
    kwargs["on_eval"] = PruningHook(trial, search.config.objective.metric, reported)
  try:
    summary = search.module.run(cfg, tdir, **kwargs)
  except loop_lib.NonFiniteError as e:
    trial.set_user_attr("fail_reason", f"non-finite loss: {e}")
    raise
  except KeyboardInterrupt:  # optuna marks it FAILED; the next run re-queues it
    trial.set_user_attr("fail_reason", "interrupted (KeyboardInterrupt)")
    trial.set_user_attr("interrupted", True)
    raise
  value, step = trial_value(search.stage, summary, tdir, search.config.objective.metric)
  trial.set_user_attr("result", {"step": step, "steps_trained": summary.get("step"),
                                 "status": summary.get("status")})
  return value


def _cleanup(search: _Search, study: optuna.Study) -> None:
  """Deletes finished trials' workdirs per keep_trial_workdirs (a requeued trial's is kept for its
  retry; the best complete trial's is kept under 'best')."""
  keep = search.config.keep_trial_workdirs
  if keep == "all":
    return
  trials = study.get_trials(deepcopy=False)
  best = _best_trial(study)
  pending_retry = {t.user_attrs.get("retry_of") for t in trials
                   if t.state in (TrialState.WAITING, TrialState.RUNNING)}
  for t in trials:
    if t.state not in FINISHED or t.number in pending_retry:
      continue
    if keep == "best" and best is not None and t.number == best.number:
      continue
    tdir = trial_dir(search.workdir, t.number)
    if os.path.isdir(tdir):
      shutil.rmtree(tdir, ignore_errors=True)


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
  try:
    return study.best_trial
  except ValueError:  # no complete trial yet
    return None


def _after_trial(search: _Search, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
  _cleanup(search, study)
  jax.clear_caches()  # each trial compiles its own steps; do not keep them all
  counts = {s.name: n for s, n in _state_counts(study.get_trials(deepcopy=False)).items() if n}
  logging.info("Trial %d %s%s; study now %s.", trial.number, trial.state.name,
               f" value={trial.value:.4g}" if trial.value is not None else "", counts)


def _state_counts(trials: Iterable[optuna.trial.FrozenTrial]) -> dict[TrialState, int]:
  counts = {s: 0 for s in TrialState}
  for t in trials:
    counts[t.state] += 1
  return counts


# --------------------------------------------------------------------------------------------------
# Outputs.


def write_outputs(search: _Search, study: optuna.Study, *, storage_desc: str, search_desc: str,
                  wall_secs: float, ran: int) -> dict[str, Any]:
  """DIR/summary.json (written last) and, by `tune_report`, report.md, history/importances PNGs
  and, once a trial completed, best_config.py/.json."""
  config, workdir = search.config, search.workdir
  trials = study.get_trials(deepcopy=False)
  dirs = {t.number: (t.user_attrs.get("worker") or {}).get("workdir") or trial_dir(workdir, t.number)
          for t in trials}  # a trial run by a worker with another DIR is there
  rows = tune_report.trial_rows(trials, search.values_of, dirs.__getitem__)
  best = _best_trial(study)
  summary: dict[str, Any] = {
      "stage": "tune", "study_name": config.study_name, "storage": storage_desc,
      "variant": config.base.model.variant, "trial_stage": search.stage,
      "metric": config.objective.metric, "direction": config.objective.direction,
      "n_trials": config.n_trials, "budget_used": tune_storage.budget_used(trials),
      "states": {s.name: n for s, n in _state_counts(trials).items()},
      "search": search_desc, "sampler": config.sampler.name, "pruner": config.pruner.name,
      "n_startup_trials": startup_trials(config),
      "space": {p.field: p.describe() for p in search.params},
      "trials_run_by_this_worker": ran, "wall_secs": wall_secs,
      "trials": rows,
  }
  if best is not None:
    values = search.values_of(best)
    summary["best"] = {"number": best.number, "value": best.value, "params": dict(best.params),
                       "config_values": values, "workdir": dirs[best.number],
                       "result": best.user_attrs.get("result")}
    summary.update(tune_report.write_best_config(workdir, trial_config(config, values), summary))
  summary.update(tune_report.write_report(workdir, study, summary, rows))
  run_dir.write_json(os.path.join(workdir, run_dir.SUMMARY_FILE), summary)
  return summary


# --------------------------------------------------------------------------------------------------
# Entry point.


def _open_study(config: ml_collections.ConfigDict, storage: optuna.storages.BaseStorage,
                params: Sequence[tune_space.Param], pruner: optuna.pruners.BasePruner
                ) -> optuna.Study:
  """Loads or creates the study (call with the study lock held). A new study gets the first trial
  enqueued; the sampler seed is config.seed + the number of trials already there, so a rerun or
  a second worker does not replay the first one's random startup trials."""
  try:
    existing = optuna.load_study(study_name=config.study_name, storage=storage)
    n_existing = len(existing.get_trials(deepcopy=False))
    existing_direction = existing.direction.name.lower()
    if existing_direction != config.objective.direction:
      raise configlib.ConfigError(
          f"objective.direction={config.objective.direction!r} but study {config.study_name!r} in "
          f"this storage was created with {existing_direction!r}; use another --workdir or "
          f"--config.study_name.")
  except KeyError:
    n_existing = 0
  study = optuna.create_study(
      study_name=config.study_name, storage=storage, load_if_exists=True,
      direction=config.objective.direction, pruner=pruner,
      sampler=make_sampler(config, config.seed + n_existing))
  if n_existing == 0:
    study.set_user_attr("metric", config.objective.metric)
    study.set_user_attr("trial_stage", config.tune.stage)
    first = tune_space.parse_enqueue(config, params, configlib.Validator(config))
    if first:
      by_field = {p.field: p for p in params}
      study.enqueue_trial({by_field[f].optuna_name: by_field[f].to_optuna(v)
                           for f, v in first.items()},
                          user_attrs={"enqueued": config.enqueue})
      logging.info("Enqueued the first trial (%s): %s", config.enqueue, first)
  else:
    saved = study.user_attrs.get("metric")
    if saved and saved != config.objective.metric:
      raise configlib.ConfigError(
          f"objective.metric={config.objective.metric!r} but study {config.study_name!r} holds "
          f"values of {saved!r}; use another --workdir or --config.study_name.")
  return study


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or continues, or only reports a finished) search; returns DIR/summary.json's dict."""
  validate(config)
  module = stage_module(config.tune.stage)
  if config.pruner.name != "none" and "on_eval" not in inspect.signature(module.run).parameters:
    raise configlib.ConfigError(
        f"pruner.name={config.pruner.name!r}: r1jax.stages.{config.tune.stage}.run does not accept "
        f"on_eval, so trials cannot report to a pruner; set --config.pruner.name=none.")
  params = tune_space.parse_space(config, configlib.Validator(config))
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  kind, where = tune_storage.storage_spec(config.storage, workdir)
  storage_desc = tune_storage.masked(where) if kind == "rdb" else f"journal:{where}"
  pruner = make_pruner(config)
  lock = tune_storage.make_lock(config, workdir)
  search = _Search(config=config, workdir=workdir, params=params, module=module, lock=lock)
  # Opening the study comes first: an unreachable database stops the run before it writes a file.
  with lock:  # workers starting together must not create the tables or the study twice
    storage = tune_storage.make_storage(config, workdir)
    study = _open_study(config, storage, params, pruner)
    failed = tune_storage.recover_trials(study)
    trials = study.get_trials(deepcopy=False)
  os.makedirs(os.path.join(workdir, TRIALS_DIR), exist_ok=True)
  configlib.write_config_json(config, workdir, space={p.field: p.describe() for p in params},
                              metrics=list(eval_metrics(config.tune.stage, config.base)))
  search_desc = describe_search(config, pruner)
  logging.info("Study %r in %s: %d trial(s) so far (%d counted of the budget of %d)%s. %s.",
               config.study_name, storage_desc, len(trials), tune_storage.budget_used(trials),
               config.n_trials,
               f"; re-queued the killed trial(s) {failed}" if failed else "", search_desc)
  started = time.time()
  ran = tune_storage.run_trials(
      study, lock, config.n_trials, lambda t: _objective(search, study, t),
      timeout_secs=config.timeout_secs, catch=(loop_lib.NonFiniteError,),
      callbacks=[lambda s, t: _after_trial(search, s, t)])
  with lock:
    summary = write_outputs(search, study, storage_desc=storage_desc, search_desc=search_desc,
                            wall_secs=time.time() - started, ran=ran)
  best = summary.get("best")
  logging.info("Search done: %d trial(s) here, study %s. Best: %s. Report: %s", ran,
               {k: v for k, v in summary["states"].items() if v},
               f"trial {best['number']} {config.objective.metric}={best['value']:.4f}; run it with "
               f"`{summary['best_command']}`" if best else "none complete",
               summary["report"])
  return summary
