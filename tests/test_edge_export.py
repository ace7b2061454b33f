"""Tests for the edge runtime: ONNX export (r1jax.compress.onnx_graph / edge), onnxruntime round
trips, the JAX-free predict (r1jax.serve) and the quantize stage's ONNX files."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest

from r1jax import configlib
from r1jax import errors
from r1jax import serve
from r1jax.compress import artifact as artifact_lib
from r1jax.compress import edge
from r1jax.compress import onnx_graph
from r1jax.compress import quantize as quant_lib
from r1jax.compress import source as source_lib
from r1jax.data import task as task_lib
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.stages import quantize as quantize_stage
from test_compress_source import classifier_dir  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(spec, batch_size, seed=0):
  rng = np.random.RandomState(seed)
  q = spec.seq_len
  lengths = rng.randint(3, q + 1, (batch_size, 1))
  mask = np.arange(q)[None, :] < lengths
  tokens = np.where(mask, rng.randint(5, spec.model.vocab_size, (batch_size, q)), 0)
  return {"tokens": tokens.astype(np.int32), "token_mask": mask}


def _float_artifact(classifier_dir, directory, pooling, buckets):  # noqa: F811
  """A float artifact of the random tiny classifier with the given head."""
  src = source_lib.load(classifier_dir)
  spec = src.spec.replace(model=dataclasses.replace(src.spec.model, pooling=pooling,
                                                   ngram_buckets=buckets))
  model = edge.inference_model(spec)
  tokens = jnp.zeros((1, spec.seq_len), jnp.int32)
  params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(1), tokens)["params"])
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return artifact_lib.save(directory, spec, nn.unbox(params), kind="float")


@pytest.fixture(scope="module")
def float_art(classifier_dir, tmp_path_factory):  # noqa: F811
  """The pipeline's head: mean pooling + the hashed n-gram bag, whose uint32 hashing must survive
  the export."""
  return _float_artifact(classifier_dir, str(tmp_path_factory.mktemp("art") / "float"), "mean",
                         512)


@pytest.fixture(scope="module")
def exported(float_art, tmp_path_factory):
  int8_dir = str(tmp_path_factory.mktemp("int8"))
  return edge.export_pair(float_art, int8_dir)


def test_float_export_matches_jax_at_any_batch(float_art, exported):
  run = edge.runner(exported["float"])
  model = onnx.load(exported["float"])
  assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == onnx_graph.BATCH
  for batch_size in (1, 5):
    batch = _batch(float_art.spec, batch_size, seed=batch_size)
    ref = np.asarray(float_art.predict(batch))
    got = run(batch)
    assert got.shape == (batch_size, float_art.spec.num_classes)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_uniform_constants_are_expanded_in_the_graph_not_stored():
  """An encoder's all-True [1, 1, Q, K] attention pattern was 64 kB of the tiny int8 file at 256
  tokens: a uniform constant over FOLD_MIN elements is stored as one value and a shape."""
  import onnxruntime  # pylint: disable=g-import-not-at-top
  b = onnx_graph._Builder(onnx)  # pylint: disable=protected-access
  uniform, varied = np.ones((1, 1, 64, 64), bool), np.arange(2048, dtype=np.float32)
  outs = [b.const(uniform, "pattern"), b.const(varied, "table"), b.const(np.zeros(8, np.float32))]
  graph = onnx.helper.make_graph(
      b.nodes, "g", [], [onnx.helper.make_tensor_value_info(o, t, None)
                         for o, t in zip(outs, (onnx.TensorProto.BOOL, onnx.TensorProto.FLOAT,
                                                onnx.TensorProto.FLOAT))], b.inits)
  model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
  assert sorted(int(np.prod(i.dims)) for i in model.graph.initializer) == [1, 4, 8, 2048]
  got = onnxruntime.InferenceSession(model.SerializeToString()).run(None, {})
  for value, expected in zip(got, (uniform, varied, np.zeros(8, np.float32))):
    np.testing.assert_array_equal(value, expected)


def test_cls_head_export_matches_jax(classifier_dir, tmp_path):  # noqa: F811
  art = _float_artifact(classifier_dir, str(tmp_path / "float"), "cls", 0)
  batch = _batch(art.spec, 3)
  got = edge.runner(edge.export(art, str(tmp_path / "model.onnx")))(batch)
  np.testing.assert_allclose(got, np.asarray(art.predict(batch)), atol=1e-4, rtol=0)


def test_int8_export_is_int8_smaller_and_agrees(float_art, exported):
  model = onnx.load(exported["int8"])
  ops = {n.op_type for n in model.graph.node}
  assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}, ops
  eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)  # Gather tables are uint8
  int8_weights = [i for i in model.graph.initializer if i.data_type in eight_bit]
  assert sum(np.prod(i.dims) for i in int8_weights) > 0.9 * float_art.num_params
  assert os.path.getsize(exported["int8"]) < 0.35 * os.path.getsize(exported["float"])
  meta = {p.key: p.value for p in model.metadata_props}
  assert meta[serve.META_KIND] == "int8" and json.loads(meta[serve.META_LABELS]) == list(
      float_art.spec.label_names)
  batch = _batch(float_art.spec, 32, seed=3)
  check = edge.agreement(np.asarray(float_art.predict(batch)), edge.runner(exported["int8"])(batch))
  assert 0 < check["max_abs_diff"] and check["argmax_agreement"] >= 0.9, check


def test_int8_export_keeps_the_output_projections_float(float_art, exported):
  """The d x C projections to the logits (the pooled head and the n-gram path) stay float MatMuls
  in the int8 file; every other MatMul against a 2-D weight becomes integer."""
  graph = onnx.load(exported["float"]).graph
  for i, node in enumerate(graph.node):
    node.name = f"n{i}"  # as edge.quantize names them
  weights = {i.name: tuple(i.dims) for i in graph.initializer}
  heads = set(edge.output_projections(graph))
  d, num_classes = float_art.spec.model.d_model, len(float_art.spec.label_names)
  assert sorted(weights[n.input[1]] for n in graph.node if n.name in heads) == [
      (d, num_classes)] * 2
  matmuls = [n for n in graph.node if n.op_type == "MatMul"]
  against_2d_weights = [n for n in matmuls if len(weights.get(n.input[1], ())) == 2]
  int8 = onnx.load(exported["int8"]).graph
  # Float MatMuls left: the heads, and those against activations or batched weights.
  assert sum(1 for n in int8.node if n.op_type == "MatMul") == (
      len(matmuls) - len(against_2d_weights) + len(heads))
  assert sum(1 for i in int8.initializer if tuple(i.dims) == (d, num_classes)
             and i.data_type == onnx.TensorProto.FLOAT) == 2


def test_serve_encodes_as_finetuning_does(float_art):
  tok = tokenizer_lib.Tokenizer.load(float_art.spec.tokenizer)
  labels = task_lib.LabelVocab(tuple(float_art.spec.label_names))
  texts = ["A compiler translates source code.", "", "word " * 200]
  q = float_art.spec.seq_len
  enc = task_lib.EncodeClassification(tok, labels, q, "text", "label", False)
  ours = serve.encode(tok, texts, q)
  for i, text in enumerate(texts):
    want = enc.map({"text": text, "label": labels.names[0]})
    np.testing.assert_array_equal(ours["tokens"][i], want["tokens"])
    np.testing.assert_array_equal(ours["token_mask"][i], want["token_mask"])


_NO_JAX = ("import sys, runpy, json\n"
           "sys.modules['jax'] = None; sys.modules['flax'] = None; sys.modules['jaxlib'] = None\n"
           "sys.argv = ['serve', '--model', sys.argv[1], '--top', '2', *sys.argv[2:]]\n"
           "try:\n"
           "  runpy.run_module('r1jax.serve', run_name='__main__')\n"
           "finally:\n"
           "  assert 'jax' not in [m.split('.')[0] for m, v in sys.modules.items() if v], 'jax'\n")


def test_predict_without_jax_in_a_subprocess(float_art, exported):
  texts = ["a programming language for numerical computing", "an operating system kernel"]
  out = subprocess.run([sys.executable, "-c", _NO_JAX, os.path.dirname(exported["int8"]), *texts],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [json.loads(line) for line in out.stdout.splitlines()]
  assert [line["text"] for line in lines] == texts
  # The same texts through JAX: the int8 export's labels are the float model's.
  tok = tokenizer_lib.Tokenizer.load(float_art.spec.tokenizer)
  logits = np.asarray(float_art.predict(serve.encode(tok, texts, float_art.spec.seq_len)))
  assert [line["label"] for line in lines] == [float_art.spec.label_names[i]
                                                for i in logits.argmax(-1)]
  assert all(len(line["top"]) == 2 for line in lines)


def test_predict_cli_bad_model_dir_is_one_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "r1jax.serve", "--model", str(tmp_path), "text"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode == errors.EXIT_CODE
  assert out.stderr.strip().count("\n") == 0 and "model.onnx does not exist" in out.stderr


def test_int8_artifact_is_refused(float_art, tmp_path):
  plans = quant_lib.plan(float_art.model, jnp.zeros((1, float_art.spec.seq_len), jnp.int32))
  qparams = quant_lib.quantize_params(float_art.params, plans)
  art = artifact_lib.save(str(tmp_path / "q"), float_art.spec, qparams, kind="int8",
                          quantization={"mode": "dynamic"})
  with pytest.raises(errors.BadInput, match="int8 \\(qwix\\) artifact.*export the float artifact"):
    edge.export(art, str(tmp_path / "model.onnx"))


def test_primitive_without_onnx_mapping_is_named():
  spec = [jax.ShapeDtypeStruct((1, 4), jnp.float32)]
  with pytest.raises(errors.BadInput, match="JAX primitive 'cumsum' has no ONNX mapping"):
    onnx_graph.to_onnx(lambda x: jnp.cumsum(x, axis=1), spec, ["x"], ["y"])
  # What is mapped converts and runs: the error above is about cumsum, not the harness.
  model = onnx_graph.to_onnx(lambda x: jnp.tanh(x) * 2.0, spec, ["x"], ["y"])
  path_free = serve._ort().InferenceSession(model.SerializeToString())  # pylint: disable=protected-access
  x = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
  np.testing.assert_allclose(path_free.run(None, {"x": x})[0], np.tanh(x) * 2, rtol=1e-6)


def test_op_the_runtime_lacks_is_named(tmp_path):
  """onnxruntime has no boolean Where kernel: loading such a graph is refused in one line."""
  helper, tp = onnx.helper, onnx.TensorProto
  inputs = [helper.make_tensor_value_info(n, tp.BOOL, [2]) for n in ("c", "x", "y")]
  graph = helper.make_graph([helper.make_node("Where", ["c", "x", "y"], ["z"])], "g", inputs,
                            [helper.make_tensor_value_info("z", tp.BOOL, [2])])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  path = str(tmp_path / "model.onnx")
  onnx.save(model, path)
  with pytest.raises(errors.BadInput, match="no CPU kernel for the ONNX op Where") as e:
    serve.session(path)
  assert "\n" not in str(e.value)


def test_quantize_stage_leaves_onnx_files(classifier_dir, tmp_path):  # noqa: F811
  config = configlib.load_config("configs/quantize.py:variant=tiny")
  config.init_from = classifier_dir
  config.quant.modes = config.quant.primary = "dynamic"
  config.report.latency_repeats, config.report.latency_warmup = 2, 1
  config.report.latency_batch_size, config.report.test_limit_batches = 8, 2
  config.export.onnx = "on"
  workdir = str(tmp_path / "q")
  summary = quantize_stage.run(config, workdir)
  rows = {r["name"]: r for r in summary["artifacts"]}
  assert [rows[n]["runtime"] for n in ("float", "int8-dynamic", "onnx-float", "onnx-int8")] == [
      "jax", "jax", "onnxruntime", "onnxruntime"]
  for name in ("float/model.onnx", "artifact/model.onnx", "artifact/model.stablehlo"):
    assert os.path.exists(os.path.join(workdir, name)), name
  onnx_summary = summary["onnx"]
  assert onnx_summary["targets"]["float_max_abs_logit_diff"] <= 1e-4
  assert set(onnx_summary["latency"]) == {"jax-float", "onnx-float", "onnx-int8"}
  assert rows["onnx-int8"]["latency_ms_batch1"] > 0
  report = open(os.path.join(workdir, "report.md")).read()
  assert "onnxruntime int8 vs float at batch 1" in report and "| onnxruntime |" in report
  predictor = serve.Predictor.load(os.path.join(workdir, "artifact"))
  assert predictor.kind == "int8" and len(predictor.predict(["lisp"])) == 1
