"""Compression and edge export of the image path (issue 28): a multimodal classifier as an int8
artifact, StableHLO, float and int8 ONNX, served by r1jax.serve with an image and a text without
JAX, the one-line errors around it, and (slow) the quantize stage on a multimodal finetuning
workdir.

`make_multimodal_workdir` writes a workdir shaped like the multimodal finetune stage's
(checkpoints/, config.json with its `multimodal` section, labels.txt, tokenizer.model) holding a random tiny
`vision.MultimodalClassifier`, in seconds."""
import base64
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import configlib
from r1jax import errors
from r1jax import serve
from r1jax.compress import artifact as artifact_lib
from r1jax.compress import edge
from r1jax.compress import export as export_lib
from r1jax.compress import quantize as quant_lib
from r1jax.compress import source as source_lib
from r1jax.compress import spec as spec_lib
from r1jax.compress import stage_lib
from r1jax.data import builtin
from r1jax.data import images as images_lib
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.model import transformer_xl as txl
from r1jax.model import vision
from r1jax.stages import quantize as quantize_stage
from test_compress_source import write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE, PATCH, SEQ_LEN = 16, 8, 12


def _tokenizer(path):
  tokenizer_lib.Tokenizer.train([r["text"] for r in builtin.load("icons", "train")],
                                300).save(path)
  return path


def _random_artifact(directory, modalities=("text", "image"), tokenizer="", num_classes=3):
  """A float artifact of a random 1-layer classifier reading `modalities` (text: a text one)."""
  cfg = txl.get_variant("tiny", vocab_size=300, n_layer=1, n_token_types=2, dropout=0.0,
                        ngram_buckets=0)
  image = vision.ImageConfig(IMAGE_SIZE, PATCH) if "image" in modalities else None
  spec = spec_lib.ClassifierSpec(model=cfg, num_classes=num_classes,
                                 label_names=tuple("abcdefghij"[:num_classes]), seq_len=SEQ_LEN,
                                 tokenizer=tokenizer, image=image, modalities=modalities)
  params = nn.unbox(spec_lib.classifier_module(spec).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return artifact_lib.save(directory, spec, params)


def _batch(spec, batch_size, seed=0):
  rng = np.random.RandomState(seed)
  mask = np.arange(SEQ_LEN)[None, :] < rng.randint(3, SEQ_LEN + 1, (batch_size, 1))
  return {"tokens": np.where(mask, rng.randint(5, 300, (batch_size, SEQ_LEN)), 0).astype(np.int32),
          "token_mask": mask,
          "images": rng.randint(0, 256, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)}


def make_multimodal_workdir(path, *, models="fused", seed=0, fusion="joint"):
  """A multimodal-finetuning-like workdir with a random 1-layer classifier on the icon task."""
  os.makedirs(path, exist_ok=True)
  tok_path = _tokenizer(os.path.join(path, "tokenizer.model"))
  vocab = tokenizer_lib.Tokenizer.load(tok_path).vocab_size
  cfg = txl.get_variant("tiny", vocab_size=vocab, n_layer=1, n_token_types=2, dropout=0.0,
                        ngram_buckets=0)
  labels = builtin.labels("icons")
  model = vision.MultimodalClassifier(cfg, vision.ImageConfig(IMAGE_SIZE, PATCH, fusion=fusion),
                                      len(labels))
  params = nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"])
  write_checkpoint(path, params)
  with open(os.path.join(path, "labels.txt"), "w") as f:
    f.write("".join(n + "\n" for n in labels))
  task = {f"{s}": f"builtin:icons:{s}" for s in ("train", "dev", "test")}
  task.update(seq_len=SEQ_LEN, text_field="text", label_field="label", image_field="image",
              multi_label=False, labels="")
  config = {"stage": "finetune", "model": {"variant": "tiny", "n_layer": 1, "dropout": 0.0,
                                           "ngram_buckets": 16384},
            "multimodal": {"enabled": True, "image_size": IMAGE_SIZE, "patch_size": PATCH,
                           "models": models, "image_field": "image", "fusion": fusion},
            "task": task,
            "resolved": {"seq_len": SEQ_LEN, "vocab_size": vocab, "labels": list(labels),
                         "models": models.split(","), "task": task}}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return path


@pytest.fixture(scope="module")
def fused_art(tmp_path_factory):
  base = tmp_path_factory.mktemp("fused")
  return _random_artifact(str(base / "float"), tokenizer=_tokenizer(str(base / "tok.model")))


@pytest.fixture(scope="module")
def fused_onnx(fused_art, tmp_path_factory):
  return edge.export_pair(fused_art, str(tmp_path_factory.mktemp("fused_int8")))


@pytest.fixture(scope="module")
def icon_png(tmp_path_factory):
  """A test-split icon as a PNG file, and its name as text."""
  record = builtin.load("icons", "test")[0]
  path = str(tmp_path_factory.mktemp("png") / "icon.png")
  with open(path, "wb") as f:
    f.write(base64.b64decode(record["image"][len(images_lib.BASE64_PREFIX):]))
  return path, record["text"]


def test_int8_and_onnx_round_trip_of_a_multimodal_classifier(fused_art, fused_onnx, tmp_path):
  spec = fused_art.spec
  assert spec.input_names == ("tokens", "token_mask", "images")
  assert spec_lib.ClassifierSpec.from_json(spec.to_json(), spec.tokenizer) == spec
  batch = _batch(spec, 5)
  reference = np.asarray(fused_art.predict(batch))
  # qwix int8 artifact: saved, reloaded int8, and close to float.
  model = spec_lib.classifier_module(spec)
  sample = spec_lib.model_inputs(spec, *(jnp.zeros(s.shape, s.dtype)
                                         for s in spec.input_specs(1)))
  plans = quant_lib.plan(model, **sample)
  assert "patch_embed/proj/kernel" in plans
  qparams = quant_lib.quantize_params(fused_art.params, plans)
  art = artifact_lib.save(str(tmp_path / "int8"), spec, qparams, kind="int8",
                          quantization={"mode": "dynamic"})
  qmodel = quant_lib.quantized_model(model, "dynamic")
  live = jax.jit(lambda p, *xs: spec_lib.apply_logits(qmodel, spec, p, *xs))(
      qparams, *spec.inputs_of(batch))
  loaded = artifact_lib.load(art.path)
  assert loaded.kind_is_quantized and loaded.spec == art.spec
  np.testing.assert_allclose(loaded.predict(batch), live, atol=1e-5)
  assert np.abs(np.asarray(live) - reference).max() < 0.05
  # StableHLO with a symbolic batch: (tokens, token_mask, images) -> logits.
  exported = export_lib.export(fused_art)
  assert [str(a.dtype) for a in exported.in_avals] == ["int32", "bool", "uint8"]
  np.testing.assert_allclose(exported.call(*spec.inputs_of(batch)), reference, atol=1e-5)
  # ONNX: float matches JAX at batch 5 and 1 (symbolic batch), int8 stays close.
  run_float, run_int8 = edge.runner(fused_onnx["float"]), edge.runner(fused_onnx["int8"])
  np.testing.assert_allclose(run_float(batch), reference, atol=1e-4)
  one = {k: v[:1] for k, v in batch.items()}
  np.testing.assert_allclose(run_float(one), reference[:1], atol=1e-4)
  assert np.abs(run_int8(batch) - reference).max() < 0.05
  meta = serve.metadata(serve.session(fused_onnx["int8"]))
  assert json.loads(meta[serve.META_MODALITIES]) == ["text", "image"]
  assert meta[serve.META_IMAGE_SIZE] == str(IMAGE_SIZE) and meta[serve.META_KIND] == "int8"


@pytest.mark.slow  # 55 s at load 7 (2 shared cores): a tokenizer trained, an ONNX export
def test_late_fusion_workdir_loads_and_exports_with_its_two_heads(tmp_path):
  """A late-fusion fused model (a head per modality) is read from its parameters, keeps its
  fusion through the spec's JSON, and its float ONNX file computes the sum of the branches."""
  src = source_lib.load(make_multimodal_workdir(str(tmp_path / "late"), fusion="late"))
  spec = src.spec
  assert spec.image == vision.ImageConfig(IMAGE_SIZE, PATCH, fusion="late")
  assert spec.kind == "text+image" and spec.num_classes == len(builtin.labels("icons"))
  assert spec_lib.ClassifierSpec.from_json(spec.to_json(), spec.tokenizer) == spec
  model = spec_lib.classifier_module(spec)
  batch = _batch(spec, 4)
  logits = np.asarray(spec_lib.apply_logits(model, spec, src.params, *spec.inputs_of(batch)))
  text_spec, image_spec = spec.replace(modalities=("text",)), spec.replace(modalities=("image",))
  branches = [np.asarray(spec_lib.apply_logits(model, s, src.params, *s.inputs_of(batch)))
              for s in (text_spec, image_spec)]
  np.testing.assert_allclose(logits, branches[0] + branches[1], rtol=1e-5, atol=1e-5)
  art = artifact_lib.save(str(tmp_path / "float"), spec, src.params)
  onnx = edge.export(art, str(tmp_path / "float" / "model.onnx"))
  np.testing.assert_allclose(edge.runner(onnx)(batch), logits, atol=1e-4)


def test_served_with_an_image_and_a_text_without_jax(fused_art, fused_onnx, icon_png):
  png, text = icon_png
  model_dir = os.path.dirname(fused_onnx["int8"])
  code = ("import sys, runpy\n"
          "sys.argv = ['r1jax.serve'] + sys.argv[1:]\n"
          "try:\n  runpy.run_module('r1jax.serve', run_name='__main__')\n"
          "except SystemExit as e:\n  assert not e.code, e.code\n"
          "assert 'jax' not in [m.split('.')[0] for m in sys.modules], 'jax imported'\n")
  out = subprocess.run([sys.executable, "-c", code, "--model", model_dir, "--image", png, text],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  (line,) = [json.loads(x) for x in out.stdout.splitlines()]
  assert line["text"] == text and line["image"] == png
  # The same pair through JAX (decoded and encoded as serve does) gives the same label.
  predictor = serve.Predictor.load(os.path.dirname(fused_onnx["float"]))
  inputs = predictor._inputs([text], [png])  # pylint: disable=protected-access
  logits = np.asarray(fused_art.predict(inputs))
  assert line["label"] == fused_art.spec.label_names[int(logits.argmax())]
  np.testing.assert_allclose(predictor.logits(**inputs), logits, atol=1e-4)


def test_serve_refuses_what_the_model_does_not_read(fused_onnx, icon_png):
  png, text = icon_png
  model_dir = os.path.dirname(fused_onnx["int8"])
  predictor = serve.Predictor.load(model_dir)
  with pytest.raises(errors.BadInput, match="reads text\\+image; give an image"):
    predictor.predict([text])
  with pytest.raises(errors.BadInput, match="2 texts and 1 images"):
    predictor.predict([text, text], [png])
  with pytest.raises(errors.BadInput, match="cannot use this image \\(not_an_image\\)"):
    predictor.predict([text], [fused_onnx["int8"]])
  out = subprocess.run([sys.executable, "-m", "r1jax.serve", "--model", model_dir, text],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode == errors.EXIT_CODE
  assert out.stderr.count("\n") == 1 and "give an image for each example" in out.stderr


def test_image_only_model_exports_and_serves_without_a_tokenizer(icon_png, tmp_path):
  art = _random_artifact(str(tmp_path / "float"), modalities=("image",))
  assert art.spec.input_names == ("images",)
  paths = edge.export_pair(art, str(tmp_path / "int8"))
  images = _batch(art.spec, 5)["images"]
  reference = np.asarray(art.predict({"images": images}))
  np.testing.assert_allclose(edge.runner(paths["float"])({"images": images}), reference,
                             atol=1e-4)
  predictor = serve.Predictor.load(paths["int8"])
  assert predictor.input_names == ("images",) and predictor.tokenizer is None
  (result,) = predictor.predict([], [icon_png[0]])
  assert result["label"] in art.spec.label_names
  with pytest.raises(errors.BadInput, match="reads images only; give no text"):
    predictor.predict(["text"], [icon_png[0]])


def test_text_paths_refuse_a_multimodal_classifier(fused_art, fused_onnx, tmp_path, icon_png):
  config = configlib.load_config("configs/prune.py:variant=tiny")
  config.init_from = fused_art.path
  with pytest.raises(errors.BadInput, match="holds a multimodal \\(text\\+image\\) classifier; "
                     "the prune stage takes text classifiers only") as e:
    stage_lib.load_source(config)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="a multimodal export"):
    export_lib.load(_stablehlo(fused_art, tmp_path))
  # A text-only export given an image.
  art = _random_artifact(str(tmp_path / "text"), modalities=("text",),
                         tokenizer=fused_art.spec.tokenizer, num_classes=2)
  edge.export(art, os.path.join(art.path, serve.ONNX_FILE))
  with pytest.raises(errors.BadInput, match="this model reads text only; --image"):
    serve.Predictor.load(art.path).predict(["folder"], [icon_png[0]])


def _stablehlo(art, tmp_path):
  path = str(tmp_path / "model.stablehlo")
  with open(path, "wb") as f:
    f.write(export_lib.export(art).serialize())
  return path


@pytest.fixture(scope="module")
def mm_dir(tmp_path_factory):
  return make_multimodal_workdir(str(tmp_path_factory.mktemp("mm")))


@pytest.fixture(scope="module")
def quantized(mm_dir, tmp_path_factory):
  """The quantize stage run on the multimodal workdir (int8 dynamic + static, ONNX on)."""
  config = configlib.load_config("configs/quantize.py:variant=tiny")
  config.init_from = mm_dir
  config.quant.modes, config.quant.primary = "dynamic,static", "dynamic"
  config.quant.calibration_batches = 2
  config.report.latency_repeats, config.report.latency_warmup = 2, 1
  config.report.latency_batch_size, config.report.test_limit_batches = 8, 2
  config.export.onnx = "on"
  workdir = str(tmp_path_factory.mktemp("q"))
  return workdir, quantize_stage.run(config, workdir)


@pytest.mark.slow  # ~30 s idle: a checkpoint written, the stage measures five artifacts
def test_quantize_stage_takes_a_multimodal_finetuning_workdir(mm_dir, quantized, icon_png):
  spec = source_lib.load(mm_dir).spec
  assert spec.multimodal and spec.kind == "text+image"
  assert spec.image == vision.ImageConfig(IMAGE_SIZE, PATCH)
  assert spec.model.ngram_buckets == 0 and spec.model.n_token_types == 2
  assert spec.task["train"] == "builtin:icons:train" and spec.seq_len == SEQ_LEN
  workdir, summary = quantized
  rows = {r["name"]: r for r in summary["artifacts"]}
  assert set(rows) == {"float", "int8-dynamic", "int8-static", "onnx-float", "onnx-int8"}
  for name in ("float/model.onnx", "artifact/model.onnx", "artifact/model.stablehlo",
               "int8_static/artifact.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert rows["int8-dynamic"]["size_pct"] < 60
  # The int8 artifact as reloaded from disk computes what the stage's quantized model computed.
  assert summary["checks"]["dynamic"]["roundtrip_max_abs_diff"] < 1e-5
  assert summary["onnx"]["targets"]["float_max_abs_logit_diff"] <= 1e-4
  assert summary["onnx"]["checks"]["int8"]["max_abs_diff"] < 0.1
  art = artifact_lib.load(os.path.join(workdir, "artifact"))
  assert art.spec.multimodal and art.kind_is_quantized
  exported = jax.export.deserialize(bytearray(open(summary["export"], "rb").read()))
  assert [str(a.dtype) for a in exported.in_avals] == ["int32", "bool", "uint8"]
  (result,) = serve.Predictor.load(os.path.join(workdir, "artifact")).predict(
      [icon_png[1]], [icon_png[0]])
  assert result["label"] in spec.label_names
