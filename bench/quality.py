r"""Model quality of the recipe on a classification task, side by side with the linear baseline.

    python bench/quality.py                                    # the embedded FOLDOC task, tiny
    python bench/quality.py --task DIR                         # DIR/{train,dev,test}.jsonl
    python bench/quality.py --task DIR --domain 'notes/*.txt'  # + unlabelled domain text
    python bench/quality.py --variant small --workdir runs/q   # rerunning resumes / skips
    python bench/quality.py --budget 30                        # the pipeline within 30 minutes

Runs the README's pipeline on the task (data -> general pretraining -> domain-adaptive
pretraining -> finetuning of both models -> compare -> distillation -> INT8 quantization), plus
finetuning from scratch with the same settings, then prints one table of test accuracy and
macro-F1: majority class, TF-IDF + logistic regression (`eval.linear_baseline`, C chosen on dev),
scratch, general, adapted, distilled, int8, each with its difference to the linear baseline, and
the wall minutes. The last line is one JSON object: `accuracy` / `macro_f1` (the adapted model),
`baseline_accuracy` / `baseline_macro_f1`, `stages` (one entry per row), `minutes`.

The task and the domain text reach the stages through the pipeline's own keys (`config.task.*`,
`config.domain_corpus`): the domain corpus is `--domain` (a data.inputs spec), else the embedded
FOLDOC text for the embedded task, plus the task's own train and dev texts (task-adaptive
pretraining, `config.tapt`: the test split is never read for pretraining). Settings are the pipeline's for `--variant`; `--set stage.key=value`
overrides any of them (e.g. `--set finetune_domain.train.num_epochs=12`). Quality numbers go to
bench/NOTES_quality.md with the settings that produced them.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from r1jax import configlib  # noqa: E402
from r1jax import eval as eval_lib  # noqa: E402
from r1jax import run_dir  # noqa: E402
from r1jax.stages import finetune  # noqa: E402
from r1jax.stages import pipeline  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("train", "dev", "test")
FINETUNES = ("finetune_general", "finetune_domain")


def task_specs(task_dir: str) -> dict[str, str]:
  """{split: input spec}: the embedded task, or DIR/<split>.jsonl (each must exist)."""
  if not task_dir:
    return {s: f"builtin:task:{s}" for s in SPLITS}
  specs = {s: os.path.join(os.path.abspath(task_dir), f"{s}.jsonl") for s in SPLITS}
  missing = [p for p in specs.values() if not os.path.isfile(p)]
  if missing:
    raise SystemExit(f"quality.py: --task {task_dir!r} lacks {missing}; a task directory holds "
                     "train.jsonl, dev.jsonl and test.jsonl with 'text' and 'label' fields.")
  return specs


def _override(config: Any, item: str) -> None:
  """--set STAGE.KEY=VALUE on the pipeline config (VALUE a Python literal or a plain string)."""
  key, sep, text = item.partition("=")
  stage = key.partition(".")[0]
  if not sep or "." not in key or stage not in config.pipeline:
    raise SystemExit(f"quality.py: --set {item!r}: use STAGE.KEY=VALUE with STAGE one of "
                     f"{sorted(config.pipeline)}, e.g. finetune_domain.train.num_epochs=12.")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  try:
    configlib.field_type(config.pipeline, key)
    configlib.set_path(config.pipeline, key, value)
  except (KeyError, AttributeError, TypeError) as e:
    raise SystemExit(f"quality.py: --set {item!r}: {e!r}; name an existing key with a value of "
                     "its type.") from None


def build_config(args: argparse.Namespace) -> Any:
  """The pipeline config: the variant's settings, the task, the domain corpus, --set overrides."""
  config = configlib.load_config(os.path.join(REPO, "configs", "pipeline.py") +
                                 f":variant={args.variant}")
  config.stages = ("data_general,data_domain,pretrain_general,pretrain_domain,finetune_general,"
                   "finetune_domain,compare,distill,quantize")
  if args.task:
    config.task.update(task_specs(args.task))
  config.domain_corpus = args.domain
  config.budget_minutes = float(getattr(args, "budget", 0.0))
  for stage in config.pipeline:
    if "train" in config.pipeline[stage]:
      config.pipeline[stage].train.progress_bar = False
  for item in args.set:
    _override(config, item)
  return config


def scratch_config(config: Any) -> Any:
  """finetune_domain's settings (task, steps, schedule) without init_from: no pretraining."""
  scratch = pipeline.stage_config(config, "finetune_domain", "")
  scratch.init_from = ""
  scratch.report.linear_baseline = False  # finetune_general's is the table's
  return scratch


def _scores(summary: dict[str, Any]) -> dict[str, float]:
  """Test accuracy / macro-F1 and, where the stage reports it, dev accuracy (the chooser)."""
  out = {"accuracy": summary["test"]["accuracy"], "macro_f1": summary["test"]["macro_f1"]}
  if "dev" in summary:
    out["dev_accuracy"] = summary["dev"]["accuracy"]
  return out


def interval(accuracy: float, n: int) -> float:
  """Half-width of the normal-approximation 95% interval of an accuracy measured on n rows."""
  return 1.96 * (accuracy * (1 - accuracy) / max(n, 1)) ** 0.5


def gather(workdir: str, scratch: dict[str, Any]) -> dict[str, dict[str, float]]:
  """{row name: {"accuracy", "macro_f1"}} from the stages' summaries."""
  read = lambda stage: run_dir.read_json(os.path.join(workdir, stage, run_dir.SUMMARY_FILE))
  general, adapted = read("finetune_general"), read("finetune_domain")
  rows = {"majority class": {k: adapted["majority_baseline"][k] for k in ("accuracy", "macro_f1")},
          "TF-IDF + LR": dict(general["linear_baseline"]["test"],
                              dev_accuracy=general["linear_baseline"]["dev"]["accuracy"]),
          "scratch": _scores(scratch), "general": _scores(general), "adapted": _scores(adapted)}
  for stage, kind in (("distill", "distilled"), ("quantize", "int8")):
    summary = read(stage) or {}
    for artifact in summary.get("artifacts", [])[1:]:  # [0] is the float reference
      mode = artifact["name"].split("-", 1)[-1]
      if artifact.get("runtime", "jax") != "jax":  # the ONNX files the quantize stage exports
        name = f"{artifact['runtime']} ({mode})"
      else:
        name = kind if kind == "distilled" else f"int8 ({mode})"
      if "accuracy" in artifact:
        rows[name] = {"accuracy": artifact["accuracy"], "macro_f1": artifact["macro_f1"]}
  return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--task", default="", help="directory with train/dev/test.jsonl; "
                      "default: the embedded FOLDOC task")
  parser.add_argument("--domain", default="", help="unlabelled domain text (a data.inputs spec)")
  parser.add_argument("--variant", default="tiny", choices=("tiny", "small", "base"))
  parser.add_argument("--workdir", default="runs/quality", help="rerunning resumes")
  parser.add_argument("--budget", type=float, default=0.0, metavar="MINUTES",
                      help="the pipeline's budget_minutes (0: the variant's step counts)")
  parser.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                      help="override a pipeline stage's config key; repeatable")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)  # the pipeline's "[i/n] stage" lines and eval lines
  workdir = os.path.abspath(args.workdir)
  started = time.time()
  config = build_config(args)
  pipeline.run(config, os.path.join(workdir, "pipeline"))
  scratch = finetune.run(scratch_config(config), os.path.join(workdir, "scratch"))
  minutes = (time.time() - started) / 60.0
  rows = gather(os.path.join(workdir, "pipeline"), scratch)
  base = rows["TF-IDF + LR"]
  n_test = scratch["test"]["num_examples"]
  table = eval_lib.markdown_table(
      ("model", "dev accuracy", "test accuracy", "+-95%", "test macro-F1", "accuracy - baseline",
       "macro-F1 - baseline"),
      [(name, f"{r['dev_accuracy']:.4f}" if "dev_accuracy" in r else "", f"{r['accuracy']:.4f}",
        f"{interval(r['accuracy'], n_test):.3f}", f"{r['macro_f1']:.4f}",
        f"{r['accuracy'] - base['accuracy']:+.4f}", f"{r['macro_f1'] - base['macro_f1']:+.4f}")
       for name, r in rows.items()])
  print(f"Task: {args.task or 'embedded FOLDOC subjects'}; variant {args.variant}; domain "
        f"{pipeline.domain_inputs(config)}; {minutes:.1f} minutes (resumed stages "
        f"count only the time of this run).\n")
  print(table)
  print(f"\n+-95%: half-width of the normal-approximation interval of a test accuracy on "
        f"{n_test} rows; dev accuracy is what chose each model's checkpoint and settings.")
  adapted = rows["adapted"]
  result = {"accuracy": adapted["accuracy"], "macro_f1": adapted["macro_f1"],
            "baseline_accuracy": base["accuracy"], "baseline_macro_f1": base["macro_f1"],
            "stages": rows, "minutes": round(minutes, 2), "variant": args.variant,
            "budget_minutes": args.budget,
            "task": args.task or "builtin:task"}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
