"""Classification metrics against hand-computed values, confusion PNG, latency after warm-up."""
import math
import os
import time

import numpy as np
import pytest

from r1jax import eval as eval_lib

NAMES = ["a", "b", "c"]


def test_multiclass_metrics_by_hand():
  labels = np.array([0, 0, 0, 1, 1, 2])
  preds = np.array([0, 0, 1, 1, 2, 2])
  m = eval_lib.multiclass_metrics(labels, preds, NAMES)
  assert m["accuracy"] == pytest.approx(4 / 6)
  assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
  # a: P 2/2, R 2/3; b: P 1/2, R 1/2; c: P 1/2, R 1/1.
  assert m["per_class"]["a"]["precision"] == pytest.approx(1.0)
  assert m["per_class"]["a"]["recall"] == pytest.approx(2 / 3)
  assert m["per_class"]["c"]["recall"] == pytest.approx(1.0)
  f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 / 1.5]
  assert m["macro_f1"] == pytest.approx(np.mean(f1))
  assert m["per_class"]["b"]["support"] == 2 and m["per_class"]["b"]["predicted"] == 2


def test_macro_f1_ignores_classes_absent_from_labels_and_predictions():
  m = eval_lib.multiclass_metrics(np.array([0, 1]), np.array([0, 1]), NAMES)
  assert m["macro_f1"] == pytest.approx(1.0)       # "c" occurs nowhere: not averaged in
  assert m["per_class"]["c"]["f1"] == 0.0
  m = eval_lib.multiclass_metrics(np.array([0, 0]), np.array([0, 2]), NAMES)
  assert m["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)  # predicted-only class counts (F1 0)


def test_multiclass_rejects_out_of_range_ids():
  with pytest.raises(ValueError, match="outside"):
    eval_lib.multiclass_metrics(np.array([0, 3]), np.array([0, 1]), NAMES)


def test_multilabel_metrics_by_hand():
  targets = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
  preds = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0]])
  m = eval_lib.multilabel_metrics(targets, preds, NAMES)
  # TP=4 (a,a,b,b), FP=1 (c in row 1), FN=1 (c in row 0).
  assert m["micro_precision"] == pytest.approx(4 / 5)
  assert m["micro_recall"] == pytest.approx(4 / 5)
  assert m["micro_f1"] == pytest.approx(0.8)
  assert m["macro_f1"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)
  assert m["accuracy"] == pytest.approx(1 / 3)  # exact match: only row 2
  assert m["confusion"][2] == [[1, 1], [1, 0]]  # label c: TN 1, FP 1, FN 1, TP 0


def test_evaluate_classifier_skips_padding_rows_and_thresholds():
  batches = [{"label": np.array([0, 1, 2, 0]), "example_mask": np.array([1, 1, 1, 0], bool),
              "x": np.eye(4, 3)[[0, 1, 0, 2]]}]
  m = eval_lib.evaluate_classifier(lambda b: b["x"] * 5.0, batches, label_names=NAMES)
  assert m["num_examples"] == 3 and m["accuracy"] == pytest.approx(2 / 3)
  ml = [{"label": np.array([[1, 0, 1]], np.float32), "z": np.array([[2.0, -2.0, 0.5]])}]
  m = eval_lib.evaluate_classifier(lambda b: b["z"], ml, label_names=NAMES, multi_label=True,
                                   threshold=0.7)  # sigmoid(0.5) = 0.62 < 0.7: c not predicted
  assert m["micro_recall"] == pytest.approx(0.5) and m["micro_precision"] == pytest.approx(1.0)


def test_evaluate_classifier_checks_logit_shape():
  with pytest.raises(ValueError, match="expected"):
    eval_lib.evaluate_classifier(lambda b: np.zeros((2, 5)), [{"label": np.array([0, 1])}],
                                 label_names=NAMES)


def test_majority_baseline():
  out = eval_lib.majority_baseline(np.array([1, 1, 0]), np.array([1, 0, 2, 1]), NAMES)
  assert out["class"] == "b" and out["accuracy"] == pytest.approx(0.5)


def _keyword_texts(n, seed, multi):
  """Texts whose label(s) are the keywords they contain, among filler words."""
  rng = np.random.default_rng(seed)
  filler = [f"w{i}" for i in range(40)]
  texts, labels = [], []
  for _ in range(n):
    names = sorted(set(rng.choice(NAMES, size=2 if multi else 1)))
    words = list(rng.choice(filler, size=8)) + [f"key{k}" for k in names]
    rng.shuffle(words)
    texts.append(" ".join(words))
    labels.append(names if multi else names[0])
  return texts, labels


@pytest.mark.parametrize("multi", [False, True])
def test_linear_baseline_learns_keywords_and_picks_c_on_dev(multi):
  train, dev, test = (_keyword_texts(n, seed, multi) for n, seed in ((120, 0), (40, 1), (40, 2)))
  out = eval_lib.linear_baseline(train, {"dev": dev, "test": test}, label_names=NAMES,
                                 multi_label=multi, c_values=(0.001, 10.0))
  key = "micro_f1" if multi else "accuracy"
  assert out["test"][key] >= 0.85 and out["dev"]["macro_f1"] >= 0.85, out["test"]
  assert out["C"] == 10.0  # C=0.001 underfits: dev picks the other
  assert out["test"]["num_examples"] == 40 and out["seconds"] > 0
  # The same metric code as the model's: a shuffled test set scores what it should.
  wrong = (test[0], [NAMES[(NAMES.index(y) + 1) % 3] for y in test[1]]) if not multi else None
  if wrong:
    assert eval_lib.linear_baseline(train, {"dev": dev, "test": wrong}, label_names=NAMES,
                                    c_values=(10.0,))["test"]["accuracy"] <= 0.15


@pytest.mark.parametrize("multi", [False, True])
def test_confusion_matrix_png(tmp_path, multi):
  if multi:
    m = eval_lib.multilabel_metrics(np.eye(3), np.eye(3), NAMES)
  else:
    m = eval_lib.multiclass_metrics(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2]), NAMES)
  path = eval_lib.save_confusion_matrix(m, str(tmp_path / "cm.png"), title="t")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(path) > 2000


def test_measure_latency_excludes_warmup_and_divides_by_batch():
  calls = []

  def fn(batch):
    calls.append(1)
    time.sleep(0.2 if len(calls) == 1 else 0.002)  # the first call "compiles"
    return batch

  out = eval_lib.measure_latency(fn, {"tokens": np.zeros((4, 3))}, warmup=1, repeats=5)
  assert len(calls) == 6
  assert out["batch_size"] == 4
  assert 1.5 < out["ms_per_batch"] < 100.0
  assert out["ms_per_example"] == pytest.approx(out["ms_per_batch"] / 4)
  s = eval_lib.latency_summary(fn, {"t": np.zeros((1, 2))}, {"t": np.zeros((8, 2))}, warmup=0,
                               repeats=3)
  assert s["latency_batch_size"] == 8 and s["latency_ms_batched"] < s["latency_ms_batch1"]
  assert not s["latency_batched_slower"] and "noise" not in eval_lib.latency_line(s)


def test_latency_summary_alternates_reports_the_spread_and_flags_noise():
  """Batch 1 and the larger batch are timed call by call in turn; each figure comes with its
  10th-90th percentile range, and a batched per-example figure above batch 1's is called noise."""
  sizes = []

  def fn(batch):
    sizes.append(len(batch["t"]))
    time.sleep(0.002 if len(batch["t"]) == 1 else 0.040)  # 5 ms per example at batch 8: "noise"
    return batch

  s = eval_lib.latency_summary(fn, {"t": np.zeros((1, 2))}, {"t": np.zeros((8, 2))}, warmup=1,
                               repeats=5)
  assert sizes == [1, 8] * 6
  assert s["latency_repeats"] == 5 and s["latency_batched_slower"]
  for name in ("batch1", "batched"):
    assert (s[f"latency_ms_{name}_p10"] <= s[f"latency_ms_{name}"]
            <= s[f"latency_ms_{name}_p90"])
  line = eval_lib.latency_line(s)
  assert "p10-p90" in line and "noise: batch 8 should not be slower per example" in line


def test_markdown_table():
  text = eval_lib.markdown_table(["x", "y"], [["a|b", 0.123456], [1, math.nan]])
  assert text.splitlines() == ["| x | y |", "|---|---|", "| a\\|b | 0.1235 |", "| 1 | n/a |"]
