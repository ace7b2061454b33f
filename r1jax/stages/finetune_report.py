"""The finetuning stage's closing part: the chosen parameters measured on dev and test (metrics,
majority baseline, latency), DIR/report.md, DIR/summary.json and the closing log line.

    results = finetune_report.evaluate_final(model, params, task, batches, report=cfg.report,
                                             threshold=cfg.task.threshold)
    finetune_report.publish(workdir, summary, confusion_png)   # report.md, summary.json, log
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from r1jax import eval as eval_lib
from r1jax import run_dir
from r1jax.data import task as task_lib
from r1jax.model import heads
from r1jax.train import metrics as metrics_lib


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


def evaluate_final(model: heads.Classifier, params: Any, task: task_lib.TaskData,
                   batches: Callable[[Sequence[Mapping[str, Any]], int], Iterable[Any]], *,
                   report: Any, threshold: float) -> dict[str, Any]:
  """Dev and test metrics, the majority baseline, and latency of the given params.

  `batches(records, batch_size)` yields one padded pass of evaluation batches with every row;
  `report` is the config's report section (latency batch size, warm-up and repeats).
  """
  predict, jitted = make_predict_fn(model, params)
  names = list(task.labels.names)
  bs = report.latency_batch_size
  out = {}
  for split in (task.dev, task.test):
    out[split.name] = eval_lib.evaluate_classifier(
        predict, batches(split.records, bs), label_names=names, multi_label=task.multi_label,
        threshold=threshold)
  test_batch = next(iter(batches(task.test.records, bs)))
  one = {k: v[:1] for k, v in test_batch.items()}
  latency = eval_lib.latency_summary(jitted, one, test_batch, warmup=report.latency_warmup,
                                     repeats=report.latency_repeats)
  out["test"].update(latency)
  out["latency_device"] = str(jax.local_devices()[0].device_kind)
  if not task.multi_label:
    ids = [task.labels.index(r["label"]) for r in task.train.records]
    test_ids = [task.labels.index(r["label"]) for r in task.test.records]
    out["majority_baseline"] = eval_lib.majority_baseline(np.asarray(ids), np.asarray(test_ids),
                                                          names)
  return out


def linear_baseline(task: task_lib.TaskData, model_test: Mapping[str, Any], *,
                    threshold: float = 0.5) -> dict[str, Any]:
  """`eval.linear_baseline` on the task's splits (C chosen on dev), in summary.json's form: its dev
  and test accuracy / macro-F1 (+ micro-F1 multi-label) and the model's test metrics minus them."""
  keys = ("accuracy", "macro_f1") + (("micro_f1",) if task.multi_label else ())

  def split(s: task_lib.Split):
    return [r["text"] for r in s.records], [r["label"] for r in s.records]
  full = eval_lib.linear_baseline(split(task.train), {"dev": split(task.dev),
                                                      "test": split(task.test)},
                                  label_names=list(task.labels.names),
                                  multi_label=task.multi_label, threshold=threshold)
  out = {k: full[k] for k in ("method", "C", "selected_on", "seconds")}
  for name in ("dev", "test"):
    out[name] = {k: full[name][k] for k in keys}
  out["model_minus_baseline"] = {k: model_test[k] - out["test"][k] for k in keys}
  return out


def baseline_line(baseline: Mapping[str, Any]) -> str:
  """One Markdown sentence: the linear baseline's test scores and the model's difference."""
  t, d = baseline["test"], baseline["model_minus_baseline"]
  return (f"Linear baseline ({baseline['method']}, C={baseline['C']:g} chosen on dev, "
          f"{baseline['seconds']:.0f} s): test accuracy {t['accuracy']:.4f}, macro-F1 "
          f"{t['macro_f1']:.4f}; the model minus the baseline: accuracy {d['accuracy']:+.4f}, "
          f"macro-F1 {d['macro_f1']:+.4f}.")


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
  lines.append(f"- best checkpoint (by dev {summary.get('best_metric', 'loss')}): phase "
               f"`{summary['best_phase']}` step {summary['best_step']} "
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
                 f"{mb['accuracy']:.4f}, macro-F1 {mb['macro_f1']:.4f}.")
  if "latency_ms_batch1_p10" in test:  # summaries written before the spread was recorded lack it
    lines += ["", f"Latency on {summary['latency_device']}, medians over "
              f"{test['latency_repeats']} calls of each batch size in alternation after warm-up: "
              f"{eval_lib.latency_line(test)}."]
  if "linear_baseline" in summary:
    lines += ["", baseline_line(summary["linear_baseline"])]
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


def publish(workdir: str, summary: Mapping[str, Any], confusion_png: str | None) -> None:
  """Process 0 writes DIR/report.md, DIR/summary.json and the test metrics (metrics.jsonl and
  TensorBoard, at the run's last step); every process logs the closing line."""
  test = summary["test"]
  if jax.process_index() == 0:
    write_report(os.path.join(workdir, "report.md"), summary, confusion_png)
    run_dir.write_json(os.path.join(workdir, "summary.json"), summary)
    writer = metrics_lib.MetricsWriter(workdir, resume_step=summary["step"])
    writer.write(summary["step"], "test", {k: v for k, v in test.items()  # numbers, not flags
                                           if isinstance(v, (int, float))
                                           and not isinstance(v, bool)})
    writer.close()
  logging.info("Test: accuracy %.4f, macro-F1 %.4f; latency %s. Report: %s; curves: %s",
               test["accuracy"], test["macro_f1"], eval_lib.latency_line(test),
               os.path.join(workdir, "report.md"), metrics_lib.tensorboard_hint(workdir))
