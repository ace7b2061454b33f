r"""Puts several finetuned workdirs side by side, like the seed's general-vs-adapted table.

    python -m r1jax.main --config=configs/compare.py --workdir=DIR --config.workdirs=A,B

Rows are metrics (accuracy, macro-F1, micro-F1 for multi-label, latency at batch 1 and batched,
trainable / total parameters, best dev loss), columns the workdirs, then one difference column per
non-reference workdir (value minus the reference's; for latency also the ratio). A second table
gives per-class F1. A multimodal finetuning workdir (finetune's multimodal mode) gives a column per
model it trained: fused, text-only, image-only. Runs must be on the same task (same label set) to be compared; the majority
baseline of the reference is quoted when it has one, and so is its linear baseline (TF-IDF +
logistic regression, `eval.linear_baseline`) with every workdir's difference to it.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import jax
import ml_collections

from r1jax import run_dir
from r1jax import configlib
from r1jax import errors
from r1jax import eval as eval_lib

SPLITS = ("test", "dev")
# (label, where in summary.json, "higher is better")
METRICS = (
    ("accuracy", ("{split}", "accuracy"), True),
    ("macro-F1", ("{split}", "macro_f1"), True),
    ("micro-F1", ("{split}", "micro_f1"), True),
    ("latency batch 1 (ms/example)", ("test", "latency_ms_batch1"), False),
    ("latency batched (ms/example)", ("test", "latency_ms_batched"), False),
    ("best dev loss", ("best_eval_loss",), False),
    ("trainable params", ("trainable_params",), None),
    ("total params", ("total_params",), None),
)


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             process_count: int | None = None) -> configlib.Validator:
  """Type and choice checks; an empty `workdirs` is reported by run() (the default config has
  none)."""
  del num_devices, process_count
  v = configlib.Validator(config)
  v.stage("compare")
  v.string("workdirs")
  v.string("names")
  v.choice("split", SPLITS)
  v.raise_if_any("compare config")
  return v


def _split_list(value: str) -> list[str]:
  return [x.strip() for x in value.split(",") if x.strip()]


def load_summaries(workdirs: Sequence[str]) -> list[dict[str, Any]]:
  out = []
  for wd in workdirs:
    path = os.path.join(os.path.expanduser(wd), "summary.json")
    if not os.path.exists(path):
      raise errors.InputNotFound(f"{path} does not exist: {wd!r} is not a finished finetuning "
                                 "workdir (run configs/finetune.py on it first).")
    with open(path) as f:
      summary = json.load(f)
    if summary.get("stage") != "finetune" or "test" not in summary:
      raise errors.BadInput(f"{path} is a {summary.get('stage')!r} summary without test metrics; "
                            "compare takes finetuning workdirs.")
    out.append(summary)
  return out


def _get(summary: dict[str, Any], where: Sequence[str], split: str) -> Any:
  node = summary
  for key in where:
    key = key.format(split=split)
    if not isinstance(node, dict) or key not in node:
      return None
    node = node[key]
  return node if isinstance(node, (int, float)) else None


def per_model(summaries: Sequence[dict[str, Any]], names: Sequence[str]
              ) -> tuple[list[dict[str, Any]], list[str]]:
  """A multimodal finetuning summary as one column per model it trained ("NAME (fused)",
  "NAME (text)", "NAME (image)"), each with that model's dev and test metrics; others as given."""
  out, out_names = [], []
  for summary, name in zip(summaries, names):
    models = summary.get("models") if summary.get("multimodal") else None
    for model, m in (models or {None: None}).items():
      out.append(summary if m is None else dict(summary, dev=m["dev"], test=m["test"]))
      out_names.append(name if m is None else f"{name} ({model})")
  return out, out_names


def compare(summaries: Sequence[dict[str, Any]], names: Sequence[str], split: str = "test"
            ) -> dict[str, Any]:
  """{"metrics": [{"metric", "values": [...], "differences": [...], ...}], "per_class": ...}.
  A multimodal finetuning workdir gives one column per model (`per_model`)."""
  summaries, names = per_model(summaries, names)
  labels = [tuple(s["task"]["labels"]) for s in summaries]
  if len(set(labels)) > 1:
    raise errors.BadInput(f"The workdirs were trained on different label sets "
                          f"({dict(zip(names, labels))}); compare runs of the same task.")
  rows = []
  for label, where, higher in METRICS:
    values = [_get(s, where, split) for s in summaries]
    if all(v is None for v in values):
      continue
    ref = values[0]
    diffs = [None if v is None or ref is None else v - ref for v in values[1:]]
    ratios = [None if v is None or not ref else v / ref for v in values[1:]]
    rows.append({"metric": label, "values": values, "differences": diffs, "ratios": ratios,
                 "higher_is_better": higher})
  names_ = summaries[0]["task"]["labels"]
  per_class = {c: [s[split]["per_class"].get(c, {}).get("f1") if "per_class" in s[split] else None
                   for s in summaries] for c in names_}
  out = {"names": list(names), "split": split, "metrics": rows, "per_class_f1": per_class,
         "init_from": [s.get("init_from") for s in summaries]}
  baseline = summaries[0].get("majority_baseline")
  if baseline:
    out["majority_baseline"] = baseline
  linear = summaries[0].get("linear_baseline")
  if linear and split in linear:
    out["linear_baseline"] = dict(
        {k: linear[k] for k in ("method", "C")}, **linear[split],
        model_minus_baseline=[{k: (s[split][k] - linear[split][k]) if k in s[split] else None
                               for k in linear[split]} for s in summaries])
  return out


def linear_baseline_text(result: dict[str, Any]) -> str:
  """The linear baseline's scores and each workdir's accuracy / macro-F1 minus them (Markdown)."""
  lb = result["linear_baseline"]
  diffs = ", ".join(f"{n} {d['accuracy']:+.4f} / {d['macro_f1']:+.4f}"
                    for n, d in zip(result["names"], lb["model_minus_baseline"]))
  return (f"Linear baseline ({lb['method']}, C={lb['C']:g}): accuracy {lb['accuracy']:.4f}, "
          f"macro-F1 {lb['macro_f1']:.4f}. Model minus baseline (accuracy / macro-F1): {diffs}.\n")


def _fmt(value: Any, ratio: Any = None, diff: bool = False) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, int) and not diff:
    return f"{value:,}"
  text = f"{value:+.4g}" if diff else f"{value:.4g}"
  if ratio is not None and not math.isnan(ratio):
    text += f" ({ratio:.2f}x)"
  return text


def table_text(result: dict[str, Any]) -> str:
  names = result["names"]
  ref = names[0]
  headers = ["metric", *names] + [f"{n} - {ref}" for n in names[1:]]
  rows = []
  for r in result["metrics"]:
    show_ratio = r["metric"].startswith(("latency", "trainable", "total"))
    rows.append([r["metric"], *(_fmt(v) for v in r["values"])] +
                [_fmt(d, q if show_ratio else None, diff=True)
                 for d, q in zip(r["differences"], r["ratios"])])
  lines = [f"# Comparison ({result['split']} split)", "",
           eval_lib.markdown_table(headers, rows)]
  if "majority_baseline" in result:
    mb = result["majority_baseline"]
    lines.append(f"Majority-class baseline (always `{mb['class']}`): accuracy "
                 f"{mb['accuracy']:.4f}, macro-F1 {mb['macro_f1']:.4f}.\n")
  if "linear_baseline" in result:
    lines.append(linear_baseline_text(result))
  lines.append("init_from: " + ", ".join(f"{n} = `{i or 'none (from scratch)'}`"
                                         for n, i in zip(names, result["init_from"])) + "\n")
  per_class = [[c, *(_fmt(v) for v in vals)] +
               [_fmt(None if v is None or vals[0] is None else v - vals[0], diff=True)
                for v in vals[1:]] for c, vals in result["per_class_f1"].items()]
  lines += ["## Per-class F1", "",
            eval_lib.markdown_table(["class", *names] + [f"{n} - {ref}" for n in names[1:]],
                                    per_class)]
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Compares `config.workdirs`; writes DIR/comparison.md and DIR/summary.json."""
  validate(config)
  workdirs = _split_list(config.workdirs)
  if len(workdirs) < 2:
    raise configlib.ConfigError(f"workdirs={config.workdirs!r}: name at least two finetuning "
                                "workdirs, comma-separated, e.g. --config.workdirs=/tmp/a,/tmp/b.")
  names = _split_list(config.names) or [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(names) != len(workdirs):
    raise configlib.ConfigError(f"names={config.names!r} has {len(names)} names for "
                                f"{len(workdirs)} workdirs; give one per workdir or none.")
  result = compare(load_summaries(workdirs), names, config.split)
  result.update(stage="compare", workdirs=workdirs)
  text = table_text(result)
  print(text)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    configlib.write_config_json(config, workdir)
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
      f.write(text)
    run_dir.write_json(os.path.join(workdir, "summary.json"), result)
  return result
