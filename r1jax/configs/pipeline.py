r"""The whole recipe in one command: data -> pretraining -> domain adaptation -> (tuning) -> compression.

    # Tiny settings, 28-76 minutes on a shared 2-core CPU (README); ends by printing DIR/report.md:
    python -m r1jax.main --config=configs/pipeline.py --workdir=runs/pipeline
    # Real accelerators: the stage configs' own small / base settings.
    python -m r1jax.main --config=configs/pipeline.py:variant=base --workdir=/mnt/gcs/BUCKET/run
    # A subset (later stages need earlier ones finished in DIR or selected too), tuning on:
    ... --config.stages=finetune_general,finetune_domain,compare --config.run_tune=True
    # Your task (JSONL/CSV/Parquet with text/label fields) and unlabelled domain text:
    ... --config.task.train=train.jsonl --config.task.dev=dev.jsonl --config.task.test=test.jsonl \
        --config.domain_corpus=notes/*.txt
    # Any key of any stage: --config.pipeline.<stage>.<key>=VALUE, e.g.
    ... --config.pipeline.pretrain_general.train.num_steps=1000 \
        --config.pipeline.data_general.data.inputs=corpus/*.jsonl
    # Everything within 30 minutes (steps and epochs sized from the measured step rates):
    ... --config.budget_minutes=30
    # Each pretraining / finetuning stage left when its eval metric plateaus, not at a step count
    # (after lowering the learning rate at a first plateau, and unfreezing frozen layers first),
    # and domain pretraining skipped when the general model shows no domain shift (diagnose):
    ... --config.schedule=auto [--config.auto.policy=rule --config.auto.finetune.min_gain=0.05]
    # The image+text task (embedded icons): fused, text-only and image-only models compared:
    ... --config.multimodal.enabled=True
    # Quantize the distilled student instead of the finetuned model:
    ... --config.sources.quantize=distill

`config.pipeline.<stage>` is the stage's own `configs/<file>.py` config (one source of truth for
every default) with the few overrides below; the pipeline fills in the keys that connect stages
(`init_from`, pretraining corpus and tokenizer, compare's workdirs) when it runs. Stages and the
directories they write (DIR/<stage>/):

    data_general      data.py      clean the general corpus, train the tokenizer
    data_domain       data.py      clean the domain corpus (same tokenizer)
    pretrain_general  pretrain.py  MLM + NSP pretraining on the cleaned general corpus
    pretrain_domain   pretrain.py  domain-adaptive pretraining from pretrain_general
    finetune_general  finetune.py  classifier from pretrain_general (configs/finetune.py's recipe)
    finetune_domain   finetune.py  the same from pretrain_domain
    compare           compare.py   general vs domain-adapted table
    tune              tune.py      hyperparameter search (only with run_tune=True or when selected)
    distill           distill.py   student distilled from sources.distill
    quantize          quantize.py  INT8 post-training quantization of sources.quantize
    prune             prune.py     magnitude pruning + recovery of sources.prune

`variant`: tiny (default: the stage configs' tiny settings with a few hundred steps per stage),
small, base (the stage configs' settings for that variant, unchanged).
"""
import os

import ml_collections

from r1jax import configlib

_HERE = os.path.dirname(os.path.abspath(__file__))

# Stage -> its config file in configs/ (kept in sync with pipeline_stages.STAGES by a test).
STAGE_CONFIGS = {
    "data_general": "data", "data_domain": "data", "pretrain_general": "pretrain",
    "pretrain_domain": "pretrain", "finetune_general": "finetune", "finetune_domain": "finetune",
    "compare": "compare", "tune": "tune", "distill": "distill", "quantize": "quantize",
    "prune": "prune",
}

# Pipeline overrides of the stage configs, per variant: {stage: {dotted key: value}}.
_COMMON = {
    "data_general": {"data.inputs": "builtin:general"},
    "data_domain": {"data.inputs": "builtin:domain", "tokenizer.train": False},
    "compare": {"names": "general,domain-adapted"},
    # The linear baseline depends on the task only: finetune_general's (compare's reference) is
    # quoted for both models, so the second finetuning skips its ~30 s.
    "finetune_domain": {"report.linear_baseline": False},
}
_PRETRAIN_TINY = {"train.warmup_steps": 300, "train.log_every_steps": 100,
                  "eval.every_steps": 1000, "eval.num_batches": 8, "checkpoint.every_steps": 1000}
_TINY = {
    # About 2.5 minutes of pretraining on a 2-core CPU: 10x the steps of session 11's pipeline
    # (held-out MLM accuracy 0.12 -> 0.35), which is what makes pretraining pay at this size.
    "pretrain_general": dict(_PRETRAIN_TINY, **{"train.num_steps": 6000}),
    "pretrain_domain": dict(_PRETRAIN_TINY, **{"train.num_steps": 4000, "train.warmup_steps": 200,
                                               "train.learning_rate": 1e-3}),
    "distill": {"train.num_steps": 160, "eval.every_steps": 32, "train.log_every_steps": 16,
                "checkpoint.every_steps": 64},
    "tune": {"n_trials": 4},
    "prune": {"train.num_steps": 96, "eval.every_steps": 32, "train.log_every_steps": 16,
              "checkpoint.every_steps": 48},
}


def _stage_config(stage: str, variant: str) -> ml_collections.ConfigDict:
  path = os.path.join(_HERE, f"{STAGE_CONFIGS[stage]}.py")
  config = configlib.load_config(f"{path}:variant={variant}")
  overrides = dict(_COMMON.get(stage, {}))
  if variant == "tiny":
    overrides.update(_TINY.get(stage, {}))
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise configlib.ConfigError(f"configs/pipeline.py overrides {stage}.{key}, which "
                                  f"configs/{STAGE_CONFIGS[stage]}.py does not define.")
    node[leaf] = value
  return config


def _diagnose_config(variant: str) -> ml_collections.ConfigDict:
  config = configlib.load_config(os.path.join(_HERE, "diagnose.py") + f":variant={variant}")
  config.update(dict(num_batches=4, batch_size=16, max_docs=1000, top_missing=10))
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = configlib.parse_arg(arg, variant="tiny").variant
  configlib.check_variant(variant)
  config = ml_collections.ConfigDict()
  config.stage = "pipeline"
  config.variant = variant
  config.seed = 0         # added to every stage's own seed (0 keeps them; 1, 2, ... for replicates)
  config.init_from = ""   # a finished pretraining workdir used instead of the pretrain_general stage
  config.stages = ""      # comma-separated subset of the stages above; "" = all (tune: run_tune)
  config.run_tune = False  # include the tune stage in the default selection
  # Your own task, given once for every stage that reads it (finetune_general, finetune_domain,
  # tune; the compression stages read it from their finetuned source). "" = the stage configs'
  # own value (the embedded FOLDOC subject task). Other task keys: --config.pipeline.<stage>.task.*
  config.task = ml_collections.ConfigDict(dict(
      train="",        # labelled training split: JSONL/CSV/Parquet path or glob
      dev="",          # dev split (early stopping, model choice); "" = the stage's (every 10th
                       # train row when train is yours)
      test="",         # test split, reported once per model
      text_field="",   # field holding the text; "" = "text"
      label_field="",  # field holding the label; "" = "label"
  ))
  # Image+text task: finetune_general and finetune_domain train the fused, text-only and image-only
  # models of configs/finetune.py's multimodal mode (the embedded icon task, or your image+text
  # task.*; their other keys: --config.pipeline.<stage>.multimodal.*), compare and the report show
  # all three per finetuning, quantize takes the fused model; distill, prune and tune (text
  # classifiers only) are left out.
  config.multimodal = ml_collections.ConfigDict(dict(enabled=False))
  # Unlabelled domain text for data_domain / pretrain_domain (path, glob, directory; comma-separated
  # for several). "" = the embedded FOLDOC corpus with the embedded task, none with your own task.
  config.domain_corpus = ""
  # Task-adaptive pretraining: the domain corpus also gets the task's train and dev text (never its
  # test text), so domain pretraining sees the task's own language.
  config.tapt = True
  # The tokenizer (trained by data_general) also learns from the domain text (and, with tapt, the
  # task's train and dev text), so domain terms get pieces of their own.
  config.domain_vocab = True
  # Wall-clock budget of the whole run in minutes (0 = none): each training stage gets a share of
  # what is left when it starts and sizes its steps from its step rate measured at start-up
  # (train.time_budget_minutes); stages finished before keep their results.
  config.budget_minutes = 0.0
  # How long pretrain_general, pretrain_domain and the finetunings train. fixed: their configs'
  # steps / epochs and early stopping. auto: those as ceilings, and each stage is left as soon as
  # its eval metric gains too little per 1000 steps (auto.*); every decision, with the numbers
  # behind it, in DIR/pipeline_state/<stage>.schedule.json, summary.json and report.md.
  config.schedule = "fixed"
  config.auto = ml_collections.ConfigDict(dict(
      # adaptive: leave a stage when its gain per 1000 steps falls under `relative` x the best
      # rate it has shown (one setting for a loss and an accuracy); rule: under `min_gain`, which
      # adaptive also uses until the stage has gained anything.
      policy="adaptive",
      window=2,  # a gain compares the best eval score with the best `window` evals earlier
      # At a plateau, before leaving the stage: a finetuning with frozen layers unfreezes the next
      # ones (its schedule's next phase), then the learning rate is multiplied by `lr_factor`
      # from that step on, at most `max_lr_drops` times (0: leave at the first plateau). Off by
      # default: the stages' rates already decay, and one drop per stage (bench run 7) bought no
      # dev or held-out gain for an eval interval more of each stage (bench/NOTES_auto_schedule.md).
      lr_factor=0.3,
      max_lr_drops=0,
      # Per kind of stage: the eval metric (pretrain: loss | mlm_loss | mlm_accuracy | nsp_*;
      # finetune: accuracy | loss | nll), the rule's minimum gain per 1000 steps in the metric's
      # units, and adaptive's fraction of the best rate (pretraining's loss falls off slowly,
      # finetuning's dev accuracy turns flat at a knee; bench/NOTES_auto_schedule.md).
      pretrain=ml_collections.ConfigDict(dict(metric="mlm_loss", min_gain=0.05, relative=0.5)),
      finetune=ml_collections.ConfigDict(dict(metric="accuracy", min_gain=0.02, relative=0.1)),
      # Whether pretrain_domain runs: after pretrain_general, the general model is measured on the
      # domain text against held-out general text (auto.diagnose) and domain pretraining is
      # skipped when the verdict is a small shift or none (finetune_domain then starts from the
      # general model); False: it always runs.
      decide_domain=True,
      # configs/diagnose.py's settings for that measurement (the pipeline fills in the model and
      # both corpora), with a bounded number of rows: 4 x 16 held-out segments per corpus, the
      # vocabulary statistics on 1000 documents of each (about 10 s on the 2-core CPU, tiny).
      diagnose=_diagnose_config(variant),
  ))
  # Which earlier stage each compression stage starts from (its init_from).
  config.sources = ml_collections.ConfigDict(dict(
      tune="pretrain_domain",      # the pretraining run whose finetuning is tuned
      distill="finetune_domain",   # the teacher
      quantize="finetune_domain",  # or distill / prune: compress the student / pruned model further
      prune="finetune_domain",     # or distill
  ))
  config.report = ml_collections.ConfigDict(dict(
      html=True,            # DIR/report.html next to DIR/report.md
      max_points=2000,      # loss-curve points per series (longer runs are subsampled)
  ))
  config.pipeline = ml_collections.ConfigDict(
      {stage: _stage_config(stage, variant) for stage in STAGE_CONFIGS})
  return config
