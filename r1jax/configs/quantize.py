r"""Post-training INT8 quantization of a finetuned classifier (qwix; embeddings int8 by hand).

    python -m r1jax.main --config=configs/quantize.py --workdir=/tmp/q_tiny \
        --config.init_from=/tmp/ft_tiny
    # Only int8 weights + dynamic int8 activations, no StableHLO export:
    python -m r1jax.main --config=configs/quantize.py --workdir=DIR --config.init_from=FT \
        --config.quant.modes=dynamic --config.export.enabled=False

Writes DIR/artifact/ (the `quant.primary` mode; loads back without the float weights), one
DIR/int8_<mode>/ per other mode, DIR/float/ (the reference), DIR/summary.json ("artifacts": size,
parameters, latency at batch 1 and batched, accuracy, macro-F1, % retained), DIR/report.md,
DIR/tradeoff.png, DIR/artifact/model.stablehlo (jax.export) and, with the [edge] extra,
DIR/float/model.onnx + DIR/artifact/model.onnx (int8), runnable without JAX by
`python -m r1jax.serve --model DIR/artifact "some text"`. `variant` only sets defaults; the
model comes from init_from. A multimodal finetuning workdir (finetune's multimodal.enabled) is
quantized the same way, measured on its image+text task; its ONNX files take tokens, token_mask
and images (`r1jax.serve --model DIR/artifact --image icon.png "its text"`).
"""
import ml_collections

from r1jax import configlib
from r1jax.compress import stage_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = configlib.parse_arg(arg, variant="base").variant
  configlib.check_variant(variant)
  config = ml_collections.ConfigDict()
  config.stage = "quantize"
  config.seed = 0
  config.init_from = ""  # finetuning (or prune / distill) workdir of the float classifier

  config.quant = ml_collections.ConfigDict(dict(
      modes="weights,dynamic,static",  # int8 weights (+ dynamic | static int8 activations), each measured
      primary="dynamic",          # the mode saved as DIR/artifact (and exported)
      embeddings=True,            # int8 embedding tables, one scale per row (qwix leaves them float)
      min_size=0,                 # weights with fewer elements stay float
      calibration="percentile",   # static mode: per-tensor activation range = absmax | percentile of |x|
      percentile=99.99,           # ... averaged over the calibration batches
      calibration_batches=16,     # batches of the task's training split used for calibration
      calibration_batch_size=32,
  ))
  # The architecture is the init_from classifier's; the variant only picks these defaults.
  config.model = ml_collections.ConfigDict(dict(variant=variant))
  config.task = stage_lib.task_section()
  config.report = stage_lib.report_section()
  config.export = stage_lib.export_section()
  # model.onnx in DIR/float (float) and DIR/artifact (int8, onnxruntime's quantizer), measured in
  # onnxruntime: "auto" = when the [edge] extra is installed, "on" = required, "off".
  config.export.onnx = "auto"
  if variant == "tiny":
    config.quant.calibration_batches = 8
  return config
