r"""What each process copies of tokenized shards kept in a bucket (GCS emulator on loopback).

    python bench/shard_fetch.py [--shards 16] [--batch 32] [--every 50] [--processes 1,2,4,8]

The embedded general and domain corpora (18,127 documents) are written as the data stage does
(`--shards` cleaned JSONL files of equal document counts, `shards.write_shards`) and copied to a
fake-gcs-server bucket (tests/servers.py). Then, for each process count P and row_groups in
(1, P), every process p of P opens the bucket's corpus with its own empty cache, splits it as
pretraining does (every `--every`-th document held out) and fetches what its rows read
(`doc_order.records_read` -> `TokenizedCorpus.fetch`, the pretraining stage's call). Printed per
(P, row_groups): the shard files and bytes in each process's cache, as counts and as a fraction
of the corpus. Nothing is timed: the emulator's speed says nothing about a real bucket's.
"""
import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from etils import epath  # noqa: E402

from r1jax.data import builtin  # noqa: E402
from r1jax.data import doc_order  # noqa: E402
from r1jax.data import pretraining  # noqa: E402
from r1jax.data import shards  # noqa: E402
from r1jax.data import sources  # noqa: E402
from r1jax.data import tokenizer as tokenizer_lib  # noqa: E402
import servers  # noqa: E402  (tests/servers.py: the GCS emulator)


def _corpus(tmp: str, n_shards: int) -> str:
  texts = builtin.texts("general") + builtin.texts("domain")
  clean = os.path.join(tmp, "data", "clean")
  os.makedirs(clean)
  per = -(-len(texts) // n_shards)
  for i in range(n_shards):
    with open(os.path.join(clean, f"part-{i:05d}.jsonl"), "w", encoding="utf-8") as f:
      f.writelines(json.dumps({"text": t}) + "\n" for t in texts[i * per:(i + 1) * per])
  tok = tokenizer_lib.Tokenizer.train(texts[::4], 4000).save(os.path.join(tmp, "tok.model"))
  out = os.path.join(tmp, "data", "tokenized")
  shards.write_shards(sources.expand_spec(clean), tok, out, progress=False)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shards", type=int, default=16)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--every", type=int, default=50)
  parser.add_argument("--processes", default="1,2,4,8")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp, servers.gcs_emulator() as gcs:
    os.environ.update(gcs.env)
    gcs.create_bucket("bench")
    local = _corpus(tmp, args.shards)
    for name in os.listdir(local):
      epath.Path(os.path.join(local, name)).copy(epath.Path(f"gs://bench/tokenized/{name}"))
    manifest = json.load(open(os.path.join(local, shards.MANIFEST), encoding="utf-8"))
    total = sum(s["bytes"] for s in manifest["shards"])
    print(f"corpus: {manifest['documents']} documents, {manifest['tokens']} tokens, "
          f"{len(manifest['shards'])} shard files, {total} bytes; global batch {args.batch}, "
          f"every {args.every}-th document held out")
    print("| processes | row_groups | shard files per process | bytes per process (max) | "
          "max share of the corpus (1/P) | all processes together |")
    print("|---|---|---|---|---|---|")
    for count in map(int, args.processes.split(",")):
      for groups in sorted({1, count}):
        files, sizes = [], []
        for p in range(count):
          cache = os.path.join(tmp, "cache", f"{count}-{groups}-{p}")
          os.environ["R1JAX_CACHE_DIR"] = cache
          corpus = shards.TokenizedCorpus("gs://bench/tokenized")
          corpus.fetch(doc_order.records_read(
              pretraining.split_documents(corpus, args.every), batch_size=args.batch,
              row_groups=groups, process_index=p, process_count=count), who=f"process {p}")
          copied = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(cache, "bench"))
                    for f in fs if f.endswith(".array_record")]  # not the stamps beside them
          files.append(len(copied))
          sizes.append(sum(map(os.path.getsize, copied)))
        print(f"| {count} | {groups} | {'/'.join(map(str, files))} | {max(sizes)} | "
              f"{max(sizes) / total:.3f} ({1 / count:.3f}) | {sum(sizes) / total:.3f} |")


if __name__ == "__main__":
  main()
