r"""The fused models against the text-only one by K-fold cross-validation over the icon task's
train + dev icons (559), so every comparison reads 559 held-out icons instead of dev's 94.

    python bench/multimodal_folds.py        # 5 folds, seed 0, 3 variants: 37 min at load 6-10
    python bench/multimodal_folds.py --variants joint,late:1 --seeds 0,1 --workdir /tmp/f

Why: on the 94 dev / 101 test icons the fused-minus-text-only difference moves by several points
with the split alone (NOTES_multimodal.md, session 23: the joint fused model +3.9 points on dev
and -1.7 on test over the same three seeds), and seeds only resample the training noise, never
which icons are judged. The test split is never read here.

Folds: a hash of the icon's name without "-symbolic" (an icon and its symbolic version fall in the
same fold, as in the task's own split). Per fold and seed, one finetuning run per variant
(`bench/multimodal.py`'s settings: tiny, from scratch, the mild augmentation) trains on the other
folds for --steps steps and evaluates on the held-out fold every --eval_every steps; the first
variant's run also trains the text-only model on the same batches. A model's score is its
accuracy at the last step (no step chosen on the held-out icons) and the mean of its last five
evaluations. Variants: `fusion[:aux_weight]` (joint, late:0, late:1 ...).

Prints per fold the held-out accuracies, the pooled accuracy over all held-out icons, each fused
variant minus text-only per fold with its mean and standard error over folds x seeds, and a JSON
line.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from bench import multimodal as bench_mm  # noqa: E402
from r1jax.data import builtin  # noqa: E402
from r1jax.stages import finetune  # noqa: E402
from r1jax.train import metrics as metrics_lib  # noqa: E402


def fold_of(icon_id: str, folds: int) -> int:
  """"actions/edit-copy-symbolic" -> its fold: a hash of "edit-copy"."""
  name = icon_id.rsplit("/", 1)[-1]
  base = name[:-len("-symbolic")] if name.endswith("-symbolic") else name
  return int(hashlib.sha256(f"fold:{base}".encode()).hexdigest(), 16) % folds


def write_folds(root: str, folds: int) -> list[tuple[str, str, int]]:
  """(train file, held-out file, held-out count) per fold, as JSONL in root."""
  records = builtin.load("icons", "train") + builtin.load("icons", "dev")
  out = []
  for k in range(folds):
    paths = [os.path.join(root, f"fold{k}_{part}.jsonl") for part in ("train", "held")]
    parts = ([r for r in records if fold_of(r["id"], folds) != k],
             [r for r in records if fold_of(r["id"], folds) == k])
    for path, rows in zip(paths, parts):
      with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    out.append((*paths, len(parts[1])))
  return out


def held_out_scores(model_dir: str) -> dict[str, float]:
  """The held-out accuracy at the last evaluation and the mean of the last five."""
  acc = [r["accuracy"] for r in metrics_lib.read_metrics(model_dir, "eval")]
  return {"last": acc[-1], "last5": statistics.mean(acc[-5:])}


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--folds", type=int, default=5)
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--variants", default="joint,late:0,late:1",
                      help="fused variants, fusion[:aux_weight], comma-separated")
  parser.add_argument("--steps", type=int, default=560, help="training steps per run")
  parser.add_argument("--eval_every", type=int, default=56)
  parser.add_argument("--workdir", default="", help="where the runs go; '' = a temporary dir")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  root = args.workdir or tempfile.mkdtemp(prefix="bench_mm_folds_")
  os.makedirs(root, exist_ok=True)
  settings = argparse.Namespace(variant="tiny", epochs=40, eval_every=args.eval_every, seq_len=16,
                                image_size=32, patch_size=8, augment=bench_mm.MILD_AUGMENT,
                                fusion="", aux_weight=None)
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  rows = []
  for seed in (int(s) for s in args.seeds.split(",")):
    for k, (train, held, count) in enumerate(write_folds(root, args.folds)):
      row = {"seed": seed, "fold": k, "held_out": count}
      for i, variant in enumerate(variants):
        fusion, _, aux = variant.partition(":")
        settings.fusion, settings.aux_weight = fusion, float(aux or 0.0)
        config = bench_mm.stage_config(settings, seed, "fused,text" if i == 0 else "fused",
                                       augment=True)
        config.train.num_steps = args.steps
        config.task.train, config.task.dev, config.task.test = train, held, held
        config.task.labels = ",".join(builtin.labels("icons"))
        workdir = os.path.join(root, f"seed{seed}_fold{k}_{variant.replace(':', '_')}")
        finetune.run(config, workdir)
        if i == 0:
          row["text"] = held_out_scores(os.path.join(workdir, "models", "text"))
        row[variant] = held_out_scores(os.path.join(workdir, "models", "fused"))
      rows.append(row)
      print(json.dumps(row), flush=True)

  names = ["text"] + variants
  total = sum(r["held_out"] for r in rows)
  print(f"\n{args.folds}-fold cross-validation over the icon task's train + dev "
        f"({sum(r['held_out'] for r in rows if r['seed'] == rows[0]['seed'])} icons), "
        f"{args.steps} steps, seeds {args.seeds}; runs in {root}")
  print(f"{'seed':>4} {'fold':>4} {'icons':>5}  " + " ".join(f"{n:>9}" for n in names)
        + "   (held-out accuracy at the last step)")
  for r in rows:
    print(f"{r['seed']:>4} {r['fold']:>4} {r['held_out']:>5}  "
          + " ".join(f"{r[n]['last']:>9.3f}" for n in names))
  out = {"rows": rows, "pooled": {}, "minus_text": {}, "workdir": root}
  for score in ("last", "last5"):
    pooled = {n: sum(r[n][score] * r["held_out"] for r in rows) / total for n in names}
    out["pooled"][score] = pooled
    print(f"pooled ({score}): " + "; ".join(f"{n} {v:.3f}" for n, v in pooled.items()))
    for v in variants:
      diffs = [r[v][score] - r["text"][score] for r in rows]
      se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
      out["minus_text"].setdefault(score, {})[v] = {"per_fold": diffs,
                                                    "mean": statistics.mean(diffs), "se": se}
      print(f"  {v} minus text ({score}): " + " ".join(f"{d:+.3f}" for d in diffs)
            + f"; mean {statistics.mean(diffs):+.3f} +- {se:.3f} (standard error)")
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
