r"""Data pipeline throughput: Grain (0 and N workers) beside plain pandas, on the embedded corpus.

    python bench/data_throughput.py [--workers 2] [--docs 0] [--steps 100] [--out result.json]

Prints, in one run on the same documents:
  cleaning   documents/s of r1jax.data.clean (every rule of CleanConfig()) with 0 and N Grain
             workers, and of a pandas implementation of the same rules in the seed's style
             (drop_duplicates / fillna / .str methods, MinHash through .apply); kept counts are
             printed so the two can be checked to agree.
  examples   MLM + NSP rows/s of r1jax.data.examples with 0 and N workers, and of a pandas
             implementation (tokenize with .apply, per-row segment + masking with .apply) that
             builds the same kind of rows (not the streaming layout).
  training   rows/s the training step consumes, for scale: 3,580 tokens/s measured for a
             d_model 256, 4-layer, batch 32 x 128 MLM+NSP step on this kind of 2-core machine
             (shared/reference/libraries.md), i.e. about 28 rows/s of 128 tokens.

Measured 2026-11-28 on the 2-core development machine while other jobs ran (load average 10-14,
so absolute numbers are low and noisy; run it on a quiet machine for real figures):
  cleaning  18,127 docs: Grain 0 workers 784 docs/s, 2 workers 584, pandas 761 (all kept 18,068);
            an earlier run at load ~2: Grain 3,088, 2 workers 1,875, pandas 1,625.
  examples  Grain 0 workers 2,615 rows/s, 2 workers 2,016, pandas 1,618: about 90x what the
            training step consumes.
Workers did not pay off on 2 shared cores: they add pickling and compete with the main process
(deduplication, report) for the same cores; the design targets hosts with spare cores.
"""
import argparse
import json
import os
import re
import sys
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from r1jax.data import builtin  # pylint: disable=g-import-not-at-top,wrong-import-position
from r1jax.data import clean  # pylint: disable=wrong-import-position
from r1jax.data import examples  # pylint: disable=wrong-import-position
from r1jax.data import sources  # pylint: disable=wrong-import-position
from r1jax.data import tokenizer as tokenizer_lib  # pylint: disable=wrong-import-position

TRAIN_STEP_TOKENS_PER_SEC = 3580  # shared/reference/libraries.md, same-size step on this machine


# ------------------------------------------------------------------------------------------------
# pandas reference: the same rules as clean.CleanConfig() defaults, written as the seed writes them.


def pandas_clean(df: pd.DataFrame, config: clean.CleanConfig) -> pd.DataFrame:
  """Seed-style cleaning of a DataFrame with a 'text' column; returns the kept rows."""
  df = df.dropna(subset=["text"])
  for col in df.select_dtypes(include=["float64", "int64"]).columns:
    df[col] = df[col].fillna(df[col].median())
  for col in df.select_dtypes(include=["object"]).columns:
    if col != "text" and df[col].isna().any():
      df[col] = df[col].fillna(df[col].mode()[0])
  text = df["text"].str.normalize("NFKC")
  text = text.str.replace(clean._control_chars_re(), "", regex=True)  # pylint: disable=protected-access
  text = text.str.replace("\r\n", "\n", regex=False).str.replace(r"[^\S\n]+", " ", regex=True)
  text = text.str.replace(clean._CJK_SPACE_RE, "", regex=True)  # pylint: disable=protected-access
  text = text.str.split("\n").apply(lambda lines: "\n".join(l.strip() for l in lines))
  text = text.str.replace(r"\n{3,}", "\n\n", regex=True).str.strip()
  df = df.assign(text=text)
  # Filters, in the same order as the Grain pipeline.
  fillers = {clean._reply_key(r) for r in config.meaningless_replies}  # pylint: disable=protected-access
  short = df["text"].str.len() <= 200
  keys = df["text"].where(short, "").apply(clean._reply_key)  # pylint: disable=protected-access
  meaningless = short & (keys.isin(fillers) | ((df["text"].str.len() >= 4) & df["text"].str.replace(
      " ", "").apply(lambda t: len(set(t)) <= 2)))
  df = df[~meaningless]
  content = df["text"].str.len() - df["text"].str.count(r"[\W_]")
  df = df[content >= config.min_chars]
  url_chars = df["text"].str.findall(clean._URL_RE).apply(lambda m: sum(map(len, m)))  # pylint: disable=protected-access
  df = df[url_chars / df["text"].str.replace(" ", "").str.len().clip(lower=1) <=
          config.max_url_fraction]
  words = df["text"].apply(clean.word_count).clip(lower=1.0)
  contacts = sum(df["text"].str.count(r) for r in clean._CONTACT_RES)  # pylint: disable=protected-access
  df = df[~((contacts >= 3) & (100.0 * contacts / words > config.max_contact_density))]
  chars = (df["text"].str.len() - df["text"].str.count(r"\s")).clip(lower=1)
  symbols = df["text"].str.count(clean._SYMBOL_RE)  # pylint: disable=protected-access
  df = df[symbols / chars <= config.max_symbol_fraction]

  def repetition(t):
    units = clean._UNIT_RE.findall(t.lower())  # pylint: disable=protected-access
    total = len(units) - 2
    return 0.0 if total < 10 else 1.0 - len({tuple(units[i:i + 3]) for i in range(total)}) / total

  df = df[df["text"].apply(repetition) <= config.max_repetition]
  lowered = df["text"].str.lower()
  hits = sum(lowered.str.count(re.escape(p.lower())) for p in config.spam_phrases)
  df = df[~((hits >= config.max_phrase_hits) |
            ((hits > 0) & (df["text"].apply(clean.word_count) < 20)))]
  df = df.assign(_key=df["text"].str.lower().str.split().str.join(" "))
  df = df.drop_duplicates(subset="_key").drop(columns="_key")
  # Near duplicates: MinHash per row with .apply, then LSH in a plain loop.
  signer = clean.MinHashSignature(config.num_perm, config.shingle_size, config.seed)
  signatures = df["text"].apply(signer.signature)
  lsh = clean.NearDedup(config.near_dup_threshold, config.num_perm)
  keep = [not lsh.map({"text": t, "_minhash": s.tobytes()}).get("_drop")
          for t, s in zip(df["text"], signatures)]
  return df[keep]


def pandas_examples(texts, tok, *, seq_len, mlm_prob, seed, n_rows):
  """MLM + NSP rows built with pandas .apply: one [CLS] A [SEP] B [SEP] row per document."""
  rng = np.random.default_rng(seed)
  df = pd.DataFrame({"text": texts[:n_rows]})
  df["ids"] = df["text"].apply(tok.encode)
  content = seq_len - 3

  def row(ids):
    n = min(len(ids), content)
    label = int(rng.random() < 0.5) if n >= 2 else 1
    len_a = int(rng.integers(1, max(2, n)))
    a = ids[:len_a]
    if label == 0:
      b = ids[len_a:n]
    else:
      other = tok.encode(texts[int(rng.integers(len(texts)))])
      b = other[:content - len(a)]
    tokens = np.array([tokenizer_lib.CLS_ID, *a, tokenizer_lib.SEP_ID, *b, tokenizer_lib.SEP_ID])
    cand = np.flatnonzero((tokens != tokenizer_lib.CLS_ID) & (tokens != tokenizer_lib.SEP_ID))
    k = int(round(len(cand) * mlm_prob))
    pos = np.sort(rng.choice(cand, k, replace=False)) if k else np.zeros(0, int)
    u = rng.random(k)
    masked = tokens.copy()
    masked[pos[u < 0.8]] = tokenizer_lib.MASK_ID
    rand = (u >= 0.8) & (u < 0.9)
    masked[pos[rand]] = rng.integers(tokenizer_lib.NUM_SPECIAL, tok.vocab_size, rand.sum())
    out = np.zeros(seq_len, np.int32)
    out[:len(masked)] = masked
    return out, pos, tokens[pos], label

  rows = df["ids"].apply(row)
  return np.stack([r[0] for r in rows]), len(rows)


# ------------------------------------------------------------------------------------------------


def _timed(fn):
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


def bench_cleaning(workers, limit):
  src = sources.open_source("builtin:general,builtin:domain")
  n = len(src) if not limit else min(limit, len(src))
  # Text and id only: the two implementations then see the same table (the corpora's other
  # metadata differs between them and includes lists, which pandas' fillna cannot take).
  records = [{"text": r["text"], "id": r["id"], "_file": r["_file"], "_line": r["_line"]}
             for r in (src[i] for i in range(n))]
  config = clean.CleanConfig()
  results = {}
  for w in sorted({0, workers}):
    def run():
      report = clean.CleaningReport(clean.rule_names(config))
      kept = sum(1 for r in map(report.add, clean.cleaning_dataset(records, config, worker_count=w))
                 if not r.get("_drop"))
      return kept
    kept, seconds = _timed(run)
    results[f"grain_workers_{w}"] = {"docs_per_sec": n / seconds, "kept": kept, "seconds": seconds}
  df = pd.DataFrame([sources.public_fields(r) for r in records])
  kept, seconds = _timed(lambda: len(pandas_clean(df, config)))
  results["pandas"] = {"docs_per_sec": n / seconds, "kept": kept, "seconds": seconds}
  return n, results


def bench_examples(workers, steps, seq_len, batch_size):
  texts = builtin.texts("general") + builtin.texts("domain")
  tok = tokenizer_lib.Tokenizer.train(texts, 8000)
  results = {}
  for w in sorted({0, workers}):
    it = examples.pretrain_iterator(texts, tok, seq_len=seq_len, batch_size=batch_size, seed=0,
                                    worker_count=w)
    next(it)  # start-up (worker processes) not counted
    _, seconds = _timed(lambda: [next(it) for _ in range(steps)])
    if hasattr(it, "close"):
      it.close()
    results[f"grain_workers_{w}"] = {"rows_per_sec": steps * batch_size / seconds,
                                     "seconds": seconds}
  n_rows = steps * batch_size
  (_, built), seconds = _timed(lambda: pandas_examples(texts, tok, seq_len=seq_len,
                                                       mlm_prob=0.15, seed=0, n_rows=n_rows))
  results["pandas"] = {"rows_per_sec": built / seconds, "seconds": seconds}
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, default=2, help="Grain worker processes to compare")
  parser.add_argument("--docs", type=int, default=0, help="limit documents for cleaning (0 = all)")
  parser.add_argument("--steps", type=int, default=100, help="example batches to time")
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--out", default="", help="also write the numbers as JSON here")
  args = parser.parse_args()
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()

  n, cleaning = bench_cleaning(args.workers, args.docs)
  print(f"cleaning ({n} documents, {os.cpu_count()} CPUs)")
  for name, r in cleaning.items():
    print(f"  {name:18s} {r['docs_per_sec']:9.0f} docs/s   kept {r['kept']}")
  ex = bench_examples(args.workers, args.steps, args.seq_len, args.batch_size)
  train_rows = TRAIN_STEP_TOKENS_PER_SEC / args.seq_len
  print(f"MLM+NSP examples (seq_len {args.seq_len}, batch {args.batch_size})")
  for name, r in ex.items():
    print(f"  {name:18s} {r['rows_per_sec']:9.0f} rows/s   ({r['rows_per_sec'] / train_rows:.0f}x "
          f"the training step)")
  print(f"  training step      {train_rows:9.0f} rows/s   (libraries.md: "
        f"{TRAIN_STEP_TOKENS_PER_SEC} tokens/s)")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"cleaning": cleaning, "examples": ex, "train_rows_per_sec": train_rows,
                 "documents": n, "cpus": os.cpu_count()}, f, indent=2)


if __name__ == "__main__":
  main()
