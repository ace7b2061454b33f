r"""Finetuning stage: a pretrained backbone + a new classification head, trained in phases.

    python -m r1jax.main --config=configs/finetune.py:variant=tiny --workdir=DIR \
        --config.init_from=PRETRAIN_WORKDIR

`run(config, workdir)`:
1. validates the config; reads the train/dev/test splits (JSONL/CSV/Parquet/builtin), skipping and
   counting rows without a text or a label, and refusing (or, with task.unknown_label=skip,
   dropping) dev/test labels never seen in training;
2. takes the tokenizer from `init_from` (or trains one when starting from scratch), builds a
   `heads.Classifier` whose architecture fields come from the config plus those the pretraining
   run set, checks every backbone leaf against the checkpoint (an error names each leaf and both
   shapes), and restores the backbone (+ the NSP pooler into the head's pooler where shapes match);
3. plans the phases of `config.schedule` and runs them one after another with the shared engine:
     head_only    backbone frozen, head trains (stage A alone);
     a_then_b     stage A, then stage B: the last `unfreeze.num_layers` layers train at
                  `unfreeze.learning_rate` while the head keeps `train.learning_rate`;
     progressive  stage A, then one more layer from the top every `unfreeze.every_epochs` epochs
                  (or earlier after `unfreeze.plateau_patience` evals without improvement);
     full         everything trains (backbone at `unfreeze.learning_rate`).
   Freezing is a list of regex rules over parameter paths (`optim.build_optimizer`): frozen leaves
   get no optimizer state, and the loss stops their gradients, so the backward pass skips them;
4. picks the best eval-loss parameters over all phases (early stopping restores the best
   checkpoint), saves them to DIR/checkpoints, evaluates dev and test, measures latency and writes
   DIR/summary.json, DIR/report.md and DIR/confusion_matrix.png.

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
import json
import math
import os
import re
import shutil
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from flax.core import meta
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from r1jax import configlib
from r1jax import eval as eval_lib
from r1jax.data import examples
from r1jax.data import sources
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.model import axes
from r1jax.model import heads
from r1jax.model import transformer_xl as txl
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import loop as loop_lib
from r1jax.train import mesh as mesh_lib
from r1jax.train import metrics as metrics_lib
from r1jax.train import optim
from r1jax.train import steps as steps_lib
from r1jax.train.state import TrainState

SCHEDULES = ("a_then_b", "head_only", "full", "progressive")
UNKNOWN_LABEL_POLICIES = ("error", "skip")
TOKENIZER_FILE = "tokenizer.model"
LABELS_FILE = "labels.txt"
HEAD = "cls_head"
ALL_LAYERS = -1  # Phase.layers value: every backbone parameter trains
# Architecture fields a finetuning run inherits from its init_from run when it does not set them.
INHERITED_FIELDS = ("vocab_size", "d_model", "n_layer", "n_head", "d_head", "d_inner", "mem_len",
                    "clamp_len", "same_length", "attention", "pre_lnorm", "activation",
                    "layer_norm_eps", "untie_r", "n_token_types")


# --------------------------------------------------------------------------------------------------
# Config validation.


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             process_count: int | None = None) -> configlib.Validator:
  """Checks that need no data or compilation; raises ConfigError naming each bad key and its fix."""
  def extra(v: configlib.Validator) -> None:
    v.require(config.get("stage") == "finetune", "stage",
              f"{config.get('stage')!r}; this stage runs configs with stage='finetune'.")
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
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  return configlib.validate_training(config, num_devices=num_devices, process_count=process_count,
                                     extra=extra)


# --------------------------------------------------------------------------------------------------
# Task data.


@dataclasses.dataclass(frozen=True)
class Split:
  """One split's usable records ({"text", "label"}, label a str or a list for multi-label) and
  what happened to the rest (counts by reason)."""
  name: str
  records: list[dict[str, Any]]
  counts: dict[str, int]


@dataclasses.dataclass(frozen=True)
class TaskData:
  labels: examples.LabelVocab
  multi_label: bool
  train: Split
  dev: Split
  test: Split


def label_names_of(value: Any, multi_label: bool, delimiter: str) -> list[str]:
  """A row's label value -> its label names ([] = missing). Lists stay lists; a multi-label string
  is split on `delimiter`; numbers become strings ("3")."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return []
  if isinstance(value, (list, tuple, np.ndarray)):
    names = [str(v).strip() for v in value if v is not None]
  elif multi_label and isinstance(value, str):
    names = [v.strip() for v in value.split(delimiter)]
  else:
    names = [str(value).strip()]
  names = [n for n in names if n and n.lower() not in sources.MISSING_STRINGS]
  return list(dict.fromkeys(names))  # drop repeats, keep order


def read_split(spec: str, name: str, task: Any) -> Split:
  """Reads `spec`, keeping rows with a text and a label; counts the others by reason."""
  counts = {"rows": 0, "used": 0, "skipped_missing_label": 0, "skipped_bad_text": 0,
            "skipped_multiple_labels": 0}
  records = []
  first_problem = {}
  for record in sources.read_records(spec, text_field=task.text_field):
    counts["rows"] += 1
    where = f"{record.get('_file', spec)}:{record.get('_line', '?')}"
    if record.get("_error"):
      counts["skipped_bad_text"] += 1
      first_problem.setdefault("bad_text", f"{where} ({record['_error']})")
      continue
    names = label_names_of(record.get(task.label_field), task.multi_label, task.label_delimiter)
    if not names:
      counts["skipped_missing_label"] += 1
      first_problem.setdefault("missing_label", where)
      continue
    if not task.multi_label and len(names) != 1:
      counts["skipped_multiple_labels"] += 1
      first_problem.setdefault("multiple_labels", where)
      continue
    records.append({"text": record["text"], "label": names if task.multi_label else names[0],
                    "_where": where})
  counts["used"] = len(records)
  skipped = counts["rows"] - counts["used"]
  if skipped:
    logging.warning("%s split (%s): skipped %d of %d rows (%s); first at %s.", name, spec, skipped,
                    counts["rows"], {k: v for k, v in counts.items() if k.startswith("skipped")
                                     and v}, first_problem)
  if not records:
    raise ValueError(f"task.{name}={spec!r}: none of its {counts['rows']} rows has both a text in "
                     f"field {task.text_field!r} and a label in field {task.label_field!r} "
                     f"({counts}); check task.text_field / task.label_field.")
  return Split(name, records, counts)


def _check_known(split: Split, vocab: examples.LabelVocab, policy: str, multi_label: bool) -> Split:
  """Applies the unknown-label policy to a split whose labels may not all be in `vocab`."""
  known = set(vocab.names)
  unknown: dict[str, list[str]] = {}
  kept = []
  dropped_codes = 0
  for r in split.records:
    names = r["label"] if multi_label else [r["label"]]
    bad = [n for n in names if n not in known]
    for n in bad:
      unknown.setdefault(n, []).append(r["_where"])
    if not bad:
      kept.append(r)
    elif multi_label and policy == "skip":  # keep the row, drop the unknown codes
      dropped_codes += len(bad)
      kept.append(dict(r, label=[n for n in names if n in known]))
  if not unknown:
    return split
  detail = ", ".join(f"{n!r} ({len(w)} rows, first at {w[0]})"
                     for n, w in sorted(unknown.items())[:10])
  if policy == "error":
    raise ValueError(
        f"task.{split.name} has label(s) never seen in the training data: {detail}. Known labels: "
        f"{list(vocab.names)[:50]}. Fix the data, list every class in task.labels, or set "
        f"--config.task.unknown_label=skip to drop those rows (multi-label: those labels).")
  counts = dict(split.counts, skipped_unknown_label=len(split.records) - len(kept),
                dropped_unknown_codes=dropped_codes, used=len(kept))
  logging.warning("%s split: labels never seen in training: %s; skipped %d rows%s "
                  "(task.unknown_label=skip).", split.name, detail, len(split.records) - len(kept),
                  f" and dropped {dropped_codes} labels" if dropped_codes else "")
  if not kept:
    raise ValueError(f"task.{split.name}: every row has a label never seen in training ({detail}).")
  return Split(split.name, kept, counts)


def load_task(task: Any) -> TaskData:
  """Reads and checks the three splits; the label vocabulary comes from `task.labels`, the
  embedded task's class order, or the sorted training labels."""
  train = read_split(task.train, "train", task)
  if task.dev:
    dev = read_split(task.dev, "dev", task)
  else:  # carve a deterministic dev set out of train
    held = [r for i, r in enumerate(train.records) if i % 10 == 9]
    rest = [r for i, r in enumerate(train.records) if i % 10 != 9]
    logging.warning("task.dev is empty: using every 10th training row (%d rows) as dev.", len(held))
    train = Split("train", rest, dict(train.counts, used=len(rest), moved_to_dev=len(held)))
    dev = Split("dev", held, {"rows": len(held), "used": len(held)})
  if task.test:
    test = read_split(task.test, "test", task)
  else:
    logging.warning("task.test is empty: the report's test metrics are computed on dev.")
    test = Split("test", dev.records, dict(dev.counts, same_as_dev=1))
  if task.labels:
    vocab = examples.LabelVocab.from_names(n.strip() for n in task.labels.split(",") if n.strip())
    train = _check_known(train, vocab, "error", task.multi_label)
  elif task.train.startswith("builtin:task"):
    from r1jax.data import builtin  # pylint: disable=g-import-not-at-top
    vocab = examples.LabelVocab.from_names(builtin.labels())
  else:
    vocab = examples.LabelVocab.from_records(train.records, "label", task.multi_label)
  if not task.multi_label and len(vocab) < 2:
    raise ValueError(f"task.train has a single class {list(vocab.names)}; a classifier needs at "
                     "least 2 (or set task.multi_label=True for label sets).")
  dev = _check_known(dev, vocab, task.unknown_label, task.multi_label)
  test = _check_known(test, vocab, task.unknown_label, task.multi_label)
  return TaskData(labels=vocab, multi_label=task.multi_label, train=train, dev=dev, test=test)


def _public(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  return [{"text": r["text"], "label": r["label"]} for r in records]


# --------------------------------------------------------------------------------------------------
# Model, tokenizer and init_from.


def read_json(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def saved_param_shapes(workdir: str) -> tuple[dict[str, tuple[int, ...]], int]:
  """({parameter path: shape}, step) of the newest checkpoint of a training workdir."""
  directory = os.path.join(os.path.expanduser(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"init_from={workdir!r} has no checkpoints/ directory; name the "
                            "workdir of a finished pretraining (or DAPT) run.")
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={"params": ocp.PyTreeCheckpointHandler()})
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"init_from={workdir!r}: {directory} holds no checkpoint; finish (or "
                              "resume) that run first.")
    tree = manager.item_metadata(step)["params"]
    tree = tree.tree if hasattr(tree, "tree") else tree
  finally:
    manager.close()
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {optim.path_str(p): tuple(m.shape) for p, m in flat}, step


def model_config(config: ml_collections.ConfigDict, *, vocab_size: int | None = None,
                 pretrained: Mapping[str, Any] | None = None) -> txl.TransformerXLConfig:
  """The classifier's TransformerXLConfig: variant + this config's overrides, then the
  architecture fields `pretrained` ({field: value} from the init_from run) sets and this config
  does not, then `vocab_size` (the tokenizer's)."""
  overrides = configlib.model_overrides(config.model)
  for name, value in (pretrained or {}).items():
    if name in INHERITED_FIELDS and name not in overrides and value is not None:
      overrides[name] = value
  if vocab_size is not None:
    overrides["vocab_size"] = vocab_size
  return txl.get_variant(config.model.variant, **overrides)


def pretrained_architecture(init_from: str, shapes: Mapping[str, tuple[int, ...]]
                            ) -> dict[str, Any]:
  """Architecture fields of the init_from run: those its config set, plus n_token_types read from
  the checkpoint (pretraining turns segment types on for NSP without writing it in the config)."""
  arch = {}
  cfg = read_json(os.path.join(os.path.expanduser(init_from), "config.json")) or {}
  for name, value in (cfg.get("model") or {}).items():
    if name in INHERITED_FIELDS and value is not None:
      arch[name] = value
  type_emb = shapes.get("backbone/type_emb/embedding")
  arch.setdefault("n_token_types", type_emb[0] if type_emb else 0)
  arch["_variant"] = (cfg.get("model") or {}).get("variant")
  return arch


def check_backbone_fits(saved: Mapping[str, tuple[int, ...]], target: Any, *, init_from: str,
                        step: int, hint: str = "") -> None:
  """Raises ValueError naming every backbone leaf whose shape differs between the checkpoint and
  the model (`target`: a tree with a "backbone" key), or that only one of them has."""
  model = {p: tuple(x.shape) for p, x in
           ((optim.path_str(k), v) for k, v in jax.tree_util.tree_flatten_with_path(target)[0])}
  problems = []
  for path in sorted(set(model) | {p for p in saved if p.startswith("backbone/")}):
    if not path.startswith("backbone/"):
      continue
    s, m = saved.get(path), model.get(path)
    if s != m:
      problems.append(f"{path}: checkpoint {s if s is not None else 'has none'}, "
                      f"model {m if m is not None else 'has none'}")
  if problems:
    raise ValueError(
        f"init_from={init_from!r} (step {step}) does not fit the classifier's backbone: "
        f"{len(problems)} parameter(s) differ:\n  " + "\n  ".join(problems[:20]) +
        (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "") +
        f"\n{hint}Use the variant and model overrides of the pretraining run.")


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: str,
                      train_texts: Sequence[str], vocab_size: int) -> tokenizer_lib.Tokenizer:
  """DIR/tokenizer.model: kept if present, else init_from's (it comes with the checkpoint), else
  task.tokenizer, else trained on the training texts (a from-scratch baseline)."""
  path = os.path.join(workdir, TOKENIZER_FILE)
  if jax.process_index() == 0 and not os.path.exists(path):
    if config.init_from:
      source = os.path.join(os.path.expanduser(config.init_from), TOKENIZER_FILE)
      if not os.path.exists(source):
        raise FileNotFoundError(f"init_from={config.init_from!r} has no {TOKENIZER_FILE}; name the "
                                "workdir of a finished pretraining (or DAPT) run.")
    else:
      source = os.path.expanduser(config.task.tokenizer)
    if source:
      shutil.copyfile(source, path + ".tmp")
      os.replace(path + ".tmp", path)
    else:
      logging.info("Training a tokenizer (vocab %d) on %d training texts.", vocab_size,
                   len(train_texts))
      tokenizer_lib.Tokenizer.train(list(train_texts), vocab_size).save(path)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("finetune_tokenizer")
  return tokenizer_lib.Tokenizer.load(path)


# --------------------------------------------------------------------------------------------------
# Phases and freezing rules.


@dataclasses.dataclass(frozen=True)
class Phase:
  """One training phase: which backbone layers train, for how long, and its early-stop patience.

  layers: 0 = head only; k = the head + the last k layers; ALL_LAYERS = every parameter.
  steps: planned steps, None = until the run's total.
  """
  index: int
  name: str
  layers: int
  steps: int | None
  patience: int

  @property
  def dirname(self) -> str:
    return f"{self.index}_{self.name}"


def plan_phases(config: ml_collections.ConfigDict, *, n_layer: int, total_steps: int,
                steps_per_epoch: int) -> list[Phase]:
  """The phases of config.schedule for a run of `total_steps` steps."""
  u = config.unfreeze
  patience = config.eval.early_stopping_patience
  layers = min(u.num_layers, n_layer)
  if layers < u.num_layers and config.schedule in ("a_then_b", "progressive"):
    logging.info("unfreeze.num_layers=%d clamped to the model's n_layer=%d.", u.num_layers, n_layer)
  if config.schedule == "head_only":
    return [Phase(0, "head_only", 0, None, patience)]
  if config.schedule == "full":
    return [Phase(0, "full", ALL_LAYERS, None, patience)]
  if config.schedule == "a_then_b":
    a_steps = max(1, int(round(u.stage_a_fraction * total_steps)))
    if a_steps >= total_steps:
      raise ValueError(f"schedule=a_then_b with {total_steps} steps leaves none for stage B "
                       f"(unfreeze.stage_a_fraction={u.stage_a_fraction}); train longer.")
    return [Phase(0, "stage_a", 0, a_steps, patience), Phase(1, "stage_b", layers, None, patience)]
  every = max(1, int(round(u.every_epochs * steps_per_epoch)))
  if layers * every >= total_steps:
    raise ValueError(
        f"schedule=progressive: {layers} layer(s) x unfreeze.every_epochs={u.every_epochs} "
        f"(= {every} steps each) needs more than the {total_steps} training steps; raise "
        f"train.num_epochs/num_steps or lower unfreeze.every_epochs or unfreeze.num_layers.")
  step_patience = u.plateau_patience or patience
  out = [Phase(i, f"top{i}" if i else "head", i, every, step_patience) for i in range(layers)]
  out.append(Phase(layers, f"top{layers}", layers, None, patience))
  return out


def phase_rules(phase: Phase, n_layer: int, unfreeze: Any) -> list[optim.Rule]:
  """Regex rules for `optim.build_optimizer`: the frozen part and the backbone's learning rate."""
  rules: list[optim.Rule] = []
  if unfreeze.extra_frozen:
    rules.append((unfreeze.extra_frozen, optim.FROZEN))
  backbone_lr = {"learning_rate": float(unfreeze.learning_rate)}
  if phase.layers == ALL_LAYERS:
    rules.append((r"backbone/.*", backbone_lr))
    return rules
  if phase.layers:
    top = "|".join(str(i) for i in range(n_layer - phase.layers, n_layer))
    rules.append((rf"backbone/layer_({top})/.*", backbone_lr))
  rules.append((r"backbone/.*", optim.FROZEN))
  return rules


# --------------------------------------------------------------------------------------------------
# Loss.


def classification_loss_fn(model: heads.Classifier, *, multi_label: bool,
                           label_smoothing: float = 0.0, frozen: Any = None) -> steps_lib.LossFn:
  """Loss for `heads.Classifier` on classification batches (no carried extras).

  batch: tokens/token_mask [B, Q], label int32 [B] (multi-label: float32 multi-hot [B, C]), and
  for padded evaluation batches example_mask bool [B] (rows weighted 0 are ignored).
  Multi-class: label-smoothed cross-entropy; metrics loss, nll, accuracy. Multi-label: mean
  sigmoid cross-entropy over labels (targets smoothed towards 0.5); metrics loss, nll, micro_f1
  (2TP / (2TP + FP + FN), a ratio of sums) and exact-match accuracy.
  `frozen`: a bool tree like params; True leaves get `stop_gradient`, so XLA drops the backward
  pass through them (the optimizer would ignore their gradients anyway).
  """
  use_types = model.config.n_token_types > 0

  def loss_fn(params, batch, extras, rng, deterministic):
    if frozen is not None:
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    tokens = batch["tokens"]
    logits, _ = model.apply({"params": params}, tokens, batch["token_mask"],
                            jnp.zeros_like(tokens) if use_types else None,
                            deterministic=deterministic, rngs={"dropout": rng})
    weights = batch.get("example_mask", jnp.ones(tokens.shape[:1], bool)).astype(jnp.float32)
    rows = jnp.maximum(weights.sum(), 1.0)
    if not multi_label:
      metrics = steps_lib.weighted_classification(logits, batch["label"], weights, label_smoothing)
      return metrics["loss"][0] / rows, (metrics, extras)
    targets = batch["label"].astype(jnp.float32)
    smoothed = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
    loss = optax.sigmoid_binary_cross_entropy(logits, smoothed).mean(-1)
    nll = optax.sigmoid_binary_cross_entropy(logits, targets).mean(-1)
    predicted = (logits >= 0).astype(jnp.float32)
    w = weights[:, None]
    tp = (predicted * targets * w).sum()
    fp = (predicted * (1 - targets) * w).sum()
    fn = ((1 - predicted) * targets * w).sum()
    exact = jnp.all(predicted == targets, axis=-1).astype(jnp.float32)
    metrics = {"loss": steps_lib.metric((loss * weights).sum(), weights.sum()),
               "nll": steps_lib.metric((nll * weights).sum(), weights.sum()),
               "micro_f1": steps_lib.metric(2 * tp, 2 * tp + fp + fn),
               "accuracy": steps_lib.metric((exact * weights).sum(), weights.sum())}
    return (loss * weights).sum() / rows, (metrics, extras)
  return loss_fn


# --------------------------------------------------------------------------------------------------
# Running.


class _PhaseWriter(metrics_lib.MetricsWriter):
  """MetricsWriter that tags every metrics.jsonl record with the phase name."""

  def __init__(self, workdir: str, phase: str, **kwargs: Any):
    super().__init__(workdir, **kwargs)
    self.phase = phase

  def write(self, step: int, split: str, values: Mapping[str, Any]) -> None:
    super().write(step, split, dict(values, phase=self.phase))


@dataclasses.dataclass
class _Context:
  """Everything the phases share."""
  config: ml_collections.ConfigDict
  workdir: str
  model: heads.Classifier
  mcfg: txl.TransformerXLConfig
  task: TaskData
  tok: tokenizer_lib.Tokenizer
  seq_len: int
  mesh: Any
  abstract_params: Any
  total_steps: int
  saved_shapes: dict[str, tuple[int, ...]]  # init_from's parameter shapes ({} from scratch)
  on_eval: Callable[[int, dict[str, float]], bool] | None = None  # loop.fit's hook, every phase


def _batches(ctx: _Context, records, *, train: bool, seed: int = 0, batch_size: int | None = None,
             all_rows: bool = False):
  """Training batches (shuffled, endless), or one padded pass for evaluation. Batches hold this
  process's rows of each global batch, or with `all_rows` every row (single-device evaluation)."""
  return examples.classification_batches(
      _public(records), ctx.tok, seq_len=ctx.seq_len,
      batch_size=batch_size or ctx.config.train.batch_size, labels=ctx.task.labels,
      multi_label=ctx.task.multi_label, shuffle=train, seed=seed,
      num_epochs=None if train else 1, pad_final_batch=not train,
      process_index=0 if all_rows else jax.process_index(),
      process_count=1 if all_rows else jax.process_count())


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
  tx = optim.build_optimizer(cfg.train, ctx.abstract_params, num_steps=steps, rules=rules)
  schedule = optim.make_schedule(cfg.train, steps)
  model, multi = ctx.model, ctx.task.multi_label
  engine = steps_lib.Engine(
      mesh=ctx.mesh, rules=axes.DEFAULT_RULES, tx=tx, init_params=_init_params_fn(ctx),
      init_extras=dict, batch_size=cfg.train.batch_size, accum_steps=cfg.train.grad_accum_steps,
      steps_per_call=loop_lib.steps_per_call(cfg),
      loss_fn=classification_loss_fn(model, multi_label=multi,
                                     label_smoothing=cfg.train.label_smoothing, frozen=frozen),
      eval_loss_fn=classification_loss_fn(model, multi_label=multi),
      lr_schedule=lambda s: schedule(s - start))  # steps are global; the schedule is the phase's
  return engine, rules, counts


def _initial_params(ctx: _Context, engine: steps_lib.Engine, params: Any) -> Any:
  """`params` (freshly initialised) with the backbone (+ pooler) restored from init_from."""
  if not ctx.config.init_from:
    return params
  abstract = engine.abstract_state().params
  saved = ctx.saved_shapes
  target = {"backbone": abstract["backbone"]}
  pooler = abstract[HEAD]["pooler"]
  pooler_fits = all(saved.get(f"nsp_head/pooler/{k}") == tuple(v.shape) for k, v in pooler.items())
  if pooler_fits:
    target["nsp_head"] = {"pooler": pooler}
  restored, step = ckpt_lib.restore_params(os.path.expanduser(ctx.config.init_from), target)
  params = dict(params, backbone=restored["backbone"])
  if pooler_fits:
    params[HEAD] = dict(params[HEAD], pooler=restored["nsp_head"]["pooler"])
  logging.info("Initialised the backbone%s from %s (step %d); the head%s is new.",
               " and the pooler" if pooler_fits else "", ctx.config.init_from, step,
               "'s output layer" if pooler_fits else "")
  return params


def _state_from_params(engine: steps_lib.Engine, params: Any, rng: jax.Array) -> TrainState:
  """A fresh train state around existing params (fresh optimizer state, step 0): the engine's
  `init_state` would also initialise (and compile the init of) parameters only to replace them."""
  sh = engine.state_shardings
  opt_state = jax.jit(engine.tx.init, out_shardings=sh.opt_state)(params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                     rng=jax.random.split(rng)[1], extras=engine.new_extras(),
                     nonfinite_skips=jnp.zeros((), jnp.int32))
  expected = jax.tree.structure(engine.abstract_state())
  if jax.tree.structure(state) != expected:
    raise AssertionError(f"train state structure {jax.tree.structure(state)} differs from the "
                         f"engine's {expected}")
  return jax.device_put(state, sh)


def _phase_loop_options(ctx: _Context, phase: Phase, end: int) -> loop_lib.LoopOptions:
  cfg = ctx.config
  return loop_lib.LoopOptions(
      num_steps=end, log_every=cfg.train.log_every_steps, eval_every=cfg.eval.every_steps,
      checkpoint_every=cfg.checkpoint.every_steps, early_stopping_patience=phase.patience,
      skip_nonfinite=cfg.train.skip_nonfinite, progress_bar=cfg.train.progress_bar,
      sigterm_grace_secs=cfg.checkpoint.sigterm_grace_secs)


def run_phase(ctx: _Context, phase: Phase, start: int, previous: dict[str, Any] | None
              ) -> dict[str, Any]:
  """Runs (or resumes, or returns the record of a finished) phase; returns its phase.json record."""
  cfg = ctx.config
  pdir = os.path.join(ctx.workdir, "phases", phase.dirname)
  record_path = os.path.join(pdir, "phase.json")
  done = read_json(record_path)
  if done is not None:
    return dict(done, dir=pdir)  # the workdir may have moved since
  end = ctx.total_steps if phase.steps is None else min(ctx.total_steps, start + phase.steps)
  engine, rules, counts = _build_engine(ctx, phase, start, end)
  logging.info("Phase %s (steps %d-%d): %s trainable / %s frozen parameters; rules %s.",
               phase.name, start, end, f"{counts['trainable']:,}", f"{counts['frozen']:,}", rules)
  checkpointer = ckpt_lib.Checkpointer(
      os.path.join(pdir, "checkpoints"), max_to_keep=cfg.checkpoint.max_to_keep,
      keep_best=cfg.checkpoint.keep_best, async_save=cfg.checkpoint.async_save)
  train_iter = _batches(ctx, ctx.task.train.records, train=True, seed=cfg.seed + 1000 * phase.index)
  writer = None
  try:
    restored = checkpointer.restore(engine.abstract_state())
    if restored is not None:
      state, step = restored.state, restored.step
      if restored.data_state is not None:
        train_iter.set_state(restored.data_state)
      loop_state = loop_lib.LoopState.from_json(restored.meta.get("loop"))
      logging.info("Resuming phase %s from step %d.", phase.name, step)
    else:
      rng = jax.random.PRNGKey(cfg.seed + phase.index)
      if previous is None:
        state = engine.init_state(rng)
        state = state.replace(params=_initial_params(ctx, engine, state.params))
      else:
        params, _ = ckpt_lib.restore_params(previous["dir"], engine.abstract_state().params,
                                            step=previous["best_step"])
        state = _state_from_params(engine, params, rng)
      state = state.replace(step=jax.device_put(jnp.asarray(start, jnp.int32),
                                                engine.state_shardings.step))
      step, loop_state = start, None
    writer = _PhaseWriter(ctx.workdir, phase.name, resume_step=step)

    def evaluate(params):
      batches = _batches(ctx, ctx.task.dev.records, train=False)
      return engine.evaluate(params, itertools.islice(batches, cfg.eval.num_batches))

    if loop_state is not None and loop_state.stopped_early:
      loop = loop_state  # killed after stopping early but before phase.json: nothing left to train
    else:
      result = loop_lib.fit(engine, state, train_iter, options=_phase_loop_options(ctx, phase, end),
                            on_eval=ctx.on_eval,
                            checkpointer=checkpointer, writer=writer, evaluate=evaluate,
                            loop_state=loop_state, start_step=step)
      loop, step = result.loop, result.step
  finally:
    if writer is not None:
      writer.close()
    checkpointer.close()
  record = {
      "index": phase.index, "name": phase.name, "dir": pdir, "layers": phase.layers,
      "unfrozen_layers": ("all" if phase.layers == ALL_LAYERS else
                          list(range(ctx.mcfg.n_layer - phase.layers, ctx.mcfg.n_layer))),
      "start_step": start, "end_step": step, "planned_end_step": end,
      "best_step": loop.best_step if loop.best_step is not None else step,
      "best_eval_loss": loop.best_eval_loss, "stopped_early": loop.stopped_early,
      "last_eval": loop.last_eval, "rules": [[p, v] for p, v in rules],
      "trainable_params": counts["trainable"], "frozen_params": counts["frozen"],
      "total_params": counts["total"], "head_learning_rate": cfg.train.learning_rate,
      "backbone_learning_rate": cfg.unfreeze.learning_rate if phase.layers else None,
  }
  if jax.process_index() == 0:
    metrics_lib.write_json(record_path, record)
  return record


def _check_plan(workdir: str, plan: list[Phase]) -> None:
  """Writes DIR/phases/plan.json, or checks a rerun against it."""
  path = os.path.join(workdir, "phases", "plan.json")
  wanted = [dataclasses.asdict(p) for p in plan]
  saved = read_json(path)
  if saved is None:
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      metrics_lib.write_json(path, {"phases": wanted})
    return
  if saved["phases"] != wanted:
    raise ValueError(f"{workdir} was started with the phases {saved['phases']} but this config "
                     f"plans {wanted}; rerun with the original schedule/steps, or use a new "
                     f"--workdir.")


# --------------------------------------------------------------------------------------------------
# Final evaluation and report.


def restore_to_device(ctx: _Context, phase_dir: str, step: int, device: Any = None) -> Any:
  """The parameters saved at `step` of a phase, whole, on one local device (every process reads
  the full arrays), for evaluation and latency."""
  sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        meta.unbox(ctx.abstract_params))
  params, _ = ckpt_lib.restore_params(phase_dir, target, step=step)
  return params


def make_predict_fn(model: heads.Classifier, params: Any, device: Any = None):
  """(predict(batch) -> logits numpy [B, C], jitted(batch) -> jax logits) on one device."""
  device = device or jax.local_devices()[0]
  params = jax.device_put(params, device)
  use_types = model.config.n_token_types > 0

  @jax.jit
  def logits_fn(p, tokens, token_mask):
    types = jnp.zeros_like(tokens) if use_types else None
    return model.apply({"params": p}, tokens, token_mask, types, deterministic=True)[0]

  def jitted(batch):
    return logits_fn(params, jax.device_put(batch["tokens"], device),
                     jax.device_put(batch["token_mask"], device))

  def predict(batch):
    return np.asarray(jitted(batch))
  return predict, jitted


def evaluate_final(ctx: _Context, params: Any) -> dict[str, Any]:
  """Dev and test metrics, the majority baseline, and latency of the given params."""
  cfg = ctx.config
  predict, jitted = make_predict_fn(ctx.model, params)
  names = list(ctx.task.labels.names)
  bs = cfg.report.latency_batch_size
  out = {}
  for split in (ctx.task.dev, ctx.task.test):
    out[split.name] = eval_lib.evaluate_classifier(
        predict, _batches(ctx, split.records, train=False, batch_size=bs, all_rows=True),
        label_names=names,
        multi_label=ctx.task.multi_label, threshold=cfg.task.threshold)
  test_batch = next(iter(_batches(ctx, ctx.task.test.records, train=False, batch_size=bs,
                                  all_rows=True)))
  one = {k: v[:1] for k, v in test_batch.items()}
  latency = eval_lib.latency_summary(jitted, one, test_batch, warmup=cfg.report.latency_warmup,
                                     repeats=cfg.report.latency_repeats)
  out["test"].update(latency)
  out["latency_device"] = str(jax.local_devices()[0].device_kind)
  if not ctx.task.multi_label:
    ids = [ctx.task.labels.index(r["label"]) for r in ctx.task.train.records]
    test_ids = [ctx.task.labels.index(r["label"]) for r in ctx.task.test.records]
    out["majority_baseline"] = eval_lib.majority_baseline(np.asarray(ids), np.asarray(test_ids),
                                                          names)
  return out


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
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("finetune_final_checkpoint")
  return final


def write_report(path: str, summary: Mapping[str, Any], confusion_png: str | None) -> str:
  """DIR/report.md: what was trained, how, and the test results."""
  test, dev = summary["test"], summary["dev"]
  multi = summary["task"]["multi_label"]
  lines = [f"# Finetuning report: {os.path.basename(os.path.dirname(path))}", ""]
  lines.append(f"- init_from: `{summary['init_from'] or '(none: trained from scratch)'}`")
  lines.append(f"- model: {summary['model']} ({summary['total_params']:,} parameters), "
               f"schedule `{summary['schedule']}`, {summary['step']} steps, "
               f"status {summary['status']}")
  lines.append(f"- task: {summary['task']['num_labels']} labels "
               f"({'multi-label' if multi else 'multi-class'}); rows used train / dev / test: "
               + " / ".join(str(summary["data"][s]["used"]) for s in ("train", "dev", "test")))
  skipped = {s: {k: v for k, v in c.items() if k.startswith(("skipped", "dropped")) and v}
             for s, c in summary["data"].items()}
  if any(skipped.values()):
    lines.append(f"- skipped rows: {json.dumps({s: c for s, c in skipped.items() if c})}")
  lines.append(f"- best checkpoint: phase `{summary['best_phase']}` step {summary['best_step']} "
               f"(dev loss {summary['best_eval_loss']:.4f})")
  lines += ["", "## Test results", ""]
  rows = [("accuracy" + (" (exact match)" if multi else ""), test["accuracy"], dev["accuracy"]),
          ("macro-F1", test["macro_f1"], dev["macro_f1"])]
  if multi:
    rows.append(("micro-F1", test["micro_f1"], dev["micro_f1"]))
  rows += [("latency, batch 1 (ms/example)", test["latency_ms_batch1"], None),
           (f"latency, batch {test['latency_batch_size']} (ms/example)",
            test["latency_ms_batched"], None)]
  lines.append(eval_lib.markdown_table(("metric", "test", "dev"), rows))
  if "majority_baseline" in summary:
    mb = summary["majority_baseline"]
    lines.append(f"Majority-class baseline (always `{mb['class']}`): accuracy "
                 f"{mb['accuracy']:.4f}, macro-F1 {mb['macro_f1']:.4f}. Latency measured on "
                 f"{summary['latency_device']}, "
                 "median after warm-up.")
  lines += ["", "## Phases", ""]
  lines.append(eval_lib.markdown_table(
      ("phase", "unfrozen layers", "trainable", "frozen", "steps", "best dev loss",
       "stopped early"),
      [(p["name"], "all" if p["unfrozen_layers"] == "all" else
        (",".join(map(str, p["unfrozen_layers"])) or "head only"),
        f"{p['trainable_params']:,}", f"{p['frozen_params']:,}",
        f"{p['start_step']}-{p['end_step']}", p["best_eval_loss"], p["stopped_early"])
       for p in summary["phases"]]))
  lines += ["", "## Per-class precision and recall (test)", "", eval_lib.per_class_table(test)]
  if confusion_png:
    lines += ["## Confusion matrix (test)", "",
              f"![confusion matrix]({os.path.basename(confusion_png)})", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


# --------------------------------------------------------------------------------------------------
# Entry point.


def run(config: ml_collections.ConfigDict, workdir: str, *,
        on_eval: Callable[[int, dict[str, float]], bool] | None = None) -> dict[str, Any]:
  """Runs (or resumes, or returns the summary of a finished) finetuning in `workdir`.

  `on_eval(step, dev_metrics)` is called after every dev eval of every phase (`loop.fit`'s hook):
  returning True ends that phase early like early stopping; raising (e.g. optuna.TrialPruned)
  stops the whole run."""
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  lock = ckpt_lib.WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
  try:
    done = loop_lib.finished_summary(workdir, config)
    if done is not None and "test" in done:
      logging.info("Finetuning in %s already finished; nothing to do.", workdir)
      return done
    return _run(config, workdir, on_eval)
  finally:
    if lock is not None:
      lock.release()


def _run(config: ml_collections.ConfigDict, workdir: str,
         on_eval: Callable[[int, dict[str, float]], bool] | None = None) -> dict[str, Any]:
  init_from = os.path.expanduser(config.init_from) if config.init_from else ""
  saved_shapes, init_step, arch = {}, None, {}
  if init_from:
    saved_shapes, init_step = saved_param_shapes(init_from)  # fails early on a bad workdir
    arch = pretrained_architecture(init_from, saved_shapes)
  else:
    logging.warning("config.init_from is empty: training the classifier FROM SCRATCH (random "
                    "backbone, tokenizer trained on the task's training texts). Set "
                    "--config.init_from=PRETRAIN_WORKDIR to finetune a pretrained model.")
  task = load_task(config.task)
  tok = prepare_tokenizer(config, workdir, [r["text"] for r in task.train.records],
                          model_config(config, pretrained=arch).vocab_size)
  mcfg = model_config(config, vocab_size=tok.vocab_size, pretrained=arch)
  if arch.get("activation") and arch["activation"] != mcfg.activation:
    logging.warning("init_from was pretrained with activation=%s; finetuning with %s changes the "
                    "backbone's function.", arch["activation"], mcfg.activation)
  model = heads.Classifier(mcfg, len(task.labels), multi_label=task.multi_label)
  seq_len = (config.task.seq_len if config.task.seq_len > 0
             else txl.SEGMENT_LEN[config.model.variant])
  abstract_params = jax.eval_shape(
      lambda r: model.init({"params": r}, jnp.zeros((1, 8), jnp.int32), None,
                           jnp.zeros((1, 8), jnp.int32) if mcfg.n_token_types else None)["params"],
      jax.random.PRNGKey(0))
  if init_from:
    hint = ""
    if arch.get("_variant") and arch["_variant"] != config.model.variant:
      hint = (f"init_from was pretrained with variant={arch['_variant']}, this config uses "
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
                 saved_shapes=saved_shapes, on_eval=on_eval)
  # Check every phase's rules now (a rule matching nothing fails here, not hours later).
  for phase in plan:
    optim.assign_groups(abstract_params, phase_rules(phase, mcfg.n_layer, config.unfreeze))
  _check_plan(workdir, plan)
  if jax.process_index() == 0:
    task.labels.save(os.path.join(workdir, LABELS_FILE))
    configlib.write_config_json(
        config, workdir, num_steps=total, steps_per_epoch=steps_per_epoch, seq_len=seq_len,
        vocab_size=tok.vocab_size, labels=list(task.labels.names), mesh=dict(mesh.shape),
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
    previous = run_phase(ctx, phase, start, previous)
    records.append(previous)
    start = previous["end_step"]
  best = min(records, key=lambda r: (math.inf if r["best_eval_loss"] is None
                                     else r["best_eval_loss"], -r["index"]))
  checkpoint = _save_final_checkpoint(workdir, best)
  params = restore_to_device(ctx, best["dir"], best["best_step"])
  logging.info("Best dev loss %.4f at step %d (phase %s); evaluating on dev and test.",
               best["best_eval_loss"], best["best_step"], best["name"])
  results = evaluate_final(ctx, params)
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
      "step": final["end_step"], "num_steps": total, "config_num_steps": config.train.num_steps,
      "init_from": config.init_from, "init_from_step": init_step,
      "model": config.model.variant, "schedule": config.schedule,
      "total_params": final["total_params"],
      "trainable_params": final["trainable_params"], "frozen_params": final["frozen_params"],
      "phases": records, "best_phase": best["name"], "best_step": best["best_step"],
      "best_eval_loss": best["best_eval_loss"], "checkpoint": checkpoint,
      "task": {"train": config.task.train, "dev": config.task.dev, "test": config.task.test,
               "multi_label": task.multi_label, "num_labels": len(task.labels),
               "labels": list(task.labels.names), "seq_len": seq_len},
      "data": {s.name: s.counts for s in (task.train, task.dev, task.test)},
      "dev": {k: v for k, v in results["dev"].items() if k not in ("confusion",)},
      "test": results["test"],
      "latency_device": results["latency_device"],
      "confusion_matrix_png": confusion_png,
  }
  if "majority_baseline" in results:
    summary["majority_baseline"] = results["majority_baseline"]
  if jax.process_index() == 0:
    write_report(os.path.join(workdir, "report.md"), summary, confusion_png)
    metrics_lib.write_json(os.path.join(workdir, "summary.json"), summary)
    writer = metrics_lib.MetricsWriter(workdir, resume_step=final["end_step"])
    writer.write(final["end_step"], "test", {k: v for k, v in results["test"].items()
                                            if isinstance(v, (int, float))})
    writer.close()
  t = results["test"]
  logging.info("Test: accuracy %.4f, macro-F1 %.4f, latency %.3f ms/example (batch 1), %.3f "
               "(batch %d). Report: %s", t["accuracy"], t["macro_f1"], t["latency_ms_batch1"],
               t["latency_ms_batched"], t["latency_batch_size"], os.path.join(workdir, "report.md"))
  return summary
