"""How long each training stage of the pipeline trains: its share of `budget_minutes`, and with
`schedule=auto` the controller that ends it when its eval metric plateaus (issue #26, part 2).

    minutes = pipeline_schedule.stage_minutes(config, "pretrain_general", elapsed, to_run)
    controller = pipeline_schedule.controller(config, "pretrain_domain", DIR)  # None: fixed
    pipeline_schedule.read_logs(DIR)   # {stage: its decision log}, for summary.json and the report

`schedule=fixed` trains every stage for its configured steps (epochs and early stopping for
finetuning). `schedule=auto` keeps those as ceilings and gives each pretraining and finetuning
stage a `train.schedule.PlateauController` as its `on_eval` hook: the pipeline moves on from
general pretraining to domain pretraining to finetuning as soon as the stage's eval metric
(`auto.<kind>.metric`) gains less per 1000 steps than the policy's threshold (`auto.policy`:
adaptive, a fraction `auto.<kind>.relative` of the stage's own best rate; or rule, a fixed
`auto.<kind>.min_gain`). Before leaving, a plateau first unfreezes the next layers of a
finetuning that has frozen ones (its schedule's next phase), then lowers the learning rate
(x `auto.lr_factor`, up to `auto.max_lr_drops` times). Each decision is written as it is made to
DIR/pipeline_state/<stage>.schedule.json with the numbers behind it; a killed pipeline resumes
with the same decisions (the controller takes its log back and redoes only the decisions after
the checkpoint the stage resumes from), and summary.json and report.md show every one.

`schedule=auto` also decides whether domain pretraining runs at all (`auto.decide_domain`):
before pretrain_domain, `decide_domain` measures the general model on the domain corpus against
its held-out general text with the domain-shift diagnostic (`diagnose.measure`, settings
`auto.diagnose`, a bounded number of rows) and skips the stage unless `diagnose.shift_level` is
moderate or large; finetune_domain (and any stage sourced from pretrain_domain) then reads the
general model (`source`). The `StageDecision`, with the numbers that caused it, goes to
DIR/pipeline_state/pretrain_domain.decision.json before the pipeline acts on it; a rerun takes it
back instead of measuring again (unless auto.diagnose or the general model changed since).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Any, Sequence

from absl import logging
import jax
import ml_collections

from r1jax import configlib
from r1jax import run_dir
from r1jax.stages import diagnose
from r1jax.stages import pipeline_stages
from r1jax.stages import tune as tune_lib
from r1jax.train import schedule as schedule_lib

SCHEDULES = ("fixed", "auto")
# The stages schedule=auto controls, and the `auto.<kind>` section that sets each one.
CONTROLLED = {"pretrain_general": "pretrain", "pretrain_domain": "pretrain",
              "finetune_general": "finetune", "finetune_domain": "finetune"}
LOG_SUFFIX = ".schedule.json"
# Whether domain pretraining runs: decided before it from the general model's diagnostic; it runs
# at these `diagnose.shift_level`s (at "small" and "none" the verdict says "finetune directly").
DOMAIN_STAGE, DAPT_LEVELS = "pretrain_domain", ("moderate", "large")
RUN, SKIP = "run_stage", "skip_stage"
SKIP_REASON = "skipped by schedule=auto: the general model's diagnostic found no domain shift"
# The diagnose keys the pipeline fills in (not part of the decision's settings).
_FILLED = ("init_from", "general", "domain", "mesh")

# budget_minutes: each stage's weight in sharing the time left when it starts. Training stages get
# their share as train.time_budget_minutes; the others' weights keep time for them.
BUDGET_WEIGHTS = {"data_general": 0.02, "data_domain": 0.02, "pretrain_general": 0.33,
                  "pretrain_domain": 0.25, "finetune_general": 0.12, "finetune_domain": 0.12,
                  "compare": 0.01, "tune": 0.2, "distill": 0.06, "quantize": 0.03, "prune": 0.04}
# The stages whose training honours train.time_budget_minutes (prune's sparsity ramp needs all
# of its steps; tune's trials have their own count).
BUDGETED = ("pretrain_general", "pretrain_domain", "finetune_general", "finetune_domain",
            "distill")
# Under a budget these train for their whole share (more pretraining keeps helping); the others
# keep their step counts or early stopping, cut to their share when it is too small.
FILL_BUDGET = ("pretrain_general", "pretrain_domain")
BUDGET_FILL_STEPS = 10_000_000
# The least budget per selected stage: start-up, compilation, evaluation and reports (measured on
# the 2-core CPU: 10-40 s per stage at the tiny size).
MIN_STAGE_MINUTES = 0.5


def stage_minutes(config: ml_collections.ConfigDict, name: str, elapsed_secs: float,
                  to_run: Sequence[str]) -> float | None:
  """Minutes of `config.budget_minutes` for training stage `name` when it starts `elapsed_secs`
  into the run: its weight's share of the time left among the stages still `to_run` (itself
  included). None without a budget or for a stage outside BUDGETED."""
  budget = float(config.get("budget_minutes", 0.0) or 0.0)
  if budget <= 0 or name not in BUDGETED:
    return None
  left = budget * 60.0 - elapsed_secs
  weights = sum(BUDGET_WEIGHTS[s] for s in to_run)
  minutes = max(left, 0.0) / 60.0 * BUDGET_WEIGHTS[name] / weights
  if minutes < 0.05:
    logging.warning("Only %.1f s of budget_minutes=%.1f are left for %s: it trains for a few "
                    "seconds.", left, budget, name)
  return max(minutes, 0.05)


# --------------------------------------------------------------------------------------------------
# schedule=auto.


def is_auto(config: ml_collections.ConfigDict) -> bool:
  return config.get("schedule", "fixed") == "auto"


def log_path(workdir: str, name: str) -> str:
  """DIR/pipeline_state/<name>.schedule.json: stage `name`'s decision log."""
  return os.path.join(workdir, pipeline_stages.STATE_DIR, name + LOG_SUFFIX)


def settings(config: ml_collections.ConfigDict, name: str) -> dict[str, Any] | None:
  """The controller settings of stage `name` (None: the stage trains its configured steps).
  Part of the stage's fingerprint, so a stage finished under other settings is not reused."""
  if not is_auto(config) or name not in CONTROLLED:
    return None
  kind = config.auto[CONTROLLED[name]]
  return {"metric": kind.metric, "window": int(config.auto.window),
          "min_gain_per_kstep": float(kind.min_gain), "policy": config.auto.policy,
          "relative": float(kind.relative), "lr_factor": float(config.auto.lr_factor),
          "max_lr_drops": int(config.auto.max_lr_drops)}


def controller(config: ml_collections.ConfigDict, name: str, workdir: str
               ) -> schedule_lib.PlateauController | None:
  """Stage `name`'s on_eval hook under schedule=auto (its decisions logged in `log_path`), or
  None when the stage trains its configured steps."""
  values = settings(config, name)
  if values is None:
    return None
  return schedule_lib.PlateauController(stage=name, log_path=log_path(workdir, name), **values)


def validate(config: ml_collections.ConfigDict, v: configlib.Validator,
             chosen: Sequence[str]) -> None:
  """schedule and auto.*: adds every problem to `v` (one error for the whole config)."""
  if v.choice("schedule", SCHEDULES) != "auto":
    return
  v.choice("auto.policy", schedule_lib.POLICIES)
  if v.boolean("auto.decide_domain") and DOMAIN_STAGE in chosen:
    stand_in = copy.deepcopy(config.auto.diagnose)
    stand_in.update(dict(general="stand-in", domain="stand-in", init_from=""))
    try:
      diagnose.validate(stand_in)
    except configlib.ConfigError as e:
      for line in str(e).splitlines()[1:]:
        v.problems.append(f"auto.diagnose.{line.strip()}")
  v.positive_int("auto.window")
  v.number_in("auto.lr_factor", 0.0, 1.0, low_open=True, high_open=True)
  v.int_at_least("auto.max_lr_drops", 0)
  for kind in sorted(set(CONTROLLED.values())):
    v.string(f"auto.{kind}.metric")
    v.number_in(f"auto.{kind}.min_gain", 0.0, 1e9)
    v.number_in(f"auto.{kind}.relative", 0.0, 1.0, low_open=True, high_open=True)
  v.raise_if_any("pipeline config")
  for kind in sorted(set(CONTROLLED.values())):
    names = [n for n in chosen if CONTROLLED.get(n) == kind]
    metric = config.auto[kind].metric
    lacking = [n for n in names if metric not in tune_lib.eval_metrics(kind, config.pipeline[n])]
    if lacking:
      metrics = tune_lib.eval_metrics(kind, config.pipeline[lacking[0]])
      v.add(f"auto.{kind}.metric", f"{metric!r} is not among the eval metrics {list(metrics)} "
            f"that {' and '.join(lacking)} report{'s' if len(lacking) == 1 else ''}; "
            "schedule=auto decides from one of them.")
    for name in names:
      every = config.pipeline[name].eval.every_steps
      v.require(int(every) > 0, f"pipeline.{name}.eval.every_steps", f"{every}: schedule=auto "
                f"decides at each eval of {name}; give it an eval period (> 0).")


@dataclasses.dataclass(frozen=True)
class StageDecision:
  """schedule=auto's choice to run or skip a whole stage, with the numbers that caused it."""
  stage: str
  action: str              # RUN | SKIP
  level: str               # diagnose.shift_level: none | small | moderate | large
  reason: str              # the diagnostic's verdict and the rule applied to it
  measures: dict[str, Any]  # perplexity ratio, word coverage, MLM losses, rows measured
  thresholds: dict[str, float]
  general_model: dict[str, Any]  # {"directory", "step", "summary_sha"}: what was measured
  settings: dict[str, Any]  # auto.diagnose without the filled-in keys (others: decided again)
  wall_secs: float

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def decision_path(workdir: str, name: str = DOMAIN_STAGE) -> str:
  """DIR/pipeline_state/<name>.decision.json: whether stage `name` runs, and why."""
  return os.path.join(workdir, pipeline_stages.STATE_DIR, name + ".decision.json")


def decides_domain(config: ml_collections.ConfigDict) -> bool:
  return is_auto(config) and bool(config.auto.get("decide_domain", False))


def _domain_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return run_dir.json_ready({k: v for k, v in configlib.to_dict(config.auto.diagnose).items()
                             if k not in _FILLED})


def read_decision(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """The domain decision made in `workdir` for this config and this general model (None: none
  yet, or made with other auto.diagnose settings or from a general model since redone)."""
  saved = run_dir.read_json(decision_path(workdir))
  if not saved or not decides_domain(config):
    return None
  general_dir = pipeline_stages.stage_dir(workdir, "pretrain_general", config.init_from)
  if (saved.get("settings") != _domain_settings(config) or
      saved["general_model"].get("summary_sha") != pipeline_stages.summary_sha(general_dir)):
    return None
  return saved


def source(config: ml_collections.ConfigDict, workdir: str, name: str) -> str:
  """The stage whose output stands for `name`'s: pretrain_general for a pretrain_domain that
  schedule=auto skipped in `workdir` (the "adapted" model is then the general one), else `name`."""
  if (name == DOMAIN_STAGE and workdir and
      (read_decision(config, workdir) or {}).get("action") == SKIP):
    return "pretrain_general"
  return name


def skips(config: ml_collections.ConfigDict, workdir: str, name: str,
          stage_cfg: ml_collections.ConfigDict) -> bool:
  """Whether schedule=auto skips stage `name` (config `stage_cfg`) about to run in `workdir`:
  for pretrain_domain, `decide_domain` now (or the decision taken back); never another stage."""
  if name != DOMAIN_STAGE or not decides_domain(config):
    return False
  return decide_domain(config, workdir, stage_cfg)["action"] == SKIP


def decide_domain(config: ml_collections.ConfigDict, workdir: str,
                  domain_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Whether pretrain_domain (its stage config `domain_cfg`) runs: the decision already made in
  `workdir` (a rerun takes it back), else the diagnostic of the general model (domain_cfg's
  init_from) on the domain corpus against its own held-out general text, written to
  `decision_path` (and its report next to it) before the pipeline acts on it."""
  saved = read_decision(config, workdir)
  if saved:
    logging.info("schedule=auto: %s decision taken back from %s: %s.", DOMAIN_STAGE,
                 decision_path(workdir), saved["action"])
    return saved
  started = time.perf_counter()
  general_dir = domain_cfg.init_from
  cfg = copy.deepcopy(config.auto.diagnose)
  cfg.update(dict(init_from=general_dir, domain=domain_cfg.data.corpus,
                  general=run_dir.read_json(os.path.join(general_dir, run_dir.CONFIG_FILE))[
                      "data"]["corpus"]))
  diagnose.validate(cfg)
  result = diagnose.measure(cfg)
  g, d, level = result["general"], result["domain"], result["level"]
  action = RUN if level in DAPT_LEVELS else SKIP
  rule = (f"{DOMAIN_STAGE} runs at a {' or '.join(DAPT_LEVELS)} shift, so it "
          + ("runs." if action == RUN else "is skipped and finetune_domain starts from the "
             "general model."))
  decision = StageDecision(
      stage=DOMAIN_STAGE, action=action, level=level, reason=f"{result['verdict']} {rule}",
      measures={"perplexity_ratio": result["shift"]["perplexity_ratio"],
                "word_token_coverage": result["overlap"]["word_token_coverage"],
                "general_mlm_loss": g["mlm_loss"], "domain_mlm_loss": d["mlm_loss"],
                "general_perplexity": g["perplexity"], "domain_perplexity": d["perplexity"],
                "eval_rows_per_corpus": result["eval_rows"], "seq_len": result["seq_len"],
                "held_out_documents": [g["held_out_documents"], d["held_out_documents"]]},
      thresholds={k: float(cfg[k]) for k in ("moderate_ppl_ratio", "large_ppl_ratio",
                                             "low_word_coverage")},
      general_model={"directory": general_dir, "step": result["checkpoint_step"],
                     "summary_sha": pipeline_stages.summary_sha(general_dir)},
      settings=_domain_settings(config), wall_secs=time.perf_counter() - started)
  out = run_dir.json_ready(decision.to_json())
  if jax.process_index() == 0:
    report = os.path.join(workdir, pipeline_stages.STATE_DIR, DOMAIN_STAGE + ".diagnose.md")
    run_dir.write_text(report, diagnose.report_text(result))
    run_dir.write_json(decision_path(workdir), out)
  logging.info("schedule=auto: %s %s (%s).", DOMAIN_STAGE, action, decision.reason)
  return out


def read_logs(workdir: str) -> dict[str, dict[str, Any]]:
  """{stage: its decision log} for every stage of `workdir` that has one."""
  out = {}
  for name in CONTROLLED:
    log = schedule_lib.read_log(log_path(workdir, name))
    if log:
      out[name] = log
  return out


def summary(workdir: str) -> dict[str, Any]:
  """summary.json's "schedule" entry: per controlled stage, where it left (None: it trained to
  its ceiling or stopped otherwise), how many decisions, the decisive one's reason, and the
  unfreeze / lower_lr decisions made before it ("actions": step, action, reason)."""
  out = {}
  for name, log in read_logs(workdir).items():
    leave = next((d for d in log["decisions"] if d["action"] == schedule_lib.LEAVE), None)
    stage_summary = run_dir.read_json(os.path.join(workdir, name, run_dir.SUMMARY_FILE)) or {}
    out[name] = {"left_at": log.get("left_at"), "decisions": len(log["decisions"]),
                 "planned_steps": stage_summary.get("num_steps"),
                 "reason": leave["reason"] if leave else None, "log": log_path(workdir, name),
                 "actions": [{k: d[k] for k in ("step", "action", "reason")}
                             for d in log["decisions"] if d["action"] in schedule_lib.ACTIONS],
                 "settings": log.get("settings")}
  if decision := decision_record(workdir):
    out["domain_pretraining"] = decision
  return out


def decision_record(workdir: str) -> dict[str, Any]:
  """The last decision whether pretrain_domain runs made in `workdir` ({} if none)."""
  return run_dir.read_json(decision_path(workdir)) or {}
