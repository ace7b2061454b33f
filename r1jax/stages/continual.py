r"""Continual stage: a finetuned classifier updated on a stream of new labelled data, in rounds.

    python -m r1jax.main --config=configs/continual.py:variant=tiny --workdir=DIR \
        --config.init_from=FINETUNE_DIR --config.stream.rounds=ROUNDS_DIR

`run(config, workdir)`:
1. validates the config, loads init_from's classifier (`compress.source`: its weights, labels,
   tokenizer and task, which is task 0) and reads every round up front (`stream.rounds`: a data
   file split into train/dev/test by `stream.holdout_every`, or a directory with train/dev/test
   files), so that bad input (labels the classifier cannot take, a round without test rows) is
   refused in one line before anything trains; an empty round is logged and skipped;
2. runs the rounds in order (`run_chain`). Each round: the head grows for the round's new classes
   (`train.continual.grow_params`: old logits unchanged); the drift of the incoming texts against
   the replay buffer (earlier training examples) is measured and logged (the classifier's
   confidence, the tokenizer's unknown pieces, word coverage: `diagnose`'s measures); the model
   trains with `loop.resume_and_fit` on the round's training rows plus the buffer's
   (`replay.enabled`), with the EWC or L2-SP penalty toward the round's starting weights and LwF
   distillation from them (`train.continual.continual_loss_fn`); then it is tested on every task
   so far, and the round's rows are offered to the buffer (`data.replay.ReplayBuffer`);
3. with `report.naive_reference`, runs the same rounds again in DIR/naive/ with every control
   off (naive sequential finetuning), and writes DIR/summary.json and DIR/report.md: accuracy on
   every task after every round, forgetting (each task's drop from its best), both chains side by
   side (`continual_report`); DIR/checkpoints/ holds the final classifier.

Resuming: a round is done when DIR/rounds/<i>_<name>/round.json exists; a round in progress
resumes from its newest checkpoint (the frozen previous weights and Fisher are in it), its data
order from the Grain iterator state, and the replay buffer it trains on from the JSON saved
before it started (DIR/rounds/<i>_<name>/replay_before.json; the buffer after the round is
replay_after.json). Steps count across rounds, so DIR/metrics.jsonl reads as one run, each record
tagged with its round.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import time
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from r1jax import configlib
from r1jax import errors
from r1jax import eval as eval_lib
from r1jax import run_dir
from r1jax.compress import measure
from r1jax.compress import spec as spec_lib
from r1jax.compress import stage_lib
from r1jax.data import replay as replay_lib
from r1jax.data import rounds as rounds_lib
from r1jax.data import task as task_lib
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.model import heads
from r1jax.stages import continual_report
from r1jax.stages import diagnose
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import continual as continual_lib
from r1jax.train import loop as loop_lib
from r1jax.train import mesh as mesh_lib
from r1jax.train import metrics as metrics_lib
from r1jax.train import optim
from r1jax.train.state import TrainState

METHODS = ("ewc", "l2sp", "none")
ROUNDS_DIR = "rounds"
NAIVE_DIR = "naive"
ROUND_FILE = "round.json"
BUFFER_BEFORE, BUFFER_AFTER = "replay_before.json", "replay_after.json"
# Drift verdict thresholds: a drop in the classifier's mean top-class probability on the incoming
# texts vs the earlier ones, and diagnose's word-coverage rule.
LARGE_CONFIDENCE_DROP, MODERATE_CONFIDENCE_DROP = 0.15, 0.05


# --------------------------------------------------------------------------------------------------
# Config.


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             process_count: int | None = None) -> configlib.Validator:
  """Checks that need no data; init_from and stream.rounds are required by run(), so that the
  shipped config validates."""
  def extra(v: configlib.Validator) -> None:
    v.stage("continual")
    v.init_from("name a finished finetuning workdir")
    for key in ("task.train", "task.dev", "task.test", "stream.rounds"):
      v.string(key)
    v.int_at_least("stream.holdout_every", 3)
    for key in ("stream.text_field", "stream.label_field", "stream.label_delimiter"):
      v.require(bool(v.string(key)), key, "is empty; name the field (or the separator).")
    enabled = v.boolean("replay.enabled")
    size = v.int_at_least("replay.size", 0)
    method = v.choice("regularize.method", METHODS)
    v.number_in("regularize.weight", 0.0, 1e9)
    v.positive_int("regularize.fisher_examples")
    v.number_in("lwf.weight", 0.0, 1e6)
    v.number_in("lwf.temperature", 0.0, 1e3, low_open=True)
    v.positive_int("drift.max_docs")
    v.boolean("report.naive_reference")
    v.positive_int("report.eval_batch_size")
    if enabled and size == 0:
      v.add("replay.size", "0 with replay.enabled=True: give the buffer a size, or set "
            "replay.enabled=False.")
    if method == "ewc" and size == 0:
      v.add("regularize.method", "ewc estimates its Fisher on the replay buffer's examples, and "
            "replay.size is 0: give the buffer a size, or use l2sp / none.")
  return configlib.validate_training(config, num_devices=num_devices, process_count=process_count,
                                     extra=extra)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes, or returns the summary of finished) continual rounds in `workdir`."""
  validate(config)
  if not config.init_from:
    raise configlib.ConfigError(
        "Invalid continual config: init_from is empty; name the finetuning workdir whose "
        "classifier the rounds update with --config.init_from=DIR (configs/finetune.py makes one).")
  if not config.stream.rounds:
    raise configlib.ConfigError(
        "Invalid continual config: stream.rounds is empty; name the rounds with "
        "--config.stream.rounds=DIR (one file or train/dev/test directory per round) or "
        "FILE1,FILE2,...")
  # A stream that has grown since a finished run (a new file in the rounds directory) makes it
  # unfinished: its rounds are read back and only the new ones train.
  return run_dir.run_once(config, workdir, _run,
                          requires=("rounds", stream_key(config.stream.rounds)))


def stream_key(rounds: str) -> str:
  """The summary key that records which rounds a finished run learned."""
  specs = json.dumps(rounds_lib.round_specs(rounds))
  return "stream_" + hashlib.sha256(specs.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Controls:
  """What a chain of rounds does against forgetting (all off: naive sequential finetuning)."""
  replay: bool
  method: str                       # ewc | l2sp | none
  options: continual_lib.ContinualOptions
  fisher_examples: int
  drift: bool                       # measure and log the drift of each round's data

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, multi_label: bool) -> "Controls":
    method = config.regularize.method
    return cls(replay=config.replay.enabled, method=method,
               options=continual_lib.ContinualOptions(
                   penalty_weight=0.0 if method == "none" else config.regularize.weight,
                   lwf_weight=config.lwf.weight, temperature=config.lwf.temperature,
                   label_smoothing=config.train.label_smoothing, multi_label=multi_label),
               fisher_examples=config.regularize.fisher_examples, drift=True)

  def naive(self) -> "Controls":
    return Controls(replay=False, method="none", options=dataclasses.replace(
        self.options, penalty_weight=0.0, lwf_weight=0.0), fisher_examples=0, drift=False)

  def to_json(self) -> dict[str, Any]:
    return {"replay": self.replay, "regularize": self.method,
            "penalty_weight": self.options.penalty_weight, "lwf_weight": self.options.lwf_weight,
            "temperature": self.options.temperature}


# --------------------------------------------------------------------------------------------------
# Evaluation and drift.


@dataclasses.dataclass
class _Context:
  config: ml_collections.ConfigDict
  workdir: str
  spec: spec_lib.ClassifierSpec     # init_from's, tokenizer in the workdir
  tok: tokenizer_lib.Tokenizer
  mesh: Any
  task0: rounds_lib.Task
  rounds: list[tuple[str, str, rounds_lib.Task | None]]
  started: float


def _spec_for(ctx: _Context, labels: Sequence[str]) -> spec_lib.ClassifierSpec:
  return ctx.spec.replace(num_classes=len(labels), label_names=tuple(labels))


def _logits_fn(spec: spec_lib.ClassifierSpec):
  return _jitted_logits(spec.model, spec.num_classes, spec.multi_label)


@functools.lru_cache(maxsize=16)
def _jitted_logits(model_config: Any, num_classes: int, multi_label: bool):
  """One jitted forward per architecture and head size (the naive chain and the tests of every
  round reuse its compilations)."""
  model = heads.Classifier(model_config, num_classes, multi_label)
  return jax.jit(lambda p, tokens, mask: model.apply({"params": p}, tokens, mask)[0])


def test_tasks(spec: spec_lib.ClassifierSpec, params: Any, tasks: Sequence[rounds_lib.Task], *,
               batch_size: int) -> dict[str, dict[str, float]]:
  """{task: {"accuracy", "macro_f1", "num_examples"}} of `params` on each task's test rows, over
  every class the model has (a test row of an old class may be predicted as a new one)."""
  logits = _logits_fn(spec)
  out = {}
  for task in tasks:
    metrics = eval_lib.evaluate_classifier(
        lambda b: logits(params, b["tokens"], b["token_mask"]),
        measure.batches(spec, task.test, batch_size=batch_size), label_names=spec.label_names,
        multi_label=spec.multi_label, threshold=float(spec.task.get("threshold", 0.5)))
    out[task.name] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                      "num_examples": metrics["num_examples"]}
  return out


def _confidence(ctx: _Context, spec: spec_lib.ClassifierSpec, params: Any,
                texts: Sequence[str]) -> float:
  """Mean probability of the predicted class (multi-label: of each label's decision) on texts."""
  logits = _logits_fn(spec)
  label = list(spec.label_names[:1]) if spec.multi_label else spec.label_names[0]
  total, count = 0.0, 0
  for batch in measure.batches(spec, [{"text": t, "label": label} for t in texts],
                               batch_size=ctx.config.report.eval_batch_size):
    out = np.asarray(logits(params, batch["tokens"], batch["token_mask"]), np.float64)
    if spec.multi_label:
      p = 1.0 / (1.0 + np.exp(-np.abs(out)))
      conf = p.mean(-1)
    else:
      p = np.exp(out - out.max(-1, keepdims=True))
      conf = (p / p.sum(-1, keepdims=True)).max(-1)
    keep = np.asarray(batch["example_mask"], bool)
    total += float(conf[keep].sum())
    count += int(keep.sum())
  return total / max(count, 1)


def measure_drift(ctx: _Context, spec: spec_lib.ClassifierSpec, params: Any,
                  incoming: rounds_lib.Task, reference: Sequence[dict[str, Any]],
                  new: Sequence[str]) -> dict[str, Any]:
  """The shift between a round's training texts and earlier training examples (`reference`), as
  seen by the classifier before the round (`spec`, `params`) and by its tokenizer."""
  max_docs = ctx.config.drift.max_docs
  new_texts = diagnose.sample_docs([r["text"] for r in incoming.train], max_docs)
  ref_texts = diagnose.sample_docs([r["text"] for r in reference], max_docs)
  conf_new = _confidence(ctx, spec, params, new_texts)
  conf_ref = _confidence(ctx, spec, params, ref_texts)
  tok_new = diagnose.tokenizer_stats(ctx.tok, new_texts)
  tok_ref = diagnose.tokenizer_stats(ctx.tok, ref_texts)
  overlap = diagnose.overlap_stats(tok_ref.pop("_piece_counts"), tok_new.pop("_piece_counts"),
                                   diagnose.words_of(ref_texts), diagnose.words_of(new_texts),
                                   top_missing=5)
  multi = spec.multi_label
  with_new = sum(1 for r in incoming.train
                 if set(r["label"] if multi else [r["label"]]) & set(new))
  drift = {"confidence_incoming": conf_new, "confidence_earlier": conf_ref,
           "confidence_drop": conf_ref - conf_new,
           "unknown_piece_rate_incoming": tok_new["unknown_piece_rate"],
           "unknown_piece_rate_earlier": tok_ref["unknown_piece_rate"],
           "pieces_per_word_ratio": tok_new["pieces_per_word"] / max(tok_ref["pieces_per_word"],
                                                                    1e-9),
           "word_token_coverage": overlap["word_token_coverage"],
           "top_unseen_words": overlap["top_missing_domain_words"],
           "new_class_share": with_new / max(len(incoming.train), 1),
           "new_classes": list(new), "docs_incoming": len(new_texts),
           "docs_earlier": len(ref_texts)}
  drift["verdict"] = drift_verdict(drift)
  return drift


def drift_verdict(drift: dict[str, Any]) -> str:
  """large / moderate / small, by the confidence drop, word coverage and new classes."""
  if (drift["confidence_drop"] >= LARGE_CONFIDENCE_DROP or
      drift["word_token_coverage"] < diagnose.LOW_WORD_COVERAGE or drift["new_class_share"] > 0.5):
    return "large"
  if drift["confidence_drop"] >= MODERATE_CONFIDENCE_DROP or drift["new_class_share"] > 0:
    return "moderate"
  return "small"


# --------------------------------------------------------------------------------------------------
# Rounds.


@dataclasses.dataclass
class ChainState:
  """Where a chain of rounds stands between rounds (host arrays)."""
  params: Any
  labels: tuple[str, ...]
  buffer: replay_lib.ReplayBuffer
  step: int
  tasks: list[rounds_lib.Task]


def run_round(ctx: _Context, chain_dir: str, controls: Controls, index: int,
              task: rounds_lib.Task, state: ChainState) -> dict[str, Any]:
  """Trains one round (or resumes it) and returns its round.json record."""
  cfg = ctx.config
  name = f"{index:02d}_{task.name}"
  rdir = os.path.join(chain_dir, ROUNDS_DIR, name)
  started = time.time()
  multi = ctx.spec.multi_label
  added = rounds_lib.new_labels(task, state.labels, multi)
  labels = tuple(state.labels) + tuple(added)
  spec, old_spec = _spec_for(ctx, labels), _spec_for(ctx, state.labels)
  model = heads.Classifier(spec.model, len(labels), multi)
  previous = heads.Classifier(spec.model, len(state.labels), multi)
  params, grown = continual_lib.grow_params(state.params, spec_lib.abstract_params(spec),
                                            jax.random.PRNGKey(cfg.seed + index))
  if added:
    logging.info("Round %s: %d new class(es) %s; the head grows (%s).", name, len(added), added,
                 ", ".join(grown))

  # The buffer this round trains on, saved before training so a resumed round replays the same.
  before_path = os.path.join(rdir, BUFFER_BEFORE)
  if os.path.exists(before_path):
    buffer = replay_lib.ReplayBuffer.from_json(run_dir.read_json(before_path))
  else:
    buffer = state.buffer
    run_dir.write_json(before_path, buffer.to_json())
  replayed = list(buffer.items) if controls.replay else []
  if controls.replay and not buffer.full:
    logging.info("Round %s: replay.size=%d is more than the %d earlier examples: the buffer holds "
                 "all of them.", name, buffer.capacity, len(buffer.items))

  drift = None
  drift_path = os.path.join(rdir, "drift.json")
  if controls.drift:
    drift = run_dir.read_json(drift_path)
    if drift is None:
      reference = list(buffer.items) or state.tasks[0].train
      drift = measure_drift(ctx, old_spec, state.params, task, reference, added)
      logging.info("Round %s drift (%s): confidence %.3f on the incoming texts vs %.3f on earlier "
                   "ones, word coverage %.3f, new-class share %.3f.", name, drift["verdict"],
                   drift["confidence_incoming"], drift["confidence_earlier"],
                   drift["word_token_coverage"], drift["new_class_share"])
      writer = metrics_lib.MetricsWriter(chain_dir, resume_step=state.step, tags={"round": name})
      writer.write(state.step, "drift", {k: v for k, v in drift.items()
                                         if isinstance(v, (int, float))})
      writer.close()
      run_dir.write_json(drift_path, drift)

  train_rows = task.train + replayed
  per_epoch = max(1, len(train_rows) // cfg.train.batch_size)
  steps = (cfg.train.num_steps if cfg.train.num_steps != -1
           else max(1, int(round(cfg.train.num_epochs * per_epoch))))
  start, end = state.step, state.step + steps
  keep_previous = controls.options.needs_previous
  ewc = controls.method == "ewc" and controls.options.penalty_weight > 0

  def init_params(rng):
    k_model, k_prev = jax.random.split(rng)
    tokens = jnp.zeros((1, 8), jnp.int32)
    tree = {"model": model.init({"params": k_model}, tokens)["params"]}
    if keep_previous:
      tree["previous"] = previous.init({"params": k_prev}, tokens)["params"]
    if ewc:
      tree["importance"] = previous.init({"params": k_prev}, tokens)["params"]
    return tree

  abstract = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  rules = [r for r in continual_lib.FREEZE_ANCHOR if r[0].split("/")[0] in abstract]
  tx = optim.build_optimizer(cfg.train, abstract, num_steps=steps, rules=rules)
  schedule = optim.make_schedule(cfg.train, steps)
  engine = loop_lib.engine_for(
      cfg, mesh=ctx.mesh, tx=tx, init_params=init_params, num_steps=steps,
      loss_fn=continual_lib.continual_loss_fn(model, previous, controls.options),
      lr_schedule=lambda s: schedule(s - start))  # steps are global; the schedule is the round's
  fisher_used = 0

  def init_state() -> TrainState:
    nonlocal fisher_used
    tree = {"model": params}
    if keep_previous:
      tree["previous"] = state.params
    if ewc:
      batches = measure.batches(old_spec, list(buffer.items), batch_size=cfg.train.batch_size)
      tree["importance"], fisher_used = continual_lib.fisher_diagonal(
          previous, state.params, batches, multi_label=multi, max_examples=controls.fisher_examples)
      logging.info("Round %s: diagonal Fisher from %d buffer examples.", name, fisher_used)
    placed = jax.device_put(tree, engine.state_shardings.params)
    fresh = engine.state_from_params(placed, jax.random.PRNGKey(cfg.seed + index))
    return fresh.replace(step=jax.device_put(jnp.asarray(start, jnp.int32),
                                             engine.state_shardings.step))

  def evaluate(p):
    batches = measure.batches(spec, task.dev, batch_size=cfg.train.batch_size,
                              process_index=jax.process_index(), process_count=jax.process_count())
    return engine.evaluate(p, itertools.islice(batches, cfg.eval.num_batches))

  logging.info("Round %s (steps %d-%d): %d new rows + %d replayed, %d classes, controls %s.", name,
               start, end, len(task.train), len(replayed), len(labels), controls.to_json())
  options = loop_lib.LoopOptions(
      num_steps=end, log_every=cfg.train.log_every_steps, eval_every=cfg.eval.every_steps,
      checkpoint_every=cfg.checkpoint.every_steps,
      early_stopping_patience=cfg.eval.early_stopping_patience, best_metric=cfg.eval.best_metric,
      early_stopping_min_delta=cfg.eval.get("early_stopping_min_delta", 0.0),
      skip_nonfinite=cfg.train.skip_nonfinite, progress_bar=cfg.train.progress_bar,
      sigterm_grace_secs=cfg.checkpoint.sigterm_grace_secs,
      deadline=loop_lib.deadline_of(cfg, ctx.started))
  result, resumed_from = loop_lib.resume_and_fit(
      cfg, engine=engine, init_state=init_state, options=options, evaluate=evaluate,
      train_iter=measure.batches(spec, train_rows, batch_size=cfg.train.batch_size, train=True,
                                 seed=cfg.seed + 1000 * index, process_index=jax.process_index(),
                                 process_count=jax.process_count()),
      checkpoint_dir=os.path.join(rdir, run_dir.CHECKPOINTS_DIR), metrics_dir=chain_dir,
      metrics_tags={"round": name})
  final, step = ckpt_lib.restore_params(
      rdir, {"model": ckpt_lib.on_one_device(spec_lib.abstract_params(spec))})
  final = jax.device_get(final["model"])
  after = buffer.added(task.train)
  run_dir.write_json(os.path.join(rdir, BUFFER_AFTER), after.to_json())
  tests = test_tasks(spec, final, state.tasks + [task], batch_size=cfg.report.eval_batch_size)
  logging.info("Round %s done at step %d; test accuracy %s.", name, step,
               {k: round(v["accuracy"], 4) for k, v in tests.items()})
  record = {
      "index": index, "name": name, "task": task.name, "source": task.source,
      "status": "complete", "start_step": start, "end_step": step, "planned_end_step": end,
      "resumed_from_step": resumed_from if resumed_from != start else None,
      "stopped_by": result.loop.stop_reason or None,
      "labels": list(labels), "new_labels": added, "grown": grown,
      "rows": {"train": len(task.train), "dev": len(task.dev), "test": len(task.test),
               "replayed": len(replayed)},
      "replay": {"capacity": after.capacity, "seen": after.seen, "held": len(after.items)},
      "fisher_examples": fisher_used or (min(len(buffer.items), controls.fisher_examples)
                                         if ewc else 0),
      "drift": drift, "test": tests, "last_eval": result.loop.last_eval,
      "controls": controls.to_json(), "wall_secs": time.time() - started,
  }
  run_dir.write_json(os.path.join(rdir, ROUND_FILE), record)
  return record


def run_chain(ctx: _Context, chain_dir: str, controls: Controls, initial_params: Any
              ) -> tuple[list[dict[str, Any]], ChainState]:
  """Every round in order from init_from's classifier; returns (their records, skipped rounds
  included; where the chain ends). A finished round is read back, not rerun."""
  cfg = ctx.config
  buffer = replay_lib.ReplayBuffer.empty(cfg.replay.size, cfg.seed).added(ctx.task0.train)
  state = ChainState(params=initial_params, labels=tuple(ctx.spec.label_names), buffer=buffer,
                     step=0, tasks=[ctx.task0])
  records = []
  for index, (name, path, task) in enumerate(ctx.rounds, start=1):
    if task is None:
      logging.warning("Round %d (%s) is empty: skipped (nothing trained, nothing lost).", index,
                      path)
      records.append({"index": index, "name": f"{index:02d}_{name}", "task": name,
                      "source": path, "status": "skipped", "reason": "empty round"})
      continue
    rdir = os.path.join(chain_dir, ROUNDS_DIR, f"{index:02d}_{task.name}")
    record = run_dir.read_json(os.path.join(rdir, ROUND_FILE))
    if record is None:
      record = run_round(ctx, chain_dir, controls, index, task, state)
    spec = _spec_for(ctx, record["labels"])
    params, _ = ckpt_lib.restore_params(
        rdir, {"model": ckpt_lib.on_one_device(spec_lib.abstract_params(spec))},
        step=record["end_step"])
    state = ChainState(params=jax.device_get(params["model"]), labels=tuple(record["labels"]),
                       buffer=replay_lib.ReplayBuffer.from_json(
                           run_dir.read_json(os.path.join(rdir, BUFFER_AFTER))),
                       step=record["end_step"], tasks=state.tasks + [task])
    records.append(record)
  return records, state


# --------------------------------------------------------------------------------------------------
# Entry point.


def _save_classifier(workdir: str, spec: spec_lib.ClassifierSpec, params: Any, step: int) -> str:
  """DIR/checkpoints/<step>: the final classifier as a plain classifier checkpoint (what
  `compress.source.load` reads), so the workdir is the next stage's init_from."""
  directory = os.path.join(workdir, run_dir.CHECKPOINTS_DIR)
  checkpointer = ckpt_lib.Checkpointer(directory, max_to_keep=1, keep_best=0, async_save=False)
  try:
    if checkpointer.latest_step() != step:
      checkpointer.save(TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                                   opt_state=jnp.zeros(()), rng=jax.random.key_data(
                                       jax.random.PRNGKey(0)), extras=jnp.zeros(()),
                                   nonfinite_skips=jnp.zeros((), jnp.int32)))
  finally:
    checkpointer.close()
  task_lib.LabelVocab(tuple(spec.label_names)).save(os.path.join(workdir, run_dir.LABELS_FILE))
  return os.path.join(directory, str(step))


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  started = time.time()
  src = stage_lib.load_source(config)
  spec = stage_lib.prepare_workdir(workdir, src.spec)
  data = measure.task_data(spec)
  task0 = rounds_lib.Task("task0", spec.task.get("train", ""),
                          *(task_lib.public_records(s.records) for s in (data.train, data.dev,
                                                                         data.test)))
  rounds = []
  for name, path in rounds_lib.round_specs(config.stream.rounds):
    task = rounds_lib.read_round(name, path, config.stream, spec.multi_label)
    if task is not None:
      # Bad labels are refused now, before any round trains.
      rounds_lib.new_labels(task, spec.label_names, spec.multi_label)
    rounds.append((name, path, task))
  if all(t is None for _, _, t in rounds):
    raise errors.BadInput(f"stream.rounds={config.stream.rounds!r}: every round is empty; "
                          "nothing to learn.")
  ctx = _Context(config=config, workdir=workdir, spec=spec,
                 tok=tokenizer_lib.Tokenizer.load(spec.tokenizer),
                 mesh=mesh_lib.make_mesh(config.mesh), task0=task0, rounds=rounds, started=started)
  controls = Controls.from_config(config, spec.multi_label)
  stage_lib.write_config(config, workdir, spec, rounds=[[n, p] for n, p, _ in rounds],
                         controls=controls.to_json(), mesh=dict(ctx.mesh.shape))
  initial = jax.device_get(src.params)
  initial_test = test_tasks(spec, initial, [task0], batch_size=config.report.eval_batch_size)
  logging.info("init_from %s: test accuracy %.4f on its own task (task0), %d classes; %d round(s).",
               src.path, initial_test["task0"]["accuracy"], spec.num_classes, len(rounds))

  records, final = run_chain(ctx, workdir, controls, initial)
  naive = None
  if config.report.naive_reference:
    logging.info("Naive sequential finetuning of the same rounds (the reference) in %s.",
                 os.path.join(workdir, NAIVE_DIR))
    naive, _ = run_chain(ctx, os.path.join(workdir, NAIVE_DIR), controls.naive(), initial)

  final_spec = _spec_for(ctx, final.labels)
  stage_lib.write_config(config, workdir, final_spec, rounds=[[n, p] for n, p, _ in rounds],
                         controls=controls.to_json(), mesh=dict(ctx.mesh.shape))
  checkpoint = _save_classifier(workdir, final_spec, final.params, final.step)
  summary = continual_report.summarize(
      initial_test, records, naive, tasks=[task0.name] + [t.name for _, _, t in rounds if t])
  summary.update({
      "stage": "continual", "status": "complete", "config_num_steps": config.train.num_steps,
      "init_from": src.path, "init_from_step": src.step, "controls": controls.to_json(),
      "labels": list(final.labels), "step": final.step, "checkpoint": checkpoint,
      "rounds": records, "naive_rounds": naive, "wall_secs": time.time() - started,
      stream_key(config.stream.rounds): [[n, p] for n, p, _ in rounds],
      "tensorboard": metrics_lib.tensorboard_command(workdir)})
  continual_report.publish(workdir, summary)
  return summary
