r"""Knowledge distillation of a finetuned classifier (teacher) into a smaller student.

    # A student with a third of the teacher's layers (the default), initialised from teacher layers:
    python -m r1jax.main --config=configs/distill.py:variant=tiny --workdir=/tmp/kd_tiny \
        --config.init_from=/tmp/ft_tiny
    # Narrower too, with hidden-state matching through a learned projection:
    python -m r1jax.main --config=configs/distill.py --workdir=DIR --config.init_from=FT \
        --config.student.n_layer=4 --config.student.d_model=384 --config.student.d_inner=1536 \
        --config.distill.hidden_weight=1.0

loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(hard labels)
       (+ hidden_weight * MSE of matched hidden states). Teacher and student see the same batch.
Writes DIR/artifact/ (the student), DIR/float/ (the teacher, the table's reference),
DIR/summary.json, DIR/report.md, DIR/tradeoff.png, DIR/checkpoints/ (student and frozen teacher;
this workdir is a valid init_from for quantize/prune, which take the student).
"""
import ml_collections

from r1jax import configlib
from r1jax.compress import stage_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = configlib.parse_arg(arg, variant="base").variant
  configlib.check_variant(variant)
  config = ml_collections.ConfigDict()
  config.stage = "distill"
  config.seed = 0
  config.init_from = ""  # the teacher: a finetuning workdir

  config.student = ml_collections.ConfigDict(dict(
      n_layer=-1,            # -1 = a third of the teacher's layers (at least 1)
      d_model=-1,            # -1 = the teacher's (every size must be <= the teacher's)
      n_head=-1,
      d_head=-1,
      d_inner=-1,
      dropout=-1.0,          # -1 = the teacher's
      layer_map="uniform",   # teacher layer per student layer: uniform | first | last | "0,5"
      init_from_teacher=True,  # copy every teacher weight whose shape fits (layers by layer_map)
  ))
  config.distill = ml_collections.ConfigDict(dict(
      alpha=0.5,             # weight of the soft-target term (1 - alpha on the hard labels)
      temperature=2.0,       # softmax temperature T of both models in the soft term
      hidden_weight=0.0,     # > 0 adds MSE between student layer outputs and their teacher layers
  ))
  config.train = configlib.train_section(
      num_steps=-1, num_epochs=3.0, batch_size=32, learning_rate=3e-4, warmup_fraction=0.1,
      weight_decay=0.01, grad_clip_norm=1.0, label_smoothing=0.0, log_every_steps=20)
  config.eval = configlib.eval_section(every_steps=100, num_batches=16, early_stopping_patience=3)
  config.checkpoint = configlib.checkpoint_section(every_steps=200, max_to_keep=1, keep_best=1)
  config.mesh = configlib.mesh_section()
  # The architecture is the init_from classifier's; the variant only picks these defaults.
  config.model = ml_collections.ConfigDict(dict(variant=variant))
  config.task = stage_lib.task_section()
  config.report = stage_lib.report_section()
  config.export = stage_lib.export_section()
  if variant == "tiny":
    config.train.num_epochs = 4.0
    config.train.learning_rate = 2e-3
    config.eval.every_steps = 64
    config.checkpoint.every_steps = 128
  return config
