r"""Classification metrics, confusion-matrix plots and inference latency: a library for any stage.

    metrics = eval.evaluate_classifier(predict_fn, batches, label_names=names)
    metrics["accuracy"], metrics["macro_f1"], metrics["per_class"]["networking"]["recall"]
    eval.save_confusion_matrix(metrics, "DIR/confusion_matrix.png")
    eval.measure_latency(jitted_fn, batch_of_1)     # {"ms_per_batch", "ms_per_example", ...}

`predict_fn(batch) -> logits [B, C]` (numpy or jax; any callable: a float model, a quantized or a
pruned one), `batches` an iterable of dicts with `label` (int [B], or multi-hot float [B, C] for
multi-label) and optionally `example_mask` bool [B] (False rows are padding and are ignored).

Definitions (the same as scikit-learn's defaults):
- multi-class: prediction = argmax of the logits; accuracy = fraction correct; per-class precision
  = TP / (TP + FP), recall = TP / (TP + FN), F1 their harmonic mean, 0 where a denominator is 0;
  macro-F1 = mean F1 over the classes that occur in the labels or the predictions; the confusion
  matrix counts [true class, predicted class].
- multi-label: a label is predicted where sigmoid(logit) >= threshold (logit >= logit(threshold));
  micro P/R/F1 pool TP/FP/FN over all labels; macro-F1 = mean per-label F1 over the labels that
  occur in the targets or the predictions; "accuracy" is the exact-match (subset) accuracy;
  "confusion" is per label [[TN, FP], [FN, TP]].

Latency: `measure_latency` calls `fn` on one fixed batch, discards `warmup` calls (compilation,
caches), times `repeats` calls that each wait for the result (`jax.block_until_ready`), and reports
the median, so one slow call (another process, a GC pause) does not move the figure, with the
10th-90th percentile range as its spread. `latency_summary` times batch 1 and a larger batch in
alternation and flags a batched per-example figure above batch 1's as noise.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np


# --------------------------------------------------------------------------------------------------
# Metrics from labels and predictions.


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, ...]:
  precision = _safe_div(tp, tp + fp)
  recall = _safe_div(tp, tp + fn)
  f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
  return precision, recall, f1


def _per_class(names: Sequence[str], tp, fp, fn, support) -> dict[str, dict[str, float]]:
  precision, recall, f1 = _prf(tp, fp, fn)
  return {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                 "support": int(support[i]), "predicted": int(tp[i] + fp[i])}
          for i, name in enumerate(names)}


def multiclass_metrics(labels: np.ndarray, predictions: np.ndarray,
                       label_names: Sequence[str]) -> dict[str, Any]:
  """Accuracy, macro-F1, per-class P/R/F1 and the confusion matrix.

  Args:
    labels: int [N] true class ids in [0, C).
    predictions: int [N] predicted class ids in [0, C).
    label_names: the C class names, in id order.
  Returns:
    {"num_examples", "accuracy", "macro_f1", "macro_precision", "macro_recall", "weighted_f1",
     "per_class": {name: {"precision", "recall", "f1", "support", "predicted"}},
     "confusion": [[int] * C] * C (rows = true class), "label_names"}.
  """
  labels = np.asarray(labels, np.int64).reshape(-1)
  predictions = np.asarray(predictions, np.int64).reshape(-1)
  c = len(label_names)
  if labels.shape != predictions.shape:
    raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in length.")
  for what, ids in (("labels", labels), ("predictions", predictions)):
    if ids.size and (ids.min() < 0 or ids.max() >= c):
      raise ValueError(f"{what} hold ids outside [0, {c}) for {c} label_names.")
  confusion = np.zeros((c, c), np.int64)
  np.add.at(confusion, (labels, predictions), 1)
  tp = np.diag(confusion)
  support = confusion.sum(axis=1)
  predicted = confusion.sum(axis=0)
  fp, fn = predicted - tp, support - tp
  precision, recall, f1 = _prf(tp, fp, fn)
  present = (support + predicted) > 0
  n = int(labels.size)
  return {
      "num_examples": n,
      "accuracy": float(tp.sum() / n) if n else math.nan,
      "macro_f1": float(f1[present].mean()) if present.any() else math.nan,
      "macro_precision": float(precision[present].mean()) if present.any() else math.nan,
      "macro_recall": float(recall[present].mean()) if present.any() else math.nan,
      "weighted_f1": float((f1 * support).sum() / n) if n else math.nan,
      "per_class": _per_class(label_names, tp, fp, fn, support),
      "confusion": confusion.tolist(),
      "label_names": list(label_names),
  }


def multilabel_metrics(targets: np.ndarray, predicted: np.ndarray,
                       label_names: Sequence[str]) -> dict[str, Any]:
  """Micro/macro P/R/F1, exact-match accuracy, per-label P/R/F1 and [[TN, FP], [FN, TP]] per label.

  Args:
    targets: {0, 1} [N, C] true label sets.
    predicted: {0, 1} (or bool) [N, C] predicted label sets.
    label_names: the C label names.
  """
  targets = np.asarray(targets).astype(bool)
  predicted = np.asarray(predicted).astype(bool)
  if targets.shape != predicted.shape or targets.ndim != 2 or targets.shape[1] != len(label_names):
    raise ValueError(f"targets {targets.shape} and predictions {predicted.shape} must both be "
                     f"[N, {len(label_names)}].")
  tp = (targets & predicted).sum(0)
  fp = (~targets & predicted).sum(0)
  fn = (targets & ~predicted).sum(0)
  tn = (~targets & ~predicted).sum(0)
  support = targets.sum(0)
  micro_p, micro_r, micro_f1 = (float(x) for x in _prf(tp.sum(), fp.sum(), fn.sum()))
  _, _, f1 = _prf(tp, fp, fn)
  present = (tp + fp + fn) > 0
  n = int(targets.shape[0])
  return {
      "num_examples": n,
      "accuracy": float((targets == predicted).all(1).mean()) if n else math.nan,
      "micro_precision": micro_p,
      "micro_recall": micro_r,
      "micro_f1": micro_f1,
      "macro_f1": float(f1[present].mean()) if present.any() else math.nan,
      "label_cardinality": float(targets.sum() / n) if n else math.nan,
      "per_class": _per_class(label_names, tp, fp, fn, support),
      "confusion": np.stack([np.stack([tn, fp], -1), np.stack([fn, tp], -1)], 1).tolist(),
      "label_names": list(label_names),
  }


def evaluate_classifier(predict_fn: Callable[[Mapping[str, Any]], Any],
                        batches: Iterable[Mapping[str, Any]], *, label_names: Sequence[str],
                        multi_label: bool = False, threshold: float = 0.5,
                        return_outputs: bool = False) -> dict[str, Any]:
  """Runs `predict_fn` over `batches` and returns `multiclass_metrics` / `multilabel_metrics`.

  Args:
    predict_fn: batch -> logits [B, C].
    batches: dicts with "label" (int [B] or multi-hot [B, C]) and optionally "example_mask" [B].
    label_names: the C class names.
    multi_label: sigmoid + threshold per label instead of argmax.
    threshold: multi-label decision threshold on the probability.
    return_outputs: also return "logits" [N, C] and "labels" (numpy) of the real rows.
  """
  if not 0.0 < threshold < 1.0:
    raise ValueError(f"threshold={threshold}: must be in (0, 1).")
  all_logits, all_labels = [], []
  for batch in batches:
    logits = np.asarray(predict_fn(batch), np.float32)
    labels = np.asarray(batch["label"])
    if logits.shape != (labels.shape[0], len(label_names)):
      raise ValueError(f"predict_fn returned logits of shape {logits.shape}; expected "
                       f"[{labels.shape[0]}, {len(label_names)}] for this batch.")
    if "example_mask" in batch:
      keep = np.asarray(batch["example_mask"], bool)
      logits, labels = logits[keep], labels[keep]
    all_logits.append(logits)
    all_labels.append(labels)
  if not all_logits:
    raise ValueError("evaluate_classifier got no batches.")
  logits = np.concatenate(all_logits)
  labels = np.concatenate(all_labels)
  if multi_label:
    cut = math.log(threshold / (1.0 - threshold))  # sigmoid(x) >= t  <=>  x >= logit(t)
    out = multilabel_metrics(labels, logits >= cut, label_names)
    out["threshold"] = float(threshold)
  else:
    out = multiclass_metrics(labels, logits.argmax(-1), label_names)
  if return_outputs:
    out["logits"], out["labels"] = logits, labels
  return out


def majority_baseline(train_labels: np.ndarray, test_labels: np.ndarray,
                      label_names: Sequence[str]) -> dict[str, Any]:
  """Metrics of always predicting the most frequent training class (multi-class only)."""
  train_labels = np.asarray(train_labels, np.int64)
  majority = int(np.bincount(train_labels, minlength=len(label_names)).argmax())
  test_labels = np.asarray(test_labels, np.int64)
  out = multiclass_metrics(test_labels, np.full_like(test_labels, majority), label_names)
  return {"class": label_names[majority], "accuracy": out["accuracy"], "macro_f1": out["macro_f1"]}


LINEAR_BASELINE = "TF-IDF (word 1-2 grams) + logistic regression"


def linear_baseline(train: tuple[Sequence[str], Sequence[Any]],
                    splits: Mapping[str, tuple[Sequence[str], Sequence[Any]]], *,
                    label_names: Sequence[str], multi_label: bool = False,
                    c_values: Sequence[float] = (1.0, 10.0, 100.0), select_on: str = "dev",
                    threshold: float = 0.5) -> dict[str, Any]:
  """The linear baseline a text classifier must beat: TF-IDF word 1-2 grams + logistic regression.

  Trained (scikit-learn) on the same training texts as the model; the inverse regularisation C is
  chosen among `c_values` by macro-F1 on `splits[select_on]`; every split is measured with the
  same metric code as the model (`multiclass_metrics` / `multilabel_metrics`).

  Args:
    train: (texts, labels); a label is a class name (multi-label: a list of names).
    splits: {name: (texts, labels)}, e.g. dev and test.
    label_names: the C class names in id order (every label must be one of them).
    multi_label: one-vs-rest, a label predicted when its probability >= `threshold`.
  Returns:
    {"method", "C", "seconds", "selected_on", split name: {"accuracy", "macro_f1", ...}}.
  """
  from sklearn import feature_extraction, linear_model, multiclass  # lazy: only reports need it
  started = time.perf_counter()
  index = {name: i for i, name in enumerate(label_names)}

  def encode(labels):
    if not multi_label:
      return np.asarray([index[y] for y in labels], np.int64)
    out = np.zeros((len(labels), len(label_names)), np.int64)
    for row, names in enumerate(labels):
      out[row, [index[n] for n in names]] = 1
    return out

  vectorizer = feature_extraction.text.TfidfVectorizer(ngram_range=(1, 2))
  x_train = vectorizer.fit_transform(list(train[0]))
  y_train = encode(train[1])
  x = {name: vectorizer.transform(list(texts)) for name, (texts, _) in splits.items()}
  y = {name: encode(labels) for name, (_, labels) in splits.items()}

  # Increasing C, each fit starting from the previous solution (warm start): about half the time
  # of three cold fits on the embedded task (bench/NOTES_quality.md).
  solver = linear_model.LogisticRegression(max_iter=2000, warm_start=True)

  def fit(c):
    solver.set_params(C=c)
    if multi_label:
      return multiclass.OneVsRestClassifier(copy.deepcopy(solver)).fit(x_train, y_train)
    return copy.deepcopy(solver.fit(x_train, y_train))

  def measure(model, name):
    if multi_label:
      return multilabel_metrics(y[name], model.predict_proba(x[name]) >= threshold, label_names)
    return multiclass_metrics(y[name], model.predict(x[name]), label_names)

  best = None
  for c in sorted(c_values):
    model = fit(float(c))
    score = measure(model, select_on)["macro_f1"] if len(c_values) > 1 else 0.0
    if best is None or score > best[0]:
      best = (score, float(c), model)
  _, c, model = best
  out = {"method": LINEAR_BASELINE, "C": c, "selected_on": select_on}
  for name in splits:
    out[name] = measure(model, name)
  out["seconds"] = time.perf_counter() - started
  return out


# --------------------------------------------------------------------------------------------------
# Plots and tables.


def pyplot() -> Any:
  """`matplotlib.pyplot` with the file-only Agg backend, imported on first use: the one place the
  reports get their plotting module from."""
  import matplotlib  # lazy: a heavy import that only the end-of-run plots need
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy: as above
  return plt


def save_confusion_matrix(metrics: Mapping[str, Any], path: str, *, title: str = "",
                          normalize: bool = True) -> str:
  """Writes the confusion matrix of `multiclass_metrics` (or per-label counts of
  `multilabel_metrics`) as a PNG heatmap; returns `path`.

  Multi-class: rows = true class, columns = predicted, colour = row-normalised share (with
  `normalize`), text = counts. Multi-label: one row per label with its TP, FN, FP counts.
  """
  plt = pyplot()
  names = list(metrics["label_names"])
  confusion = np.asarray(metrics["confusion"])
  if confusion.ndim == 3:  # multi-label [C, 2, 2] -> [C, (TP, FN, FP)]
    counts = np.stack([confusion[:, 1, 1], confusion[:, 1, 0], confusion[:, 0, 1]], -1)
    columns, ylabel, xlabel = ["TP", "FN", "FP"], "label", ""
  else:
    counts, columns, ylabel, xlabel = confusion, names, "true class", "predicted class"
  shown = counts.astype(np.float64)
  if normalize:
    shown = _safe_div(shown, shown.sum(axis=1, keepdims=True))
  size = max(4.0, 0.55 * max(len(names), len(columns)) + 2.0)
  fig, ax = plt.subplots(figsize=(size if len(columns) > 3 else 5.0, size))
  image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=shown.max() or 1.0)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
               label="share of the row" if normalize else "count")
  ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
  ax.set_yticks(range(len(names)), names)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  cut = 0.6 * (shown.max() or 1.0)
  for (i, j), count in np.ndenumerate(counts):
    ax.text(j, i, str(int(count)), ha="center", va="center", fontsize=8,
            color="white" if shown[i, j] > cut else "black")
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  """A GitHub-markdown table; floats are written with 4 significant digits."""
  def cell(value):
    if isinstance(value, float):
      return "n/a" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|")
  lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def per_class_table(metrics: Mapping[str, Any]) -> str:
  """Markdown table of per-class precision, recall, F1 and support."""
  rows = [(name, m["precision"], m["recall"], m["f1"], m["support"], m["predicted"])
          for name, m in metrics["per_class"].items()]
  return markdown_table(("class", "precision", "recall", "F1", "support", "predicted"), rows)


# --------------------------------------------------------------------------------------------------
# Latency.


def _batch_size_of(example_batch: Any) -> int:
  leaves = [x for x in jax.tree.leaves(example_batch) if getattr(x, "ndim", 0) >= 1]
  if not leaves:
    raise ValueError("measure_latency: pass batch_size= (no array in example_batch).")
  return int(leaves[0].shape[0])


def _timed_ms(fn: Callable[[Any], Any], batch: Any) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(batch))
  return (time.perf_counter() - start) * 1e3


def measure_latency(fn: Callable[[Any], Any], example_batch: Any, *, warmup: int = 3,
                    repeats: int = 20, batch_size: int | None = None) -> dict[str, float]:
  """Wall-clock latency of `fn(example_batch)` after warm-up (median over `repeats` calls).

  Args:
    fn: the inference function (e.g. a jitted apply); its result is waited for with
      `jax.block_until_ready` (a no-op for numpy results).
    example_batch: the argument; its batch size is read from the leading axis of its first array
      leaf unless `batch_size` is given.
    warmup: untimed calls first (compilation, allocation).
    repeats: timed calls.
  Returns:
    {"batch_size", "ms_per_batch" (median), "ms_per_example", "ms_p10", "ms_p90" (10th and 90th
    percentile per batch), "ms_min", "ms_max", "repeats"}.
  """
  if repeats < 1 or warmup < 0:
    raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0.")
  if batch_size is None:
    batch_size = _batch_size_of(example_batch)
  for _ in range(warmup):
    jax.block_until_ready(fn(example_batch))
  times = [_timed_ms(fn, example_batch) for _ in range(repeats)]
  p10, median, p90 = (float(x) for x in np.percentile(times, [10, 50, 90]))
  return {"batch_size": batch_size, "ms_per_batch": median, "ms_per_example": median / batch_size,
          "ms_p10": p10, "ms_p90": p90, "ms_min": min(times), "ms_max": max(times),
          "repeats": repeats}


def latency_summary(fn: Callable[[Any], Any], batch1: Any, batched: Any, *, warmup: int = 3,
                    repeats: int = 20) -> dict[str, Any]:
  """Per-example latency at batch 1 and at the larger batch, for a report.

  The two are timed in alternation (one call of each in turn, after `warmup` untimed calls of
  each), so load from other processes on a shared machine falls on both alike. Returns
  {"latency_ms_batch1", "latency_ms_batched": medians in ms per example; the same keys + "_p10" /
  "_p90": the 10th-90th percentile range over the `repeats` calls; "latency_batch_size",
  "latency_repeats", "latency_batched_slower"}. Batching shares each call's fixed cost among its
  examples, so a batched median above batch 1's is timing noise (the machine's load changed
  while measuring), not the model: `latency_batched_slower` flags it for the report.
  """
  return latency_summaries({"": fn}, batch1, batched, warmup=warmup, repeats=repeats)[""]


def latency_summaries(fns: Mapping[str, Callable[[Any], Any]], batch1: Any, batched: Any, *,
                      warmup: int = 3, repeats: int = 20) -> dict[str, dict[str, Any]]:
  """`latency_summary` of several functions (e.g. one model in two runtimes) timed in turn: each
  repeat calls every function at batch 1 and batched before the next repeat, so the machine's
  load falls on all alike. Returns {name: latency_summary's dict}."""
  if repeats < 1 or warmup < 0:
    raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0.")
  sizes = {"batch1": _batch_size_of(batch1), "batched": _batch_size_of(batched)}
  batches = {"batch1": batch1, "batched": batched}
  for _ in range(warmup):
    for fn in fns.values():
      for name in batches:
        jax.block_until_ready(fn(batches[name]))
  times = {key: {name: [] for name in batches} for key in fns}
  for _ in range(repeats):
    for key, fn in fns.items():
      for name, batch in batches.items():
        times[key][name].append(_timed_ms(fn, batch) / sizes[name])
  summaries = {}
  for key in fns:
    out: dict[str, Any] = {"latency_batch_size": sizes["batched"], "latency_repeats": repeats}
    for name, values in times[key].items():
      p10, median, p90 = (float(x) for x in np.percentile(values, [10, 50, 90]))
      out.update({f"latency_ms_{name}": median, f"latency_ms_{name}_p10": p10,
                  f"latency_ms_{name}_p90": p90})
    out["latency_batched_slower"] = out["latency_ms_batched"] > out["latency_ms_batch1"]
    summaries[key] = out
  return summaries


def latency_line(summary: Mapping[str, Any]) -> str:
  """"0.80 ms/example at batch 1 (p10-p90 0.71-0.93), 0.29 at batch 32 (0.27-0.35)", plus a
  warning when the batched figure is the slower one (see `latency_summary`)."""
  def part(name: str) -> str:
    return (f"{summary[f'latency_ms_{name}']:.3f} (p10-p90 {summary[f'latency_ms_{name}_p10']:.3f}"
            f"-{summary[f'latency_ms_{name}_p90']:.3f})")
  text = (f"{part('batch1')} ms/example at batch 1, {part('batched')} at batch "
          f"{summary['latency_batch_size']}")
  if summary.get("latency_batched_slower"):
    text += (f" [noise: batch {summary['latency_batch_size']} should not be slower per example "
             "than batch 1; the machine was busy while timing, measure again on a quiet one]")
  return text
