r"""Finetuning with and without length-bucketed batches, side by side in one run.

    python bench/finetune_padding.py                          # the pipeline's tiny finetuning, scratch
    python bench/finetune_padding.py --init_from PRETRAIN_DIR --steps 640 --buckets 0,4,8

Runs the pipeline's finetuning settings (`configs/pipeline.py`, finetune_domain, tiny: 256 tokens
per text) for a fixed number of steps without early stopping, once per `task.length_buckets`
value, one after another in fresh workdirs, and prints per run: wall seconds (compilation of each
width included, as a user pays it), optimizer steps per second over the run, the share of the
computed positions that hold a real token (`real_token_fraction` in metrics.jsonl), and dev
accuracy; then the speed-up of each run over the first. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from r1jax import configlib  # noqa: E402
from r1jax.stages import finetune  # noqa: E402
from r1jax.stages import pipeline  # noqa: E402
from r1jax.train import metrics as metrics_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(args: argparse.Namespace, buckets: int, workdir: str) -> dict[str, float]:
  """One finetuning run with `task.length_buckets=buckets`: its figures."""
  base = configlib.load_config(os.path.join(REPO, "configs", f"pipeline.py:variant={args.variant}"))
  config = pipeline.stage_config(base, "finetune_domain", "")
  config.init_from = args.init_from
  config.train.num_steps = args.steps
  config.eval.early_stopping_patience = 0
  config.report.linear_baseline = False
  config.train.progress_bar = False
  config.task.length_buckets = buckets
  started = time.perf_counter()
  summary = finetune.run(config, workdir)
  seconds = time.perf_counter() - started
  train = [r for r in metrics_lib.read_metrics(workdir, "train") if "real_token_fraction" in r]
  return {"buckets": buckets, "seconds": seconds, "steps": summary["step"],
          "steps_per_sec": summary["step"] / seconds,
          "real_token_fraction": sum(r["real_token_fraction"] for r in train) / max(1, len(train)),
          "dev_accuracy": summary["dev"]["accuracy"]}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="tiny")
  parser.add_argument("--init_from", default="", help="pretraining workdir; '' = from scratch")
  parser.add_argument("--steps", type=int, default=384, help="optimizer steps per run")
  parser.add_argument("--buckets", default="0,8", help="task.length_buckets values, in order")
  parser.add_argument("--workdir", default="", help="where the runs go; '' = a temporary dir")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  root = args.workdir or tempfile.mkdtemp(prefix="finetune_padding_")
  rows = [run_one(args, int(b), os.path.join(root, f"buckets{b}"))
          for b in args.buckets.split(",")]
  print(f"{'length_buckets':>14} {'seconds':>8} {'steps/s':>8} {'real tokens':>11} "
        f"{'dev acc':>8} {'speed-up':>8}")
  for r in rows:
    r["speedup"] = r["steps_per_sec"] / rows[0]["steps_per_sec"]
    print(f"{r['buckets']:>14} {r['seconds']:>8.1f} {r['steps_per_sec']:>8.2f} "
          f"{r['real_token_fraction']:>11.3f} {r['dev_accuracy']:>8.4f} {r['speedup']:>7.2f}x")
  print(json.dumps({"runs": rows}))
  return rows


if __name__ == "__main__":
  main()
