r"""Domain-shift diagnostic for a pretrained checkpoint and two corpora (general, domain).

    python -m r1jax.main --config=configs/diagnose.py --workdir=DIR --config.init_from=PRETRAIN_DIR

Measured per corpus:
- MLM loss, perplexity (exp of the loss) and accuracy of the checkpoint on held-out documents
  (documents i with i % n == n - 1, n = the checkpoint's `data.eval_every_nth_doc`, so on the
  corpus it was trained on these are exactly the documents it never saw), streamed like pretraining
  (same segment length, masking rate, NSP pairs) with a fixed seed;
- tokenizer: unknown-piece rate ([UNK] plus byte-fallback pieces: characters the vocabulary has no
  piece for), pieces per whitespace word (how much the vocabulary fragments the text);
and between the corpora (on `max_docs` evenly spaced documents of each):
- piece overlap: share of the domain's distinct pieces (and of its piece occurrences) that also
  occur in the general corpus;
- word overlap: the same for lower-cased words, their Jaccard index, and the most frequent domain
  words the general corpus never uses.

The ratios domain / general (perplexity, unknown rate, pieces per word) summarise the shift; the
verdict line is a rule of thumb (`shift_level`, thresholds in the config): perplexity ratio >= 1.5
or word-occurrence coverage < 0.9 means a large shift (continued domain pretraining, DAPT, is
likely to pay), >= 1.15 a moderate one, and below 1 / 1.15 the checkpoint already models the
domain better than general text (adapted). Writes DIR/summary.json and DIR/report.md, and prints
the table; `measure` computes the same without writing (the pipeline's schedule=auto decides from
it whether to run domain pretraining).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
import re
from typing import Any, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import optax

from r1jax import configlib
from r1jax import eval as eval_lib
from r1jax import errors
from r1jax import run_dir
from r1jax.data import pretraining
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.model import axes
from r1jax.model import heads
from r1jax.model import losses
from r1jax.model import transformer_xl as txl
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import mesh as mesh_lib
from r1jax.train import steps as steps_lib

_WORD_RE = re.compile(r"\w+", re.UNICODE)
LARGE_PPL_RATIO, MODERATE_PPL_RATIO, LOW_WORD_COVERAGE = 1.5, 1.15, 0.9


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             process_count: int | None = None) -> configlib.Validator:
  """Checks values up front; `init_from` may be empty here (run() then asks for it)."""
  v = configlib.Validator(config)
  v.stage("diagnose")
  v.int_at_least("seed", 0)
  v.init_from("name a pretraining workdir")
  for key in ("general", "domain"):
    v.require(bool(v.string(key)), key, "is empty; name a corpus (path, glob or builtin:...).")
  v.int_at_least("held_out_every_nth", 2, allow=(-1,))
  v.int_at_least("max_docs", 0)
  v.int_at_least("top_missing", 0)
  v.int_at_least("seq_len", 8, allow=(-1,))
  batch = v.positive_int("batch_size")
  v.positive_int("num_batches")
  moderate = v.number_in("moderate_ppl_ratio", 0.0, 1e9, low_open=True)
  large = v.number_in("large_ppl_ratio", 0.0, 1e9, low_open=True)
  v.require(moderate is None or large is None or large >= moderate, "large_ppl_ratio",
            f"{large} is below moderate_ppl_ratio={moderate}; a large shift is at least a "
            "moderate one: raise it.")
  v.number_in("low_word_coverage", 0.0, 1.0)
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  try:
    shape = configlib.resolve_mesh_shape(config.mesh, num_devices)
    dp = shape[0] * shape[1]
    if batch and batch % (dp * process_count):
      v.add("batch_size", f"{batch} is not divisible by the data-parallel size {dp} (and "
            f"{process_count} processes); use a multiple of {dp * process_count}.")
  except configlib.ConfigError as e:
    v.add("mesh", str(e))
  v.raise_if_any("diagnose config")
  return v


# --------------------------------------------------------------------------------------------------
# Tokenizer and vocabulary statistics.


def sample_docs(texts: Sequence[str], max_docs: int) -> list[str]:
  """`max_docs` evenly spaced documents (all if max_docs is 0 or larger than the corpus)."""
  if not max_docs or len(texts) <= max_docs:
    return list(texts)
  idx = np.linspace(0, len(texts) - 1, max_docs).round().astype(int)
  return [texts[i] for i in idx]


def words_of(texts: Sequence[str]) -> collections.Counter:
  return collections.Counter(w.lower() for t in texts for w in _WORD_RE.findall(t))


def tokenizer_stats(tok: tokenizer_lib.Tokenizer, texts: Sequence[str]) -> dict[str, Any]:
  """Unknown-piece rate, byte-fallback rate, pieces per word and piece counts of `texts`."""
  ids = np.concatenate([np.asarray(x, np.int64) for x in tok.encode_batch(list(texts))] or
                       [np.zeros(0, np.int64)])
  is_byte = np.array([tok.sp.is_byte(i) for i in range(tok.vocab_size)], bool)
  n = max(int(ids.size), 1)
  unk = int((ids == tokenizer_lib.UNK_ID).sum())
  byte = int(is_byte[ids].sum())
  words = sum(len(t.split()) for t in texts)
  return {"docs": len(texts), "pieces": int(ids.size), "words": words,
          "unk_rate": unk / n, "byte_fallback_rate": byte / n,
          "unknown_piece_rate": (unk + byte) / n,
          "pieces_per_word": ids.size / max(words, 1),
          "_piece_counts": np.bincount(ids, minlength=tok.vocab_size)}


def overlap_stats(general_pieces: np.ndarray, domain_pieces: np.ndarray,
                  general_words: collections.Counter, domain_words: collections.Counter,
                  top_missing: int) -> dict[str, Any]:
  """Share of the domain's pieces / words (types and occurrences) that the general corpus has."""
  g_used, d_used = general_pieces > 0, domain_pieces > 0
  d_total_pieces = max(int(domain_pieces.sum()), 1)
  shared_words = domain_words.keys() & general_words.keys()
  d_total_words = max(sum(domain_words.values()), 1)
  missing = [(w, c) for w, c in domain_words.most_common() if w not in general_words]
  return {
      "piece_type_overlap": float((d_used & g_used).sum() / max(d_used.sum(), 1)),
      "piece_token_coverage": float(domain_pieces[g_used].sum() / d_total_pieces),
      "word_type_overlap": len(shared_words) / max(len(domain_words), 1),
      "word_token_coverage": sum(domain_words[w] for w in shared_words) / d_total_words,
      "word_jaccard": len(shared_words) / max(len(domain_words.keys() | general_words.keys()), 1),
      "domain_word_types": len(domain_words), "general_word_types": len(general_words),
      "top_missing_domain_words": [[w, c] for w, c in missing[:top_missing]],
  }


# --------------------------------------------------------------------------------------------------
# Held-out MLM loss.


def _checkpoint_settings(init_from: str) -> dict[str, Any]:
  path = os.path.join(init_from, run_dir.CONFIG_FILE)
  cfg = run_dir.read_json(path)
  if cfg is None:
    raise errors.InputNotFound(f"init_from={init_from!r} has no config.json; name the workdir of a "
                               "pretraining run.")
  data = cfg.get("data") or {}
  resolved = cfg.get("resolved") or {}
  variant = (cfg.get("model") or {}).get("variant")
  if variant not in txl.VARIANTS:
    raise errors.BadInput(f"{path}: model.variant={variant!r} is not one of "
                          f"{tuple(txl.VARIANTS)}; is this a pretraining workdir?")
  return {"variant": variant, "nsp": bool(data.get("nsp", True)),
          "mlm_prob": float(data.get("mlm_prob", 0.15)),
          "every_nth": int(data.get("eval_every_nth_doc", 50)),
          "seq_len": int(resolved.get("seq_len") or txl.SEGMENT_LEN[variant])}


class MLMEvaluator:
  """The checkpoint's PretrainModel on the shared engine, for held-out MLM metrics."""

  def __init__(self, init_from: str, tok: tokenizer_lib.Tokenizer, *, mesh_cfg: Any,
               batch_size: int, settings: dict[str, Any]):
    self.model_config = dataclasses.replace(run_dir.model_config_of(init_from),
                                            vocab_size=tok.vocab_size, dropout=0.0, dropatt=0.0)
    model = heads.PretrainModel(self.model_config)
    cfg = self.model_config

    def init_params(rng):
      tokens = np.zeros((1, 8), np.int32)
      return model.init({"params": rng}, tokens,
                        token_types=tokens if cfg.n_token_types else None)["params"]

    self.engine = steps_lib.Engine(
        mesh=mesh_lib.make_mesh(mesh_cfg), rules=axes.DEFAULT_RULES, tx=optax.set_to_zero(),
        init_params=init_params, init_extras=lambda: {"memory": txl.init_memory(cfg, batch_size)},
        loss_fn=losses.pretrain_loss_fn(model), batch_size=batch_size)
    self.params, self.step = ckpt_lib.restore_params(init_from,
                                                     self.engine.abstract_state().params)
    self.tok = tok
    self.batch_size = batch_size
    self.settings = settings

  def evaluate(self, texts: Sequence[str], *, seq_len: int, num_batches: int) -> dict[str, float]:
    s = self.settings
    batches = pretraining.pretrain_iterator(
        list(texts), self.tok, seq_len=seq_len, batch_size=self.batch_size, seed=0,
        mlm_prob=s["mlm_prob"], nsp=s["nsp"] and len(texts) > 1,
        process_index=jax.process_index(), process_count=jax.process_count())
    m = self.engine.evaluate(self.params, itertools.islice(batches, num_batches))
    out = {"mlm_loss": m["mlm_loss"], "perplexity": math.exp(min(m["mlm_loss"], 50.0)),
           "mlm_accuracy": m["mlm_accuracy"]}
    if "nsp_accuracy" in m:
      out["nsp_accuracy"] = m["nsp_accuracy"]
    return out


# --------------------------------------------------------------------------------------------------
# Entry point.


def shift_level(shift: dict[str, float], coverage: float, *, large: float = LARGE_PPL_RATIO,
                moderate: float = MODERATE_PPL_RATIO,
                low_coverage: float = LOW_WORD_COVERAGE) -> str:
  """How large the shift is for this checkpoint: "none" (perplexity ratio under 1 / `moderate`:
  it models the domain better), "large" (ratio >= `large` or word coverage < `low_coverage`),
  "moderate" (ratio >= `moderate`), else "small"."""
  ratio = shift["perplexity_ratio"]
  if ratio < 1.0 / moderate:
    return "none"
  if ratio >= large or coverage < low_coverage:
    return "large"
  return "moderate" if ratio >= moderate else "small"


def verdict(shift: dict[str, float], coverage: float, **thresholds: float) -> str:
  """One line: how large the shift is for this checkpoint, and what to do about it
  (`thresholds`: `shift_level`'s)."""
  ratio = shift["perplexity_ratio"]
  level = shift_level(shift, coverage, **thresholds)
  if level == "none":  # the model prefers the domain: adapted already
    return (f"no shift for this checkpoint: its domain perplexity is {ratio:.2f}x the general one "
            f"(it models the domain text better, e.g. after DAPT), although only {coverage:.1%} of "
            "domain word occurrences are general-corpus words; finetune directly.")
  advice = {"large": "continued domain pretraining (DAPT: configs/pretrain.py with init_from and "
                     "the domain corpus) is likely to pay off",
            "moderate": "DAPT may help; try finetuning first and compare",
            "small": "the general model already models the domain text; finetune directly"}
  return (f"{level} shift: domain perplexity is {ratio:.2f}x the general one and "
          f"{coverage:.1%} of domain word occurrences are general-corpus words; {advice[level]}.")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Diagnoses `config.init_from` on the two corpora; writes DIR/summary.json and DIR/report.md."""
  validate(config)
  if not config.init_from:
    raise configlib.ConfigError("init_from is empty; name the pretraining workdir to diagnose, "
                                "e.g. --config.init_from=/tmp/pretrain_tiny.")
  os.makedirs(workdir, exist_ok=True)
  summary = measure(config)
  text = report_text(summary)
  print(text)
  if jax.process_index() == 0:
    configlib.write_config_json(config, workdir, held_out_every_nth=summary["held_out_every_nth"],
                                seq_len=summary["seq_len"])
    with open(os.path.join(workdir, "report.md"), "w") as f:
      f.write(text)
    run_dir.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def measure(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The diagnostic of `config.init_from` (validated, set) on the two corpora, as summary.json
  holds it: per corpus, the shift ratios, the overlap, the `shift_level` and the verdict (with
  the config's thresholds); writes nothing."""
  init_from = os.path.expanduser(config.init_from)
  tok = tokenizer_lib.Tokenizer.load(run_dir.tokenizer_of(init_from))
  settings = _checkpoint_settings(init_from)
  every_nth = (config.held_out_every_nth if config.held_out_every_nth > 0
               else settings["every_nth"])
  seq_len = config.seq_len if config.seq_len > 0 else settings["seq_len"]
  evaluator = MLMEvaluator(init_from, tok, mesh_cfg=config.mesh, batch_size=config.batch_size,
                           settings=settings)

  results, pieces, words = {}, {}, {}
  for name in ("general", "domain"):
    texts = pretraining.resolve_texts(config[name])
    _, held = pretraining.split_documents(texts, every_nth)
    if not held:
      raise errors.BadInput(f"{name}={config[name]!r} has {len(texts)} documents: too few for a "
                            f"held-out set of every {every_nth}-th document; lower "
                            "held_out_every_nth.")
    sample = sample_docs(texts, config.max_docs)
    stats = tokenizer_stats(tok, sample)
    pieces[name] = stats.pop("_piece_counts")
    words[name] = words_of(sample)
    stats.update(evaluator.evaluate(held, seq_len=seq_len, num_batches=config.num_batches))
    stats.update(corpus=config[name], documents=len(texts), held_out_documents=len(held))
    results[name] = stats
    logging.info("%s: %s", name, {k: v for k, v in stats.items() if isinstance(v, float)})

  overlap = overlap_stats(pieces["general"], pieces["domain"], words["general"], words["domain"],
                          config.top_missing)
  g, d = results["general"], results["domain"]
  shift = {"perplexity_ratio": d["perplexity"] / g["perplexity"],
           "mlm_loss_difference": d["mlm_loss"] - g["mlm_loss"],
           "unknown_piece_rate_ratio": (d["unknown_piece_rate"] / g["unknown_piece_rate"]
                                        if g["unknown_piece_rate"] else math.inf),
           "pieces_per_word_ratio": d["pieces_per_word"] / g["pieces_per_word"]}
  summary = {"stage": "diagnose", "init_from": config.init_from, "checkpoint_step": evaluator.step,
             "model": settings["variant"], "seq_len": seq_len, "held_out_every_nth": every_nth,
             "eval_rows": config.num_batches * config.batch_size,
             "general": g, "domain": d, "overlap": overlap, "shift": shift}
  thresholds = {"large": config.large_ppl_ratio, "moderate": config.moderate_ppl_ratio,
                "low_coverage": config.low_word_coverage}
  coverage = overlap["word_token_coverage"]
  summary.update(level=shift_level(shift, coverage, **thresholds),
                 verdict=verdict(shift, coverage, **thresholds))
  return summary


def report_text(summary: dict[str, Any]) -> str:
  g, d, o = summary["general"], summary["domain"], summary["overlap"]
  rows = [(label, g[key], d[key], d[key] / g[key] if g[key] else math.nan)
          for label, key in (("MLM loss (held-out)", "mlm_loss"), ("perplexity", "perplexity"),
                             ("MLM accuracy", "mlm_accuracy"),
                             ("unknown-piece rate ([UNK] + bytes)", "unknown_piece_rate"),
                             ("[UNK] rate", "unk_rate"), ("pieces per word", "pieces_per_word"))]
  lines = [f"# Domain-shift diagnostic: `{summary['init_from']}` "
           f"(step {summary['checkpoint_step']})",
           "", f"general = `{g['corpus']}` ({g['documents']} docs, {g['held_out_documents']} "
           f"held out), domain = `{d['corpus']}` ({d['documents']} docs, {d['held_out_documents']} "
           "held out)", "",
           eval_lib.markdown_table(("", "general", "domain", "domain / general"), rows),
           eval_lib.markdown_table(("vocabulary overlap (domain vs general)", "value"), [
               ("distinct pieces shared", o["piece_type_overlap"]),
               ("piece occurrences covered", o["piece_token_coverage"]),
               ("distinct words shared", o["word_type_overlap"]),
               ("word occurrences covered", o["word_token_coverage"]),
               ("word Jaccard", o["word_jaccard"])]),
           "Most frequent domain words absent from the general corpus: " +
           (", ".join(f"{w} ({c})" for w, c in o["top_missing_domain_words"]) or "none"), "",
           f"**Verdict**: {summary['verdict']}", ""]
  return "\n".join(lines)
