"""Tests for r1jax.data.task: classification batches and the label vocabulary."""
import numpy as np
import pytest

from r1jax.data import augment
from r1jax.data import builtin
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
