r"""Near-duplicate removal at scale: recall and precision on planted near duplicates, time, memory.

    python bench/near_dedup_scale.py [--docs 1000000] [--engines grain,beam] [--workers 2]
                                     [--index memory,disk] [--near_fraction 0.1]
                                     [--corpus_dir DIR] [--out result.json]

Generates `--docs` documents (a JSONL file in a temporary directory): random texts of 150-300
words from a 20,000-word vocabulary, and, with probability `--near_fraction`, a planted near
duplicate instead: an earlier original with 1 or 2 words replaced (true Jaccard similarity of
5-word shingles 0.87-0.97, above the default threshold 0.8; the bench prints the lowest one among
the first 2,000 documents). Originals share no
shingle with each other by construction of the vocabulary draw (a 5-word run repeats with
probability ~1e-21), so a dropped original is a false positive.

Cleaning runs with `CleanConfig` defaults except the per-text quality filters (off: random words
would trip the repetition and symbol rules): exact and near deduplication, the repairs, NFKC.
Engines: `grain` (clean_grain.cleaning_dataset, 0 workers: the near-duplicate index in one process), once
per `--index` (`clean.dedup_index`: memory, disk; rows `grain:memory`, `grain:disk`), and `beam`
(clean_beam on the local runner with `--workers` processes). `--corpus_dir` keeps the generated
corpus there (corpus_N_F.jsonl and its planted flags) and reuses it on the next run.

Printed per engine: seconds, documents/s, CPU seconds (the engine's process and its children), peak
resident memory of the engine's process (each engine runs in a fresh Python) and of its largest
child (Beam's workers), near-duplicate recall (planted ones dropped as near_duplicate) and
precision (dropped as near_duplicate that were planted); for Grain also its anonymous resident
memory after each tenth of the documents (the heap, where a memory index grows; peak RSS also
counts shared libraries, the mmap'd corpus's pages and the reader's start-up scan of it); and
whether the engines' kept documents and reports agree.
"""
import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from r1jax.data import clean  # pylint: disable=wrong-import-position
from r1jax.data import clean_grain  # pylint: disable=wrong-import-position
from r1jax.data import sources  # pylint: disable=wrong-import-position

VOCAB = 20_000
SHINGLE = 5


def _jaccard(a, b):
  sa = {tuple(a[i:i + SHINGLE]) for i in range(len(a) - SHINGLE + 1)}
  sb = {tuple(b[i:i + SHINGLE]) for i in range(len(b) - SHINGLE + 1)}
  return len(sa & sb) / len(sa | sb)


def generate(path, n_docs, near_fraction, seed=0):
  """Writes the corpus; -> (is_planted bool [n_docs], the lowest true Jaccard of a planted pair)."""
  rng = np.random.default_rng(seed)
  words = [f"w{i}" for i in range(VOCAB)]
  planted = np.zeros(n_docs, bool)
  originals = []
  lowest = 1.0
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n_docs):
      if originals and rng.random() < near_fraction:
        base = originals[int(rng.integers(len(originals)))]
        doc = list(base)
        for _ in range(int(rng.integers(1, 3))):
          doc[int(rng.integers(len(doc)))] = f"x{int(rng.integers(1_000_000))}"
        if i < 2000:  # spot-check the planted pairs' true similarity
          lowest = min(lowest, _jaccard(base, doc))
        planted[i] = True
      else:
        doc = [words[k] for k in rng.integers(0, VOCAB, int(rng.integers(150, 301)))]
        if len(originals) < 200_000:
          originals.append(doc)
        else:
          originals[int(rng.integers(len(originals)))] = doc
      f.write(json.dumps({"text": " ".join(doc), "id": i}) + "\n")
  return planted, lowest


def corpus(directory, n_docs, near_fraction):
  """The corpus in `directory` (generated unless there from an earlier run with the same size and
  near_fraction) -> (path, is_planted bool [n_docs], the lowest true Jaccard of a planted pair)."""
  path = os.path.join(directory, f"corpus_{n_docs}_{near_fraction}.jsonl")
  if not os.path.exists(path + ".npz"):
    os.makedirs(directory, exist_ok=True)
    planted, lowest = generate(path + ".part", n_docs, near_fraction)
    os.replace(path + ".part", path)
    np.savez(path + ".npz", planted=planted, lowest=lowest)
  saved = np.load(path + ".npz")
  return path, saved["planted"], float(saved["lowest"])


def config():
  return clean.CleanConfig(min_chars=None, max_url_fraction=None, max_contact_density=None,
                           max_symbol_fraction=None, max_repetition=None, max_phrase_hits=None,
                           meaningless_replies=())


def _usage():
  me = resource.getrusage(resource.RUSAGE_SELF)
  kids = resource.getrusage(resource.RUSAGE_CHILDREN)
  return (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
          me.ru_maxrss / 1024, kids.ru_maxrss / 1024)


def _status_mb(field):
  """A memory figure of this process from /proc/self/status (MB; None where there is none).

  RssAnon is the heap (a memory index lives there); RssFile counts shared libraries and the pages
  of the mmap'd corpus that reading touched (the source reads records through mmap), which peak
  RSS includes."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None


def run(engine, path, workers, tmp, index="memory"):
  """-> (kept bool [n] by document id, report dict, stats)."""
  cfg = dataclasses.replace(config(), dedup_index=index)
  start, (cpu, _, _) = time.perf_counter(), _usage()
  src = sources.open_source(path)
  kept = np.zeros(len(src), bool)
  anon = []  # anonymous resident memory (MB) after each tenth of the documents
  if engine == "grain":
    report = clean.CleaningReport(clean.rule_names(cfg), max_samples=5)
    tenth = max(1, len(src) // 10)
    ds = clean_grain.cleaning_dataset(src, cfg, index_dir=tmp)
    for n, r in enumerate(map(report.add, ds), 1):
      if not r.get("_drop"):
        kept[r["id"]] = True
      if n % tenth == 0:
        anon.append(_status_mb("RssAnon"))
  else:
    from r1jax.data import clean_beam  # pylint: disable=g-import-not-at-top
    out = os.path.join(tmp, "beam")
    report = clean_beam.clean_with_beam(src, cfg, out, num_workers=workers,
                                        reopen=sources.reopener(path),
                                        max_samples=5)
    for r in clean_beam.records_in_order(out):
      kept[r["id"]] = True
  seconds = time.perf_counter() - start
  return kept, report.to_dict(), {"engine": engine, "seconds": seconds,
                                  "docs_per_sec": len(kept) / seconds, "cpu_s": _usage()[0] - cpu,
                                  "anon_rss_mb_by_tenth": anon,
                                  "file_rss_mb_end": _status_mb("RssFile")}


def run_in_child(engine, path, workers, tmp, index="memory"):
  """`run` in a fresh Python: its peak memory is the engine's alone (not the generator's)."""
  out = os.path.join(tmp, f"{engine}_{index}.npz")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--run", engine, "--corpus",
                         path, "--workers", str(workers), "--result", out, "--index", index],
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
  result = np.load(out, allow_pickle=True)
  return result["kept"], result["report"].item(), result["stats"].item()


def _child(args):
  with tempfile.TemporaryDirectory() as tmp:
    kept, report, stats = run(args.run, args.corpus, args.workers, tmp, args.index)
  _, rss_self, rss_kids = _usage()
  stats.update(peak_rss_main_mb=rss_self, peak_rss_child_mb=rss_kids)
  np.savez(args.result, kept=kept, report=np.array(report, dtype=object),
           stats=np.array(stats, dtype=object))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--docs", type=int, default=1_000_000)
  parser.add_argument("--engines", default="grain,beam")
  parser.add_argument("--workers", type=int, default=2, help="Beam local worker processes")
  parser.add_argument("--index", default="memory,disk", help="grain: clean.dedup_index values")
  parser.add_argument("--near_fraction", type=float, default=0.1)
  parser.add_argument("--corpus_dir", default="", help="keep (and reuse) the corpus here")
  parser.add_argument("--out", default="")
  parser.add_argument("--run", default="", help=argparse.SUPPRESS)  # child: one engine
  parser.add_argument("--corpus", default="", help=argparse.SUPPRESS)
  parser.add_argument("--result", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  if args.run:
    _child(args)
    return
  results = {"docs": args.docs, "cpus": os.cpu_count(), "load_start": os.getloadavg()[0]}
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    path, planted, lowest = corpus(args.corpus_dir or tmp, args.docs, args.near_fraction)
    print(f"{args.docs} documents, {planted.sum()} planted near duplicates (lowest true Jaccard "
          f"of the first 2,000 documents' planted pairs {lowest:.3f}); generated (or read) in "
          f"{time.perf_counter() - start:.0f} s; {os.path.getsize(path) / 1e6:.0f} MB; load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    kept_by, reports = {}, {}
    runs = [(e, i) for e in args.engines.split(",")
            for i in (args.index.split(",") if e == "grain" else ["memory"])]
    for engine, index in runs:
      kept, report, stats = run_in_child(engine, path, args.workers, tmp, index)
      engine = f"{engine}:{index}" if engine == "grain" else engine
      dropped = ~kept
      hit = (dropped & planted).sum()
      stats.update(recall=hit / max(1, planted.sum()), precision=hit / max(1, dropped.sum()),
                   dropped={k: v for k, v in report["dropped"].items() if v},
                   kept=int(kept.sum()), load=os.getloadavg()[0])
      kept_by[engine] = kept
      reports[engine] = json.dumps(report, sort_keys=True, default=str)
      results[engine] = stats
      print(f"  {engine:12s} {stats['seconds']:7.1f} s  {stats['docs_per_sec']:7.0f} docs/s  cpu "
            f"{stats['cpu_s']:7.1f} s  peak RSS main {stats['peak_rss_main_mb']:6.0f} MB, largest "
            f"child {stats['peak_rss_child_mb']:6.0f} MB  recall {stats['recall']:.4f}  precision "
            f"{stats['precision']:.4f}  dropped {stats['dropped']}  load {stats['load']:.2f}",
            flush=True)
      if stats["anon_rss_mb_by_tenth"]:
        print(f"  {engine:12s} anonymous RSS (MB) after each tenth of the documents: "
              f"{' '.join(f'{m:.0f}' for m in stats['anon_rss_mb_by_tenth'])}; file-backed RSS "
              f"(shared libraries, mmap'd corpus) at the end {stats['file_rss_mb_end']:.0f} MB",
              flush=True)
    if len(kept_by) > 1:
      same = len({k.tobytes() for k in kept_by.values()}) == 1
      same_report = len(set(reports.values())) == 1
      results.update(engines_agree=same, reports_agree=same_report)
      print(f"  kept documents identical across engines: {same}; reports (counts, first 5 "
            f"samples of each rule with their details) identical: {same_report}")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2, default=float)


if __name__ == "__main__":
  main()
