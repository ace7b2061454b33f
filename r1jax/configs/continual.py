r"""Continual learning: a finetuned classifier updated, round after round, on new labelled data.

    # Each entry of ROUNDS_DIR (sorted) is a round: a data file (split into train/dev/test by
    # stream.holdout_every) or a directory with train/dev/test files:
    python -m r1jax.main --config=configs/continual.py:variant=tiny --workdir=DIR \
        --config.init_from=FINETUNE_DIR --config.stream.rounds=ROUNDS_DIR
    # Rounds named one by one, with EWC (or l2sp) added and no distillation:
    ... --config.stream.rounds=week1.jsonl,week2.jsonl --config.regularize.method=ewc \
        --config.lwf.weight=0
    # Naive sequential finetuning (what the report compares against):
    ... --config.replay.enabled=False --config.regularize.method=none --config.lwf.weight=0

Each round starts from the model the round before ended with (the first from init_from), grows the
head for classes it has not seen (old logits unchanged), measures the drift of the incoming data,
trains on the round's data (+ replayed earlier examples) with the forgetting controls below, and
tests the model on every task so far (init_from's task is task 0). Writes DIR/rounds/<i>_<name>/
(round.json, the round's checkpoints, the replay buffer before and after it), DIR/naive/ (the same
rounds with no forgetting control, the reference), DIR/summary.json, DIR/report.md,
DIR/metrics.jsonl (tagged by round) and DIR/checkpoints/ (the final classifier, a valid init_from
for quantize / prune / distill). A killed run resumes in the round (and at the step) it stopped.
"""
import ml_collections

from r1jax import configlib
from r1jax.compress import stage_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = configlib.parse_arg(arg, variant="base").variant
  configlib.check_variant(variant)
  config = ml_collections.ConfigDict()
  config.stage = "continual"
  config.seed = 0
  config.init_from = ""  # the finetuning workdir whose classifier the rounds update

  config.stream = ml_collections.ConfigDict(dict(
      rounds="",            # comma-separated rounds, or one directory whose sorted entries are them
      holdout_every=5,      # one-file round: row i is test if i % n == n-1, dev if n-2, else train
      text_field="text",    # field holding the text in the round files
      label_field="label",  # field holding the label(s)
      label_delimiter=",",  # multi-label: separator when a row's labels are one string
  ))
  # Forgetting control. Each term is switched off by its own key; all off = naive finetuning.
  # The defaults are what measured best on the embedded data (bench/NOTES_continual.md): replay
  # and LwF; the weight penalties cost both old and new classes there, so they are off.
  config.replay = ml_collections.ConfigDict(dict(
      enabled=True,         # train each round on its data plus the buffer's earlier examples
      size=3000,            # buffer capacity (reservoir sample of every earlier training example)
  ))
  config.regularize = ml_collections.ConfigDict(dict(
      method="none",        # pull toward the previous round's weights: ewc | l2sp | none
      weight=0.05,          # penalty weight / 2 * sum w_i (theta_i - previous_i)^2
      fisher_examples=256,  # ewc: buffer examples the diagonal Fisher (w, mean 1) is estimated on
  ))
  config.lwf = ml_collections.ConfigDict(dict(
      weight=1.0,           # distillation from the previous round's model on each batch; 0 = off
      temperature=2.0,      # softmax temperature of both models in that term
  ))
  config.drift = ml_collections.ConfigDict(dict(
      max_docs=500,         # incoming / earlier texts compared per round (evenly spaced)
  ))
  config.train = configlib.train_section(
      num_steps=-1, num_epochs=3.0, batch_size=32, learning_rate=1e-3, warmup_fraction=0.1,
      weight_decay=0.01, grad_clip_norm=1.0, label_smoothing=0.0, log_every_steps=20)
  # num_steps / num_epochs are per round (epochs over the round's data + the replayed examples).
  config.eval = configlib.eval_section(every_steps=100, num_batches=8, early_stopping_patience=0)
  config.checkpoint = configlib.checkpoint_section(every_steps=200, max_to_keep=1, keep_best=0)
  config.mesh = configlib.mesh_section()
  # The architecture is the init_from classifier's; the variant only picks these defaults.
  config.model = ml_collections.ConfigDict(dict(variant=variant))
  config.task = stage_lib.task_section()  # task 0's splits; "" = init_from's own
  config.report = ml_collections.ConfigDict(dict(
      naive_reference=True,  # also run the rounds with no forgetting control, side by side
      eval_batch_size=64,    # batch size of the test passes
  ))
  if variant == "tiny":
    config.train.learning_rate = 2e-3
    config.eval.every_steps = 64
    config.checkpoint.every_steps = 128
  return config
