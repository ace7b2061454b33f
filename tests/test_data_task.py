"""Tests for r1jax.data.task: classification batches and the label vocabulary."""
import grain
import numpy as np
import pytest

from r1jax.data import augment
from r1jax.data import builtin
from r1jax.data import grain_ops
from r1jax.data import task as task_lib
from r1jax.data import tokenizer as tokenizer_lib

CLS = tokenizer_lib.CLS_ID


def test_classification_batches(tok):
  train = builtin.load("task", split="train")[:50]
  labels = task_lib.LabelVocab.from_names(builtin.labels())
  it = task_lib.classification_batches(train, tok, labels=labels, seq_len=40, batch_size=8, seed=0)
  b = next(it)
  assert set(b) == {"tokens", "token_mask", "label"}
  assert b["tokens"].shape == (8, 40) and b["label"].dtype == np.int32
  assert (b["tokens"][:, 0] == CLS).all() and (b["label"] < len(labels)).all()
  for _ in range(10):  # endless by default: 50 records, 80 examples read
    next(it)
  # Multi-label: multi-hot float32 [B, C].
  multi = [dict(r, label=r["tags"]) for r in train]
  b = next(task_lib.classification_batches(multi, tok, labels=labels, seq_len=40, batch_size=8,
                                           multi_label=True))
  assert b["label"].shape == (8, 10) and b["label"].dtype == np.float32
  assert (b["label"].sum(1) >= 1).all()


def test_classification_eval_padding_and_sharding(tok):
  records = [{"text": f"record {i}", "label": "ab"[i % 2]} for i in range(11)]
  seen = []
  for p in range(2):
    batches = list(task_lib.classification_batches(
        records, tok, seq_len=16, batch_size=4, shuffle=False, num_epochs=1,
        pad_final_batch=True, process_index=p, process_count=2))
    assert len(batches) == 3 and all(b["tokens"].shape == (2, 16) for b in batches)
    for b in batches:
      seen += [tok.decode(t) for t, m in zip(b["tokens"], b["example_mask"]) if m]
  assert sorted(seen) == sorted(r["text"] for r in records)


def test_classification_workers_give_the_same_batches(tok):
  records = builtin.load("task", split="dev")[:64]
  kw = dict(labels=builtin.labels(), seq_len=24, batch_size=8, num_epochs=1, seed=1)
  plain = list(task_lib.classification_batches(records, tok, **kw))
  workers = list(task_lib.classification_batches(records, tok, worker_count=2, **kw))
  assert len(plain) == len(workers) == 8
  for x, y in zip(plain, workers):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_label_vocabulary_errors(tok, tmp_path):
  records = [{"text": "a b c", "label": "x"}, {"text": "d e f", "label": "y"}]
  vocab = task_lib.LabelVocab.from_records(records)
  assert vocab.names == ("x", "y")
  assert task_lib.LabelVocab.load(vocab.save(str(tmp_path / "labels.txt"))) == vocab
  with pytest.raises(ValueError, match="Unknown label 'y'"):
    task_lib.classification_dataset(records, tok, labels=["x"], seq_len=8, batch_size=2)
  with pytest.raises(ValueError, match="no label field"):
    task_lib.classification_dataset([{"text": "a"}], tok, seq_len=8, batch_size=1)


def test_label_vocabulary_reads_values_like_the_task_splits():
  # One rule (`label_names_of`) for LabelVocab and load_task: stripped names, missing markers
  # ("NA", "none", ...) are no label, a multi-label string splits on commas.
  vocab = task_lib.LabelVocab.from_records([{"label": " x "}, {"label": "y"}, {"label": "NA"}])
  assert vocab.names == ("x", "y")
  assert vocab.encode(" y") == 1
  np.testing.assert_array_equal(vocab.encode("x, y, x", multi_label=True), [1.0, 1.0])
  assert task_lib.label_names_of(["x", None, " y "], True) == ["x", "y"]


def test_classification_batches_augment_training_text_afresh_each_epoch(tok):
  records = [{"text": "The quick brown fox jumps over the lazy dog near the big house.",
              "label": "ab"[i % 2]} for i in range(8)]
  aug = augment.AugmentText(augment.TextAugmenter(augment.SynonymLexicon.from_spec("wordnet")),
                            prob=1.0)
  kw = dict(labels=["a", "b"], seq_len=32, batch_size=8, seed=2)

  def epochs(n, **extra):
    it = task_lib.classification_batches(records, tok, **kw, **extra)
    return [next(it) for _ in range(n)]

  plain = epochs(2)
  first, again = epochs(3, augment=aug), epochs(3, augment=aug)
  for x, y in zip(first, again):  # deterministic under the seed
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  texts = [sorted(tok.decode(t) for t in b["tokens"]) for b in first]
  assert texts[0] != sorted(tok.decode(t) for t in plain[0]["tokens"])  # augmented
  assert texts[0] != texts[1] != texts[2]  # each epoch draws new operations
  np.testing.assert_array_equal(first[0]["label"], plain[0]["label"])  # labels untouched
  # prob 0 reads the texts as they are; a checkpointed iterator resumes the same stream.
  none = augment.AugmentText(aug.augmenter, prob=0.0)
  np.testing.assert_array_equal(epochs(1, augment=none)[0]["tokens"], plain[0]["tokens"])
  it = task_lib.classification_batches(records, tok, augment=aug, **kw)
  next(it)
  state = it.get_state()
  resumed = task_lib.classification_batches(records, tok, augment=aug, **kw)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["tokens"], first[1]["tokens"])
  with pytest.raises(ValueError, match=r"augment prob=1.5 must be in \[0, 1\]"):
    augment.AugmentText(aug.augmenter, prob=1.5)


def test_length_grouped_batches_cut_padding_and_resume(tok):
  records = builtin.load("task", split="train")[:203]
  kw = dict(labels=builtin.labels(), seq_len=128, batch_size=8, seed=3)
  lengths = {r["text"]: min(128, len(tok.encode(r["text"])) + 2) for r in records}

  def longest(b):
    return int(b["token_mask"].sum(-1).max())

  def waste(batches):  # padding positions left after cutting each batch to its longest row
    return sum(longest(b) * len(b["tokens"]) - int(b["token_mask"].sum()) for b in batches)

  # 203 records: each epoch is 13 groups of 16 rows (5 records read twice), 26 batches.
  epoch = 26
  grouped_it = task_lib.classification_batches(records, tok, group_by_length=16, **kw)
  grouped = [next(grouped_it) for _ in range(3 * epoch)]
  plain_it = task_lib.classification_batches(records, tok, **kw)
  plain = [next(plain_it) for _ in range(3 * epoch)]
  assert waste(grouped) < 0.3 * waste(plain)
  # Each epoch holds every record, a different order each epoch.
  texts = [[tok.decode(t) for t in b["tokens"]] for b in grouped]
  epochs = [sum(texts[e * epoch:(e + 1) * epoch], []) for e in range(3)]
  assert all(len(set(e)) == len(records) for e in epochs) and epochs[0] != epochs[1]
  # Groups line up with pairs of batches in every epoch: a group is a slice of a window sorted by
  # length, so its first batch's rows are all no longer than its second batch's.
  for a, b in zip(grouped[0::2], grouped[1::2]):
    assert longest(a) <= int(b["token_mask"].sum(-1).min())
  # Deterministic under the seed; a checkpointed iterator resumes the same stream.
  again = task_lib.classification_batches(records, tok, group_by_length=16, **kw)
  for _ in range(30):
    next(again)
  resumed = task_lib.classification_batches(records, tok, group_by_length=16, **kw)
  resumed.set_state(again.get_state())
  for b in grouped[30:33]:
    np.testing.assert_array_equal(next(resumed)["tokens"], b["tokens"])
  # Evaluation: the records ordered by length, every one once.
  ev = list(task_lib.classification_batches(records, tok, shuffle=False, num_epochs=1,
                                            pad_final_batch=True, group_by_length=1, **kw))
  lens = [int(m.sum()) for b in ev for m, e in zip(b["token_mask"], b["example_mask"]) if e]
  assert lens == sorted(lengths[r["text"]] for r in records)
  with pytest.raises(ValueError, match="group=0"):
    grain_ops.LengthGroupedShuffle(grain.MapDataset.source(records), [1] * len(records), group=0,
                                   seed=0)


def test_bucket_length_and_trim():
  assert [grain_ops.bucket_length(n, 256, 8) for n in (1, 32, 33, 200, 256)] == [32, 32, 64, 224,
                                                                               256]
  assert grain_ops.bucket_length(10, 100, 3) == 34 and grain_ops.bucket_length(70, 100, 3) == 100
  assert grain_ops.bucket_length(5, 64, 0) == 64
  # Short rows: widths no closer than 32 (each width compiles once).
  assert [grain_ops.bucket_length(n, 64, 8, 32) for n in (1, 9, 33, 64)] == [32, 32, 64, 64]
  assert grain_ops.bucket_length(40, 256, 8, 32) == 64
  batch = {"tokens": np.ones((2, 8)), "token_mask": np.ones((2, 8), bool), "label": np.zeros(2)}
  cut = grain_ops.trim_to_length(batch, 3, ("tokens", "token_mask"))
  assert cut["tokens"].shape == (2, 3) and cut["token_mask"].shape == (2, 3)
  assert cut["label"] is batch["label"]


def test_seq_len_from_the_data_covers_the_asked_share(tok):
  lengths = np.array([10] * 80 + [60] * 15 + [500] * 5)
  # 90% of the texts are <= 60 tokens: 62 with [CLS]/[SEP] -> the next multiple of 32.
  assert task_lib.choose_seq_len(lengths, cover=0.9, cap=512) == 64
  assert task_lib.choose_seq_len(lengths, cover=0.75, cap=512) == 32
  assert task_lib.choose_seq_len(lengths, cover=1.0, cap=512) == 512
  assert task_lib.choose_seq_len(lengths, cover=1.0, cap=300) == 288   # the cap, rounded down
  assert task_lib.choose_seq_len(np.array([], np.int64), cover=0.9, cap=256) == 256
  assert task_lib.truncated_share(lengths, 64) == pytest.approx(0.05)
  assert task_lib.truncated_share(lengths, 32) == pytest.approx(0.20)
  # Counted on the tokenizer's pieces, sampled when there are many texts.
  records = [{"text": "alpha beta gamma " * k} for k in range(1, 31)]
  full = task_lib.text_lengths(records, tok)
  assert list(full) == [len(tok.encode(r["text"])) for r in records]
  sample = task_lib.text_lengths(records, tok, limit=10, seed=3)
  assert len(sample) == 10 and set(sample) <= set(full)
