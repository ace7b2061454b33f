r"""Images beside text on the embedded icon task (issue 28): the three models, augmentation's
effect, and the image pipeline's throughput against what a training step consumes.

    python bench/multimodal.py        # tiny, 3 seeds: ~25 minutes on the shared 2-core machine
    python bench/multimodal.py --seeds 0 --epochs 20 --augment "" --workdir /tmp/mm
    python bench/multimodal.py --throughput_only --epochs 8   # the pipeline target: ~3 min
    python bench/multimodal.py --fusion joint --aux_weight 0  # the fused model of sessions 1-17

Per seed, two finetuning runs (`configs/finetune.py:variant=tiny` with multimodal.enabled, from
scratch, fixed steps, each model evaluated at its best dev step) on the same split:
  A  fused, text-only and image-only models, training images augmented (image_augment.prob=1,
     then --augment's overrides: by default the mild settings of NOTES_multimodal.md's runs 2-5;
     "" = the config's strengths);
  B  the image-only model again without augmentation.
Then, in this process, the image pipeline (`multimodal.image_text_dataset` with augmentation,
training batches, one process, no workers) is timed for `--throughput_batches` batches, and set
against the training step's consumption measured in run A (images per second of the fused
model's train records, compilation excluded).

--throughput_only: only the third target, --rounds times: a run of the fused model alone (first
seed, run A's settings, --epochs epochs) measures the step's consumption, then the pipeline is
timed as above; prints each round's line, the median ratio and the JSON line.

Prints one table of test (and dev) accuracies, the fused model's per-seed gain over the
text-only one on dev and test (their mean and its standard error over seeds), the targets with
met / not met, and last a JSON line. Issue 28's targets: fused above both single-modality
models; augmentation's effect on the image-only model measured; pipeline >= 10x the training
step's consumption.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from r1jax import configlib  # noqa: E402
from r1jax.data import builtin  # noqa: E402
from r1jax.data import multimodal  # noqa: E402
from r1jax.data import task as task_lib  # noqa: E402
from r1jax.data import tokenizer as tokenizer_lib  # noqa: E402
from r1jax.stages import finetune  # noqa: E402
from r1jax.stages import finetune_multimodal  # noqa: E402
from r1jax.train import metrics as metrics_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Full strength kept the image-only model at the majority class (NOTES_multimodal.md, run 1).
MILD_AUGMENT = ("prob=0.5,crop_scale_min=0.85,rotate_degrees=10,brightness=0.1,contrast=0.1,"
                "saturation=0.1,hue=0.02")


def stage_config(args: argparse.Namespace, seed: int, models: str, augment: bool):
  config = configlib.load_config(os.path.join(REPO, "configs",
                                              f"finetune.py:variant={args.variant}"))
  config.seed = seed
  config.multimodal.enabled = True
  config.multimodal.models = models
  config.multimodal.image_size = args.image_size
  config.multimodal.patch_size = args.patch_size
  config.task.seq_len = args.seq_len
  config.train.num_epochs = float(args.epochs)
  config.train.progress_bar = False
  config.eval.every_steps = args.eval_every
  config.eval.early_stopping_patience = 0
  config.eval.best_metric = "accuracy"
  config.checkpoint.every_steps = args.eval_every
  config.image_augment.prob = 1.0 if augment else 0.0
  if args.fusion:
    config.multimodal.fusion = args.fusion
  if args.aux_weight is not None:
    config.multimodal.aux_weight = args.aux_weight
  if augment:
    for item in filter(None, args.augment.split(",")):
      key, value = item.split("=")
      config.image_augment[key.strip()] = float(value)
  return config


def consumed_images_per_sec(model_dir: str, batch_size: int) -> float:
  """Images per second the training steps took in, from the train records' steps_per_sec (each
  measured over a window after the first, compiling, call)."""
  rates = [r["steps_per_sec"] for r in metrics_lib.read_metrics(model_dir, "train")
           if r.get("steps_per_sec")]
  return statistics.median(rates) * batch_size


def pipeline_images_per_sec(args: argparse.Namespace, batches: int) -> float:
  """The training pipeline with augmentation, timed over `batches` batches (after one)."""
  split = multimodal.read_image_split("builtin:icons:train", "train", image_size=args.image_size)
  tok = tokenizer_lib.Tokenizer.train([r["text"] for r in split.records], 1000)
  labels = task_lib.LabelVocab.from_names(builtin.labels("icons"))
  it = iter(multimodal.image_text_dataset(
      split.records, tok, labels=labels, seq_len=args.seq_len, batch_size=args.batch_size,
      image_size=args.image_size, augment=finetune_multimodal.augment_config(
          stage_config(args, 0, "fused", augment=True).image_augment), seed=0))
  next(it)
  started = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * args.batch_size / (time.perf_counter() - started)


def pipeline_line(pipeline: float, consumption: float) -> str:
  ratio = pipeline / consumption
  return (f"image pipeline {pipeline:,.0f} images/s vs training step {consumption:,.0f} images/s: "
          f"{ratio:.1f}x (target >= 10x: {'met' if ratio >= 10 else 'NOT met'})")


def throughput_only(args: argparse.Namespace, root: str) -> dict:
  """--rounds times: the fused model alone for the step's consumption, then the pipeline right
  after, in this process; each round's ratio and their median (the machine's load moves both
  figures from minute to minute, so one pair can mislead)."""
  seed = int(args.seeds.split(",")[0])
  config = stage_config(args, seed, "fused", augment=True)
  args.batch_size = config.train.batch_size
  rounds = []
  for r in range(args.rounds):
    workdir = os.path.join(root, f"seed{seed}_fused_round{r}")
    finetune.run(config, workdir)
    consumption = consumed_images_per_sec(os.path.join(workdir, "models", "fused"),
                                          config.train.batch_size)
    pipeline = pipeline_images_per_sec(args, args.throughput_batches)
    rounds.append({"pipeline_images_per_sec": pipeline, "step_images_per_sec": consumption,
                   "pipeline_over_step": pipeline / consumption,
                   "load_average": os.getloadavg()[0]})
  print(f"\nfused model, {args.epochs} epochs, {args.variant}, batch {args.batch_size}, "
        f"{args.rounds} rounds; runs in {root}")
  for r in rounds:
    print(f"  load {r['load_average']:.2f}: " + pipeline_line(r["pipeline_images_per_sec"],
                                                              r["step_images_per_sec"]))
  ratio = statistics.median(r["pipeline_over_step"] for r in rounds)
  print(f"median over rounds: {ratio:.1f}x (target >= 10x: {'met' if ratio >= 10 else 'NOT met'})")
  out = {"rounds": rounds, "pipeline_over_step": ratio, "workdir": root}
  print(json.dumps(out))
  return out


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="tiny")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run pair each")
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--eval_every", type=int, default=56)
  parser.add_argument("--seq_len", type=int, default=16)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--patch_size", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=32, help="the config's train.batch_size")
  parser.add_argument("--throughput_batches", type=int, default=200)
  parser.add_argument("--augment", default=MILD_AUGMENT,
                      help="image_augment overrides for the augmented runs ('' = the config's "
                           "strengths)")
  parser.add_argument("--fusion", default="", help="multimodal.fusion ('' = the config's)")
  parser.add_argument("--aux_weight", type=float, default=None,
                      help="multimodal.aux_weight (default: the config's)")
  parser.add_argument("--workdir", default="", help="where the runs go; '' = a temporary dir")
  parser.add_argument("--throughput_only", action="store_true",
                      help="only the pipeline vs the step (a fused-only run for the step)")
  parser.add_argument("--rounds", type=int, default=3,
                      help="--throughput_only: how many (step, pipeline) pairs to measure")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  root = args.workdir or tempfile.mkdtemp(prefix="bench_multimodal_")
  if args.throughput_only:
    return throughput_only(args, root)
  rows, consumed = [], []
  for seed in (int(s) for s in args.seeds.split(",")):
    config = stage_config(args, seed, "fused,text,image", augment=True)
    args.batch_size = config.train.batch_size
    a = finetune.run(config, os.path.join(root, f"seed{seed}_A"))
    b = finetune.run(stage_config(args, seed, "image", augment=False),
                     os.path.join(root, f"seed{seed}_B"))
    consumed.append(consumed_images_per_sec(os.path.join(root, f"seed{seed}_A", "models",
                                                         "fused"), config.train.batch_size))
    for name, run, label in (("fused", a, "fused (text+image), augmented"),
                             ("text", a, "text only"),
                             ("image", a, "image only, augmented"),
                             ("image", b, "image only, not augmented")):
      m = run["models"][name]
      rows.append({"seed": seed, "model": label, "dev": m["dev"]["accuracy"],
                   "test": m["test"]["accuracy"], "test_macro_f1": m["test"]["macro_f1"]})
  pipeline = pipeline_images_per_sec(args, args.throughput_batches)
  consumption = statistics.median(consumed)

  print(f"\nEmbedded icon task ({args.epochs} epochs, {args.variant}, images {args.image_size}px, "
        f"patches {args.patch_size}px, text {args.seq_len} tokens); runs in {root}")
  print(f"{'seed':>4}  {'model':<30} {'dev acc':>8} {'test acc':>8} {'test macro-F1':>13}")
  for r in rows:
    print(f"{r['seed']:>4}  {r['model']:<30} {r['dev']:>8.3f} {r['test']:>8.3f} "
          f"{r['test_macro_f1']:>13.3f}")
  mean = {label: statistics.mean(r["test"] for r in rows if r["model"] == label)
          for label in dict.fromkeys(r["model"] for r in rows)}
  print("mean test accuracy over seeds: " + "; ".join(f"{k} {v:.3f}" for k, v in mean.items()))
  gains = {}
  for split in ("dev", "test"):
    by = {(r["seed"], r["model"]): r[split] for r in rows}
    diffs = [by[s, "fused (text+image), augmented"] - by[s, "text only"]
             for s in dict.fromkeys(r["seed"] for r in rows)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    gains[split] = {"per_seed": diffs, "mean": statistics.mean(diffs), "standard_error": se}
    print(f"fused minus text only, {split}: " + " ".join(f"{d:+.3f}" for d in diffs)
          + f"; mean {statistics.mean(diffs):+.3f} +- {se:.3f} (standard error over seeds)")
  fused, text = mean["fused (text+image), augmented"], mean["text only"]
  image_aug, image_plain = mean["image only, augmented"], mean["image only, not augmented"]
  ratio = pipeline / consumption
  targets = {
      "fused_above_both": fused > max(text, image_aug, image_plain),
      "fused_minus_text": gains,
      "augmentation_effect_on_image_only": image_aug - image_plain,
      "pipeline_over_step": ratio,
      "pipeline_at_least_10x": ratio >= 10.0,
  }
  print(f"target fused > text-only and image-only: {fused:.3f} vs {text:.3f} / "
        f"{max(image_aug, image_plain):.3f}: {'met' if targets['fused_above_both'] else 'NOT met'}")
  verdict = "helps" if image_aug > image_plain else "does not help"
  print(f"augmentation on the image-only model: {image_aug:.3f} with, {image_plain:.3f} without "
        f"({image_aug - image_plain:+.3f}; {verdict})")
  print(pipeline_line(pipeline, consumption))
  out = {"rows": rows, "mean_test_accuracy": mean, "fusion": config.multimodal.fusion,
         "aux_weight": config.multimodal.aux_weight, "pipeline_images_per_sec": pipeline,
         "step_images_per_sec": consumption, "targets": targets, "workdir": root,
         "models": list(finetune_multimodal.MODELS)}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
