r"""Data pipeline throughput: Grain (0, 1 and 2 workers) beside plain pandas, on the embedded corpus.

    python bench/data_throughput.py [--workers 1,2] [--repeats 3] [--docs 0] [--steps 500]
                                    [--sections cleaning,examples,beam] [--out result.json]

Prints, in one run on the same documents, every configuration `--repeats` times in rotating order
(each run on its own line, with the load average at its start), then the medians:
  cleaning   documents/s of r1jax.data.clean (every rule of CleanConfig()) with 0 and N Grain
             workers, and of a pandas implementation of the same rules in the seed's style
             (drop_duplicates / fillna / .str methods, MinHash through .apply); kept counts are
             printed so the two can be checked to agree (and the Grain reports must be equal).
             The rate is the steady one, over documents 129-18,127 for every configuration:
             worker start-up (spawn, imports, first chunks: until document 128 is out) and
             shutdown (after the last document, until Grain has stopped its workers) are shown
             separately; end-to-end includes both.
  examples   MLM + NSP rows/s of r1jax.data.pretraining with 0 and N workers over `--steps` batches
             after the first (the first batch, with the workers' start-up, is timed apart), and of
             a pandas implementation (tokenize with .apply, per-row segment + masking with .apply)
             that builds the same kind of rows (not the streaming layout). Batches must be equal
             for every worker count (checked).
  cpu        per document / row: CPU of the main process and of the workers (from /proc) over
             the steady part, and the workers' start-up CPU: figures that other jobs' load
             barely moves.
  beam       (section `beam`, the [beam] extra) the same cleaning as an Apache Beam pipeline on its
             local runner with 2 worker processes, beside Grain with 0 and 2 workers, on the
             embedded corpus and on a generated messy one (duplicates, near duplicates, invalid
             UTF-8, terminal escapes, mojibake): wall-clock documents/s end to end (start-up
             included), CPU seconds of every process (this one and its children, from getrusage)
             and documents per CPU-second ("per core"); kept documents and reports must be equal
             (checked). bench/NOTES_cleaning_scale.md has the figures.
  training   rows/s the training step consumes, for scale: 8,254 tokens/s, r1jax's d_model 256,
             4-layer, batch 32 x 128 MLM+NSP step on this 2-core machine (bench/train_throughput.py,
             2 threads, 2026-11-28), i.e. about 64 rows/s of 128 tokens.

Measured 2026-11-28 17:06-17:09 on the 2-core development machine, no other process above 20% of
a core during the run (sampled every 3 s), load average 1.6 at the start (earlier jobs decaying)
and 0.6 at the end; medians of 3:
  cleaning  18,127 docs: Grain 0 workers 4,123 docs/s, 1 worker 4,236 (x1.03), 2 workers 8,114
            (x1.97); pandas 2,646; all kept 18,068. Start-up 0.85-1.0 s and shutdown 0.7-0.8 s
            with workers, so end-to-end on this small corpus: 3,961 / 3,132 / 4,643 docs/s.
            CPU per document: 236-247 us in one process; with 2 workers 14-19 us in the main
            process and 222-238 us in the workers (1.4-1.5 s of worker start-up CPU).
  examples  Grain 0 workers 7,468 rows/s, 1 worker 7,801 (x1.04), 2 workers 14,051 (x1.88);
            pandas 6,285; about 220x what the training step consumes. Start-up 0.65-0.9 s with
            workers. CPU per row: 124-143 us in one process; with 2 workers 5-6 us in the main
            process and 131-133 us in the workers.
Two more quiet runs the same afternoon: cleaning x1.86 and x1.79, examples x1.74 and x1.78 with 2
workers. With other jobs on the machine (load 1.0-2.8, another process using 1-1.5 cores) the
workers lose (cleaning x0.75-0.84, examples x0.78-0.94): there is no idle core for them, and they
cost as much CPU per document as one process does, plus their start-up. One worker gains at most
the main process's share of the work (~5%: x0.98-1.04 steady, slower end-to-end): it does what one
process would, at the same cost. See bench/NOTES_data.md.
"""
import argparse
import json
import multiprocessing
import os
import re
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from r1jax.data import builtin  # pylint: disable=g-import-not-at-top,wrong-import-position
from r1jax.data import clean  # pylint: disable=wrong-import-position
from r1jax.data import clean_grain  # pylint: disable=wrong-import-position
from r1jax.data import clean_steps  # pylint: disable=wrong-import-position
from r1jax.data import dedup  # pylint: disable=wrong-import-position
from r1jax.data import pretraining  # pylint: disable=wrong-import-position
from r1jax.data import readers  # pylint: disable=wrong-import-position
from r1jax.data import sources  # pylint: disable=wrong-import-position
from r1jax.data import tokenizer as tokenizer_lib  # pylint: disable=wrong-import-position

TRAIN_STEP_TOKENS_PER_SEC = 8254  # bench/train_throughput.py, r1jax MLM+NSP small step, 2 threads


# ------------------------------------------------------------------------------------------------
# pandas reference: the same rules as clean.CleanConfig() defaults, written as the seed writes them.


def pandas_clean(df, config: clean.CleanConfig):
  """Seed-style cleaning of a pandas DataFrame with a 'text' column; returns the kept rows."""
  df = df.dropna(subset=["text"])
  for col in df.select_dtypes(include=["float64", "int64"]).columns:
    df[col] = df[col].fillna(df[col].median())
  for col in df.select_dtypes(include=["object"]).columns:
    if col != "text" and df[col].isna().any():
      df[col] = df[col].fillna(df[col].mode()[0])
  text = df["text"].str.normalize("NFKC")
  text = text.str.replace(clean_steps._control_chars_re(), "", regex=True)  # pylint: disable=protected-access
  text = text.str.replace("\r\n", "\n", regex=False).str.replace(r"[^\S\n]+", " ", regex=True)
  text = text.str.replace(clean_steps._CJK_SPACE_RE, "", regex=True)  # pylint: disable=protected-access
  text = text.str.split("\n").apply(lambda lines: "\n".join(l.strip() for l in lines))
  text = text.str.replace(r"\n{3,}", "\n\n", regex=True).str.strip()
  df = df.assign(text=text)
  # Filters, in the same order as the Grain pipeline.
  fillers = {clean_steps._reply_key(r) for r in config.meaningless_replies}  # pylint: disable=protected-access
  short = df["text"].str.len() <= 200
  keys = df["text"].where(short, "").apply(clean_steps._reply_key)  # pylint: disable=protected-access
  meaningless = short & (keys.isin(fillers) | ((df["text"].str.len() >= 4) & df["text"].str.replace(
      " ", "").apply(lambda t: len(set(t)) <= 2)))
  df = df[~meaningless]
  content = df["text"].str.len() - df["text"].str.count(r"[\W_]")
  df = df[content >= config.min_chars]
  url_chars = df["text"].str.findall(clean_steps._URL_RE).apply(lambda m: sum(map(len, m)))  # pylint: disable=protected-access
  df = df[url_chars / df["text"].str.replace(" ", "").str.len().clip(lower=1) <=
          config.max_url_fraction]
  words = df["text"].apply(clean_steps.word_count).clip(lower=1.0)
  contacts = sum(df["text"].str.count(r) for r in clean_steps._CONTACT_RES)  # pylint: disable=protected-access
  df = df[~((contacts >= 3) & (100.0 * contacts / words > config.max_contact_density))]
  chars = (df["text"].str.len() - df["text"].str.count(r"\s")).clip(lower=1)
  symbols = df["text"].str.count(clean_steps._SYMBOL_RE)  # pylint: disable=protected-access
  df = df[symbols / chars <= config.max_symbol_fraction]

  def repetition(t):
    units = clean_steps._UNIT_RE.findall(t.lower())  # pylint: disable=protected-access
    total = len(units) - 2
    return 0.0 if total < 10 else 1.0 - len({tuple(units[i:i + 3]) for i in range(total)}) / total

  df = df[df["text"].apply(repetition) <= config.max_repetition]
  lowered = df["text"].str.lower()
  hits = sum(lowered.str.count(re.escape(p.lower())) for p in config.spam_phrases)
  df = df[~((hits >= config.max_phrase_hits) |
            ((hits > 0) & (df["text"].apply(clean_steps.word_count) < 20)))]
  df = df.assign(_key=df["text"].str.lower().str.split().str.join(" "))
  df = df.drop_duplicates(subset="_key").drop(columns="_key")
  # Near duplicates: MinHash per row with .apply, then LSH in a plain loop.
  signer = dedup.MinHashSignature(config.num_perm, config.shingle_size, config.seed)
  signatures = df["text"].apply(signer.signature)
  lsh = dedup.NearDedup(config.near_dup_threshold, config.num_perm)
  keep = [not lsh.map({"text": t, "_minhash": s.tobytes()}).get("_drop")
          for t, s in zip(df["text"], signatures)]
  return df[keep]


def pandas_examples(texts, tok, *, seq_len, mlm_prob, seed, n_rows):
  """MLM + NSP rows built with pandas .apply: one [CLS] A [SEP] B [SEP] row per document."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
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
# Measurements. Every configuration runs `repeats` times, in rotating order, so that the load of
# other jobs on a shared machine falls on all of them alike; each run is printed with the load
# average at its start.


def _timed(fn):
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


def _load():
  return os.getloadavg()[0]


def _main_cpu():
  """CPU seconds of this process (all its threads)."""
  me = resource.getrusage(resource.RUSAGE_SELF)
  return me.ru_utime + me.ru_stime


def _worker_cpu():
  """CPU seconds used so far by the live Grain worker processes (this process's only
  multiprocessing children), from /proc; 0.0 where /proc is missing."""
  total = 0.0
  for child in multiprocessing.active_children():
    try:
      with open(f"/proc/{child.pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, IndexError, ValueError):
      pass
  return total


def _rotations(items, repeats):
  """[(repeat, item)]: each repeat starts one item later, so no item always runs first or last."""
  return [(r, items[(i + r) % len(items)]) for r in range(repeats) for i in range(len(items))]


def clean_run(records, config, workers, warmup):
  """One Grain cleaning pass over `records`.

  Three phases, timed separately: start-up (until the first `warmup` records are out: spawning
  the workers, their imports, their first chunks), steady (until the last record is out; the rate
  is taken here) and shutdown (until the iterator ends: Grain stops each worker process in turn,
  and a finished worker sleeps up to 0.5 s before it looks for the stop signal). End-to-end
  covers all three.
  """
  load = _load()
  report = clean.CleaningReport(clean.rule_names(config))
  n = len(records)
  start = time.perf_counter()
  it = iter(clean_grain.cleaning_dataset(records, config, worker_count=workers))
  kept = 0
  for i, record in enumerate(it):
    if i == warmup:
      warm, main_warm, workers_warm = time.perf_counter(), _main_cpu(), _worker_cpu()
    kept += not report.add(record).get("_drop")
    if i == n - 1:
      last, main_last, workers_last = time.perf_counter(), _main_cpu(), _worker_cpu()
  end = time.perf_counter()
  it.close()
  steady = n - 1 - warmup
  return {"workers": workers, "docs_per_sec": steady / (last - warm),
          "startup_s": warm - start, "shutdown_s": end - last,
          "end_to_end_docs_per_sec": n / (end - start),
          "main_cpu_us_per_doc": 1e6 * (main_last - main_warm) / steady,
          "worker_cpu_us_per_doc": 1e6 * (workers_last - workers_warm) / steady,
          "worker_startup_cpu_s": workers_warm, "kept": kept,
          "report": report.to_dict()["dropped"], "load": load}


def bench_cleaning(worker_counts, limit, repeats):
  src = sources.open_source("builtin:general,builtin:domain")
  n = len(src) if not limit else min(limit, len(src))
  # Text and id only: the two implementations then see the same table (the corpora's other
  # metadata differs between them and includes lists, which pandas' fillna cannot take).
  records = [{"text": r["text"], "id": r["id"], "_file": r["_file"], "_line": r["_line"]}
             for r in (src[i] for i in range(n))]
  config = clean.CleanConfig()
  # Start-up: until every worker has delivered its first chunk; the same records are left out of
  # every configuration's steady rate, so all rates cover the same documents.
  warmup = clean_grain.CHUNK_SIZE * max(1, *worker_counts)
  if n <= warmup:
    raise ValueError(f"--docs {n} leaves nothing to time after the {warmup} start-up documents.")
  import pandas as pd  # pylint: disable=g-import-not-at-top
  df = pd.DataFrame([readers.public_fields(r) for r in records])
  runs = []
  for _, w in _rotations(list(worker_counts) + ["pandas"], repeats):
    if w == "pandas":
      load = _load()
      kept, seconds = _timed(lambda: len(pandas_clean(df.copy(), config)))
      runs.append({"workers": "pandas", "docs_per_sec": n / seconds, "startup_s": 0.0,
                   "shutdown_s": 0.0, "end_to_end_docs_per_sec": n / seconds, "kept": kept,
                   "load": load})
    else:
      runs.append(clean_run(records, config, w, warmup))
    _print_clean_run(runs[-1])
  reports = {json.dumps(r["report"], sort_keys=True) for r in runs if "report" in r}
  assert len(reports) == 1, "the report differs between worker counts"
  return n, warmup, runs


def examples_run(texts, tok, workers, steps, seq_len, batch_size):
  """One Grain example stream: start-up (first batch) and steady rows/s over `steps` batches."""
  load = _load()
  start = time.perf_counter()
  it = pretraining.pretrain_iterator(texts, tok, seq_len=seq_len, batch_size=batch_size, seed=0,
                                     worker_count=workers)
  first = next(it)
  warm, main_warm, workers_warm = time.perf_counter(), _main_cpu(), _worker_cpu()
  for _ in range(steps):
    last = next(it)
  end, main_end, workers_end = time.perf_counter(), _main_cpu(), _worker_cpu()
  it.close()
  rows = steps * batch_size
  return {"workers": workers, "rows_per_sec": rows / (end - warm), "startup_s": warm - start,
          "main_cpu_us_per_row": 1e6 * (main_end - main_warm) / rows,
          # Workers build ahead (a few messages each), so this is close to, not exactly, per row.
          "worker_cpu_us_per_row": 1e6 * (workers_end - workers_warm) / rows,
          "worker_startup_cpu_s": workers_warm, "load": load,
          "checksum": int(first["tokens"].sum()) + int(last["mlm_ids"].sum())}


def bench_examples(worker_counts, steps, seq_len, batch_size, repeats):
  texts = builtin.texts("general") + builtin.texts("domain")
  tok = tokenizer_lib.Tokenizer.train(texts, 8000)
  runs = []
  n_rows = steps * batch_size
  for _, w in _rotations(list(worker_counts) + ["pandas"], repeats):
    if w == "pandas":
      load = _load()
      (_, built), seconds = _timed(lambda: pandas_examples(texts, tok, seq_len=seq_len,
                                                           mlm_prob=0.15, seed=0, n_rows=n_rows))
      runs.append({"workers": "pandas", "rows_per_sec": built / seconds, "startup_s": 0.0,
                   "load": load})
    else:
      runs.append(examples_run(texts, tok, w, steps, seq_len, batch_size))
    _print_examples_run(runs[-1])
  checksums = {r["checksum"] for r in runs if "checksum" in r}
  assert len(checksums) == 1, "the batches differ between worker counts"
  return runs


def messy_corpus(path, n_docs, seed=0):
  """Writes a JSONL corpus of about n_docs documents drawn from the embedded corpus, with exact
  duplicates (5%), near duplicates (one word changed, 5%), invalid UTF-8 (2%), terminal colour codes
  (2%, half without their ESC), mojibake and HTML entities (2%); returns the path."""
  rng = np.random.default_rng(seed)
  texts = builtin.texts("general") + builtin.texts("domain")
  lines, written = [], []
  for i in range(n_docs):
    u = rng.random()
    if u < 0.05 and written:
      text = written[int(rng.integers(len(written)))].upper()
    elif u < 0.10 and written:
      words = written[int(rng.integers(len(written)))].split()
      words[int(rng.integers(len(words)))] = "changed"
      text = " ".join(words)
    else:
      text = texts[i % len(texts)] + ("" if i < len(texts) else f" Part {i // len(texts)}.")
      written.append(text)
    v = rng.random()
    if v < 0.02:
      line = json.dumps({"text": text, "id": i}).encode().replace(b'"text": "', b'"text": "\xff', 1)
    elif v < 0.03:
      line = json.dumps({"text": f"\x1b[1;3{i % 8}m{text}\x1b[0m", "id": i}).encode()
    elif v < 0.04:
      line = json.dumps({"text": f"[37;1m{text}[;m[33m", "id": i}).encode()
    elif v < 0.06:
      line = json.dumps({"text": text.replace(" a ", " cafÃ© &amp; "), "id": i}).encode()
    else:
      line = json.dumps({"text": text, "id": i}, ensure_ascii=False).encode()
    lines.append(line)
  with open(path, "wb") as f:
    f.write(b"\n".join(lines) + b"\n")
  return path


def _cpu_all():
  """CPU seconds of this process and of its finished children (Grain and Beam workers)."""
  me = resource.getrusage(resource.RUSAGE_SELF)
  kids = resource.getrusage(resource.RUSAGE_CHILDREN)
  return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def engine_run(spec, config, engine, workers, tmp):
  """One cleaning pass end to end: -> (kept public records in order, report dict, stats)."""
  from r1jax.data import clean_beam  # pylint: disable=g-import-not-at-top
  load, start, cpu = _load(), time.perf_counter(), _cpu_all()
  src = sources.open_source(spec)
  if engine == "grain":
    report = clean.CleaningReport(clean.rule_names(config))
    kept = [readers.public_fields(r) for r in map(report.add, clean_grain.cleaning_dataset(
        src, config, worker_count=workers)) if not r.get("_drop")]
  else:
    out = os.path.join(tmp, f"beam-{time.time_ns()}")
    report = clean_beam.clean_with_beam(src, config, out, num_workers=workers,
                                        reopen=sources.reopener(spec))
    kept = [readers.public_fields(r) for r in clean_beam.records_in_order(out)]
  seconds, cpu = time.perf_counter() - start, _cpu_all() - cpu
  n = report.documents_in
  return kept, report.to_dict(), {"engine": engine, "workers": workers, "seconds": seconds,
                                  "docs_per_sec": n / seconds, "cpu_s": cpu,
                                  "docs_per_cpu_s": n / cpu, "load": load, "documents": n}


def bench_beam(repeats, messy_docs):
  import tempfile  # pylint: disable=g-import-not-at-top
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    corpora = {"embedded": "builtin:general,builtin:domain",
               "messy": messy_corpus(os.path.join(tmp, "messy.jsonl"), messy_docs)}
    config = clean.CleanConfig()
    for name, spec in corpora.items():
      runs, outputs = [], set()
      for _, (engine, w) in _rotations([("grain", 0), ("grain", 2), ("beam", 2)], repeats):
        kept, report, stats = engine_run(spec, config, engine, w, tmp)
        outputs.add(json.dumps([kept, report], sort_keys=True))
        stats["kept"] = report["documents_out"]
        runs.append(stats)
        print(f"    run  {name:8s} {engine}_workers_{w}  {stats['docs_per_sec']:7.0f} docs/s   "
              f"cpu {stats['cpu_s']:6.1f} s   {stats['docs_per_cpu_s']:6.0f} docs/cpu-s   kept "
              f"{stats['kept']}   load {stats['load']:.2f}", flush=True)
      assert len(outputs) == 1, f"{name}: kept documents or reports differ between engines"
      results[name] = runs
      print(f"  {name}: kept documents and reports identical across engines "
            f"({runs[0]['documents']} in, {runs[0]['kept']} kept; dropped "
            f"{ {k: v for k, v in json.loads(outputs.pop())[1]['dropped'].items() if v} })")
      for key, label in (("docs_per_sec", "docs/s"), ("docs_per_cpu_s", "docs/cpu-s")):
        by = {}
        for r in runs:
          by.setdefault(f"{r['engine']}_workers_{r['workers']}", []).append(r[key])
        med = {k: float(np.median(v)) for k, v in by.items()}
        ratio = med["beam_workers_2"] / med["grain_workers_0"]
        print(f"  {name} {label:10s} " + "   ".join(f"{k} {v:7.0f}" for k, v in med.items()) +
              f"   beam/grain_0 x{ratio:.2f}")
  return results


def _name(w):
  return "pandas" if w == "pandas" else f"grain_workers_{w}"


def _cpu_text(r, unit):
  if f"main_cpu_us_per_{unit}" not in r:
    return ""
  return (f"   cpu us/{unit}: main {r[f'main_cpu_us_per_{unit}']:3.0f} workers "
          f"{r[f'worker_cpu_us_per_{unit}']:3.0f} (start-up {r['worker_startup_cpu_s']:.1f} s)")


def _print_clean_run(r):
  print(f"    run  {_name(r['workers']):16s} {r['docs_per_sec']:7.0f} docs/s   start-up "
        f"{r['startup_s']:4.2f} s   shutdown {r['shutdown_s']:4.2f} s   end-to-end "
        f"{r['end_to_end_docs_per_sec']:6.0f} docs/s   "
        f"kept {r['kept']}   load {r['load']:.2f}{_cpu_text(r, 'doc')}", flush=True)


def _print_examples_run(r):
  print(f"    run  {_name(r['workers']):16s} {r['rows_per_sec']:7.0f} rows/s   start-up "
        f"{r['startup_s']:4.2f} s   load {r['load']:.2f}{_cpu_text(r, 'row')}", flush=True)


def summarize(runs, key):
  """{config: median of `key` over its runs}, in first-seen order."""
  by = {}
  for r in runs:
    by.setdefault(r["workers"], []).append(r[key])
  return {w: float(np.median(v)) for w, v in by.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", default="1,2",
                      help="Grain worker counts to compare with 0 workers (comma-separated)")
  parser.add_argument("--repeats", type=int, default=3, help="runs of every configuration")
  parser.add_argument("--docs", type=int, default=0, help="limit documents for cleaning (0 = all)")
  parser.add_argument("--steps", type=int, default=500, help="example batches to time")
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--sections", default="cleaning,examples",
                      help="cleaning, examples, beam (comma-separated)")
  parser.add_argument("--messy_docs", type=int, default=20000,
                      help="documents of the generated messy corpus (section beam)")
  parser.add_argument("--out", default="", help="also write the numbers as JSON here")
  args = parser.parse_args()
  sections = set(args.sections.split(","))
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  worker_counts = [0] + sorted({int(w) for w in args.workers.split(",") if int(w) > 0})

  print(f"{os.cpu_count()} CPUs; load average at start {_load():.2f}; rates exclude worker "
        "start-up (spawn + imports + first chunk or batch) and shutdown, shown separately; "
        "end-to-end includes them")
  result = {"cpus": os.cpu_count()}
  rates = ex_rates = {}
  if "cleaning" in sections:
    n, warmup, clean_runs = bench_cleaning(worker_counts, args.docs, args.repeats)
    rates = summarize(clean_runs, "docs_per_sec")
    e2e = summarize(clean_runs, "end_to_end_docs_per_sec")
    startup = summarize(clean_runs, "startup_s")
    shutdown = summarize(clean_runs, "shutdown_s")
    print(f"cleaning ({n} documents; steady rate over documents {warmup + 1}-{n}; median of "
          f"{args.repeats} runs)")
    for w, rate in rates.items():
      extra = f"   x{rate / rates[0]:.2f} vs 0 workers" if w not in (0, "pandas") else ""
      print(f"  {_name(w):18s} {rate:9.0f} docs/s   start-up {startup[w]:4.2f} s   shutdown "
            f"{shutdown[w]:4.2f} s   end-to-end {e2e[w]:6.0f} docs/s{extra}")
    for r in clean_runs:
      r.pop("report", None)
    result.update(cleaning_runs=clean_runs, cleaning=rates, documents=n, warmup_documents=warmup)
  if "examples" in sections:
    ex_runs = bench_examples(worker_counts, args.steps, args.seq_len, args.batch_size,
                             args.repeats)
    ex_rates = summarize(ex_runs, "rows_per_sec")
    ex_startup = summarize(ex_runs, "startup_s")
    train_rows = TRAIN_STEP_TOKENS_PER_SEC / args.seq_len
    print(f"MLM+NSP examples (seq_len {args.seq_len}, batch {args.batch_size}, {args.steps} "
          f"batches after the first; median of {args.repeats} runs)")
    for w, rate in ex_rates.items():
      extra = f"   x{rate / ex_rates[0]:.2f} vs 0 workers" if w not in (0, "pandas") else ""
      print(f"  {_name(w):18s} {rate:9.0f} rows/s   start-up {ex_startup[w]:4.2f} s   "
            f"({rate / train_rows:.0f}x the training step){extra}")
    print(f"  training step      {train_rows:9.0f} rows/s   (bench/train_throughput.py: "
          f"{TRAIN_STEP_TOKENS_PER_SEC} tokens/s)")
    result.update(examples_runs=ex_runs, examples=ex_rates, train_rows_per_sec=train_rows)
  best = max((w for w in rates if w not in (0, "pandas")), key=rates.get, default=None)
  best_ex = max((w for w in ex_rates if w not in (0, "pandas")), key=ex_rates.get, default=None)
  if best is not None and best_ex is not None:
    print(f"best measured worker count: cleaning {best} (x{rates[best] / rates[0]:.2f}), "
          f"examples {best_ex} (x{ex_rates[best_ex] / ex_rates[0]:.2f}); load average at end "
          f"{_load():.2f}")
  if "beam" in sections:
    print(f"cleaning engines end to end (Beam DirectRunner, 2 worker processes; median of "
          f"{args.repeats} runs)")
    result["beam_runs"] = bench_beam(args.repeats, args.messy_docs)
    print(f"load average at end {_load():.2f}")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
  main()
