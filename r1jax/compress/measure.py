"""Size, speed and quality of artifacts on one test set, and the trade-off table they make.

    batches = measure.eval_batches(spec, "test")
    row = measure.measure(art, batches, name="int8 (dynamic)")      # one table entry
    rows = measure.add_relative(rows, reference="float")            # % retained, size %, speedup
    measure.write_tradeoff(workdir, rows, title="INT8 quantization")  # report.md + tradeoff.png

Every entry has at least: name, kind, runtime ("jax"; "onnxruntime" for `edge`'s rows), params,
bytes (the weights file on disk), accuracy, macro_f1, latency_ms_batch1 (ms per example at
batch 1), latency_ms_batched (ms per example at `latency_batch_size`), and, relative to the
reference entry, retained_accuracy_pct, retained_macro_f1_pct, size_pct, speedup_batch1,
speedup_batched. Latency is measured by
`r1jax.eval.measure_latency` (median of timed calls after warm-up) on real test rows, one call at a
time, on the first device.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from r1jax import eval as eval_lib
from r1jax.compress import spec as spec_lib
from r1jax.data import multimodal as multimodal_data
from r1jax.data import task as task_lib
from r1jax.data import tokenizer as tokenizer_lib

REPORT_FILE = "report.md"
PLOT_FILE = "tradeoff.png"


def task_data(spec: spec_lib.ClassifierSpec) -> task_lib.TaskData:
  """The task's splits as the finetuning stage reads them (`task_lib.load_task`: same label
  parsing, unknown-label policy and dev fallback), with the spec's class names in id order."""
  task = dict(spec.task)
  if spec.multimodal:
    data = multimodal_data.load_image_task(
        ml_collections.ConfigDict(dict(task, labels=",".join(spec.label_names))),
        spec.image.image_size)
    for split in (data.train, data.dev, data.test):
      if split.report.dropped:
        logging.warning("%s split: %s.", split.name, split.report.summary())
    return data
  if not any("," in n for n in spec.label_names):
    task["labels"] = ",".join(spec.label_names)
  data = task_lib.load_task(ml_collections.ConfigDict(task))
  if tuple(data.labels.names) != tuple(spec.label_names):
    raise ValueError(f"the task's labels {list(data.labels.names)[:10]} differ from the model's "
                     f"{list(spec.label_names)[:10]}; set task.labels or fix the task splits.")
  return data


def batches(spec: spec_lib.ClassifierSpec, records: Sequence[Mapping[str, Any]], *,
            batch_size: int, train: bool = False, seed: int = 0, process_index: int = 0,
            process_count: int = 1) -> Any:
  """Classification batches of `records`: shuffled and endless (train), or one pass whose final
  batch is padded and marked in `example_mask`."""
  tok = tokenizer_lib.Tokenizer.load(spec.tokenizer)
  if spec.multimodal:
    return multimodal_data.image_text_dataset(
        records, tok, labels=task_lib.LabelVocab(tuple(spec.label_names)), seq_len=spec.seq_len,
        batch_size=batch_size, image_size=spec.image.image_size, shuffle=train, seed=seed,
        num_epochs=None if train else 1, pad_final_batch=not train, process_index=process_index,
        process_count=process_count)
  return task_lib.classification_batches(
      task_lib.public_records(records), tok, seq_len=spec.seq_len,
      batch_size=batch_size, labels=spec.label_names, multi_label=spec.multi_label,
      shuffle=train, seed=seed, num_epochs=None if train else 1, pad_final_batch=not train,
      process_index=process_index, process_count=process_count)


def eval_batches(spec: spec_lib.ClassifierSpec, split: str = "test", *, batch_size: int = 32,
                 limit: int | None = None, data: Any = None) -> list[dict[str, np.ndarray]]:
  """A list of one-pass batches of `split` (the same list is reused for every artifact)."""
  if split not in ("train", "dev", "test"):
    raise ValueError(f"split {split!r}: allowed values are train, dev, test.")
  data = data or task_data(spec)
  out = []
  for batch in batches(spec, getattr(data, split).records, batch_size=batch_size):
    out.append({k: np.asarray(v) for k, v in batch.items()})
    if limit is not None and len(out) >= limit:
      break
  return out


def first_rows(batches: Sequence[Mapping[str, np.ndarray]], n: int,
               keys: Sequence[str] = ("tokens", "token_mask")) -> dict[str, np.ndarray]:
  """The first n rows of `keys` over the batches, repeated when they hold fewer (latency inputs)."""
  rows = {k: np.concatenate([b[k] for b in batches])[:n] for k in keys}
  have = next(iter(rows.values())).shape[0]
  if have < n:
    reps = math.ceil(n / have)
    rows = {k: np.concatenate([v] * reps)[:n] for k, v in rows.items()}
  return rows


def quality(art, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, Any]:
  """`r1jax.eval.evaluate_classifier` of the artifact on the batches."""
  return eval_lib.evaluate_classifier(art.predict, batches, label_names=art.spec.label_names,
                                      multi_label=art.spec.multi_label,
                                      threshold=float(art.spec.task.get("threshold", 0.5)))


def measure(art, batches: Sequence[Mapping[str, np.ndarray]], *, name: str,
            latency_batch_size: int = 32, warmup: int = 3, repeats: int = 20,
            extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """One trade-off entry for `art` (an `artifact.Artifact`) on `batches`."""
  metrics = quality(art, batches)
  device = jax.devices()[0]
  params = jax.device_put(art.params, device)
  fn = jax.jit(art.logits)

  def call(batch):
    return fn(params, *art.spec.inputs_of(batch))
  keys = art.spec.input_names
  one = jax.device_put(first_rows(batches, 1, keys), device)
  many = jax.device_put(first_rows(batches, latency_batch_size, keys), device)
  latency = eval_lib.latency_summary(call, one, many, warmup=warmup, repeats=repeats)
  row = {"name": name, "kind": art.kind, "runtime": "jax", "path": art.path,
         "params": art.num_params,
         "bytes": art.file_bytes(),
         "bytes_compressed": _meta_bytes(art, "bytes_params_compressed"),
         "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
         "num_examples": metrics["num_examples"], **latency}
  row.update(extra or {})
  return row


def _meta_bytes(art, key: str) -> int | None:
  path = os.path.join(art.path, spec_lib.ARTIFACT_FILE) if art.path else ""
  if not path or not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get(key)


def add_relative(rows: Sequence[Mapping[str, Any]], reference: str) -> list[dict[str, Any]]:
  """Adds % retained / size % / speedups relative to the row named `reference`."""
  by_name = {r["name"]: r for r in rows}
  if reference not in by_name:
    raise ValueError(f"reference {reference!r} is not among the entries {list(by_name)}.")
  ref = by_name[reference]

  def pct(a, b):
    return 100.0 * a / b if b else math.nan

  out = []
  for r in rows:
    r = dict(r)
    r["reference"] = reference
    r["retained_accuracy_pct"] = pct(r["accuracy"], ref["accuracy"])
    r["retained_macro_f1_pct"] = pct(r["macro_f1"], ref["macro_f1"])
    r["accuracy_drop_points"] = 100.0 * (ref["accuracy"] - r["accuracy"])
    r["size_pct"] = pct(r["bytes"], ref["bytes"])
    r["params_pct"] = pct(r["params"], ref["params"])
    r["speedup_batch1"] = (ref["latency_ms_batch1"] / r["latency_ms_batch1"]
                           if r["latency_ms_batch1"] else math.nan)
    r["speedup_batched"] = (ref["latency_ms_batched"] / r["latency_ms_batched"]
                            if r["latency_ms_batched"] else math.nan)
    out.append(r)
  return out


TABLE_COLUMNS = (
    ("artifact", "name"), ("runtime", "runtime"), ("params", "params"), ("MB on disk", "bytes"),
    ("size %", "size_pct"), ("accuracy", "accuracy"), ("macro-F1", "macro_f1"),
    ("% acc. kept", "retained_accuracy_pct"), ("% F1 kept", "retained_macro_f1_pct"),
    ("ms/ex batch 1", "latency_ms_batch1"), ("ms/ex batched", "latency_ms_batched"),
    ("speedup b1", "speedup_batch1"), ("speedup batched", "speedup_batched"))


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  def cell(key, value):
    if key == "bytes" and value is not None:
      return float(value) / 1e6
    return value
  return eval_lib.markdown_table([h for h, _ in TABLE_COLUMNS],
                                 [[cell(k, r.get(k)) for _, k in TABLE_COLUMNS] for r in rows])


def plot(rows: Sequence[Mapping[str, Any]], path: str, *, title: str = "") -> str:
  """Size on disk (MB, log scale) vs accuracy, one labelled point per artifact."""
  plt = eval_lib.pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for r in rows:
    x, y = r["bytes"] / 1e6, 100.0 * r["accuracy"]
    ax.scatter([x], [y], s=40 + 400 * min(1.0, r["latency_ms_batch1"] /
                                          max(q["latency_ms_batch1"] for q in rows)))
    ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("weights on disk (MB, log scale)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title or "size vs accuracy (marker area ~ batch-1 latency)")
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_tradeoff(directory: str, rows: Sequence[Mapping[str, Any]], *, title: str,
                   notes: Sequence[str] = ()) -> dict[str, str]:
  """DIR/report.md (the table and notes) and DIR/tradeoff.png; returns their paths."""
  os.makedirs(directory, exist_ok=True)
  text = [f"# {title}", "", markdown(rows), ""]
  ref = rows[0].get("reference") if rows else None
  if ref:
    text.append(f"Relative columns compare with `{ref}`. Latency: ms per example, median of timed "
                f"calls after warm-up, batch 1 and batch {rows[0].get('latency_batch_size')}, on "
                f"{jax.devices()[0].platform}.")
  text += [f"- {n}" for n in notes]
  report = os.path.join(directory, REPORT_FILE)
  with open(report, "w") as f:
    f.write("\n".join(text) + "\n")
  return {"report": report, "plot": plot(rows, os.path.join(directory, PLOT_FILE), title=title)}
