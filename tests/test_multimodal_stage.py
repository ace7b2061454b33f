"""Finetuning on an image+text task (issue 28): the config switch, its validation, and (slow) the
stage end to end on the embedded icon task with the three models compared on the same split."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from r1jax import configlib
from r1jax.stages import finetune

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**multimodal):
  config = configlib.load_config(os.path.join(REPO, "configs", "finetune.py:variant=tiny"))
  config.multimodal.enabled = True
  for key, value in multimodal.items():
    config.multimodal[key] = value
  return config


def test_multimodal_keys_are_validated_together():
  config = _config(image_size=30, patch_size=8, models="fused,audio", fusion="early")
  config.image_augment.hue = 0.9
  config.image_augment.crop_scale_min = 0.0
  with pytest.raises(configlib.ConfigError) as e:
    finetune.validate(config, num_devices=8, process_count=1)
  message = str(e.value)
  for expected in ("multimodal.patch_size: 8 must divide multimodal.image_size=30",
                   "multimodal.models: 'fused,audio'", "image_augment.hue: 0.9 must be in",
                   "image_augment.crop_scale_min", "multimodal.fusion"):
    assert expected in message
  with pytest.raises(configlib.ConfigError, match="aux_weight: 1.0 needs multimodal.fusion=late"):
    finetune.validate(_config(fusion="joint", aux_weight=1.0), num_devices=8, process_count=1)
  finetune.validate(_config(), num_devices=8, process_count=1)   # the defaults are valid


def test_bad_multimodal_value_is_one_line_without_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "r1jax.main", "--config=configs/finetune.py:variant=tiny",
       f"--workdir={tmp_path / 'w'}", "--config.multimodal.enabled=True",
       "--config.multimodal.patch_size=5"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "multimodal.patch_size: 5 must divide multimodal.image_size=32" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.slow  # ~60 s: three tiny models compiled and trained
def test_stage_trains_and_compares_three_models_on_icons(tmp_path):
  config = _config(image_size=16, patch_size=8)
  config.task.seq_len = 12
  config.train.num_steps = 8
  config.train.batch_size = 16
  config.eval.every_steps = 4
  config.checkpoint.every_steps = 4
  config.train.progress_bar = False
  config.image_augment.prob = 1.0
  config.model.n_layer = 1
  workdir = str(tmp_path / "mm")
  summary = finetune.run(config, workdir)
  assert summary["multimodal"] and summary["main_model"] == "fused"
  assert list(summary["models"]) == ["fused", "text", "image"]
  for name, model in summary["models"].items():
    for split in ("dev", "test"):
      assert 0.0 <= model[split]["accuracy"] <= 1.0
    assert model["step"] == 8
  assert summary["task"]["train"] == "builtin:icons:train"
  assert summary["images"]["train"]["counts"] == {"rows": 465, "used": 465}
  report = open(os.path.join(workdir, "report.md")).read()
  assert "| fused | text+image |" in report and "| image | image |" in report
  assert os.path.isdir(os.path.join(workdir, "checkpoints"))
  for name in ("fused", "text", "image"):
    records = [json.loads(line) for line in
               open(os.path.join(workdir, "models", name, "metrics.jsonl"))]
    assert {r["model"] for r in records} == {name}
  # The fused model exported as StableHLO (symbolic batch) gives the stage's logits.
  exported = jax.export.deserialize(bytearray(open(summary["export"], "rb").read()))
  signature = json.load(open(os.path.join(workdir, "model.signature.json")))
  assert list(signature["inputs"]) == ["tokens", "token_mask", "images"]
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50, (3, 12)).astype(np.int32)
  images = rng.integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
  logits = np.asarray(exported.call(tokens, np.ones((3, 12), bool), images))
  assert logits.shape == (3, 9) and np.all(np.isfinite(logits))
  one = np.asarray(exported.call(tokens[:1], np.ones((1, 12), bool), images[:1]))
  np.testing.assert_allclose(one[0], logits[0], rtol=1e-4, atol=1e-5)    # any batch size
  other = np.asarray(exported.call(tokens, np.ones((3, 12), bool), 255 - images))
  assert not np.allclose(other, logits)                                   # the images count
  # A finished stage is not redone: the same summary comes back.
  assert finetune.run(config, workdir)["models"] == json.loads(json.dumps(summary["models"]))
