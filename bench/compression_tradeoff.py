r"""Compression trade-off on the embedded FOLDOC task: float vs INT8 vs distilled vs pruned.

    python bench/compression_tradeoff.py --workdir=/tmp/bench_compress               # tiny, 6-layer teacher
    python bench/compression_tradeoff.py --workdir=DIR --variant=small --teacher_layers=6
    python bench/compression_tradeoff.py --workdir=DIR --pretrain_steps=1500         # pretrain first (better)
    python bench/compression_tradeoff.py --workdir=DIR --quick                       # minutes: smoke run
    python bench/compression_tradeoff.py --workdir=DIR --skip=distill,prune          # float vs int8 only

Runs the real stages, each in its own workdir under --workdir (rerunning resumes / skips what is
done): [pretrain on builtin:domain] -> finetune (the teacher / float reference) -> quantize (int8
weights, + dynamic, + static activations) -> distill (a student with a third of the layers) ->
prune (50% of every backbone kernel, recovery finetuning). Every artifact is measured on the same
test split by its stage (size on disk, parameters, latency at batch 1 and batched, accuracy,
macro-F1); this script gathers the rows, recomputes the relative columns against the float model,
checks the issue's targets, writes DIR/summary.json, DIR/report.md, DIR/tradeoff.png, prints the
table and, last, one JSON line. With the [edge] extra the quantize stage also exports the float
model and an int8 one to ONNX and times them in onnxruntime in turn with the float model in JAX:
those rows have runtime "onnxruntime", and the edge targets (issue 25) are checked too.

Targets (issue 6): INT8 <= 26% of the float32 file, <= 1 point accuracy drop, latency no worse
than float32 in the int8-activation (dynamic) mode; distillation with 1/3 of the layers keeps
>= 95% of the teacher's accuracy and is >= 2x faster at batch 1; 50% sparsity keeps >= 98% of the
dense accuracy after recovery finetuning. Issue 25 (edge runtime): int8 in onnxruntime >= 1.5x
faster than float in onnxruntime at batch 1 and faster than the float JAX path, <= 1 point
accuracy drop, file <= 26% of float; exported float logits within 1e-4 of JAX, int8 argmax
agreement >= 99%.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from r1jax import configlib  # noqa: E402
from r1jax.compress import edge as edge_lib  # noqa: E402
from r1jax.compress import measure  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _config(stage: str, variant: str):
  return configlib.load_config(os.path.join(CONFIGS, f"{stage}.py") + f":variant={variant}")


def _quiet(config) -> None:
  if "train" in config:
    config.train.progress_bar = False


def run(args) -> dict:
  from r1jax.stages import finetune, pretrain, quantize  # pylint: disable=g-import-not-at-top
  root = os.path.abspath(args.workdir)
  os.makedirs(root, exist_ok=True)
  timings = {}

  def timed(name, fn, *a):
    start = time.time()
    out = fn(*a)
    timings[name] = time.time() - start
    return out

  init_from = ""
  if args.pretrain_steps:
    c = _config("pretrain", args.variant)
    c.model.n_layer = args.teacher_layers
    c.data.corpus = "builtin:domain"
    c.train.num_steps = args.pretrain_steps
    _quiet(c)
    timed("pretrain", pretrain.run, c, os.path.join(root, "pretrain"))
    init_from = os.path.join(root, "pretrain")

  c = _config("finetune", args.variant)
  c.init_from = init_from
  c.model.n_layer = args.teacher_layers
  c.schedule = "full"
  if args.finetune_epochs:
    c.train.num_epochs = args.finetune_epochs
  if args.quick:
    c.train.num_steps, c.eval.every_steps = 60, 30
  _quiet(c)
  ft_dir = os.path.join(root, "finetune")
  timed("finetune", finetune.run, c, ft_dir)

  rows = []
  c = _config("quantize", args.variant)
  c.init_from = ft_dir
  if args.latency_repeats:
    c.report.latency_repeats = args.latency_repeats
  if args.quick:
    c.report.latency_repeats = 5
  q = timed("quantize", quantize.run, c, os.path.join(root, "quantize"))
  rows += q["artifacts"]

  skip = {s.strip() for s in args.skip.split(",") if s.strip()}
  d = p = None
  if "distill" not in skip:
    d = _distill(args, ft_dir, root, timed)
    rows += d["artifacts"][1:]
  if "prune" not in skip:
    p = _prune(args, ft_dir, root, timed)
    rows += p["artifacts"][1:]
  return _finish(args, root, rows, q, d, p, timings)


def _distill(args, ft_dir, root, timed):
  from r1jax.stages import distill  # pylint: disable=g-import-not-at-top
  c = _config("distill", args.variant)
  c.init_from = ft_dir
  c.student.n_layer = max(1, args.teacher_layers // 3)
  c.distill.hidden_weight = args.hidden_weight
  if args.distill_epochs:
    c.train.num_epochs = args.distill_epochs
  if args.quick:
    c.train.num_steps, c.eval.every_steps, c.report.latency_repeats = 40, 20, 5
  _quiet(c)
  return timed("distill", distill.run, c, os.path.join(root, "distill"))


def _prune(args, ft_dir, root, timed):
  from r1jax.stages import prune  # pylint: disable=g-import-not-at-top
  c = _config("prune", args.variant)
  c.init_from = ft_dir
  c.prune.sparsity = args.sparsity
  c.prune.schedule = args.prune_schedule
  if args.prune_epochs:
    c.train.num_epochs = args.prune_epochs
  if args.quick:
    c.train.num_steps, c.eval.every_steps, c.report.latency_repeats = 40, 20, 5
  _quiet(c)
  return timed("prune", prune.run, c, os.path.join(root, "prune"))


def _finish(args, root, rows, q, d, p, timings):
  keep = ("name", "kind", "runtime", "path", "params", "bytes", "bytes_compressed", "accuracy", "macro_f1",
          "num_examples", "latency_ms_batch1", "latency_ms_batched", "latency_batch_size")
  rows = measure.add_relative([{k: r.get(k) for k in keep} for r in rows], reference="float")
  by = {r["name"]: r for r in rows}
  dyn = by["int8-dynamic"]
  targets = {
      "int8_size_pct": dyn["size_pct"], "int8_size_met": dyn["size_pct"] <= 26.0,
      "int8_accuracy_drop_points": {m: by[f"int8-{m}"]["accuracy_drop_points"]
                                    for m in ("weights", "dynamic", "static") if f"int8-{m}" in by},
      "int8_dynamic_accuracy_met": dyn["accuracy_drop_points"] <= 1.0,
      "int8_dynamic_latency_vs_float_batch1": 1.0 / dyn["speedup_batch1"],
      "int8_dynamic_latency_vs_float_batched": 1.0 / dyn["speedup_batched"],
      "int8_dynamic_latency_met": dyn["speedup_batch1"] >= 1.0 and dyn["speedup_batched"] >= 1.0,
  }
  if d:
    student = next(r for r in rows if r["name"].startswith("distilled"))
    targets.update({
        "student_layers": f"{max(1, args.teacher_layers // 3)}/{args.teacher_layers}",
        "student_retained_accuracy_pct": student["retained_accuracy_pct"],
        "student_retained_met": student["retained_accuracy_pct"] >= 95.0,
        "student_speedup_batch1": student["speedup_batch1"],
        "student_speedup_met": student["speedup_batch1"] >= 2.0})
  if p:
    pruned = next(r for r in rows if r["name"].startswith("pruned"))
    targets.update({
        "pruned_sparsity": p["sparsity"]["selected_sparsity"],
        "pruned_retained_accuracy_pct": pruned["retained_accuracy_pct"],
        "pruned_retained_met": pruned["retained_accuracy_pct"] >= 98.0})
  edge_targets = (q.get("onnx") or {}).get("targets")
  notes = [f"{k}: {v if not isinstance(v, float) else round(v, 4)}" for k, v in targets.items()]
  if edge_targets:
    targets["edge"] = edge_targets
    notes += edge_lib.notes(edge_targets)
    latency = q["onnx"]["latency"]
    notes.append("same-run latency, ms/example (batch 1 / batch "
                 f"{latency['jax-float']['latency_batch_size']}): " + "; ".join(
                     f"{n} {v['latency_ms_batch1']:.3f} / {v['latency_ms_batched']:.3f}"
                     for n, v in latency.items()))
  notes.append(f"stage wall times (s): {json.dumps({k: round(v) for k, v in timings.items()})}")
  paths = measure.write_tradeoff(root, rows, title=f"Compression trade-off ({args.variant}, "
                                 f"{args.teacher_layers}-layer teacher, FOLDOC test split)",
                                 notes=notes)
  summary = {"bench": "compression", "variant": args.variant,
             "teacher_layers": args.teacher_layers, "pretrain_steps": args.pretrain_steps,
             "artifacts": rows, "targets": targets, "timings_secs": timings, **paths}
  with open(os.path.join(root, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(measure.markdown(rows))
  print("\n".join(notes))
  return summary


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--variant", default="tiny", choices=("tiny", "small"))
  parser.add_argument("--teacher_layers", type=int, default=6)
  parser.add_argument("--pretrain_steps", type=int, default=0,
                      help="MLM+NSP steps on builtin:domain before finetuning (0 = from scratch)")
  parser.add_argument("--finetune_epochs", type=float, default=0.0, help="0 = the config's")
  parser.add_argument("--distill_epochs", type=float, default=0.0, help="0 = the config's")
  parser.add_argument("--prune_epochs", type=float, default=0.0, help="0 = the config's")
  parser.add_argument("--hidden_weight", type=float, default=0.0)
  parser.add_argument("--sparsity", type=float, default=0.5)
  parser.add_argument("--prune_schedule", default="gradual", choices=("one_shot", "gradual"))
  parser.add_argument("--quick", action="store_true", help="few steps: a smoke run")
  parser.add_argument("--latency_repeats", type=int, default=0,
                      help="timed calls per latency (quantize stage); 0 = the config's")
  parser.add_argument("--skip", default="", help="comma-separated stages left out: distill, prune")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  summary = run(args)
  print(json.dumps({"bench": "compression", "variant": args.variant,
                    "rows": [{k: r[k] for k in ("name", "bytes", "params", "accuracy", "macro_f1",
                                                "latency_ms_batch1", "latency_ms_batched",
                                                "retained_accuracy_pct", "size_pct")}
                             for r in summary["artifacts"]],
                    "targets": summary["targets"]}))


if __name__ == "__main__":
  main()
