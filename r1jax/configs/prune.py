r"""Magnitude pruning of a finetuned classifier's kernels, then recovery finetuning.

    # 50% of every backbone kernel, pruned at once, then one epoch of recovery finetuning:
    python -m r1jax.main --config=configs/prune.py:variant=tiny --workdir=/tmp/prune_tiny \
        --config.init_from=/tmp/ft_tiny
    # One global threshold, sparsity raised gradually over the first half of training:
    python -m r1jax.main --config=configs/prune.py --workdir=DIR --config.init_from=FT \
        --config.prune.scope=global --config.prune.schedule=gradual --config.prune.sparsity=0.4
    # Structured: half of each layer's attention heads and feed-forward units removed (chosen by
    # gradient x weight importance on training batches), then recovery finetuning:
    python -m r1jax.main --config=configs/prune.py:variant=tiny --workdir=DIR \
        --config.init_from=FT --config.prune.mode=structured --config.prune.heads_fraction=0.5 \
        --config.prune.ffn_fraction=0.5

Magnitude: masks live in the optimizer state (last link of the optax chain), so pruned weights
stay exactly zero through recovery finetuning and the masks resume with the checkpoints.
Structured: the heads and units kept are chosen once (DIR/structured_plan.json) and the smaller
model is finetuned. Writes DIR/artifact/, DIR/float/ (reference), DIR/summary.json, DIR/report.md,
DIR/tradeoff.png, DIR/checkpoints/ (a valid init_from for the quantize stage).
"""
import ml_collections

from r1jax import configlib
from r1jax.compress import prune as prune_lib
from r1jax.compress import stage_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = configlib.parse_arg(arg, variant="base").variant
  configlib.check_variant(variant)
  config = ml_collections.ConfigDict()
  config.stage = "prune"
  config.seed = 0
  config.init_from = ""  # finetuning workdir of the classifier to prune

  config.prune = ml_collections.ConfigDict(dict(
      mode="magnitude",                   # magnitude: zero single weights | structured: remove
                                          # whole heads and feed-forward units (matrices shrink)
      heads_fraction=0.5,                 # structured: share of each layer's heads removed, [0, 1)
      ffn_fraction=0.5,                   # structured: share of each layer's FF units removed
      score_batches=16,                   # structured: training batches the importance sums over
      structured_scope="layer",           # structured: layer (same share per layer) | global
                                          # (worst heads/units anywhere; layers differ in size)
      sparsity=0.5,                       # target fraction of zeros in the selected kernels, [0, 1)
      scope="layer",                      # layer: each kernel to the target | global: one threshold
      schedule="one_shot",                # one_shot | gradual (cubic ramp, Zhu & Gupta 2017)
      ramp_fraction=0.5,                  # gradual: share of the steps spent raising sparsity
      update_every=10,                    # gradual: steps between mask updates
      include=prune_lib.DEFAULT_INCLUDE,  # regex over parameter paths (full match) to prune
      exclude="",                         # regex of paths to keep dense
  ))
  config.train = configlib.train_section(
      num_steps=-1, num_epochs=1.0, batch_size=32, learning_rate=1e-4, warmup_fraction=0.1,
      weight_decay=0.01, grad_clip_norm=1.0, label_smoothing=0.0, log_every_steps=20)
  config.eval = configlib.eval_section(every_steps=100, num_batches=16, early_stopping_patience=0)
  config.checkpoint = configlib.checkpoint_section(every_steps=200, max_to_keep=1, keep_best=0)
  config.mesh = configlib.mesh_section()
  # The architecture is the init_from classifier's; the variant only picks these defaults.
  config.model = ml_collections.ConfigDict(dict(variant=variant))
  config.task = stage_lib.task_section()
  config.report = stage_lib.report_section()
  config.export = stage_lib.export_section()
  if variant == "tiny":
    config.train.num_epochs = 2.0
    config.train.learning_rate = 5e-4
    config.eval.every_steps = 64
    config.checkpoint.every_steps = 128
  return config
