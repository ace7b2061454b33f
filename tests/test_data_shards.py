"""Tokenized pretraining shards (r1jax.data.shards): written from cleaned JSONL, read through
Grain's ArrayRecord source, bitwise the same batches as the texts, exact resume, disjoint process
shares (with row groups: contiguous parts, and the shard files a process needs for them),
resumable writing, one-line errors on damaged shards; the pretraining stage's choice of input
(stages.pretrain.open_corpus)."""
import json
import logging
import os

import numpy as np
import pytest

from r1jax import configlib
from r1jax import errors
from r1jax.data import doc_order
from r1jax.data import pretraining
from r1jax.data import shards
from r1jax.data import sources
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.stages import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  for x, y in zip(a, b, strict=True):
    assert set(x) == set(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs, tok):
  """A data stage's layout: clean/part-0000{0,1}.jsonl (with rows that are not documents),
  tokenizer.model, tokenized/ written by write_shards."""
  root = tmp_path_factory.mktemp("shards")
  clean = root / "data" / "clean"
  clean.mkdir(parents=True)
  texts = docs[:120]
  for i, part in enumerate((texts[:70], texts[70:])):
    with open(clean / f"part-{i:05d}.jsonl", "w", encoding="utf-8") as f:
      for j, text in enumerate(part):
        f.write(json.dumps({"text": text, "id": j}) + "\n")
        if j == 3:
          f.write(json.dumps({"text": "   "}) + "\n")  # not a document: both paths skip it
  tok_path = tok.save(str(root / "tokenizer.model"))
  out = str(root / "data" / "tokenized")
  manifest = shards.write_shards(sources.expand_spec(str(clean)), tok_path, out, worker_count=0,
                                 progress=False)
  return {"root": root, "clean": str(clean), "out": out, "manifest": manifest, "texts": texts,
          "tokenizer": tok_path}


def test_manifest_describes_the_shards(corpus, tok):
  m = corpus["manifest"]
  assert m["format"] == shards.FORMAT and m["dtype"] == "uint16"
  assert m["documents"] == 120 and [s["records"] for s in m["shards"]] == [70, 50]
  assert [s["skipped"] for s in m["shards"]] == [1, 1]
  assert m["tokens"] == sum(len(tok.encode(t)) for t in corpus["texts"])
  assert m["tokenizer"] == {"file": "tokenizer.model", "vocab_size": tok.vocab_size,
                            "sha256": shards.tokenizer_sha256(tok)}
  with open(os.path.join(corpus["out"], shards.MANIFEST)) as f:
    assert json.load(f) == m
  docs = shards.TokenizedCorpus(corpus["out"])
  assert len(docs) == 120
  np.testing.assert_array_equal(docs.tokens(75), tok.encode(corpus["texts"][75]))
  assert np.concatenate(list(docs.token_counts())).tolist() == [
      len(tok.encode(t)) for t in corpus["texts"]]


@pytest.mark.parametrize("kw", [dict(nsp=True), dict(nsp=False, pack=True, whole_word=True)])
def test_shards_give_bitwise_the_batches_of_the_texts(corpus, tok, kw):
  """The same documents, ids and order, across an epoch boundary of the training split."""
  every = 7
  train_texts, held_texts = pretraining.split_documents(corpus["texts"], every)
  train_docs, held_docs = pretraining.split_documents(shards.TokenizedCorpus(corpus["out"]), every)
  assert (len(train_docs), len(held_docs)) == (len(train_texts), len(held_texts))
  opts = dict(seq_len=64, batch_size=8, seed=2, **kw)
  from_texts = _batches(pretraining.pretrain_iterator(train_texts, tok, **opts), 50)
  from_shards = _batches(pretraining.pretrain_iterator(train_docs, tok, **opts), 50)
  assert max(int(b["epoch"].max()) for b in from_shards) >= 1
  _assert_same(from_texts, from_shards)
  _assert_same(_batches(pretraining.pretrain_iterator(held_texts, tok, **opts), 4),
               _batches(pretraining.pretrain_iterator(held_docs, tok, **opts), 4))
  assert np.concatenate(list(train_docs.token_counts())).tolist() == [
      len(tok.encode(t)) for t in train_texts]


@pytest.mark.parametrize("row_groups", [1, 2])
def test_resume_from_shards_continues_at_the_same_record(corpus, tok, row_groups):
  opts = dict(seq_len=32, batch_size=4, seed=5, nsp=False, pack=True, row_groups=row_groups)
  docs = shards.TokenizedCorpus(corpus["out"])
  it = pretraining.pretrain_iterator(docs, tok, **opts)
  _batches(it, 9)
  state = it.get_state()
  expected = _batches(it, 12)
  # A new process: the corpus opened again, the iterator state restored from JSON.
  again = pretraining.pretrain_iterator(shards.TokenizedCorpus(corpus["out"]), tok, **opts)
  again.set_state(json.loads(json.dumps(state)))
  _assert_same(expected, _batches(again, 12))


class _Recording(shards.TokenizedDocuments):
  """A tokenized corpus that notes which documents are read."""

  def __init__(self, docs):
    self._docs = docs
    for name in ("tokenizer_sha256", "tokenizer_path", "source_dir", "directory"):
      setattr(self, name, getattr(docs, name))
    self.read = []

  def __len__(self):
    return len(self._docs)

  def tokens(self, i):
    self.read.append(i)
    return self._docs.tokens(i)


def epoch_zero_reads(docs, tok, process_index, process_count, batch_size=6, row_groups=1):
  """The documents process `process_index` reads in epoch 0 of its stream (the multi-host test
  runs this in each process), stepping until each of its rows has reached epoch 1. Without the
  document cache, each row reads its current document once per step (no NSP, no packing), rows in
  order, so read i belongs to row i % rows of step i // rows, whose `epoch` the batch tells."""
  recording = _Recording(docs)
  it = pretraining.pretrain_iterator(recording, tok, seq_len=128, batch_size=batch_size, seed=1,
                                     nsp=False, process_index=process_index,
                                     process_count=process_count, row_groups=row_groups)
  epochs = [next(it)["epoch"]]
  while not np.max(epochs, axis=0).all():
    epochs.append(next(it)["epoch"])
  epochs = np.concatenate(epochs)
  assert len(recording.read) == len(epochs)
  return np.asarray(recording.read)[epochs == 0].tolist()


def test_processes_read_disjoint_documents_covering_an_epoch(corpus, tok, monkeypatch):
  monkeypatch.setattr(pretraining, "_DOC_CACHE_SIZE", 0)
  docs = shards.TokenizedCorpus(corpus["out"])
  parts = [set(epoch_zero_reads(docs, tok, p, 2)) for p in range(2)]
  assert not parts[0] & parts[1]
  assert parts[0] | parts[1] == set(range(len(docs)))
  # With a row group per process, each process reads its own half of the corpus.
  parts = [set(epoch_zero_reads(docs, tok, p, 2, row_groups=2)) for p in range(2)]
  assert parts == [set(range(60)), set(range(60, 120))]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory, docs, tok):
  """Shards of 23, 5, 0, 41, 1, 17 and 34 short documents."""
  root = tmp_path_factory.mktemp("uneven")
  texts = [" ".join(t.split()[:12]) for t in docs]
  start = 0
  for i, n in enumerate((23, 5, 0, 41, 1, 17, 34)):
    with open(root / f"part-{i:05d}.jsonl", "w", encoding="utf-8") as f:
      f.writelines(json.dumps({"text": t}) + "\n" for t in texts[start:start + n])
      f.write(json.dumps({"text": " "}) + "\n")  # no document: the third shard is empty
    start += n
  out = str(root / "tokenized")
  shards.write_shards(sources.expand_spec(str(root)), tok.save(str(root / "tok.model")), out,
                      worker_count=0, progress=False)
  return out


@pytest.mark.parametrize("kw", [dict(nsp=True), dict(nsp=False, pack=True)])
def test_row_groups_keep_the_global_batch_of_any_process_count(uneven, tok, kw):
  docs = shards.TokenizedCorpus(uneven)
  opts = dict(seq_len=32, batch_size=8, seed=3, row_groups=4, **kw)
  full = _batches(pretraining.pretrain_iterator(docs, tok, **opts), 40)
  for count in (2, 4):
    parts = [_batches(pretraining.pretrain_iterator(docs, tok, process_index=p,
                                                    process_count=count, **opts), 40)
             for p in range(count)]
    _assert_same(full, [{k: np.concatenate([part[s][k] for part in parts]) for k in full[s]}
                        for s in range(40)])
  assert max(int(b["epoch"].max()) for b in full) >= 1
  # Other row groups, another stream (row_groups=1 is the layout without groups).
  assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(
      full, _batches(pretraining.pretrain_iterator(docs, tok, **dict(opts, row_groups=2)), 40)))


def test_shard_files_holding_record_ranges():
  counts = [10, 10, 0, 10, 7]  # records 0-9, 10-19, none, 20-29, 30-36
  assert shards.shard_files(counts, [(0, 20)]) == [0, 1]
  assert shards.shard_files(counts, [(20, 21)]) == [3]  # an empty shard never
  assert shards.shard_files(counts, [(19, 21)]) == [1, 3]
  assert shards.shard_files(counts, [(9, 10), (36, 37), (5, 5)]) == [0, 4]
  assert shards.shard_files(counts, [(0, 37)]) == [0, 1, 3, 4]
  assert shards.shard_files(counts, []) == []


@pytest.mark.parametrize("count,groups", [(1, 1), (2, 1), (2, 2), (3, 3), (3, 6), (4, 4), (4, 2)])
def test_a_process_needs_the_shard_files_its_rows_read(uneven, tok, count, groups):
  """records_read -> shard_files: every file a process's training and held-out streams read (NSP
  included, over an epoch of each row) is among them; with row groups a multiple of the process
  count, each process needs only about its share of the files."""
  corpus = shards.TokenizedCorpus(uneven)
  counts = [s["records"] for s in json.load(open(os.path.join(uneven, shards.MANIFEST)))["shards"]]
  file_of = np.repeat(np.arange(len(counts)), counts)
  needs = []
  for p in range(count):
    need = shards.shard_files(counts, doc_order.records_read(
        pretraining.split_documents(corpus, 7), batch_size=12, row_groups=groups,
        process_index=p, process_count=count))
    recording = _Recording(corpus)
    for view in pretraining.split_documents(recording, 7):
      it = pretraining.pretrain_iterator(view, tok, seq_len=16, batch_size=12, seed=1,
                                         row_groups=groups, process_index=p, process_count=count)
      while not next(it)["epoch"].all():
        pass
    assert set(file_of[recording.read].tolist()) <= set(need), (p, need)
    needs.append(need)
  assert set().union(*needs) == {0, 1, 3, 4, 5, 6}
  if groups == 1:
    assert all(len(n) == 6 for n in needs)  # every row reads from the whole corpus
  if groups % count == 0 and count > 1:
    assert sum(map(len, needs)) <= 6 + 2 * (count - 1)  # a boundary file may serve two processes
    assert max(map(len, needs)) < 6


def test_row_groups_need_whole_rows_and_enough_documents(corpus, tok):
  docs = shards.TokenizedCorpus(corpus["out"])
  with pytest.raises(ValueError, match="row_groups=3 must divide batch_size=8"):
    pretraining.pretrain_iterator(docs, tok, seq_len=32, batch_size=8, row_groups=3)
  with pytest.raises(errors.BadInput, match="too few for row_groups=8"):
    pretraining.pretrain_iterator(pretraining.split_documents(docs, 30)[1], tok, seq_len=32,
                                  batch_size=8, row_groups=8)


def test_writing_is_resumable_and_damage_is_named_with_the_fix(corpus, tmp_path):
  clean_paths = sources.expand_spec(corpus["clean"])
  out = str(tmp_path / "tokenized")
  shards.write_shards(clean_paths, corpus["tokenizer"], out, worker_count=0, progress=False)
  first, second = (os.path.join(out, f"part-0000{i}.array_record") for i in range(2))
  with open(first, "rb") as f:
    good = f.read()
  # Truncated: named, with the fix; nothing else touched.
  with open(first, "wb") as f:
    f.write(good[:len(good) // 2])
  with pytest.raises(errors.BadInput, match=r"part-00000.array_record: .*truncated.*Rerun the data "
                     r"stage.*data.input=memory"):
    shards.TokenizedCorpus(out)
  # Not ArrayRecord at all (same size as the manifest says).
  with open(first, "wb") as f:
    f.write(b"{}\n" * (len(good) // 3) + b" " * (len(good) % 3))
  with pytest.raises(errors.BadInput, match=r"part-00000.array_record: not a readable ArrayRecord"):
    shards.TokenizedCorpus(out)
  # Rewriting keeps the intact shard (same file, not rewritten) and repairs the damaged one.
  kept = os.stat(second).st_mtime_ns
  shards.write_shards(clean_paths, corpus["tokenizer"], out, worker_count=0, progress=False)
  assert os.stat(second).st_mtime_ns == kept
  with open(first, "rb") as f:
    assert f.read() == good
  assert len(shards.TokenizedCorpus(out)) == 120

  # A manifest that does not match its shards.
  manifest_path = os.path.join(out, shards.MANIFEST)
  with open(manifest_path) as f:
    manifest = json.load(f)
  manifest["shards"][1]["records"] += 1
  with open(manifest_path, "w") as f:
    json.dump(manifest, f)
  with pytest.raises(errors.BadInput, match=r"part-00001.array_record: .*with 51 records \(reads 50"):
    shards.TokenizedCorpus(out)
  with open(manifest_path, "w") as f:
    f.write("{not json")
  with pytest.raises(errors.BadInput, match=r"manifest.json is not a tokenized-corpus manifest"):
    shards.TokenizedCorpus(out)


def test_other_tokenizer_is_refused(corpus, docs):
  other = tokenizer_lib.Tokenizer.train(docs[:200], 600)
  with pytest.raises(errors.BadInput, match=r"made with .*tokenizer.model.*data.input=memory"):
    pretraining.pretrain_iterator(shards.TokenizedCorpus(corpus["out"]), other, seq_len=32,
                                  batch_size=2)


def _workdir(tmp_path, name):
  path = tmp_path / name
  path.mkdir()
  return str(path)


def _config(corpus_spec, **data):
  config = configlib.load_config(f"{os.path.join(ROOT, 'configs', 'pretrain.py')}:variant=tiny")
  config.data.corpus = corpus_spec
  config.data.eval_every_nth_doc = 7
  config.data.update(data)
  return config


def test_pretraining_chooses_its_input_and_says_why(corpus, tmp_path, caplog, docs):
  caplog.set_level(logging.INFO)
  # The data stage's clean directory: the shards beside it, with their tokenizer.
  chosen = pretrain.open_corpus(_config(corpus["clean"]), _workdir(tmp_path, "a"))
  assert chosen.input == "shards" and len(chosen.train) + len(chosen.held_out) == 120
  assert "Pretraining input: tokenized shards" in caplog.text
  assert pretrain.estimate_steps_per_epoch(chosen.token_counts(), seq_len=32, batch_size=4,
                                           nsp=True) == pretrain.estimate_steps_per_epoch(
      pretrain.open_corpus(_config(corpus["clean"], input="memory"), _workdir(tmp_path, "b"))
      .token_counts(), seq_len=32, batch_size=4, nsp=True)
  # Naming the tokenized directory, memory: the texts come from the manifest's source.
  memory = pretrain.open_corpus(_config(corpus["out"], input="memory"), _workdir(tmp_path, "c"))
  assert memory.input == "memory" and memory.train == chosen_texts(corpus)
  assert "Pretraining input: texts in memory" in caplog.text and "data.input=memory" in caplog.text
  # Another tokenizer: auto reads the texts, shards refuses.
  other = tokenizer_lib.Tokenizer.train(docs[:200], 600).save(str(tmp_path / "other.model"))
  caplog.clear()
  fallback = pretrain.open_corpus(_config(corpus["clean"], tokenizer=other), _workdir(tmp_path, "d"))
  assert fallback.input == "memory" and "made with another tokenizer" in caplog.text
  with pytest.raises(errors.BadInput, match="not with"):
    pretrain.open_corpus(_config(corpus["clean"], tokenizer=other, input="shards"),
                         _workdir(tmp_path, "e"))
  with pytest.raises(errors.InputNotFound, match="has no tokenized shards"):
    pretrain.open_corpus(_config("builtin:domain", input="shards"), _workdir(tmp_path, "f"))
  with pytest.raises(errors.BadInput, match="knowledge_file"):
    pretrain.open_corpus(_config(corpus["clean"], input="shards", knowledge_file="builtin"),
                         _workdir(tmp_path, "g"))


def chosen_texts(corpus):
  return pretraining.split_documents(corpus["texts"], 7)[0]
