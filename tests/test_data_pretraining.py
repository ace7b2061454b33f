"""Tests for r1jax.data.pretraining (MLM/NSP/knowledge batches, streaming, resumption, workers),
r1jax.data.knowledge and r1jax.data.grain_ops."""
import logging

import grain
import numpy as np
import pytest

from r1jax.data import builtin
from r1jax.data import grain_ops
from r1jax.data import knowledge
from r1jax.data import pretraining
from r1jax.data import tokenizer as tokenizer_lib

CLS, SEP, PAD, MASK = (tokenizer_lib.CLS_ID, tokenizer_lib.SEP_ID, tokenizer_lib.PAD_ID,
                       tokenizer_lib.MASK_ID)


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _unmasked(batch):
  """tokens with the original ids put back at the predicted positions."""
  tokens = batch["tokens"].copy()
  for r in range(tokens.shape[0]):
    k = int(batch["mlm_weights"][r].sum())
    tokens[r, batch["mlm_positions"][r, :k]] = batch["mlm_ids"][r, :k]
  return tokens


def test_batch_layout_matches_contract(docs, tok):
  it = pretraining.pretrain_iterator(docs, tok, seq_len=48, batch_size=6, seed=0,
                                     knowledge_path=builtin.path("knowledge"))
  b = next(it)
  expected = {
      "tokens": (np.int32, (6, 48)), "token_mask": (np.bool_, (6, 48)),
      "token_types": (np.int32, (6, 48)), "mlm_positions": (np.int32, (6, 8)),
      "mlm_ids": (np.int32, (6, 8)), "mlm_weights": (np.float32, (6, 8)),
      "nsp_label": (np.int32, (6,)), "reset_memory": (np.bool_, (6,)), "epoch": (np.int32, (6,)),
      "kg_tokens": (np.int32, (6, 32)), "kg_token_mask": (np.bool_, (6, 32)),
      "kg_label": (np.int32, (6,)),
  }
  assert set(b) == set(expected)
  for key, (dtype, shape) in expected.items():
    assert b[key].dtype == dtype and b[key].shape == shape, key
  assert b["reset_memory"].all()  # step 0 starts every row's first document
  assert (b["tokens"][:, 0] == CLS).all()
  assert (b["tokens"][~b["token_mask"]] == PAD).all()
  # Token types: 0 through the first [SEP], 1 after it (on real tokens).
  for r in range(6):
    first_sep = int(np.flatnonzero(b["tokens"][r] == SEP)[0])
    assert (b["token_types"][r, :first_sep + 1] == 0).all()
    assert (b["token_types"][r, first_sep + 1:][b["token_mask"][r, first_sep + 1:]] == 1).all()


def test_mlm_statistics(docs, tok):
  it = pretraining.pretrain_iterator(docs, tok, seq_len=64, batch_size=16, seed=1, nsp=True)
  predicted = maskable = n_mask = n_same = n_random = 0
  for b in _batches(it, 60):
    original = _unmasked(b)
    maskable += int((b["token_mask"] & (original != CLS) & (original != SEP)).sum())
    for r in range(16):
      k = int(b["mlm_weights"][r].sum())
      pos = b["mlm_positions"][r, :k]
      assert (np.diff(pos) > 0).all()
      assert not np.isin(original[r, pos], [CLS, SEP, PAD]).any()  # specials never masked
      predicted += k
      n_mask += int((b["tokens"][r, pos] == MASK).sum())
      n_same += int((b["tokens"][r, pos] == original[r, pos]).sum())
      n_random += int(((b["tokens"][r, pos] != MASK) &
                       (b["tokens"][r, pos] != original[r, pos])).sum())
  rate = predicted / maskable
  assert abs(rate - 0.15) < 0.01, rate
  assert abs(n_mask / predicted - 0.8) < 0.03
  assert abs(n_same / predicted - 0.1) < 0.03
  assert abs(n_random / predicted - 0.1) < 0.03
  assert predicted > 5000


def _row_streams(batches, row, nsp):
  """Per document: the concatenated real text of `row` (A, plus B when it was the true next)."""
  streams, current = [], None
  for b in batches:
    original = _unmasked(b)[row]
    if b["reset_memory"][row]:
      if current is not None:
        streams.append(current)
      current = []
    seps = np.flatnonzero(original == SEP)
    a = original[1:seps[0]].tolist()
    current += a
    if nsp and b["nsp_label"][row] == 0:
      current += original[seps[0] + 1:seps[1]].tolist()
  return streams


@pytest.mark.parametrize("nsp", [False, True])
def test_rows_continue_their_documents(docs, tok, nsp):
  encoded = {tuple(tok.encode(d)) for d in docs}
  it = pretraining.pretrain_iterator(docs, tok, seq_len=32, batch_size=3, seed=2, nsp=nsp)
  batches = _batches(it, 80)
  for row in range(3):
    streams = _row_streams(batches, row, nsp)
    assert len(streams) >= 2
    for s in streams:  # every finished document came through whole and in order
      assert tuple(s) in encoded
  if nsp:
    labels = np.concatenate([b["nsp_label"] for b in batches])
    assert 0.35 < labels.mean() < 0.65


def _content(batches, row):
  """Row `row`'s real tokens over `batches`, original ids, [CLS]/[SEP] dropped, concatenated."""
  out = []
  for b in batches:
    original = _unmasked(b)[row][b["token_mask"][row]]
    assert original[0] == CLS and original[-1] == SEP
    out += [t for t in original.tolist() if t not in (CLS, SEP)]
  return out


def test_packed_rows_are_full_and_carry_the_same_documents_in_order(docs, tok):
  short = [d[:60] for d in docs]  # short documents: unpacked rows would be mostly padding
  kw = dict(seq_len=32, batch_size=3, seed=2, nsp=False)
  unpacked = _batches(pretraining.pretrain_iterator(short, tok, **kw), 40)
  packed = _batches(pretraining.pretrain_iterator(
      short, tok, pack=True, knowledge_path=builtin.path("knowledge"), **kw), 40)
  fill = lambda bs: float(np.mean([b["token_mask"].mean() for b in bs]))
  assert fill(unpacked) < 0.7 and fill(packed) > 0.95, (fill(unpacked), fill(packed))
  # One stream per row: memory is cleared at step 0 only.
  assert packed[0]["reset_memory"].all() and not any(b["reset_memory"].any() for b in packed[1:])
  for row in range(3):
    # The same documents in the same order, none cut or skipped: the packed stream (longer, as
    # its rows are full) starts with everything the unpacked one holds.
    expected, got = _content(unpacked, row), _content(packed, row)
    assert len(got) > 1.4 * len(expected)
    assert got[:len(expected)] == expected
  # Some rows hold several documents, [SEP] between them.
  assert any(b["tokens"][r][1:-1].tolist().count(SEP) for b in packed for r in range(3))
  with pytest.raises(ValueError, match="nsp=False"):
    pretraining.pretrain_iterator(short, tok, seq_len=32, batch_size=3, pack=True, nsp=True)


def test_deterministic_and_seed_dependent(docs, tok):
  kw = dict(seq_len=32, batch_size=4, knowledge_path=builtin.path("knowledge"), whole_word=True)
  a = _batches(pretraining.pretrain_iterator(docs, tok, seed=5, **kw), 5)
  b = _batches(pretraining.pretrain_iterator(docs, tok, seed=5, **kw), 5)
  c = _batches(pretraining.pretrain_iterator(docs, tok, seed=6, **kw), 5)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


@pytest.mark.parametrize("pack", [False, True])
def test_restore_mid_epoch_gives_identical_stream(tok, pack):
  # 7 short documents, 3 rows: the 25 steps cross several epochs.
  small = [f"Document {i} talks about compilers and networks, part {i}. " * (1 + i % 3)
           for i in range(7)]
  kw = dict(seq_len=16, batch_size=3, seed=3, knowledge_path=builtin.path("knowledge"))
  if pack:
    kw.update(pack=True, nsp=False)
  it = pretraining.pretrain_iterator(small, tok, **kw)
  _batches(it, 7)
  state = it.get_state()
  expected = _batches(it, 18)
  assert max(int(b["epoch"].max()) for b in expected) >= 2
  restored = pretraining.pretrain_iterator(small, tok, **kw)
  restored.set_state(state)
  for x, y in zip(expected, _batches(restored, 18)):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_process_sharding_splits_global_rows(docs, tok):
  kw = dict(seq_len=32, batch_size=4, seed=4)
  full = _batches(pretraining.pretrain_iterator(docs, tok, **kw), 3)
  parts = [_batches(pretraining.pretrain_iterator(docs, tok, process_index=p, process_count=2,
                                                  **kw), 3) for p in range(2)]
  for step in range(3):
    for key in full[step]:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), full[step][key])


def test_workers_give_the_same_stream_and_restore(docs, tok):
  kw = dict(seq_len=32, batch_size=4, seed=7)
  plain = _batches(pretraining.pretrain_iterator(docs, tok, **kw), 6)
  it = pretraining.pretrain_iterator(docs, tok, worker_count=2, **kw)
  with_workers = _batches(it, 3)
  state = it.get_state()
  with_workers += _batches(it, 3)
  it.close()
  for x, y in zip(plain, with_workers):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  again = pretraining.pretrain_iterator(docs, tok, worker_count=2, **kw)
  again.set_state(state)
  for x, y in zip(plain[3:], _batches(again, 3)):
    np.testing.assert_array_equal(x["mlm_positions"], y["mlm_positions"])
  again.close()


def test_workers_restore_inside_a_later_message_and_back_to_the_start(docs, tok):
  # 2 rows per worker: a worker message holds 32 steps, so step 35 is inside the second message.
  kw = dict(seq_len=32, batch_size=4, seed=3)
  plain = _batches(pretraining.pretrain_iterator(docs, tok, **kw), 40)
  it = pretraining.pretrain_iterator(docs, tok, worker_count=2, **kw)
  start = it.get_state()  # before the first batch: asks nothing of the (unstarted) workers
  head = _batches(it, 35)
  state = it.get_state()
  tail = _batches(it, 5)
  for x, y in zip(plain, head + tail):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  it.set_state(state)  # back into the second message
  np.testing.assert_array_equal(next(it)["mlm_ids"], plain[35]["mlm_ids"])
  it.set_state(start)  # back to the very start
  np.testing.assert_array_equal(next(it)["tokens"], plain[0]["tokens"])
  it.close()
  again = pretraining.pretrain_iterator(docs, tok, worker_count=2, **kw)
  again.set_state(state)
  for x, y in zip(plain[35:], _batches(again, 5)):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  again.close()


def test_flatten_is_checkpointable_at_every_position():
  lists = [[1, 2, 3], [4], [5, 6]]
  ds = grain_ops.FlattenIterDataset(grain.MapDataset.source(lists).to_iter_dataset())
  it = iter(ds)
  states, items = [], []
  for _ in range(6):
    states.append(it.get_state())
    items.append(next(it))
  assert items == [1, 2, 3, 4, 5, 6]
  for i, state in enumerate(states):
    fresh = iter(ds)
    fresh.set_state(state)
    assert list(fresh) == items[i:]
    it.set_state(state)  # also on an iterator that has moved on
    assert list(it) == items[i:]


def test_whole_word_masking_keeps_words_together(docs, tok):
  word_start = tok.word_start_table()
  it = pretraining.pretrain_iterator(docs, tok, seq_len=64, batch_size=8, seed=8, whole_word=True,
                                     nsp=False)
  predicted = maskable = 0
  for b in _batches(it, 20):
    original = _unmasked(b)
    for r in range(8):
      k = int(b["mlm_weights"][r].sum())
      chosen = set(b["mlm_positions"][r, :k].tolist())
      predicted += k
      maskable += int(b["token_mask"][r].sum()) - 2
      for p in range(1, int(b["token_mask"][r].sum()) - 1):
        if not word_start[original[r, p]] and original[r, p - 1] not in (CLS, SEP):
          assert (p in chosen) == (p - 1 in chosen)  # a word is masked entirely or not at all
  assert 0.12 < predicted / maskable <= 0.151


def test_knowledge_entities_and_triples(tmp_path, tok):
  kb_path = tmp_path / "kb.tsv"
  kb_path.write_text("# comment\nSun Microsystems\tcompany\nJava\tlanguage\n"
                     "Java\tdeveloped_by\tSun Microsystems\nPython\tlanguage\n"
                     "网络协议\tconcept\n", encoding="utf-8")
  kb = knowledge.KnowledgeBase.from_file(str(kb_path))
  text = "Java came from Sun Microsystems; JavaScript did not. 计算机网络协议很重要。"
  spans = [text[s:e] for s, e in kb.find_mentions(text)]
  assert spans == ["Java", "Sun Microsystems", "网络协议"]
  assert "company" not in kb.entities  # types are not masked as entities
  docs = ["Java was made by Sun Microsystems for set-top boxes. " * 3,
          "Python and Java are languages; Sun Microsystems made Java. " * 3]
  it = pretraining.pretrain_iterator(docs, tok, seq_len=48, batch_size=2, seed=9, nsp=False,
                                     knowledge_path=str(kb_path))
  sun = tok.encode(" Sun Microsystems")
  whole = partial = 0
  labels = []
  for b in _batches(it, 60):
    original = _unmasked(b)
    for r in range(2):
      k = int(b["mlm_weights"][r].sum())
      chosen = set(b["mlm_positions"][r, :k].tolist())
      row = original[r].tolist()
      for start in range(len(row) - len(sun) + 1):
        if row[start:start + len(sun)] == sun:
          hit = [p in chosen for p in range(start, start + len(sun))]
          whole += all(hit)
          partial += any(hit) and not all(hit)
      head_tail = tok.decode(b["kg_tokens"][r])
      labels.append(int(b["kg_label"][r]))
      del head_tail
  assert whole > 0 and partial == 0
  assert 0.3 < np.mean(labels) < 0.7
  rng = np.random.default_rng(0)
  for _ in range(50):
    h, r, t, label = kb.sample(rng)
    assert kb.is_true((h, r, t)) == (label == 1)


def test_bad_pretrain_arguments(docs, tok):
  with pytest.raises(ValueError, match="divisible"):
    pretraining.pretrain_dataset(docs, tok, seq_len=32, batch_size=5, process_count=2)
  with pytest.raises(ValueError, match="worker_count"):
    pretraining.pretrain_dataset(docs, tok, seq_len=32, batch_size=4, worker_count=3)
  with pytest.raises(ValueError, match="at least 2 documents"):
    pretraining.pretrain_dataset(["only one"], tok, seq_len=32, batch_size=2)
  with pytest.raises(ValueError, match="no non-empty"):
    pretraining.pretrain_dataset(["", "  "], tok, seq_len=32, batch_size=2)
  with pytest.raises(ValueError, match="mlm_prob"):
    pretraining.pretrain_dataset(docs, tok, seq_len=32, batch_size=2, mlm_prob=1.5)


def test_bad_knowledge_file(tmp_path, docs, tok):
  bad = tmp_path / "bad.tsv"
  bad.write_text("Java\tlanguage\nonly-one-field\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad.tsv:2"):
    pretraining.pretrain_dataset(docs, tok, seq_len=32, batch_size=2, knowledge_path=str(bad))


def test_a_corpus_spec_says_what_it_read(tmp_path, caplog):
  """Pretraining on FILE.txt logs how many documents it read and how it parsed them."""
  text, jsonl = tmp_path / "corpus.txt", tmp_path / "notes.jsonl"
  text.write_text("first doc\n\nsecond doc\n", encoding="utf-8")
  jsonl.write_text('{"text": "a note"}\n{"body": "no text field"}\n', encoding="utf-8")
  with caplog.at_level(logging.INFO, logger="absl"):
    texts = pretraining.resolve_texts(f"{text},{jsonl}")
  assert texts == ["first doc", "second doc", "a note"]
  assert (f"Corpus {text},{jsonl}: 3 documents, read as plain text, one document per line; "
          "JSONL, the text in field 'text'; rows skipped: {'missing_text': 1}.") in caplog.text
