r"""Pretraining input at scale: resident memory flat as the corpus grows 10x, input throughput
beside what the small model's training step consumes (issue 27's targets).

    python bench/data_scale.py [--small_mb 20] [--factor 10] [--dir /tmp/r1jax_scale]
                               [--steps 200] [--train_steps 8] [--toy] [--out result.json]

In one run:
  1. generates two corpora of synthetic text (Zipf-distributed pseudo-words, documents of 40 to
     ~4,000 characters) as a data stage's cleaned JSONL (DIR/<size>/data/clean/part-NNNNN.jsonl,
     20,000 documents a file): --small_mb and --factor times as much; plus the embedded corpus
     (builtin general + domain) as a small one;
  2. trains one 8,000-piece tokenizer (the small variant's vocabulary) and tokenizes each corpus
     into ArrayRecord shards with `r1jax.data.shards.write_shards`, as the data stage does (Grain
     worker processes, one per core): MB/s and tokens/s;
  3. per corpus and input (tokenized shards / texts in memory), a fresh process opens the corpus
     the way the pretraining stage does (`stages.pretrain.open_corpus`, which logs its choice) and
     streams --steps batches of the small variant's rows (batch 32 x 128, MLM + NSP): its start-up
     seconds, input rows/s and token positions/s, and its peak resident memory (ru_maxrss from
     wait4, the whole process);
  4. per corpus, the real pretraining command (small variant, --train_steps steps, shards) in a
     fresh process: its peak resident memory and the training step's positions/s (the last
     logged window, metrics.jsonl).
The last line is a JSON summary with the targets: rss_growth_pretrain (peak RSS of the pretraining
process, large corpus / small corpus - 1; target <= 0.10), rss_growth_input_shards and
rss_growth_input_memory (the input side alone, for contrast), input_over_training (input positions
per second over the training step's, same run; target >= 10).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DOCS_PER_FILE = 20_000
SEQ_LEN, BATCH = 128, 32  # the small variant's segment length and batch size


def _load() -> float:
  return os.getloadavg()[0]


# -------------------------------------------------------------------------------------------------
# Corpus generation


def generate(directory: str, megabytes: float, seed: int) -> dict:
  """Cleaned-JSONL files of synthetic documents totalling about `megabytes` MB of text."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  clean = os.path.join(directory, "data", "clean")
  done = os.path.join(clean, ".complete")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  os.makedirs(clean, exist_ok=True)
  # One language for every corpus (the same words), different documents per seed.
  language = np.random.default_rng(1234)
  letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
  freq = 1.0 / np.arange(1, 27) ** 0.9
  words = ["".join(language.choice(letters, size=language.integers(2, 10), p=freq / freq.sum()))
           for _ in range(30_000)]
  rng = np.random.default_rng(seed)
  weights = 1.0 / np.arange(1, len(words) + 1) ** 1.05
  weights /= weights.sum()
  target = int(megabytes * 1e6)
  written = docs = files = 0
  while written < target:
    path = os.path.join(clean, f"part-{files:05d}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      lengths = np.clip(rng.lognormal(4.6, 0.9, DOCS_PER_FILE), 8, 800).astype(int)  # words
      ids = rng.choice(len(words), size=int(lengths.sum()), p=weights)
      start = 0
      for n in lengths:
        text = " ".join(words[i] for i in ids[start:start + n]).capitalize() + "."
        start += n
        line = json.dumps({"text": text}) + "\n"
        f.write(line)
        written += len(line)
        docs += 1
        if written >= target:
          break
    files += 1
  info = {"megabytes": written / 1e6, "documents": docs, "files": files}
  with open(done, "w") as f:
    json.dump(info, f)
  return info


def embedded(directory: str) -> dict:
  from r1jax.data import builtin  # pylint: disable=import-outside-toplevel
  clean = os.path.join(directory, "data", "clean")
  os.makedirs(clean, exist_ok=True)
  texts = builtin.texts("general") + builtin.texts("domain")
  with open(os.path.join(clean, "part-00000.jsonl"), "w", encoding="utf-8") as f:
    for t in texts:
      f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
  size = os.path.getsize(os.path.join(clean, "part-00000.jsonl"))
  return {"megabytes": size / 1e6, "documents": len(texts), "files": 1}


# -------------------------------------------------------------------------------------------------
# Children: one fresh process per measurement, so peak RSS is that measurement's


def child_input(corpus_dir: str, input_mode: str, steps: int, tokenizer: str) -> None:
  """Opens the corpus as pretraining does and streams `steps` batches; prints a JSON line."""
  # pylint: disable=import-outside-toplevel
  import jax
  from absl import logging
  from r1jax import configlib
  from r1jax.data import pretraining
  from r1jax.stages import pretrain
  del jax
  logging.set_verbosity(logging.INFO)
  config = configlib.load_config(f"{REPO}/configs/pretrain.py:variant=small")
  config.data.corpus = os.path.join(corpus_dir, "data", "clean")
  config.data.input = input_mode
  config.data.tokenizer = tokenizer
  workdir = os.path.join(corpus_dir, f"input_{input_mode}")
  shutil.rmtree(workdir, ignore_errors=True)  # a fresh run: it takes over no earlier tokenizer
  os.makedirs(workdir)
  start = time.perf_counter()
  corpus = pretrain.open_corpus(config, workdir)
  it = pretraining.pretrain_iterator(corpus.train, corpus.tokenizer, seq_len=SEQ_LEN,
                                     batch_size=BATCH, seed=0)
  next(it)
  opened = time.perf_counter() - start
  real = 0
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(steps):
    real += int(next(it)["token_mask"].sum())
  seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
  print(json.dumps({"input": corpus.input, "startup_s": opened, "rows_per_s": steps * BATCH / seconds,
                    "positions_per_s": steps * BATCH * SEQ_LEN / seconds,
                    "real_tokens_per_s": real / seconds, "cpu_us_per_row": 1e6 * cpu / steps / BATCH,
                    "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small_mb", type=float, default=20.0)
  parser.add_argument("--factor", type=float, default=10.0)
  parser.add_argument("--dir", default="/tmp/r1jax_scale")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--train_steps", type=int, default=8)
  parser.add_argument("--toy", action="store_true", help="tiny sizes: a smoke test of the script")
  parser.add_argument("--out", default="")
  parser.add_argument("--child", default="")
  parser.add_argument("--corpus", default="")
  parser.add_argument("--input", default="shards")
  parser.add_argument("--tokenizer", default="")
  parser.add_argument("--wrapped", nargs=argparse.REMAINDER, default=None)
  args = parser.parse_args()
  if args.child == "input":
    child_input(args.corpus, args.input, args.steps, args.tokenizer)
    return
  if args.child == "rss":  # run a command, print its peak RSS (this wrapper's only child)
    proc = subprocess.run(args.wrapped, capture_output=True, text=True, check=False)
    sys.stderr.write(proc.stderr)
    sys.stdout.write(proc.stdout)
    print(json.dumps({"returncode": proc.returncode, "child_maxrss_mb":
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
    sys.exit(proc.returncode)
  if args.toy:
    args.small_mb, args.factor, args.steps, args.train_steps = 0.3, 3, 20, 4

  from r1jax.data import shards  # pylint: disable=import-outside-toplevel
  from r1jax.data import sources  # pylint: disable=import-outside-toplevel
  from r1jax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel

  os.makedirs(args.dir, exist_ok=True)
  print(f"host: {os.cpu_count()} cores; load {_load():.2f} at start; {time.strftime('%F %T')}",
        flush=True)
  sizes = {"embedded": None, "small": args.small_mb, "large": args.small_mb * args.factor}
  corpora = {}
  for name, mb in sizes.items():
    directory = os.path.join(args.dir, name if mb is None else f"{name}_{mb:g}mb")
    start = time.perf_counter()
    info = embedded(directory) if mb is None else generate(directory, mb, seed=len(corpora))
    corpora[name] = dict(info, dir=directory)
    print(f"corpus {name:8s} {info['megabytes']:8.1f} MB  {info['documents']:9d} documents  "
          f"{info['files']:4d} files  ({time.perf_counter() - start:.0f} s)", flush=True)

  tok_path = os.path.join(args.dir, "tokenizer.model")
  if not os.path.exists(tok_path):
    texts = [json.loads(line)["text"] for line in open(
        os.path.join(corpora["small"]["dir"], "data", "clean", "part-00000.jsonl"))]
    tokenizer_lib.Tokenizer.train(texts[:20000], 8000).save(tok_path)

  for name, info in corpora.items():
    out_dir = os.path.join(info["dir"], "data", "tokenized")
    shutil.rmtree(out_dir, ignore_errors=True)  # timed from scratch
    load = _load()
    start = time.perf_counter()
    manifest = shards.write_shards(sources.expand_spec(os.path.join(info["dir"], "data", "clean")),
                                   tok_path, out_dir, worker_count=-1, progress=False)
    seconds = time.perf_counter() - start
    info.update(tokens=manifest["tokens"], tokenize_s=seconds)
    # A rerun keeps every shard: resumable, and this is the cost of checking them.
    start = time.perf_counter()
    shards.write_shards(sources.expand_spec(os.path.join(info["dir"], "data", "clean")), tok_path,
                        out_dir, worker_count=-1, progress=False)
    info["recheck_s"] = time.perf_counter() - start
    print(f"tokenize {name:8s} {manifest['tokens']:11d} tokens in {seconds:6.1f} s: "
          f"{info['megabytes'] / seconds:5.2f} MB/s, {manifest['tokens'] / seconds:9.0f} tokens/s "
          f"({min(os.cpu_count(), info['files'])} workers; load {load:.2f}); rerun keeping "
          f"every shard {info['recheck_s']:.1f} s", flush=True)

  inputs = {}
  for name, info in corpora.items():
    for mode in ("shards", "memory"):
      wrapped = [sys.executable, __file__, "--child", "rss", "--wrapped", sys.executable, __file__,
                 "--child", "input", "--corpus", info["dir"], "--input", mode, "--steps",
                 str(args.steps), "--tokenizer", tok_path]
      load = _load()
      proc = subprocess.run(wrapped, capture_output=True, text=True, check=False)
      if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
      lines = proc.stdout.strip().splitlines()
      result = json.loads(lines[-2])
      result.update(load=load, peak_rss_mb=json.loads(lines[-1])["child_maxrss_mb"],
                    choice=next((line.split("] ", 1)[-1] for line in proc.stderr.splitlines()
                                 if "Pretraining input:" in line), ""))
      inputs[(name, mode)] = result
      print(f"input    {name:8s} {mode:6s} start-up {result['startup_s']:6.2f} s  "
            f"{result['rows_per_s']:7.0f} rows/s  {result['positions_per_s']:9.0f} positions/s  "
            f"cpu {result['cpu_us_per_row']:4.0f} us/row  peak RSS {result['peak_rss_mb']:6.0f} MB"
            f"  load {load:.2f}\n         choice: {result['choice']}", flush=True)

  training = {}
  for name in ("small", "large"):
    info = corpora[name]
    workdir = os.path.join(info["dir"], f"pretrain_{int(time.time())}")
    cmd = [sys.executable, "-m", "r1jax.main",
           f"--config={REPO}/configs/pretrain.py:variant=small", f"--workdir={workdir}",
           f"--config.data.corpus={os.path.join(info['dir'], 'data', 'clean')}",
           "--config.data.input=shards", f"--config.data.tokenizer={tok_path}",
           f"--config.train.num_steps={args.train_steps}",
           f"--config.train.log_every_steps={args.train_steps // 2}",
           "--config.train.steps_per_call=1", "--config.train.progress_bar=False",
           f"--config.eval.every_steps={args.train_steps}", "--config.eval.num_batches=1",
           f"--config.checkpoint.every_steps={args.train_steps}", "--config.train.warmup_steps=1"]
    load = _load()
    proc = subprocess.run([sys.executable, __file__, "--child", "rss", "--wrapped", *cmd],
                          capture_output=True, text=True, check=False, cwd=REPO)
    if proc.returncode:
      raise RuntimeError(proc.stderr[-3000:])
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["child_maxrss_mb"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      train = [json.loads(line) for line in f]
    last = [r for r in train if r.get("split") == "train"][-1]
    training[name] = {"peak_rss_mb": peak, "steps_per_sec": last["steps_per_sec"],
                      "positions_per_s": last["steps_per_sec"] * BATCH * SEQ_LEN, "load": load}
    print(f"pretrain {name:8s} small model, {args.train_steps} steps from shards: peak RSS "
          f"{peak:6.0f} MB, training step {training[name]['positions_per_s']:7.0f} positions/s "
          f"({last['steps_per_sec']:.2f} steps/s)  load {load:.2f}", flush=True)

  def growth(a, b):
    return b / a - 1

  summary = {
      "small_mb": corpora["small"]["megabytes"], "large_mb": corpora["large"]["megabytes"],
      "small_documents": corpora["small"]["documents"],
      "large_documents": corpora["large"]["documents"],
      "rss_pretrain_small_mb": training["small"]["peak_rss_mb"],
      "rss_pretrain_large_mb": training["large"]["peak_rss_mb"],
      "rss_growth_pretrain": growth(training["small"]["peak_rss_mb"],
                                    training["large"]["peak_rss_mb"]),
      "rss_growth_input_shards": growth(inputs[("small", "shards")]["peak_rss_mb"],
                                        inputs[("large", "shards")]["peak_rss_mb"]),
      "rss_growth_input_memory": growth(inputs[("small", "memory")]["peak_rss_mb"],
                                        inputs[("large", "memory")]["peak_rss_mb"]),
      "input_positions_per_s_large_shards": inputs[("large", "shards")]["positions_per_s"],
      "training_positions_per_s": training["large"]["positions_per_s"],
      "input_over_training": (inputs[("large", "shards")]["positions_per_s"] /
                              training["large"]["positions_per_s"]),
      "tokenize_tokens_per_s_large": corpora["large"]["tokens"] / corpora["large"]["tokenize_s"],
      "startup_s": {f"{n}_{m}": r["startup_s"] for (n, m), r in inputs.items()},
      "rows_per_s": {f"{n}_{m}": r["rows_per_s"] for (n, m), r in inputs.items()},
      "toy": args.toy, "load_end": _load(),
  }
  print(f"targets: pretraining peak RSS {summary['rss_pretrain_small_mb']:.0f} -> "
        f"{summary['rss_pretrain_large_mb']:.0f} MB ({100 * summary['rss_growth_pretrain']:+.1f}%, "
        f"target within 10%) for {args.factor:g}x the corpus; input "
        f"{summary['input_over_training']:.0f}x the training step's positions/s (target >= 10x)",
        flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(summary, f, indent=1)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
