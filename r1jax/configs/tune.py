r"""Bayesian hyperparameter search (optuna) over short finetuning or pretraining runs.

    # A small search on the embedded task (tiny model, from scratch, a few minutes per trial on CPU):
    python -m r1jax.main --config=configs/tune.py:variant=tiny --workdir=/tmp/tune_tiny
    # Finetune a pretrained model; 40 trials; other ranges; objective and direction:
    python -m r1jax.main --config=configs/tune.py:variant=base --workdir=DIR \
        --config.init_from=PRETRAIN_WORKDIR --config.n_trials=40 \
        --config.space.learning_rate.low=1e-5 --config.objective.metric=loss \
        --config.objective.direction=minimize
    # Tune pretraining instead (objective: held-out MLM accuracy):
    python -m r1jax.main --config=configs/tune.py:variant=tiny,stage=pretrain --workdir=DIR
    # Several workers (processes or machines) on one study: start the same command several times
    # with the same --workdir (SQLite/journal in DIR), or give every worker, each with its own
    # --workdir, the same PostgreSQL URL (pip install "r1jax[postgres]"):
    ... --config.storage=postgresql://user:pass@host:5432/db   # or sqlite:///path, journal:/path
    # Run the best configuration found on its own:
    python -m r1jax.main --config=DIR/best_config.py --workdir=BEST

Each trial runs `r1jax.stages.<tune.stage>.run(trial_config, DIR/trials/<n>)` with `base` (the stage's
own config, loaded from configs/<stage>.py with the same variant) plus the sampled values of `space`.
Killing the search and rerunning the same command continues the study (see r1jax/stages/tune.py).
Outputs: DIR/summary.json, DIR/report.md (+ PNG plots), DIR/best_config.py and DIR/best_config.json.

`space.<name>`: one searched parameter.
  field   config path inside `base`, e.g. train.learning_rate, model.dropout, unfreeze.num_layers
  type    float | int | pow2 (powers of two from low to high, searched on the exponent) |
          categorical (values in `choices`, comma-separated) | off (not searched)
  low, high, log (log-uniform; float/int), step (grid step for float/int; 0 = continuous)
"""
import os

import ml_collections

from r1jax import configlib

STAGES = ("finetune", "pretrain")


def _param(field: str, type: str, low: float = 0.0, high: float = 0.0, log: bool = False,  # pylint: disable=redefined-builtin
           step: float = 0.0, choices: str = "") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(field=field, type=type, low=float(low), high=float(high),
                                        log=log, step=float(step), choices=choices))


def _stage_config(stage: str, variant: str) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{stage}.py")
  return configlib.load_config(f"{path}:variant={variant}")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = configlib.parse_arg(arg, variant="base", stage="finetune")
  variant, stage = args.variant, args.stage
  configlib.check_variant(variant)
  if stage not in STAGES:
    raise configlib.ConfigError(f"configs/tune.py: stage={stage!r} is not one of {STAGES}; e.g. "
                                f"configs/tune.py:variant=tiny,stage=pretrain.")
  config = ml_collections.ConfigDict()
  config.stage = "tune"
  config.seed = 0        # sampler seed (a worker joining a study adds the number of trials so far)
  config.init_from = ""  # when set, every trial's base.init_from (e.g. the pretraining workdir)
  config.tune = ml_collections.ConfigDict(dict(stage=stage))  # the stage each trial runs
  config.base = _stage_config(stage, variant)  # that stage's config; trials override `space`
  config.base.train.progress_bar = False
  if stage == "finetune":
    # TF-IDF + LR depends on the task only: finetune's own report has it, not every trial.
    config.base.report.linear_baseline = False

  # Search space (the seed's defaults). For finetuning, the learning rate searched is the backbone's
  # (unfreeze.learning_rate; the seed's stage-B rate was 1e-6); the head keeps train.learning_rate.
  config.space = ml_collections.ConfigDict(dict(
      learning_rate=_param("unfreeze.learning_rate" if stage == "finetune" else
                           "train.learning_rate", "float", 1e-6, 1e-4, log=True),
      batch_size=_param("train.batch_size", "pow2", 32, 128),
      dropout=_param("model.dropout", "float", 0.1, 0.5),
  ))
  config.objective = ml_collections.ConfigDict(dict(
      # An eval metric of the stage (finetune: accuracy | loss | nll [| micro_f1 multi-label];
      # pretrain: loss | mlm_accuracy | mlm_loss | nsp_accuracy | nsp_loss [| kg_*]). A trial's
      # value is this metric at the model the stage delivers (finetune: the step eval.best_metric chose;
      # pretrain: the last step); every eval reports it to the pruner.
      metric="accuracy" if stage == "finetune" else "mlm_accuracy",
      direction="maximize",  # maximize | minimize
  ))
  config.n_trials = 20  # the study's budget: finished + running trials, over all workers and reruns
  config.timeout_secs = 0.0  # this worker starts no new trial after this long; 0 = no limit
  config.sampler = ml_collections.ConfigDict(dict(
      name="tpe",            # tpe | gp (needs torch) | random
      startup_trials=-1,     # random trials before the model is used; -1 = max(2, n_trials // 4)
      multivariate=True,     # tpe: model the parameters jointly
  ))
  config.pruner = ml_collections.ConfigDict(dict(
      name="median",         # median | hyperband | none
      startup_trials=-1,     # median: trials finished before pruning starts; -1 = max(2, n_trials // 5)
      warmup_steps=0,        # median: no pruning before this training step
      min_resource=-1,       # hyperband: steps of the smallest rung; -1 = base eval.every_steps
      max_resource=-1,       # hyperband: -1 = base train.num_steps (or "auto" when that is -1)
      reduction_factor=3,    # hyperband
  ))
  # "" = sqlite:///DIR/study.db; "journal" = DIR/study.journal; "journal:PATH"; or any SQLAlchemy
  # database URL (postgresql://... with the [postgres] extra, sqlite:///PATH) several workers
  # share; with PostgreSQL the budget's lock is in the database, so workers need no shared DIR.
  config.storage = ""
  config.study_name = "tune"
  config.heartbeat_secs = 60  # database storages: a RUNNING trial silent 3x this long is retried
  # A known good configuration tried first: "base" (the base config's values of the searched
  # fields), "" (none), or "field=value,field=value" (the other searched fields from base).
  config.enqueue = "base"
  config.keep_trial_workdirs = "all"  # all | best (delete the others once finished) | none

  if variant == "tiny":
    # A search of minutes-long trials on 2 CPU cores: the tiny model from scratch, everything
    # trained (schedule=full), short runs with frequent evals for the pruner.
    config.n_trials = 8
    b = config.base
    if stage == "finetune":
      b.schedule = "full"
      b.task.seq_len = 32
      b.train.num_steps = 96
      b.eval.every_steps = 16
      b.eval.num_batches = 64  # covers the whole dev split at any batch size in the space
      b.eval.early_stopping_patience = 0  # the pruner decides
      b.checkpoint.every_steps = 32
      b.train.log_every_steps = 16
      b.report.latency_repeats = 2
      b.report.latency_warmup = 1
      config.space.learning_rate.field = "train.learning_rate"
      config.space.learning_rate.low = 1e-4
      config.space.learning_rate.high = 3e-2
    else:
      b.train.num_steps = 200
      b.train.warmup_steps = 20
      b.eval.every_steps = 50
      b.eval.num_batches = 4
      b.eval.early_stopping_patience = 0
      b.checkpoint.every_steps = 100
      b.train.log_every_steps = 50
      config.space.learning_rate.low = 3e-4
      config.space.learning_rate.high = 1e-2
      config.space.dropout.low = 0.0  # the tiny pretraining default is 0.0
      config.space.dropout.high = 0.3
  elif variant == "small" and stage == "pretrain":
    config.space.learning_rate.low = 1e-5  # the small pretraining default is 3e-4
    config.space.learning_rate.high = 1e-3
  return config
