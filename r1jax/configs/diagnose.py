r"""Domain-shift diagnostic: how different is the domain from what a checkpoint was pretrained on?

    python -m r1jax.main --config=configs/diagnose.py --workdir=/tmp/diag \
        --config.init_from=/tmp/pretrain_tiny
    # Your corpora (any input spec: paths, globs, builtin:..., tfds:...):
    ... --config.general=wiki/*.txt --config.domain=notes.jsonl

For each corpus: held-out MLM loss / perplexity / accuracy of the checkpoint, and the tokenizer's
unknown-piece ([UNK] + byte-fallback) rate and pieces per word; between them: piece and word
vocabulary overlap, and the most frequent domain words the general corpus never uses. Printed, and
saved to DIR/summary.json and DIR/report.md. Run it *before* domain adaptation: a large perplexity
ratio or a low word coverage says continued domain pretraining (DAPT) is worth its cost.
"""
import ml_collections

from r1jax import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # The variant only sizes the eval batch; the model always comes from the checkpoint.
  variant = configlib.parse_arg(arg, variant="base").variant
  configlib.check_variant(variant)
  config = ml_collections.ConfigDict()
  config.stage = "diagnose"
  config.seed = 0
  config.init_from = ""           # pretraining workdir to diagnose (checkpoint + tokenizer.model)
  config.general = "builtin:general"  # corpus the model was (or is assumed to be) pretrained on
  config.domain = "builtin:domain"    # the target domain corpus
  config.held_out_every_nth = -1  # MLM on docs i % n == n-1 (-1: the checkpoint's eval split)
  config.max_docs = 4000          # documents per corpus for tokenizer/overlap statistics (0 = all)
  config.top_missing = 25         # how many frequent domain words absent from general to list
  config.seq_len = -1             # MLM eval segment length; -1 = the checkpoint's
  config.batch_size = 32 if variant != "base" else 16  # MLM eval batch (global)
  config.num_batches = 16         # MLM eval batches per corpus
  # The verdict's thresholds (diagnose.shift_level): domain / general perplexity from which the
  # shift is moderate (DAPT may help; under 1 / this: none, the model prefers the domain text)
  config.moderate_ppl_ratio = 1.15
  config.large_ppl_ratio = 1.5     # domain / general perplexity from which the shift is large
  config.low_word_coverage = 0.9   # share of domain word occurrences in general text under which: large
  config.mesh = configlib.mesh_section()
  return config
