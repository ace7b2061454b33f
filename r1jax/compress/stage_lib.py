"""What the quantize, distill and prune stages share: config sections, the source classifier, the
float reference, training data and engine plumbing, and the closing trade-off report.

Every compression workdir ends up with:
    DIR/config.json, DIR/summary.json ("artifacts": one entry per artifact, the float reference
    first), DIR/report.md, DIR/tradeoff.png, DIR/float/ (the reference as an artifact),
    DIR/artifact/ (this stage's main artifact; with export on, DIR/artifact/model.stablehlo),
    DIR/tokenizer.model and DIR/labels.txt (so the workdir can be the next stage's init_from).
"""
from __future__ import annotations

import itertools
import math
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from r1jax import configlib
from r1jax import errors
from r1jax import run_dir
from r1jax.compress import artifact as artifact_lib
from r1jax.compress import export as export_lib
from r1jax.compress import measure
from r1jax.compress import source as source_lib
from r1jax.compress import spec as spec_lib
from r1jax.data import task as task_lib
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import loop as loop_lib

FLOAT_DIR = "float"
ARTIFACT_DIR = spec_lib.ARTIFACT_SUBDIR
REFERENCE = "float"


# --------------------------------------------------------------------------------------------------
# Config sections.


def task_section() -> ml_collections.ConfigDict:
  """Data splits; "" = the init_from run's own (its config.json `task`), else the embedded task."""
  return ml_collections.ConfigDict(dict(
      train="",   # training / calibration split spec (e.g. builtin:task:train); "" = init_from's
      dev="",     # eval during training; "" = init_from's
      test="",    # the trade-off table's test set; "" = init_from's
  ))


def report_section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      eval_batch_size=32,       # batch size of the test-set pass
      latency_batch_size=32,    # the "batched" latency (ms per example at this batch size)
      latency_warmup=3,         # untimed calls before timing
      latency_repeats=20,       # timed calls (median reported)
      test_limit_batches=0,     # > 0: only this many test batches (quick runs); 0 = the whole split
  ))


def export_section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      enabled=True,             # write DIR/artifact/model.stablehlo (jax.export, StableHLO)
      platforms="cpu",          # comma-separated lowering platforms: cpu, cuda, rocm, tpu
  ))


def validate_common(v: configlib.Validator) -> None:
  """Checks of the shared sections (init_from, task, report, export)."""
  v.init_from("name a finished finetuning workdir")
  for key in ("task.train", "task.dev", "task.test"):
    v.string(key)
  v.positive_int("report.eval_batch_size")
  v.positive_int("report.latency_batch_size")
  v.int_at_least("report.latency_warmup", 0)
  v.positive_int("report.latency_repeats")
  v.int_at_least("report.test_limit_batches", 0)
  v.boolean("export.enabled")
  platforms = v.string("export.platforms")
  if platforms is not None:
    bad = [p for p in platforms.split(",") if p.strip() not in ("cpu", "cuda", "rocm", "tpu")]
    v.require(not bad and platforms.strip(), "export.platforms",
              f"{platforms!r}: comma-separated among cpu, cuda, rocm, tpu.")


def run_once(config: ml_collections.ConfigDict, workdir: str,
             body: Callable[[ml_collections.ConfigDict, str], dict[str, Any]]) -> dict[str, Any]:
  """A compression stage's `run`: it needs init_from, then `run_dir.run_once` (finished = its
  summary has the artifacts table)."""
  require_init_from(config)
  return run_dir.run_once(config, workdir, body, requires=("artifacts",))


def require_init_from(config: ml_collections.ConfigDict) -> None:
  """A compression stage cannot start without a classifier (checked by run(), not by validate(),
  so that the default configs validate)."""
  if not config.get("init_from"):
    raise configlib.ConfigError(
        f"Invalid {config.get('stage')} config: init_from is empty; name the finetuning workdir "
        f"to compress with --config.init_from=DIR (configs/finetune.py makes one).")


# --------------------------------------------------------------------------------------------------
# Source and workdir.


def load_source(config: ml_collections.ConfigDict, *, multimodal: bool = False,
                **kwargs: Any) -> source_lib.Source:
  """The init_from classifier, with task splits overridden by config.task where set. A multimodal
  classifier (image path) is refused in one line unless the stage takes one (`multimodal`)."""
  src = source_lib.load(os.path.expanduser(config.init_from), **kwargs)
  if src.spec.multimodal and not multimodal:
    raise errors.BadInput(
        f"init_from={config.init_from!r} holds a multimodal ({src.spec.kind}) classifier; the "
        f"{config.stage} stage takes text classifiers only (the quantize stage takes both).")
  task = dict(src.spec.task)
  for split in ("train", "dev", "test"):
    if config.task.get(split):
      task[split] = config.task[split]
  src.spec = src.spec.replace(task=task)
  return src


def prepare_workdir(workdir: str, spec: spec_lib.ClassifierSpec) -> spec_lib.ClassifierSpec:
  """Copies tokenizer.model and writes labels.txt into the workdir; returns the spec pointing to
  the workdir's tokenizer."""
  os.makedirs(workdir, exist_ok=True)
  tok = os.path.join(workdir, run_dir.TOKENIZER_FILE)
  if os.path.abspath(spec.tokenizer) != tok:
    shutil.copyfile(spec.tokenizer, tok + ".tmp")
    os.replace(tok + ".tmp", tok)
  task_lib.LabelVocab(tuple(spec.label_names)).save(os.path.join(workdir,
                                                                 run_dir.LABELS_FILE))
  return spec.replace(tokenizer=tok)


def write_config(config: ml_collections.ConfigDict, workdir: str,
                 spec: spec_lib.ClassifierSpec, **resolved: Any) -> str:
  """DIR/config.json with the resolved model, task, labels and seq_len a later stage reads."""
  data = spec.to_json()
  return configlib.write_config_json(config, workdir, model=data["model"], task=data["task"],
                                     labels=data["label_names"], seq_len=spec.seq_len,
                                     num_classes=spec.num_classes, **resolved)


def float_reference(workdir: str, spec: spec_lib.ClassifierSpec, params: Any,
                    source_path: str) -> artifact_lib.Artifact:
  """DIR/float/: the uncompressed classifier in the artifact format (the table's reference)."""
  return artifact_lib.save(os.path.join(workdir, FLOAT_DIR), spec, params, kind="float",
                           metadata={"source": source_path})


# --------------------------------------------------------------------------------------------------
# Training plumbing (distill, prune).


def steps_for(config: ml_collections.ConfigDict, data: Any) -> tuple[int, int]:
  """(num_steps, steps_per_epoch) from train.num_steps or train.num_epochs x the training split."""
  per_epoch = max(1, len(data.train.records) // config.train.batch_size)
  steps = config.train.num_steps
  if steps == -1:
    steps = max(1, int(round(config.train.num_epochs * per_epoch)))
  return steps, per_epoch


def train_iterator(config: ml_collections.ConfigDict, spec: spec_lib.ClassifierSpec,
                   data: Any) -> Any:
  """The shuffled, repeating training batches of this process (checkpointable Grain iterator)."""
  return iter(measure.batches(spec, data.train.records, batch_size=config.train.batch_size,
                              train=True, seed=config.seed, process_index=jax.process_index(),
                              process_count=jax.process_count()))


def dev_evaluator(config: ml_collections.ConfigDict, spec: spec_lib.ClassifierSpec, data: Any,
                  engine: Any) -> Callable[[Any], dict[str, float]]:
  """params -> engine metrics averaged over (up to eval.num_batches of) the dev split."""
  def evaluate(params):
    batches = measure.batches(spec, data.dev.records, batch_size=config.train.batch_size,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
    return engine.evaluate(params, itertools.islice(batches, config.eval.num_batches))
  return evaluate


def finetune_and_restore(config: ml_collections.ConfigDict, workdir: str, *, engine: Any,
                         spec: spec_lib.ClassifierSpec, saved_spec: spec_lib.ClassifierSpec,
                         data: Any, init_state: Callable[[], Any], num_steps: int
                         ) -> tuple[dict[str, Any], Any, int]:
  """Recovery finetuning of a pruned classifier (`loop.train_and_evaluate` on the task's training
  batches, dev evaluation; resumable), then its final parameters restored on one device.
  Returns (training summary, params shaped as `saved_spec`'s model, their step)."""
  train_summary = loop_lib.train_and_evaluate(
      config, workdir, engine=engine, train_iter=train_iterator(config, spec, data),
      init_state=init_state, num_steps=num_steps,
      evaluate=dev_evaluator(config, spec, data, engine))
  params, step = ckpt_lib.restore_params(
      workdir, ckpt_lib.on_one_device(spec_lib.abstract_params(saved_spec)))
  return train_summary, params, step


# --------------------------------------------------------------------------------------------------
# Measuring and reporting.


def test_batches(config: ml_collections.ConfigDict, spec: spec_lib.ClassifierSpec,
                 data: Any = None) -> list:
  limit = config.report.test_limit_batches or None
  return measure.eval_batches(spec, "test", batch_size=config.report.eval_batch_size, limit=limit,
                              data=data)


def measure_all(config: ml_collections.ConfigDict, named: Sequence[tuple[str, Any]],
                batches: Sequence[Mapping[str, np.ndarray]],
                extras: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
  """Measures each (name, artifact) on the same batches; the first is the reference. Each
  artifact's row is recorded in its artifact.json and MODEL_CARD.md."""
  rows = []
  for name, art in named:
    logging.info("Measuring %s (%s) on %d test batches.", name, art.path, len(batches))
    rows.append(measure.measure(art, batches, name=name,
                                latency_batch_size=config.report.latency_batch_size,
                                warmup=config.report.latency_warmup,
                                repeats=config.report.latency_repeats,
                                extra=(extras or {}).get(name)))
  rows = measure.add_relative(rows, reference=named[0][0])
  if jax.process_index() == 0:
    for (_, art), row in zip(named, rows):
      if art.path:   # the table's numbers go into the artifact's card
        artifact_lib.record_measurements(art.path, dict(
            row, device=jax.devices()[0].platform, latency_repeats=config.report.latency_repeats))
  return rows


def maybe_export(config: ml_collections.ConfigDict, art: artifact_lib.Artifact) -> str | None:
  if not config.export.enabled:
    return None
  platforms = [p.strip() for p in config.export.platforms.split(",") if p.strip()]
  return export_lib.save(art, art.path, platforms=platforms)


def finish(config: ml_collections.ConfigDict, workdir: str, rows: Sequence[Mapping[str, Any]], *,
           title: str, notes: Sequence[str] = (), summary: Mapping[str, Any] | None = None
           ) -> dict[str, Any]:
  """Writes report.md, tradeoff.png and summary.json (merged over any training summary)."""
  paths = measure.write_tradeoff(workdir, rows, title=title, notes=notes)
  path = os.path.join(workdir, run_dir.SUMMARY_FILE)
  out = run_dir.read_json(path) or {}
  out.update(dict(summary or {}))
  if "status" in out and "train_status" not in out:
    out["train_status"] = out["status"]  # complete / stopped_early / data_exhausted
  out.update({"stage": config.stage, "status": "complete", "reference": rows[0]["name"],
              "artifacts": list(rows), "report": paths["report"], "plot": paths["plot"]})
  run_dir.write_json(path, out)
  return out


def targets_note(value: float, target: float, what: str, higher_is_better: bool = True) -> str:
  ok = value >= target if higher_is_better else value <= target
  if math.isnan(value):
    ok = False
  return f"{what}: {value:.4g} (target {'>=' if higher_is_better else '<='} {target:g}): " + (
      "met" if ok else "NOT met")


def to_jnp(batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  return {k: jnp.asarray(v) for k, v in batch.items()}
