"""Tests for r1jax.compress.quantize, int8 artifacts, jax.export, and the quantize stage."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import configlib
from r1jax.compress import artifact as artifact_lib
from r1jax.compress import export as export_lib
from r1jax.compress import quantize as quant_lib
from r1jax.compress import source as source_lib
from r1jax.compress import spec as spec_lib
from r1jax.compress import weights as weights_lib
from r1jax.model import heads
from r1jax.model import transformer_xl as txl
from r1jax.stages import quantize as quantize_stage
from test_compress_source import classifier_dir  # noqa: F401  (fixture)
from test_compress_source import finetuned_dir  # noqa: F401  (fixture)
from test_compress_source import pretrain_dir  # noqa: F401  (fixture)

Q = 16


@pytest.fixture(scope="module")
def tiny():
  cfg = txl.get_variant("tiny", vocab_size=300, n_layer=1, n_token_types=2, dropout=0.0)
  model = heads.Classifier(cfg, 5)
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(5, 300, (12, Q)), jnp.int32)
  mask = jnp.asarray(np.arange(Q)[None, :] < rng.randint(4, Q + 1, (12, 1)))
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens[:1])["params"])
  return model, params, tokens, mask


def _apply(model, params, tokens, mask):
  return jax.jit(lambda p, t, m: model.apply({"params": p}, t, m)[0])(params, tokens, mask)


def test_plan_finds_every_weight(tiny):
  model, params, tokens, mask = tiny
  plans = quant_lib.plan(model, tokens[:1], mask[:1])
  for i in range(1):
    for name in ("attn/qkv", "attn/r_net", "attn/out", "ff_in"):  # ff_out: known gap
      assert f"backbone/layer_{i}/{name}/kernel" in plans, name
  # The attention projections live in child modules that qwix alone does not see.
  assert plans["backbone/layer_0/attn/qkv/kernel"].channelwise_axes == (1, 2, 3)
  assert plans["backbone/layer_0/attn/out/kernel"].channelwise_axes == (2,)
  assert plans["backbone/layer_0/ff_in/kernel"].channelwise_axes == (1,)
  assert plans["backbone/word_emb/embedding"] == quant_lib.LeafPlan("embedding", (0,))
  assert "cls_head/out/kernel" in plans
  # Biases and LayerNorm stay float.
  assert not any(p.endswith(("bias", "scale")) for p in plans)
  no_emb = quant_lib.plan(model, tokens[:1], mask[:1], embeddings=False)
  assert "backbone/word_emb/embedding" not in no_emb


def test_int8_modes_close_to_float(tiny):
  model, params, tokens, mask = tiny
  plans = quant_lib.plan(model, tokens[:1], mask[:1])
  qparams = quant_lib.quantize_params(params, plans)
  qkv = qparams["backbone"]["layer_0"]["attn"]["qkv"]["kernel"]
  assert qkv.array.qvalue.dtype == jnp.int8 and qkv.array.scale.shape == (1, 3, 4, 16)
  emb = qparams["backbone"]["word_emb"]["embedding"].array
  assert emb.qvalue.dtype == jnp.int8 and emb.scale.shape == (300, 1)
  ref = _apply(model, params, tokens, mask)
  scales = quant_lib.calibrate(model, qparams, [{"tokens": tokens, "token_mask": mask}])
  assert scales and all(v > 0 for v in scales.values())
  for mode in quant_lib.MODES:
    out = _apply(quant_lib.quantized_model(model, mode, scales if mode == "static" else None),
                 qparams, tokens, mask)
    err = float(jnp.max(jnp.abs(out - ref)))
    assert err < 0.05 * float(jnp.max(jnp.abs(ref))) + 1e-3, (mode, err)
    assert not jnp.allclose(out, ref, atol=1e-7), f"{mode} did not quantize anything"
  # int8 bytes: ~ a quarter of float32 (+ scales and float biases / LayerNorm).
  assert quant_lib.quantized_bytes(qparams) < 0.3 * sum(x.nbytes for x in jax.tree.leaves(params))


def test_static_mode_needs_scales_and_bad_mode(tiny):
  model, *_ = tiny
  with pytest.raises(ValueError, match="act_scales"):
    quant_lib.Int8Provider("static")
  with pytest.raises(ValueError, match="allowed values are weights, dynamic, static"):
    quant_lib.Int8Provider("int4")
  with pytest.raises(ValueError, match="no batches"):
    quant_lib.calibrate(model, {}, [])


def test_int8_artifact_roundtrip_matches_in_memory(tiny, tmp_path):
  model, params, tokens, mask = tiny
  plans = quant_lib.plan(model, tokens[:1], mask[:1])
  qparams = quant_lib.quantize_params(params, plans)
  spec = spec_lib.ClassifierSpec(model=model.config, num_classes=5,
                                   label_names=tuple("abcde"), seq_len=Q)
  for mode in ("weights", "dynamic"):
    art = artifact_lib.save(str(tmp_path / mode), spec, qparams, kind="int8",
                            quantization={"mode": mode})
    data = weights_lib.load(os.path.join(art.path, artifact_lib.PARAMS_FILE))
    for path in plans:
      assert data[path + "::qvalue"].dtype == np.int8
      assert path not in data  # no float copy of a quantized weight
    loaded = artifact_lib.load(art.path)
    assert loaded.kind == "int8" and loaded.kind_is_quantized
    assert quant_lib.is_quantized(loaded.params["backbone"]["layer_0"]["ff_in"]["kernel"])
    live = _apply(quant_lib.quantized_model(model, mode), qparams, tokens, mask)
    got = loaded.predict({"tokens": tokens, "token_mask": mask})
    np.testing.assert_array_equal(np.asarray(got), np.asarray(live))
    assert loaded.num_params == sum(x.size for x in jax.tree.leaves(params))


def test_export_matches_live_model(tiny, tmp_path):
  model, params, tokens, mask = tiny
  plans = quant_lib.plan(model, tokens[:1], mask[:1])
  spec = spec_lib.ClassifierSpec(model=model.config, num_classes=5,
                                   label_names=tuple("abcde"), seq_len=Q)
  qparams = quant_lib.quantize_params(params, plans)
  for mode in ("float", "weights", "dynamic"):
    if mode == "float":  # the training (flat matmul) layout must export with a symbolic batch too
      art = artifact_lib.save(str(tmp_path / mode), spec, params, kind="float")
    else:
      art = artifact_lib.save(str(tmp_path / mode), spec, qparams, kind="int8",
                              quantization={"mode": mode})
    served = export_lib.load(export_lib.save(art, art.path))
    for n in (1, 12):  # one file, any batch size
      live = np.asarray(art.predict({"tokens": tokens[:n], "token_mask": mask[:n]}))
      # Dynamic int8 rounds activations in the compiled program; a differently fused program
      # may round a few of them one step the other way.
      tol = 0.02 * np.abs(live).max() if mode == "dynamic" else 1e-5
      np.testing.assert_allclose(np.asarray(served(tokens[:n], mask[:n])), live, atol=tol)
  with pytest.raises(ValueError, match=f"tokens must be \\[batch, {Q}\\]"):
    served(tokens[:, :4], mask[:, :4])
  signature = json.load(open(os.path.join(art.path, export_lib.SIGNATURE_FILE)))
  assert signature["outputs"]["logits"] == ["batch", 5, "float32"]


def _stage_config(init_from, **quant):
  config = configlib.load_config("configs/quantize.py:variant=tiny")
  config.init_from = init_from
  config.report.latency_repeats = 2
  config.report.latency_warmup = 1
  config.report.latency_batch_size = 8
  config.report.test_limit_batches = 2
  config.quant.calibration_batches = 2
  config.export.onnx = "off"  # tests/test_edge_export.py runs the stage with it
  for k, v in quant.items():
    config.quant[k] = v
  return config


def test_quantize_stage(classifier_dir, tmp_path):  # noqa: F811
  workdir = str(tmp_path / "q")
  summary = quantize_stage.run(_stage_config(classifier_dir, modes="dynamic"), workdir)
  names = [r["name"] for r in summary["artifacts"] if r["runtime"] == "jax"]
  assert names == ["float", "int8-dynamic"]  # + the ONNX rows with [edge] (test_edge_export.py)
  for row in summary["artifacts"]:
    for key in ("bytes", "params", "accuracy", "macro_f1", "latency_ms_batch1",
                "latency_ms_batched", "retained_accuracy_pct"):
      assert isinstance(row[key], (int, float)), (row["name"], key)
  int8 = summary["artifacts"][1]
  # Known gap: the feed-forward output kernels (ff_out) stay float (see compress/quantize.py).
  assert int8["bytes"] < 0.5 * summary["artifacts"][0]["bytes"]
  assert summary["checks"]["dynamic"]["roundtrip_max_abs_diff"] == 0.0
  for name in ("summary.json", "report.md", "tradeoff.png", "config.json", "labels.txt",
               "tokenizer.model", "artifact/artifact.json", "artifact/model.stablehlo",
               "float/model.safetensors", "artifact/MODEL_CARD.md"):
    assert os.path.exists(os.path.join(workdir, name)), name
  art = artifact_lib.load(os.path.join(workdir, "artifact"))
  assert art.quantization["mode"] == "dynamic"
  served = export_lib.load(os.path.join(workdir, "artifact"))
  batch = {"tokens": np.ones((2, art.spec.seq_len), np.int32),
           "token_mask": np.ones((2, art.spec.seq_len), bool)}
  live = np.asarray(art.predict(batch))
  np.testing.assert_allclose(np.asarray(served(batch["tokens"], batch["token_mask"])), live,
                             atol=0.02 * np.abs(live).max())
  # A finished run is not redone.
  assert quantize_stage.run(_stage_config(classifier_dir, modes="dynamic"),
                            workdir)["artifacts"] == summary["artifacts"]


def test_quantize_stage_bad_inputs(pretrain_dir, tmp_path):  # noqa: F811
  with pytest.raises(configlib.ConfigError, match="quant.modes"):
    quantize_stage.validate(_stage_config(pretrain_dir, modes="dynamic,int4"))
  with pytest.raises(configlib.ConfigError, match="quant.primary"):
    quantize_stage.validate(_stage_config(pretrain_dir, modes="weights"))
  with pytest.raises(configlib.ConfigError, match="init_from is empty"):
    quantize_stage.run(_stage_config(""), str(tmp_path / "e"))
  with pytest.raises(configlib.ConfigError, match="init_from"):
    quantize_stage.validate(_stage_config(str(tmp_path / "missing")))
  with pytest.raises(source_lib.WrongCheckpointKind, match="cls_head"):
    quantize_stage.run(_stage_config(pretrain_dir), str(tmp_path / "q"))


@pytest.mark.slow
def test_quantize_finetuned_accuracy(finetuned_dir, tmp_path):  # noqa: F811
  config = _stage_config(finetuned_dir)
  config.report.test_limit_batches = 0
  summary = quantize_stage.run(config, str(tmp_path / "q"))
  rows = {r["name"]: r for r in summary["artifacts"]}
  for mode in ("weights", "dynamic", "static"):
    assert summary["checks"][mode]["roundtrip_max_abs_diff"] == 0.0
    assert rows[f"int8-{mode}"]["accuracy_drop_points"] <= 5.0, mode
  assert summary["targets"]["dynamic"]["size_pct"] < 30.0
