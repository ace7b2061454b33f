r"""Finetuning stage: a pretrained backbone + a new classification head, trained in phases.

    python -m r1jax.main --config=configs/finetune.py:variant=tiny --workdir=DIR \
        --config.init_from=PRETRAIN_WORKDIR

`run(config, workdir)`:
1. validates the config; reads the train/dev/test splits (JSONL/CSV/Parquet/builtin), skipping and
   counting rows without a text or a label, and refusing (or, with task.unknown_label=skip,
   dropping) dev/test labels never seen in training;
2. takes the tokenizer from `init_from` (or trains one when starting from scratch), builds a
   `heads.Classifier` whose architecture is init_from's (`run_dir.model_config_of`: sizes from its
   checkpoint) except for the fields this config sets, checks every backbone leaf against the
   checkpoint (an error names each leaf and both shapes), and restores the backbone (+ the NSP
   pooler into the head's pooler where shapes match);
3. plans the phases of `config.schedule` and runs them one after another with the shared engine:
     head_only    backbone frozen, head trains (stage A alone);
     a_then_b     stage A, then stage B: the last `unfreeze.num_layers` layers (all of them in a
                  smaller model; each phase logs what it trains) train at
                  `unfreeze.learning_rate` while the head keeps `train.learning_rate`;
     progressive  stage A, then one more layer from the top every `unfreeze.every_epochs` epochs
                  (or earlier after `unfreeze.plateau_patience` evals without improvement,
                  or, under the pipeline's schedule=auto, at its controller's "unfreeze");
     full         everything trains (backbone at `unfreeze.learning_rate`).
   Freezing is a list of regex rules over parameter paths (`optim.build_optimizer`): frozen leaves
   get no optimizer state, and the loss stops their gradients, so the backward pass skips them;
4. picks the best eval-loss parameters over all phases (early stopping restores the best
   checkpoint), saves them to DIR/checkpoints, evaluates dev and test, measures latency and writes
   DIR/summary.json, DIR/report.md and DIR/confusion_matrix.png (`finetune_report`).

Phases: each has its own directory DIR/phases/<i>_<name>/ with its checkpoints (the optimizer state
differs between phases) and a `phase.json` once it is done; steps are counted globally, so
DIR/metrics.jsonl and DIR/tensorboard/ read as one run, each record tagged with its phase. A phase
starts from the best parameters of the one before. Killing the process at any point and rerunning
the same command continues in the phase (and at the step) where it stopped; DIR/phases/plan.json
refuses a rerun whose schedule no longer matches the one the workdir was started with.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import shutil
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from flax.core import meta
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from r1jax import configlib
from r1jax import distributed
from r1jax import eval as eval_lib
from r1jax import run_dir
from r1jax.data import augment as augment_lib
from r1jax.data import task as task_lib
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.model import heads
from r1jax.model import losses
from r1jax.model import transformer_xl as txl
from r1jax.stages import finetune_multimodal
from r1jax.stages import finetune_phases
from r1jax.stages import finetune_report
from r1jax.stages.finetune_phases import ALL_LAYERS, Phase, phase_rules, plan_phases
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import loop as loop_lib
from r1jax.train import mesh as mesh_lib
from r1jax.train import metrics as metrics_lib
from r1jax.train import optim
from r1jax.train import schedule as schedule_lib
from r1jax.train import steps as steps_lib
from r1jax.train.state import TrainState

SCHEDULES = ("a_then_b", "head_only", "full", "progressive")
EVAL_METRICS = ("loss", "nll", "accuracy")  # eval.best_metric choices (multi-label: + micro_f1)
UNKNOWN_LABEL_POLICIES = ("error", "skip")
HEAD = "cls_head"


# --------------------------------------------------------------------------------------------------
# Config validation.


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             process_count: int | None = None) -> configlib.Validator:
  """Checks that need no data or compilation; raises ConfigError naming each bad key and its fix."""
  def extra(v: configlib.Validator) -> None:
    v.stage("finetune")
    try:
      txl.get_variant(config.model.variant, **configlib.model_overrides(config.model))
    except (ValueError, TypeError) as e:
      v.add("model", str(e))
    v.choice("schedule", SCHEDULES)
    v.positive_int("unfreeze.num_layers")
    v.number_in("unfreeze.learning_rate", 0.0, 10.0, low_open=True)
    v.number_in("unfreeze.stage_a_fraction", 0.0, 1.0, low_open=True, high_open=True)
    v.number_in("unfreeze.every_epochs", 0.0, 1e6, low_open=True)
    v.int_at_least("unfreeze.plateau_patience", 0)
    pattern = v.string("unfreeze.extra_frozen")
    if pattern:
      try:
        re.compile(pattern)
      except re.error as e:
        v.add("unfreeze.extra_frozen", f"{pattern!r} is not a valid regex ({e}).")
    for key in ("train", "dev", "test", "text_field", "label_field", "labels", "tokenizer"):
      v.string(f"task.{key}")
    v.require(bool(config.task.get("train")), "task.train",
              "is empty; name the training data (e.g. train.jsonl or builtin:task:train).")
    v.require(bool(config.task.get("text_field")) and bool(config.task.get("label_field")),
              "task.text_field/label_field", "must be non-empty field names.")
    v.boolean("task.multi_label")
    delimiter = v.string("task.label_delimiter")
    v.require(delimiter is None or bool(delimiter), "task.label_delimiter",
              "is empty; use e.g. ',' or ';'.")
    v.choice("task.unknown_label", UNKNOWN_LABEL_POLICIES)
    v.int_at_least("task.seq_len", 8, allow=(-1,))
    if config.task.get("seq_len") == -1:
      v.number_in("task.seq_len_cover", 0.0, 1.0, low_open=True)
      v.int_at_least("task.max_seq_len", task_lib.SEQ_LEN_MULTIPLE)
    v.int_at_least("task.length_buckets", 0)
    v.number_in("task.threshold", 0.0, 1.0, low_open=True, high_open=True)
    tok = config.task.get("tokenizer")
    if tok:
      v.require(os.path.isfile(os.path.expanduser(tok)), "task.tokenizer",
                f"{tok!r} is not a file; name a tokenizer.model or '' to train one.")
    v.require(config.checkpoint.get("keep_best", 0) >= 1, "checkpoint.keep_best",
              f"{config.checkpoint.get('keep_best')}; early stopping restores the best checkpoint, "
              "so keep at least 1.")
    v.positive_int("report.latency_batch_size")
    v.positive_int("report.latency_repeats")
    v.int_at_least("report.latency_warmup", 0)
    v.boolean("report.linear_baseline")
    v.choice("eval.best_metric", EVAL_METRICS + (("micro_f1",) if config.task.get("multi_label")
                                                 else ()))
    if config.get("augment") is not None:
      for key in ("prob", "synonym_prob", "insert_prob", "delete_prob", "swap_prob"):
        v.number_in(f"augment.{key}", 0.0, 1.0)
      v.string("augment.synonyms")
    if config.get("multimodal") is not None:
      finetune_multimodal.validate(v, config)
  return configlib.validate_training(config, num_devices=num_devices, process_count=process_count,
                                     extra=extra)


# --------------------------------------------------------------------------------------------------
# Model, tokenizer and init_from.


def model_config(config: ml_collections.ConfigDict, *, vocab_size: int | None = None,
                 pretrained: Mapping[str, Any] | None = None) -> txl.TransformerXLConfig:
  """The classifier's TransformerXLConfig: variant + this config's overrides, then the
  architecture fields `pretrained` ({field: value} from the init_from run) sets and this config
  does not, then `vocab_size` (the tokenizer's)."""
  overrides = configlib.model_overrides(config.model, pretrained)
  if vocab_size is not None:
    overrides["vocab_size"] = vocab_size
  return txl.get_variant(config.model.variant, **overrides)


def check_backbone_fits(saved: Mapping[str, tuple[int, ...]], target: Any, *, init_from: str,
                        step: int, hint: str = "") -> None:
  """Raises ValueError naming every backbone leaf whose shape differs between the checkpoint and
  the model (`target`: a tree with a "backbone" key), or that only one of them has."""
  model = {p: tuple(x.shape) for p, x in
           ((run_dir.path_str(k), v) for k, v in jax.tree_util.tree_flatten_with_path(target)[0])}
  problems = []
  for path in sorted(set(model) | {p for p in saved if p.startswith("backbone/")}):
    if not path.startswith("backbone/"):
      continue
    s, m = saved.get(path), model.get(path)
    if s != m:
      problems.append(f"{path}: checkpoint {s if s is not None else 'has none'}, "
                      f"model {m if m is not None else 'has none'}")
  if problems:
    raise configlib.ConfigError(
        f"init_from={init_from!r} (step {step}) does not fit the classifier's backbone: "
        f"{len(problems)} parameter(s) differ:\n  " + "\n  ".join(problems[:20]) +
        (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "") +
        f"\n{hint}Use the variant and model overrides of the pretraining run.")


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: str,
                      train_texts: Sequence[str], vocab_size: int) -> tokenizer_lib.Tokenizer:
  """DIR/tokenizer.model: kept if present, else init_from's (it comes with the checkpoint), else
  task.tokenizer, else trained on the training texts (a from-scratch baseline)."""
  source = (run_dir.tokenizer_of(config.init_from) if config.init_from
            else os.path.expanduser(config.task.tokenizer))

  def train() -> tokenizer_lib.Tokenizer:
    logging.info("Training a tokenizer (vocab %d) on %d training texts.", vocab_size,
                 len(train_texts))
    return tokenizer_lib.Tokenizer.train(list(train_texts), vocab_size)
  return run_dir.provide_tokenizer(workdir, source=source, train=train)


def choose_seq_len(config: ml_collections.ConfigDict, task: task_lib.TaskData,
                   tok: tokenizer_lib.Tokenizer) -> tuple[int, dict[str, float]]:
  """(tokens per row, {split: share of its texts cut}): task.seq_len, or with -1 the smallest
  multiple of 32 that holds task.seq_len_cover of the training texts whole, at most
  task.max_seq_len. Length buckets keep a long seq_len cheap on batches of short texts."""
  lengths = {s.name: task_lib.text_lengths(s.records, tok, seed=config.seed)
             for s in (task.train, task.dev, task.test)}
  seq_len = config.task.seq_len
  if seq_len <= 0:
    cover, cap = config.task.seq_len_cover, config.task.max_seq_len
    seq_len = task_lib.choose_seq_len(lengths["train"], cover=cover, cap=cap)
    logging.info("task.seq_len=-1: %d tokens per row holds %.0f%% of the training texts whole "
                 "(median %d tokens; asked for %.0f%%, at most %d).", seq_len,
                 100 * (1 - task_lib.truncated_share(lengths["train"], seq_len)),
                 int(np.median(lengths["train"])) if len(lengths["train"]) else 0, 100 * cover,
                 cap)
  truncated = {k: task_lib.truncated_share(v, seq_len) for k, v in lengths.items()}
  if truncated["train"] > 0:
    logging.info("seq_len %d cuts the texts longer than %d tokens (their ends are not read): %s.",
                 seq_len, seq_len - 2, ", ".join(f"{100 * v:.1f}% of {k}" for k, v in
                                                 truncated.items()))
  return seq_len, truncated


# --------------------------------------------------------------------------------------------------
# Running.


@dataclasses.dataclass
class _Context:
  """Everything the phases share."""
  config: ml_collections.ConfigDict
  workdir: str
  model: heads.Classifier
  mcfg: txl.TransformerXLConfig
  task: task_lib.TaskData
  tok: tokenizer_lib.Tokenizer
  seq_len: int
  mesh: Any
  abstract_params: Any
  total_steps: int
  saved_shapes: dict[str, tuple[int, ...]]  # init_from's parameter shapes ({} from scratch)
  on_eval: Callable[[int, dict[str, float]], bool] | None = None  # loop.fit's hook, every phase
  started: float = 0.0                       # time.time() at the start (time budget's deadline)
  augment: augment_lib.AugmentText | None = None  # training texts' augmentation, or None


def _batches(ctx: _Context, records, *, train: bool, seed: int = 0, batch_size: int | None = None,
             all_rows: bool = False):
  """Training batches (shuffled, endless), or one padded pass for evaluation. Batches hold this
  process's rows of each global batch, or with `all_rows` every row (single-device evaluation)."""
  buckets = ctx.config.task.get("length_buckets", 0)
  rows = (batch_size or ctx.config.train.batch_size) // (1 if all_rows else jax.process_count())
  group = rows * loop_lib.steps_per_call(ctx.config) if train else 1
  return task_lib.classification_batches(
      task_lib.public_records(records), ctx.tok, seq_len=ctx.seq_len,
      group_by_length=group if buckets else 0,
      batch_size=batch_size or ctx.config.train.batch_size, labels=ctx.task.labels,
      multi_label=ctx.task.multi_label, shuffle=train, seed=seed,
      num_epochs=None if train else 1, pad_final_batch=not train,
      process_index=0 if all_rows else jax.process_index(),
      process_count=1 if all_rows else jax.process_count(),
      augment=ctx.augment if train else None)


def augmenter(config: ml_collections.ConfigDict) -> augment_lib.AugmentText | None:
  """The training texts' on-the-fly augmentation (config.augment), or None when it is off."""
  a = config.get("augment")
  if a is None or not a.prob:
    return None
  ops = augment_lib.AugmentConfig(synonym_prob=a.synonym_prob, insert_prob=a.insert_prob,
                                  delete_prob=a.delete_prob, swap_prob=a.swap_prob)
  return augment_lib.AugmentText(
      augment_lib.TextAugmenter(augment_lib.SynonymLexicon.from_spec(a.synonyms), ops), a.prob)


def _init_params_fn(ctx: _Context):
  def init_params(rng):
    tokens = jnp.zeros((1, 8), jnp.int32)
    types = jnp.zeros_like(tokens) if ctx.mcfg.n_token_types else None
    return ctx.model.init({"params": rng}, tokens, None, types)["params"]
  return init_params


def _build_engine(ctx: _Context, phase: Phase, start: int, end: int):
  """(engine, rules, parameter counts) for one phase."""
  cfg = ctx.config
  rules = phase_rules(phase, ctx.mcfg.n_layer, cfg.unfreeze)
  # Raises if a rule matches no parameter.
  labels = optim.assign_groups(ctx.abstract_params, rules)["labels"]
  counts = optim.count_params(ctx.abstract_params, labels)
  counts["frozen"] = counts["total"] - counts["trainable"]
  frozen = jax.tree.map(lambda l: l == optim.FROZEN, labels)
  steps = end - start
  tx = optim.build_optimizer(cfg.train, ctx.abstract_params, num_steps=steps, rules=rules,
                             adjustable_lr=schedule_lib.lowers_lr(ctx.on_eval))
  schedule = optim.make_schedule(cfg.train, steps)
  model, multi = ctx.model, ctx.task.multi_label
  engine = loop_lib.engine_for(
      cfg, mesh=ctx.mesh, tx=tx, init_params=_init_params_fn(ctx), num_steps=steps,
      loss_fn=losses.classification_loss_fn(model, multi_label=multi,
                                            label_smoothing=cfg.train.label_smoothing,
                                            frozen=frozen),
      eval_loss_fn=losses.classification_loss_fn(model, multi_label=multi),
      lr_schedule=lambda s: schedule(s - start),  # steps are global; the schedule is the phase's
      length_buckets=cfg.task.get("length_buckets", 0))
  return engine, rules, counts


def _restored_params(ctx: _Context, engine: steps_lib.Engine) -> dict[str, Any]:
  """The backbone (+ pooler) restored from init_from, as a partial params tree ({} without)."""
  if not ctx.config.init_from:
    return {}
  abstract = engine.abstract_state().params
  saved = ctx.saved_shapes
  target = {"backbone": abstract["backbone"]}
  pooler = abstract[HEAD]["pooler"]
  pooler_fits = all(saved.get(f"nsp_head/pooler/{k}") == tuple(v.shape) for k, v in pooler.items())
  if pooler_fits:
    target["nsp_head"] = {"pooler": pooler}
  restored, step = ckpt_lib.restore_params(os.path.expanduser(ctx.config.init_from), target)
  params = {"backbone": restored["backbone"]}
  if pooler_fits:
    params[HEAD] = {"pooler": restored["nsp_head"]["pooler"]}
  logging.info("Initialised the backbone%s from %s (step %d); the head%s is new.",
               " and the pooler" if pooler_fits else "", ctx.config.init_from, step,
               "'s output layer" if pooler_fits else "")
  return params


def run_phase(ctx: _Context, phase: Phase, start: int, previous: dict[str, Any] | None
              ) -> dict[str, Any]:
  """Runs (or resumes, or returns the record of a finished) phase; returns its phase.json record.

  A phase is a `loop.resume_and_fit` run of its own (checkpoints in DIR/phases/<i>_<name>/, since
  the optimizer state differs between phases) that logs to the stage's metrics.jsonl, tagged with
  the phase's name."""
  cfg = ctx.config
  pdir = os.path.join(ctx.workdir, "phases", phase.dirname)
  record_path = os.path.join(pdir, "phase.json")
  done = run_dir.read_json(record_path)
  if done is not None:
    return dict(done, dir=pdir)  # the workdir may have moved since
  end = ctx.total_steps if phase.steps is None else min(ctx.total_steps, start + phase.steps)
  engine, rules, counts = _build_engine(ctx, phase, start, end)
  trains = {ALL_LAYERS: "every parameter", 0: "the head only"}.get(
      phase.layers, f"the head and the last {phase.layers} of {ctx.mcfg.n_layer} backbone layers")
  logging.info("Phase %s (steps %d-%d) trains %s: %s trainable / %s frozen parameters; rules %s.",
               phase.name, start, end, trains, f"{counts['trainable']:,}", f"{counts['frozen']:,}",
               rules)

  def init_state() -> TrainState:
    rng = jax.random.PRNGKey(cfg.seed + phase.index)
    if previous is None:  # only the new parameters' init compiles
      restored = _restored_params(ctx, engine)
      state = engine.init_state_from(rng, restored) if restored else engine.init_state(rng)
    else:
      params, _ = ckpt_lib.restore_params(previous["dir"], engine.abstract_state().params,
                                          step=previous["best_step"])
      state = engine.state_from_params(params, rng)
    return state.replace(step=jax.device_put(jnp.asarray(start, jnp.int32),
                                             engine.state_shardings.step))

  def evaluate(params):
    batches = _batches(ctx, ctx.task.dev.records, train=False)
    return engine.evaluate(params, itertools.islice(batches, cfg.eval.num_batches))

  options = loop_lib.LoopOptions(
      num_steps=end, log_every=cfg.train.log_every_steps, eval_every=cfg.eval.every_steps,
      checkpoint_every=cfg.checkpoint.every_steps, early_stopping_patience=phase.patience,
      early_stopping_min_delta=cfg.eval.get("early_stopping_min_delta", 0.0),
      best_metric=cfg.eval.best_metric,
      skip_nonfinite=cfg.train.skip_nonfinite, progress_bar=cfg.train.progress_bar,
      sigterm_grace_secs=cfg.checkpoint.sigterm_grace_secs,
      deadline=loop_lib.deadline_of(cfg, ctx.started))
  result, _ = loop_lib.resume_and_fit(
      cfg, engine=engine, init_state=init_state, options=options, evaluate=evaluate,
      train_iter=_batches(ctx, ctx.task.train.records, train=True,
                          seed=cfg.seed + 1000 * phase.index),
      checkpoint_dir=os.path.join(pdir, run_dir.CHECKPOINTS_DIR), metrics_dir=ctx.workdir,
      metrics_tags={"phase": phase.name}, on_eval=ctx.on_eval)
  loop, step = result.loop, result.step
  record = {
      "index": phase.index, "name": phase.name, "dir": pdir, "layers": phase.layers,
      "unfrozen_layers": ("all" if phase.layers == ALL_LAYERS else
                          list(range(ctx.mcfg.n_layer - phase.layers, ctx.mcfg.n_layer))),
      "start_step": start, "end_step": step, "planned_end_step": end,
      "best_step": loop.best_step if loop.best_step is not None else step,
      "best_eval_loss": loop.best_eval_loss, "best_score": loop.best_score,
      "stopped_early": loop.stopped_early,
      "stopped_by": loop.stop_reason or None,
      "last_eval": loop.last_eval, "rules": [[p, v] for p, v in rules],
      "trainable_params": counts["trainable"], "frozen_params": counts["frozen"],
      "total_params": counts["total"], "head_learning_rate": cfg.train.learning_rate,
      "backbone_learning_rate": cfg.unfreeze.learning_rate if phase.layers else None,
  }
  run_dir.write_json(record_path, record)
  return record


def _score(record: Mapping[str, Any]) -> float | None:
  """A phase's best selection score (lower is better); phases recorded before scores existed
  were chosen by their loss."""
  return record.get("best_score", record["best_eval_loss"])


# --------------------------------------------------------------------------------------------------
# Final evaluation and report.


def restore_to_device(ctx: _Context, phase_dir: str, step: int, device: Any = None) -> Any:
  """The parameters saved at `step` of a phase, whole, on one local device (every process reads
  the full arrays), for evaluation and latency."""
  target = ckpt_lib.on_one_device(meta.unbox(ctx.abstract_params), device)
  params, _ = ckpt_lib.restore_params(phase_dir, target, step=step)
  return params


def _save_final_checkpoint(workdir: str, best: dict[str, Any]) -> str:
  """DIR/checkpoints/<step>: a copy of the best phase's checkpoint at its best step (a complete
  Orbax step: `restore_params(DIR, ...)` reads it). Copied under a temporary name, then renamed."""
  step = best["best_step"]
  directory = os.path.join(workdir, "checkpoints")
  final = os.path.join(directory, str(step))
  if jax.process_index() == 0 and not os.path.isdir(final):
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".copy-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.path.join(best["dir"], "checkpoints", str(step)), tmp)
    os.rename(tmp, final)
  distributed.sync("finetune_final_checkpoint")
  return final


# --------------------------------------------------------------------------------------------------
# Entry point.


def run(config: ml_collections.ConfigDict, workdir: str, *,
        on_eval: Callable[[int, dict[str, float]], bool] | None = None) -> dict[str, Any]:
  """Runs (or resumes, or returns the summary of a finished) finetuning in `workdir`.

  `on_eval(step, dev_metrics)` is called after every dev eval of every phase (`loop.fit`'s hook):
  returning True ends that phase early like early stopping; raising (e.g. optuna.TrialPruned)
  stops the whole run."""
  validate(config)
  if config.get("multimodal") is not None and config.multimodal.enabled:
    return run_dir.run_once(config, workdir, lambda c, w: finetune_multimodal.run(
        c, w, model_config=model_config, prepare_tokenizer=prepare_tokenizer, on_eval=on_eval),
                            requires=("test",))
  return run_dir.run_once(config, workdir, lambda c, w: _run(c, w, on_eval), requires=("test",))


def _run(config: ml_collections.ConfigDict, workdir: str,
         on_eval: Callable[[int, dict[str, float]], bool] | None = None) -> dict[str, Any]:
  started = time.time()
  init_from = os.path.expanduser(config.init_from) if config.init_from else ""
  saved_shapes, init_step, arch = {}, None, {}
  if init_from:
    saved_shapes, init_step = run_dir.saved_param_shapes(init_from)  # fails early on a bad workdir
    arch = run_dir.architecture_of(init_from, shapes=saved_shapes)
  else:
    logging.warning("config.init_from is empty: training the classifier FROM SCRATCH (random "
                    "backbone, tokenizer trained on the task's training texts). Set "
                    "--config.init_from=PRETRAIN_WORKDIR to finetune a pretrained model.")
  task = task_lib.load_task(config.task)
  tok = prepare_tokenizer(config, workdir, [r["text"] for r in task.train.records],
                          model_config(config, pretrained=arch).vocab_size)
  mcfg = model_config(config, vocab_size=tok.vocab_size, pretrained=arch)
  if arch.get("activation") and arch["activation"] != mcfg.activation:
    logging.warning("init_from was pretrained with activation=%s; finetuning with %s changes the "
                    "backbone's function.", arch["activation"], mcfg.activation)
  model = heads.Classifier(mcfg, len(task.labels), multi_label=task.multi_label)
  seq_len, truncated = choose_seq_len(config, task, tok)
  abstract_params = jax.eval_shape(
      lambda r: model.init({"params": r}, jnp.zeros((1, 8), jnp.int32), None,
                           jnp.zeros((1, 8), jnp.int32) if mcfg.n_token_types else None)["params"],
      jax.random.PRNGKey(0))
  if init_from:
    hint = ""
    pretrained_variant = run_dir.variant_of(init_from)
    if pretrained_variant and pretrained_variant != config.model.variant:
      hint = (f"init_from was pretrained with variant={pretrained_variant}, this config uses "
              f"variant={config.model.variant}. ")
    check_backbone_fits(saved_shapes, {"backbone": meta.unbox(abstract_params)["backbone"]},
                        init_from=init_from, step=init_step, hint=hint)

  batch_size = config.train.batch_size
  steps_per_epoch = max(1, len(task.train.records) // batch_size)
  total = config.train.num_steps
  if total == -1:
    total = max(1, int(round(config.train.num_epochs * steps_per_epoch)))
  plan = plan_phases(config, n_layer=mcfg.n_layer, total_steps=total,
                     steps_per_epoch=steps_per_epoch)
  mesh = mesh_lib.make_mesh(config.mesh)
  ctx = _Context(config=config, workdir=workdir, model=model, mcfg=mcfg, task=task, tok=tok,
                 seq_len=seq_len, mesh=mesh, abstract_params=abstract_params, total_steps=total,
                 saved_shapes=saved_shapes, on_eval=on_eval, started=started,
                 augment=augmenter(config))

  def step_rate() -> float:
    # The last phase trains the most parameters: its rate bounds every phase's.
    engine, _, _ = _build_engine(ctx, plan[-1], 0, total)
    probe = _batches(ctx, task.train.records, train=True, seed=config.seed + 7)
    return loop_lib.measure_step_rate(engine, engine.init_state(jax.random.PRNGKey(0)), probe)

  planned = total
  total, budget = loop_lib.budget_steps(config, workdir, total, step_rate, started,
                                        minimum=len(plan))  # a step for each phase
  if total != planned:
    plan = plan_phases(config, n_layer=mcfg.n_layer, total_steps=total,
                       steps_per_epoch=steps_per_epoch)
    ctx = dataclasses.replace(ctx, total_steps=total)
  # Check every phase's rules now (a rule matching nothing fails here, not hours later).
  for phase in plan:
    optim.assign_groups(abstract_params, phase_rules(phase, mcfg.n_layer, config.unfreeze))
  finetune_phases.check_plan(workdir, plan)
  if jax.process_index() == 0:
    task.labels.save(os.path.join(workdir, run_dir.LABELS_FILE))
    configlib.write_config_json(
        config, workdir, num_steps=total, steps_per_epoch=steps_per_epoch, seq_len=seq_len,
        vocab_size=tok.vocab_size, labels=list(task.labels.names), mesh=dict(mesh.shape),
        budget=budget,
        phases=[dataclasses.asdict(p) for p in plan], model=dataclasses.asdict(mcfg) | {
            "dtype": str(mcfg.dtype), "param_dtype": str(mcfg.param_dtype)})
  logging.info("Finetuning %s (%d labels, %s) for %d steps, %d per epoch; phases %s.",
               config.model.variant, len(task.labels),
               "multi-label" if task.multi_label else "multi-class", total, steps_per_epoch,
               [(p.name, p.layers, p.steps) for p in plan])

  records, start, previous = [], 0, None
  for phase in plan:
    if start >= total:
      logging.info("No steps left for phase %s.", phase.name)
      break
    if previous is not None and previous.get("stopped_by") == "time_budget":
      logging.warning("Time budget spent: phase %s does not run.", phase.name)
      break
    if isinstance(on_eval, schedule_lib.PlateauController):  # schedule=auto: while a later phase
      on_eval.unfreezes_left = len(plan) - 1 - phase.index  # trains more, a plateau goes to it
    previous = run_phase(ctx, phase, start, previous)
    records.append(previous)
    start = previous["end_step"]
  best = min(records, key=lambda r: (math.inf if _score(r) is None else _score(r), -r["index"]))
  checkpoint = _save_final_checkpoint(workdir, best)
  params = restore_to_device(ctx, best["dir"], best["best_step"])
  logging.info("Best by dev %s: step %d (phase %s, dev loss %.4f); evaluating on dev and test.",
               config.eval.best_metric, best["best_step"], best["name"],
               math.nan if best["best_eval_loss"] is None else best["best_eval_loss"])
  results = finetune_report.evaluate_final(
      model, params, task,
      lambda records, bs: _batches(ctx, records, train=False, batch_size=bs, all_rows=True),
      report=config.report, threshold=config.task.threshold)
  if config.report.linear_baseline and jax.process_index() == 0:
    results["linear_baseline"] = finetune_report.linear_baseline(task, results["test"],
                                                                 threshold=config.task.threshold)
  confusion_png = None
  if jax.process_index() == 0:
    confusion_png = eval_lib.save_confusion_matrix(
        results["test"], os.path.join(workdir, "confusion_matrix.png"),
        title=f"test: accuracy {results['test']['accuracy']:.3f}, "
              f"macro-F1 {results['test']['macro_f1']:.3f}")
  final = records[-1]
  summary = {
      "stage": "finetune",
      "status": "stopped_early" if final["stopped_early"] else "complete",
      "stopped_by": final.get("stopped_by"), "budget": budget,
      "step": final["end_step"], "num_steps": total, "config_num_steps": config.train.num_steps,
      "init_from": config.init_from, "init_from_step": init_step,
      "model": config.model.variant, "schedule": config.schedule,
      "total_params": final["total_params"],
      "trainable_params": final["trainable_params"], "frozen_params": final["frozen_params"],
      "phases": records, "best_phase": best["name"], "best_step": best["best_step"],
      "best_eval_loss": best["best_eval_loss"], "best_metric": config.eval.best_metric,
      "checkpoint": checkpoint,
      "task": {"train": config.task.train, "dev": config.task.dev, "test": config.task.test,
               "multi_label": task.multi_label, "num_labels": len(task.labels),
               "labels": list(task.labels.names), "seq_len": seq_len, "truncated": truncated},
      "data": {s.name: s.counts for s in (task.train, task.dev, task.test)},
      "dev": {k: v for k, v in results["dev"].items() if k not in ("confusion",)},
      "test": results["test"],
      "latency_device": results["latency_device"],
      "confusion_matrix_png": confusion_png,
      "tensorboard": metrics_lib.tensorboard_command(workdir),
  }
  for key in ("majority_baseline", "linear_baseline"):
    if key in results:
      summary[key] = results[key]
  finetune_report.publish(workdir, summary, confusion_png)
  return summary
