r"""Issue #26 part 2's target: the pipeline with `schedule=auto` against the fixed schedule, side
by side in one process.

    python bench/auto_schedule.py                        # the embedded corpus and task, tiny
    python bench/auto_schedule.py --workdir runs/auto --order fixed,auto   # one after the other
    python bench/auto_schedule.py --set pretrain_general.train.num_steps=3000

Runs the path the auto schedule controls twice, with the same settings except `schedule`: data
(general and domain) -> general pretraining -> domain-adaptive pretraining -> finetuning of the
adapted model. The fixed run trains each stage for its configured steps (finetuning: its epochs
with early stopping on dev accuracy); the auto run has the same ceilings and leaves each stage
when its eval metric plateaus (configs/pipeline.py `auto.*`; by default the learning rate is
lowered at a stage's first plateau and the stage left at the next). Both pretraining stages
evaluate every `--pretrain-eval-every` steps in both runs (the fixed run's evals only cost time).

Prints, per run: each training stage's steps and wall time, the whole run's wall and process CPU
time, and the finetuned model's dev accuracy and test accuracy / macro-F1; then the ratios and the
verdict against the target "same or better test macro-F1 at <= 70% of the fixed pipeline's wall
time", and each auto stage's decisive decision. The last line is one JSON object.

By default the two runs go at the same time, each in its own process (`--order` runs them one
after the other in this one): on a machine other jobs share, sequential runs see different loads,
while concurrent ones see the same. The auto run finishes first and leaves the fixed one more CPU
for its last part, which shortens the fixed run's wall time: the ratio errs against auto.
Measurements go to bench/NOTES_auto_schedule.md.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from quality import _override  # noqa: E402  (bench/quality.py: --set STAGE.KEY=VALUE)
from r1jax import configlib  # noqa: E402
from r1jax import run_dir  # noqa: E402
from r1jax.stages import pipeline  # noqa: E402
from r1jax.stages import pipeline_schedule  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("data_general", "data_domain", "pretrain_general", "pretrain_domain", "finetune_domain")
TRAINING = ("pretrain_general", "pretrain_domain", "finetune_domain")
WALL_TARGET = 0.70


def build_config(args: argparse.Namespace, schedule: str) -> Any:
  config = configlib.load_config(os.path.join(REPO, "configs", "pipeline.py") +
                                 f":variant={args.variant}")
  config.stages = ",".join(STAGES)
  config.schedule = schedule
  config.seed = args.seed
  for stage in config.pipeline:
    section = config.pipeline[stage].get("train") or config.pipeline[stage].get("data")
    if section is not None and "progress_bar" in section:
      section.progress_bar = False
  for stage in ("pretrain_general", "pretrain_domain"):
    config.pipeline[stage].eval.every_steps = args.pretrain_eval_every
  for item in args.set:
    _override(config, item)
  for item in args.auto:  # configs/pipeline.py's auto.* (used by the auto run only)
    key, _, text = item.partition("=")
    try:
      configlib.field_type(config.auto, key)  # an unknown key is a KeyError
      configlib.set_path(config.auto, key, _literal(text))
    except (KeyError, AttributeError, TypeError) as e:
      raise SystemExit(f"auto_schedule.py: --auto {item!r}: {e!r}; name a key of "
                       "configs/pipeline.py's auto section, e.g. finetune.relative=0.05.") from None
  return config


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def run_one(args: argparse.Namespace, schedule: str) -> dict[str, Any]:
  workdir = os.path.join(os.path.abspath(args.workdir), schedule)
  config = build_config(args, schedule)
  wall, cpu = time.perf_counter(), time.process_time()
  pipeline.run(config, workdir)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  read = lambda stage, name=run_dir.SUMMARY_FILE: run_dir.read_json(
      os.path.join(workdir, stage, name)) or {}
  stages = {}
  for stage in STAGES:
    state = run_dir.read_json(os.path.join(workdir, "pipeline_state", f"{stage}.json")) or {}
    summary = read(stage)
    stages[stage] = {"wall_secs": state.get("wall_secs"), "step": summary.get("step"),
                     "num_steps": summary.get("num_steps"),
                     "stopped_by": summary.get("stopped_by")}
  ft = read("finetune_domain")
  out = {"schedule": schedule, "workdir": workdir, "wall_secs": wall, "cpu_secs": cpu,
         "stage_wall_secs": sum(s["wall_secs"] or 0.0 for s in stages.values()),
         "stages": stages, "test_accuracy": ft["test"]["accuracy"],
         "test_macro_f1": ft["test"]["macro_f1"], "dev_accuracy": ft["dev"]["accuracy"],
         "best_step": ft.get("best_step")}
  if schedule == "auto":
    out["decisions"] = pipeline_schedule.summary(workdir)
  return out


def concurrent(args: argparse.Namespace, argv: list[str]) -> dict[str, dict[str, Any]]:
  """Both schedules at once, each in a process of its own; {schedule: run_one's result}."""
  out_dir = tempfile.mkdtemp(prefix="auto_schedule_")
  procs = {}
  for schedule in ("auto", "fixed"):
    result = os.path.join(out_dir, f"{schedule}.json")
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--only", schedule,
           "--result", result]
    log = open(os.path.join(out_dir, f"{schedule}.log"), "w")
    procs[schedule] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), result, log)
  runs = {}
  for schedule, (proc, result, log) in procs.items():
    if proc.wait() != 0:
      raise SystemExit(f"auto_schedule.py: the {schedule} run failed; its log: {log.name}")
    log.close()
    with open(result) as f:
      runs[schedule] = json.load(f)
  return runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/auto_schedule_bench")
  parser.add_argument("--variant", default="tiny", choices=("tiny", "small", "base"))
  parser.add_argument("--order", default="", choices=("", "auto,fixed", "fixed,auto"),
                      help="run the two one after the other in this process, in this order "
                      "('': both at once, each in its own process)")
  parser.add_argument("--auto", action="append", default=[],
                      help="KEY=VALUE of the pipeline's auto section, e.g. finetune.relative=0.05")
  parser.add_argument("--only", default="", choices=("", "auto", "fixed"),
                      help="run one schedule and write its result to --result (what the "
                      "concurrent mode starts)")
  parser.add_argument("--result", default="")
  parser.add_argument("--pretrain-eval-every", type=int, default=500)
  parser.add_argument("--seed", type=int, default=0, help="the pipeline's seed (added to every "
                      "stage's own)")
  parser.add_argument("--set", action="append", default=[],
                      help="STAGE.KEY=VALUE for both runs, e.g. "
                      "finetune_domain.train.num_epochs=12")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  load = os.getloadavg()
  if args.only:
    result = run_one(args, args.only)
    with open(args.result, "w") as f:
      json.dump(result, f, default=str)
    return result
  if args.order:
    runs = {s: run_one(args, s) for s in args.order.split(",")}
  else:
    runs = concurrent(args, argv if argv is not None else sys.argv[1:])
  fixed, auto = runs["fixed"], runs["auto"]

  print(f"\nload average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, at end "
        f"{os.getloadavg()[0]:.1f}; {args.order or 'both at once'}; variant {args.variant}")
  print("| run | " + " | ".join(f"{s} steps (wall s)" for s in TRAINING) +
        " | pipeline wall s | process CPU s | dev accuracy | test accuracy | test macro-F1 |")
  print("|---|" + "---:|" * (len(TRAINING) + 5))
  for name, r in (("fixed", fixed), ("auto", auto)):
    cells = [f"{r['stages'][s]['step']} / {r['stages'][s]['num_steps']} "
             f"({r['stages'][s]['wall_secs']:.0f})" if r["stages"][s]["wall_secs"] is not None
             else "skipped" for s in TRAINING]
    print(f"| {name} | " + " | ".join(cells) + f" | {r['wall_secs']:.0f} | {r['cpu_secs']:.0f} | "
          f"{r['dev_accuracy']:.4f} | {r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} |")
  wall_ratio = auto["wall_secs"] / fixed["wall_secs"]
  cpu_ratio = auto["cpu_secs"] / fixed["cpu_secs"]
  steps = lambda r: sum(r["stages"][s]["step"] or 0 for s in TRAINING)
  step_ratio = steps(auto) / max(steps(fixed), 1)
  f1_diff = auto["test_macro_f1"] - fixed["test_macro_f1"]
  met = wall_ratio <= WALL_TARGET and f1_diff >= 0
  print(f"auto / fixed: wall {wall_ratio:.1%}, process CPU {cpu_ratio:.1%}, training steps "
        f"{step_ratio:.1%}; test macro-F1 {auto['test_macro_f1']:.4f} vs "
        f"{fixed['test_macro_f1']:.4f} ({f1_diff:+.4f}), accuracy {auto['test_accuracy']:.4f} vs "
        f"{fixed['test_accuracy']:.4f}")
  print(f"target same or better test macro-F1 at <= {WALL_TARGET:.0%} of the fixed wall time: "
        f"{'met' if met else 'NOT met'}")
  domain = auto["decisions"].pop("domain_pretraining", None)
  if domain:
    print(f"  auto pretrain_domain {domain['action']} ({domain['wall_secs']:.1f} s): "
          f"{domain['reason']}")
  for stage, d in auto["decisions"].items():
    for a in d.get("actions", []):  # unfreeze / lower_lr before leaving
      print(f"  auto {stage}: {a['action']} at step {a['step']} ({a['reason']})")
    print(f"  auto {stage}: " + (f"left at step {d['left_at']} of {d['planned_steps']} "
                                 f"({d['reason']})" if d["left_at"] is not None else
                                 f"not left by the schedule ({d['decisions']} decisions)"))
  result = {"wall_ratio": wall_ratio, "cpu_ratio": cpu_ratio, "step_ratio": step_ratio,
            "macro_f1_diff": f1_diff, "target_met": met, "load_at_start": load[0],
            "fixed": fixed, "auto": auto}
  print(json.dumps(result, default=str))
  return result


if __name__ == "__main__":
  main()
