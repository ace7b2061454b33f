r"""The image path compressed (issue 28): a fused text+image classifier of the embedded icon task
through the quantize stage, int8 in JAX (qwix) and float / int8 ONNX in onnxruntime, checked
against the float model in JAX on the icon task's test split.

    python bench/multimodal_edge.py                  # ~5 minutes on the shared 2-core machine
    python bench/multimodal_edge.py --workdir /tmp/mme --epochs 20

1. finetune (configs/finetune.py:variant=tiny, multimodal.enabled, the fused model only, the
   mild augmentation of bench/multimodal.py, 40 epochs from scratch): WORKDIR/finetune;
2. quantize (configs/quantize.py:variant=tiny, modes weights + dynamic, ONNX on) of that workdir:
   WORKDIR/quantize (DIR/artifact: int8 + model.onnx + model.stablehlo; DIR/float: model.onnx).

Prints the stage's trade-off table (accuracy, size, latency at batch 1 and batched), then the
targets: exported float logits within 1e-4 of JAX, int8 ONNX argmax agreement with the float
model >= 99% on the test split, and last a JSON line. Reruns on the same workdir reuse finished
stages.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from r1jax import configlib  # noqa: E402
from r1jax.compress import measure  # noqa: E402
from r1jax.stages import finetune  # noqa: E402
from r1jax.stages import quantize  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MILD_AUGMENT = dict(prob=0.5, crop_scale_min=0.85, rotate_degrees=10.0, brightness=0.1,
                    contrast=0.1, saturation=0.1, hue=0.02)


def finetune_config(args: argparse.Namespace):
  config = configlib.load_config(os.path.join(REPO, "configs", "finetune.py:variant=tiny"))
  config.seed = args.seed
  config.multimodal.enabled = True
  config.multimodal.models = "fused"
  config.task.seq_len = 16
  config.train.num_epochs = float(args.epochs)
  config.train.progress_bar = False
  config.eval.every_steps = 56
  config.eval.early_stopping_patience = 0
  config.eval.best_metric = "accuracy"
  config.checkpoint.every_steps = 56
  for key, value in MILD_AUGMENT.items():
    config.image_augment[key] = value
  return config


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--latency_repeats", type=int, default=20)
  parser.add_argument("--workdir", default="", help="where the runs go; '' = a temporary dir")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  root = args.workdir or tempfile.mkdtemp(prefix="bench_multimodal_edge_")
  ft_dir = os.path.join(root, "finetune")
  ft = finetune.run(finetune_config(args), ft_dir)
  config = configlib.load_config(os.path.join(REPO, "configs", "quantize.py:variant=tiny"))
  config.init_from = ft_dir
  config.quant.modes = "weights,dynamic"
  config.export.onnx = "on"
  config.report.latency_repeats = args.latency_repeats
  summary = quantize.run(config, os.path.join(root, "quantize"))
  rows = summary["artifacts"]
  print(f"\nFused text+image classifier, icon task test split ({rows[0]['num_examples']} icons); "
        f"finetuned test accuracy {ft['models']['fused']['test']['accuracy']:.3f}; runs in {root}")
  print(measure.markdown(rows))
  onnx = summary["onnx"]
  t = onnx["targets"]
  checks = {"float_max_abs_logit_diff": t["float_max_abs_logit_diff"],
            "onnx_int8_argmax_agreement": t["int8_argmax_agreement"],
            "jax_int8_argmax_agreement": {m: summary["checks"][m]["argmax_agreement_vs_float"]
                                          for m in summary["checks"]}}
  print(f"exported float logits vs JAX: max |diff| {t['float_max_abs_logit_diff']:.2g} (target "
        f"<= 1e-4: {'met' if t['met']['float_max_abs_logit_diff'] else 'NOT met'})")
  print(f"int8 ONNX argmax agreement with the float model: {100 * t['int8_argmax_agreement']:.1f}%"
        f" (target >= 99%: {'met' if t['met']['int8_argmax_agreement'] else 'NOT met'})")
  print(f"int8 ONNX file {t['int8_size_pct_of_onnx_float']:.1f}% of the float ONNX file; "
        f"batch 1 int8 vs float in onnxruntime x{t['int8_speedup_vs_onnx_float_batch1']:.2f}")
  out = {"rows": rows, "checks": checks, "targets": t, "workdir": root}
  print(json.dumps(out, default=str))
  return out


if __name__ == "__main__":
  main()
