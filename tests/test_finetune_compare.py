"""The comparison command: side-by-side table with differences, per-class F1, clear errors."""
import json
import os

import pytest

from r1jax import configlib
from r1jax.stages import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ["a", "b"]


def fake_run(tmp_path, name, acc, f1, lat1, latb, labels=LABELS, stage="finetune"):
  workdir = tmp_path / name
  workdir.mkdir()
  summary = {
      "stage": stage, "init_from": f"/pt/{name}", "trainable_params": 100, "total_params": 1000,
      "best_eval_loss": 1.0 - acc, "task": {"labels": labels},
      "majority_baseline": {"class": "a", "accuracy": 0.5, "macro_f1": 0.33},
      "linear_baseline": {"method": "TF-IDF + LR", "C": 10.0,
                          "test": {"accuracy": 0.8, "macro_f1": 0.75},
                          "dev": {"accuracy": 0.79, "macro_f1": 0.7}},
      "test": {"accuracy": acc, "macro_f1": f1, "latency_ms_batch1": lat1,
               "latency_ms_batched": latb, "latency_batch_size": 32,
               "per_class": {"a": {"f1": f1 + 0.1}, "b": {"f1": f1 - 0.1}}},
      "dev": {"accuracy": acc - 0.01, "macro_f1": f1 - 0.01, "per_class": {}},
  }
  (workdir / "summary.json").write_text(json.dumps(summary))
  return str(workdir)


def config(**kw):
  c = configlib.load_config(os.path.join(ROOT, "configs", "compare.py"))
  for k, v in kw.items():
    c[k] = v
  return c


def test_side_by_side_table_with_differences(tmp_path, capsys):
  a = fake_run(tmp_path, "general", 0.60, 0.50, 2.0, 0.5)
  b = fake_run(tmp_path, "adapted", 0.70, 0.65, 2.2, 0.4)
  out = compare.run(config(workdirs=f"{a},{b}", names="general,adapted"), str(tmp_path / "cmp"))
  rows = {r["metric"]: r for r in out["metrics"]}
  assert rows["accuracy"]["values"] == [0.60, 0.70]
  assert rows["accuracy"]["differences"][0] == pytest.approx(0.10)
  assert rows["macro-F1"]["differences"][0] == pytest.approx(0.15)
  assert rows["latency batch 1 (ms/example)"]["ratios"][0] == pytest.approx(1.1)
  assert "micro-F1" not in rows  # no run reports it
  assert out["per_class_f1"]["a"] == [pytest.approx(0.6), pytest.approx(0.75)]
  printed = capsys.readouterr().out
  table = open(tmp_path / "cmp" / "comparison.md").read()
  assert printed.strip() == table.strip()
  assert "| metric | general | adapted | adapted - general |" in table
  assert "| accuracy | 0.6 | 0.7 | +0.1 |" in table
  assert "| latency batch 1 (ms/example) | 2 | 2.2 | +0.2 (1.10x) |" in table
  assert "Majority-class baseline" in table
  # The linear baseline of the reference run, with every run's difference to it.
  assert out["linear_baseline"]["model_minus_baseline"][1]["accuracy"] == pytest.approx(-0.10)
  assert ("Linear baseline (TF-IDF + LR, C=10): accuracy 0.8000, macro-F1 0.7500. Model minus "
          "baseline (accuracy / macro-F1): general -0.2000 / -0.2500, adapted -0.1000 / -0.1000."
          ) in table
  saved = json.load(open(tmp_path / "cmp" / "summary.json"))
  assert saved["stage"] == "compare" and saved["names"] == ["general", "adapted"]


def test_three_runs_and_default_names(tmp_path):
  dirs = [fake_run(tmp_path, n, 0.5 + i / 10, 0.4, 1.0, 1.0) for i, n in enumerate("xyz")]
  out = compare.run(config(workdirs=",".join(dirs)), str(tmp_path / "cmp"))
  assert out["names"] == ["x", "y", "z"]
  acc = next(r for r in out["metrics"] if r["metric"] == "accuracy")
  assert acc["differences"] == [pytest.approx(0.1), pytest.approx(0.2)]


def test_errors(tmp_path):
  a = fake_run(tmp_path, "a", 0.6, 0.5, 1.0, 1.0)
  with pytest.raises(configlib.ConfigError, match="name at least two"):
    compare.run(config(workdirs=a), str(tmp_path / "c"))
  with pytest.raises(FileNotFoundError, match="not a finished finetuning workdir"):
    compare.run(config(workdirs=f"{a},{tmp_path / 'missing'}"), str(tmp_path / "c"))
  other = fake_run(tmp_path, "other", 0.6, 0.5, 1.0, 1.0, labels=["x", "y"])
  with pytest.raises(ValueError, match="different label sets"):
    compare.run(config(workdirs=f"{a},{other}"), str(tmp_path / "c"))
  pre = fake_run(tmp_path, "pre", 0.6, 0.5, 1.0, 1.0, stage="pretrain")
  with pytest.raises(ValueError, match="compare takes finetuning workdirs"):
    compare.run(config(workdirs=f"{a},{pre}"), str(tmp_path / "c"))
  with pytest.raises(configlib.ConfigError, match="1 names for 2 workdirs"):
    compare.run(config(workdirs=f"{a},{a}", names="one"), str(tmp_path / "c"))
  with pytest.raises(configlib.ConfigError, match="split: 'train' is not one of"):
    compare.validate(config(split="train"))
