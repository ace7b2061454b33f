"""Tests for r1jax.compress.source / artifact / measure, and the classifier workdirs the other
compression tests start from.

`make_classifier_workdir` writes a workdir shaped like a finetuning run's (checkpoints/, config.json,
labels.txt, tokenizer.model) with a randomly initialised tiny classifier in seconds; the real
finetuning stage builds `finetuned_workdir` for the slow end-to-end tests.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import configlib
from r1jax.compress import artifact as artifact_lib
from r1jax.compress import measure
from r1jax.compress import source as source_lib
from r1jax.compress import spec as spec_lib
from r1jax.compress import weights as weights_lib
from r1jax.data import builtin
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.model import heads
from r1jax.model import transformer_xl as txl
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train.state import TrainState

SEQ_LEN = 24


def write_checkpoint(path, params):
  """DIR/checkpoints/1 holding `params` as a training run saves them."""
  state = TrainState(step=jnp.asarray(1, jnp.int32), params=params, opt_state=jnp.zeros(()),
                     rng=jax.random.key_data(jax.random.PRNGKey(0)), extras=jnp.zeros(()),
                     nonfinite_skips=jnp.zeros((), jnp.int32))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(path, "checkpoints"), max_to_keep=1,
                                       keep_best=0, async_save=False)
  checkpointer.save(state)
  checkpointer.close()


def make_classifier_workdir(path, *, n_layer=2, seq_len=SEQ_LEN, pretrain=False, seed=0):
  """A finetuning-like workdir holding a random tiny classifier (or a pretraining model)."""
  os.makedirs(path, exist_ok=True)
  tok_path = os.path.join(path, "tokenizer.model")
  if not os.path.exists(tok_path):
    tokenizer_lib.Tokenizer.train(builtin.texts("task", "train")[:1500], 400).save(tok_path)
  vocab = tokenizer_lib.Tokenizer.load(tok_path).vocab_size
  cfg = txl.get_variant("tiny", vocab_size=vocab, n_layer=n_layer, n_token_types=2, dropout=0.0)
  labels = builtin.labels()
  if pretrain:
    model = heads.PretrainModel(cfg)
  else:
    model = heads.Classifier(cfg, len(labels))
  params = jax.tree.map(lambda x: x, model.init(jax.random.PRNGKey(seed),
                                                jnp.zeros((1, 8), jnp.int32))["params"])
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  write_checkpoint(path, nn.unbox(params))
  with open(os.path.join(path, "labels.txt"), "w") as f:
    f.write("".join(n + "\n" for n in labels))
  model_json = {"variant": "tiny", "n_layer": n_layer, "dropout": 0.0}
  config = {"stage": "pretrain" if pretrain else "finetune", "model": model_json,
            "task": {"train": "builtin:task:train", "dev": "builtin:task:dev",
                     "test": "builtin:task:test", "seq_len": seq_len, "text_field": "text",
                     "label_field": "label", "multi_label": False, "labels": "",
                     "label_delimiter": ",", "unknown_label": "error", "threshold": 0.5},
            "resolved": {"seq_len": seq_len, "vocab_size": vocab, "labels": list(labels)}}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return path


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
  return make_classifier_workdir(str(tmp_path_factory.mktemp("clf")))


@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory):
  return make_classifier_workdir(str(tmp_path_factory.mktemp("pt")), pretrain=True)


def finetuned_workdir(tmp_path_factory):
  """A tiny classifier trained by the finetuning stage (shared by every slow test of a session)."""
  from r1jax.stages import finetune  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.getbasetemp() / "compress_finetuned")
  config = configlib.load_config("configs/finetune.py:variant=tiny")
  config.model.n_layer = 3
  config.model.dropout = 0.1
  config.task.seq_len = 32
  config.schedule = "full"
  config.train.num_steps = 120
  config.train.learning_rate = 3e-3
  config.train.progress_bar = False
  config.eval.every_steps = 60
  config.eval.num_batches = 4
  config.checkpoint.every_steps = 1000
  config.checkpoint.async_save = False
  config.report.latency_repeats = 2
  finetune.run(config, path)
  return path


@pytest.fixture(scope="module")
def finetuned_dir(tmp_path_factory):
  return finetuned_workdir(tmp_path_factory)


def test_load_classifier_workdir(classifier_dir):
  src = source_lib.load(classifier_dir)
  assert src.kind == "checkpoint" and src.step == 1
  spec = src.spec
  assert spec.model.n_layer == 2 and spec.model.n_token_types == 2 and spec.model.untie_r
  assert spec.num_classes == 10 and spec.label_names == tuple(builtin.labels())
  assert spec.seq_len == SEQ_LEN and not spec.multi_label
  assert spec.task["test"] == "builtin:task:test"
  expected = spec_lib.abstract_params(spec)
  assert jax.tree.map(lambda x: x.shape, src.params) == jax.tree.map(lambda x: x.shape, expected)


def test_pretraining_checkpoint_is_refused(pretrain_dir):
  with pytest.raises(source_lib.WrongCheckpointKind, match=r"pretraining checkpoint.*mlm_head.*"
                     r"no 'cls_head'.*finetune"):
    source_lib.load(pretrain_dir)


def test_missing_or_empty_init_from(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    source_lib.load(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    source_lib.load(str(tmp_path))


def test_float_artifact_roundtrip_and_measure(classifier_dir, tmp_path):
  src = source_lib.load(classifier_dir)
  art = artifact_lib.save(str(tmp_path / "float"), src.spec, src.params, kind="float")
  assert art.num_params == sum(x.size for x in jax.tree.leaves(src.params))
  stored = weights_lib.load(os.path.join(art.path, artifact_lib.PARAMS_FILE))
  assert stored and all(v.dtype == np.float32 for v in stored.values())
  batches = measure.eval_batches(art.spec, "test", batch_size=16, limit=2)
  assert batches[0]["tokens"].shape == (16, SEQ_LEN)
  model = heads.Classifier(src.spec.model, 10)
  want = model.apply({"params": src.params}, batches[0]["tokens"], batches[0]["token_mask"])[0]
  np.testing.assert_allclose(art.predict(batches[0]), want, atol=1e-5)
  # An artifact directory is itself a valid source.
  again = source_lib.load(art.path)
  assert again.kind == "artifact" and again.spec == art.spec
  row = measure.measure(art, batches, name="float", latency_batch_size=8, warmup=1, repeats=2)
  for key in ("bytes", "params", "accuracy", "macro_f1", "latency_ms_batch1",
              "latency_ms_batched"):
    assert row[key] is not None and row[key] >= 0, key
  assert row["bytes"] == os.path.getsize(os.path.join(art.path, "model.safetensors"))
  rows = measure.add_relative([row, dict(row, name="copy", bytes=row["bytes"] // 4)], "float")
  assert rows[1]["size_pct"] == pytest.approx(25.0, abs=0.1)
  assert rows[0]["retained_accuracy_pct"] in (100.0,) or np.isnan(rows[0]["retained_accuracy_pct"])
  paths = measure.write_tradeoff(str(tmp_path / "report"), rows, title="t")
  assert os.path.getsize(paths["plot"]) > 1000 and "| float |" in open(paths["report"]).read()


def test_artifact_refuses_wrong_shapes(classifier_dir, tmp_path):
  src = source_lib.load(classifier_dir)
  art = artifact_lib.save(str(tmp_path / "a"), src.spec, src.params)
  meta_path = os.path.join(art.path, spec_lib.ARTIFACT_FILE)
  meta = json.load(open(meta_path))
  meta["spec"]["model"]["d_inner"] = 128
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(ValueError, match="shape mismatch"):
    artifact_lib.load(art.path)
  with pytest.raises(ValueError, match="artifact kind"):
    artifact_lib.save(str(tmp_path / "b"), src.spec, src.params, kind="zip")
