"""The classifier in an edge runtime: ONNX export (float), int8 by onnxruntime's quantizer, and the
same model measured in onnxruntime beside JAX.

    paths = edge.export_pair(float_art, int8_dir)      # float_art.path/model.onnx, int8_dir/model.onnx
    rows, timing = edge.measure(float_art, paths, batches, latency_batch_size=32)

Route (measured, bench/NOTES_edge.md): the float graph is built from the classifier's jaxpr by
`onnx_graph.to_onnx` (jax2onnx does not install beside r1jax's orbax nor trace this model with
jax 0.10), then quantized by onnxruntime's own tooling, so its int8 kernels run:
`quantize_dynamic` turns each MatMul against a weight into int8 weights (one scale per output
column) x int8 activations quantized per call (DynamicQuantizeMatMul / MatMulInteger, integer
GEMMs), except the output projections to the logits (`output_projections`), and each embedding Gather into an int8 table + DequantizeLinear. The qwix int8 artifact
of the quantize stage is the JAX deliverable; its qwix ops (int8 x int8 dot_general with scales
folded around it) have no onnxruntime kernel of their own, which is why the int8 ONNX starts from
the float graph. An int8 artifact given to `export` is refused with that fix.

Both files carry the label names, sequence length and kind in their metadata (`r1jax.serve`
reads them), and take tokens int32 [B, Q] + token_mask bool [B, Q] to logits float32 [B, C] with
a symbolic batch B; a multimodal classifier's take the inputs of its modalities (tokens,
token_mask and/or images uint8 [B, S, S, C]) and also carry its modalities and image size.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from r1jax import errors
from r1jax import eval as eval_lib
from r1jax import run_dir
from r1jax import serve
from r1jax.compress import onnx_graph
from r1jax.compress import measure as measure_lib
from r1jax.compress import spec as spec_lib

MODES = ("dynamic",)
ONNX_SETTINGS = ("auto", "on", "off")
QUANTIZATION = ("onnxruntime.quantization.quantize_dynamic: int8 weights (per output channel) "
                "of every MatMul but the output projections and of every embedding Gather, "
                "activations quantized per call")


def available() -> bool:
  """Whether onnx and onnxruntime (the [edge] extra) are installed."""
  try:
    import onnx  # noqa: F401  # Lazy: probing the optional [edge] extra.
    import onnxruntime  # noqa: F401  # Lazy: probing the optional [edge] extra.
  except ImportError:
    return False
  return True


def require() -> None:
  """Raises MissingExtra naming [edge] when onnx or onnxruntime is missing."""
  try:
    import onnx  # noqa: F401  # Lazy: only the ONNX export needs onnx (the [edge] extra).
    import onnxruntime  # noqa: F401  # Lazy: ... and onnxruntime to check and quantize it.
  except ImportError as e:
    raise errors.missing_extra(e, extra="edge", what="ONNX export (export.onnx)") from e


def inference_model(spec: spec_lib.ClassifierSpec) -> Any:
  """The classifier as the export traces it: projections as einsums over the kernels' own shapes
  and attention heads in one group (same parameters and results as training's layout; fewer,
  larger ONNX nodes, where onnxruntime pays per node)."""
  config = dataclasses.replace(spec.model, flat_matmuls=False, head_groups=1,
                               attention_impl="einsum", dropout=0.0, dropatt=0.0)
  return spec_lib.classifier_module(spec, config)


def _metadata(spec: spec_lib.ClassifierSpec, kind: str, quantization: str) -> dict[str, str]:
  image = ({serve.META_MODALITIES: json.dumps(list(spec.modalities)),
            serve.META_IMAGE_SIZE: str(spec.image.image_size)} if spec.multimodal else {})
  return {**image, serve.META_LABELS: json.dumps(list(spec.label_names)),
          serve.META_SEQ_LEN: str(spec.seq_len),
          serve.META_MULTI_LABEL: "true" if spec.multi_label else "false",
          serve.META_THRESHOLD: str(float(spec.task.get("threshold", 0.5))),
          serve.META_KIND: kind, serve.META_QUANTIZATION: quantization}


def _save(model: Any, path: str) -> str:
  import onnx  # Lazy: only the ONNX export needs onnx (the [edge] extra).
  onnx.save(model, path + ".tmp")
  os.replace(path + ".tmp", path)
  return path


def export(art: Any, path: str) -> str:
  """Writes the float ONNX graph of a float artifact (`artifact.Artifact`) to `path`."""
  require()
  if art.kind_is_quantized:
    raise errors.BadInput(
        f"{art.path or 'this artifact'} is an int8 (qwix) artifact: its int8 ops have no ONNX "
        f"kernels; export the float artifact (the quantize stage's DIR/float) and quantize the "
        f"ONNX graph with edge.quantize (the quantize stage does both with export.onnx).")
  model = inference_model(art.spec)
  params = art.params

  def logits(*inputs):
    return spec_lib.apply_logits(model, art.spec, params, *inputs)
  proto = onnx_graph.to_onnx(
      logits, art.spec.input_specs(1), art.spec.input_names, [serve.OUTPUT],
      metadata=_metadata(art.spec, "float", ""))
  return _save(_compact(proto), path)


def quantize(float_path: str, path: str, spec: spec_lib.ClassifierSpec, *,
             mode: str = "dynamic") -> str:
  """int8 ONNX of a float ONNX file by onnxruntime's quantizer; returns `path`."""
  require()
  if mode not in MODES:
    raise errors.BadInput(f"ONNX quantization mode {mode!r}: allowed values are "
                          f"{', '.join(MODES)}.")
  import onnx  # Lazy: only the ONNX export needs onnx (the [edge] extra).
  from onnxruntime import quantization as ort_quant  # Lazy: the [edge] extra's quantizer.
  tmp = path + ".q.tmp"
  # Per-channel scales need 2-D weights: onnxruntime's integer MatMul refuses the per-channel
  # zero points of a batched [H, d, P] constant (attention's projected position table), which
  # stays float (a few thousand values per layer).
  float_model = onnx.load(float_path)
  for i, node in enumerate(float_model.graph.node):
    node.name = f"n{i}"  # nodes_to_exclude names nodes
  ranks = {i.name: len(i.dims) for i in float_model.graph.initializer}
  batched = [n.name for n in float_model.graph.node
             if n.op_type == "MatMul" and ranks.get(n.input[1], 2) != 2]
  onnx.save(float_model, tmp + ".in")
  ort_quant.quantize_dynamic(tmp + ".in", tmp, weight_type=ort_quant.QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gather"], per_channel=True,
                             nodes_to_exclude=batched + output_projections(float_model.graph))
  model = _compact(onnx.load(tmp))
  os.remove(tmp)
  os.remove(tmp + ".in")
  del model.metadata_props[:]
  onnx.helper.set_model_props(model, _metadata(spec, "int8", QUANTIZATION))
  return _save(model, path)


def output_projections(graph: Any) -> list[str]:
  """Names of the MatMul nodes whose result reaches a graph output through no other MatMul: the
  classifier's output projections (d x C each), which the int8 file keeps float. Their inputs are
  the activations per-call int8 quantization hurts most: the n-gram bag's sum / sqrt(count) and
  the pooled state (session 21, bench/NOTES_edge.md: the FOLDOC model's max |logit diff| 1.15 ->
  0.21, accuracy drop 1.13 -> 0.56 points, for < 0.1% of the weights)."""
  consumers: dict[str, list[Any]] = {}
  for node in graph.node:
    for name in node.input:
      consumers.setdefault(name, []).append(node)
  outputs = {o.name for o in graph.output}

  def reaches_output(node: Any) -> bool:
    seen, todo = set(), list(node.output)
    while todo:
      tensor = todo.pop()
      if tensor in outputs:
        return True
      for nxt in consumers.get(tensor, ()):
        if nxt.op_type not in ("MatMul", "Gemm") and id(nxt) not in seen:
          seen.add(id(nxt))
          todo.extend(nxt.output)
    return False
  return [n.name for n in graph.node if n.op_type == "MatMul" and reaches_output(n)]


def _compact(model: Any) -> Any:
  """The same graph with short tensor names and no node names or doc strings: the quantizer's
  names ("<tensor>_quantized_scale", ...) are a few percent of a small int8 file."""
  graph = model.graph
  keep = {v.name for v in list(graph.input) + list(graph.output)}
  names: dict[str, str] = {}

  def short(name: str) -> str:
    if not name or name in keep:
      return name
    return names.setdefault(name, format(len(names), "x"))
  for init in graph.initializer:
    init.name = short(init.name)
  for node in graph.node:
    node.name, node.doc_string = "", ""
    node.input[:] = [short(n) for n in node.input]
    node.output[:] = [short(n) for n in node.output]
  del graph.value_info[:]
  return model


def export_pair(float_art: Any, int8_dir: str) -> dict[str, str]:
  """float_art.path/model.onnx and int8_dir/model.onnx (+ tokenizer.model beside each)."""
  float_path = export(float_art, os.path.join(float_art.path, serve.ONNX_FILE))
  os.makedirs(int8_dir, exist_ok=True)
  int8_path = quantize(float_path, os.path.join(int8_dir, serve.ONNX_FILE), float_art.spec)
  tok = os.path.join(int8_dir, run_dir.TOKENIZER_FILE)
  if float_art.spec.tokenizer and not os.path.exists(tok):
    shutil.copyfile(float_art.spec.tokenizer, tok)
  return {"float": float_path, "int8": int8_path}


def runner(path: str, *, threads: int = 0):
  """batch {"tokens", "token_mask"} (+ "images" for a multimodal model: the inputs the file
  declares) -> logits numpy [B, C], in onnxruntime."""
  sess = serve.session(path, threads=threads)
  names = [i.name for i in sess.get_inputs()]

  def run(batch: Mapping[str, Any]) -> np.ndarray:
    return sess.run([serve.OUTPUT], {n: np.asarray(batch[n], serve.INPUT_DTYPES[n])
                                     for n in names})[0]
  return run


def agreement(reference: np.ndarray, logits: np.ndarray) -> dict[str, float]:
  """Max |logit difference| and argmax agreement of two [B, C] logit arrays."""
  reference, logits = np.asarray(reference, np.float32), np.asarray(logits, np.float32)
  return {"max_abs_diff": float(np.max(np.abs(reference - logits))),
          "argmax_agreement": float(np.mean(reference.argmax(-1) == logits.argmax(-1)))}


def measure(float_art: Any, paths: Mapping[str, str], batches: Sequence[Mapping[str, np.ndarray]],
            *, latency_batch_size: int = 32, warmup: int = 3, repeats: int = 20
            ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Trade-off rows of the ONNX files (quality, file size, latency in onnxruntime) and a timing
  of float JAX vs each ONNX file measured in turn in this process.

  Returns (rows like `measure.measure`'s with "runtime": "onnxruntime", the JAX float's timing
  and the logit checks against it).
  """
  rows, checks = [], {}
  runs = {name: runner(path) for name, path in paths.items()}
  jax_float = jax.jit(float_art.logits)

  def jax_run(batch):
    return jax_float(float_art.params, *float_art.spec.inputs_of(batch))
  reference = np.concatenate([np.asarray(jax_run(b)) for b in batches])
  for name, run in runs.items():
    metrics = eval_lib.evaluate_classifier(
        run, batches, label_names=float_art.spec.label_names,
        multi_label=float_art.spec.multi_label,
        threshold=float(float_art.spec.task.get("threshold", 0.5)))
    checks[name] = agreement(reference, np.concatenate([run(b) for b in batches]))
    rows.append({"name": f"onnx-{name}", "kind": "float" if name == "float" else "int8",
                 "runtime": "onnxruntime", "path": paths[name],
                 "params": float_art.num_params, "bytes": os.path.getsize(paths[name]),
                 "bytes_compressed": None, "accuracy": metrics["accuracy"],
                 "macro_f1": metrics["macro_f1"], "num_examples": metrics["num_examples"],
                 **{f"vs_jax_float_{k}": v for k, v in checks[name].items()}})
  many = measure_lib.first_rows(batches, latency_batch_size, float_art.spec.input_names)
  one = {k: v[:1] for k, v in many.items()}
  # Every runtime gets the same numpy batch (the JAX call includes its host-to-device copy, as
  # onnxruntime's includes its own input handling).
  fns = {"jax-float": jax_run, **{f"onnx-{n}": r for n, r in runs.items()}}
  timing = eval_lib.latency_summaries(fns, one, many, warmup=warmup, repeats=repeats)
  for row in rows:
    row.update(timing[row["name"]])
  return rows, {"latency": timing, "checks": checks}


# Targets of issue 25 for the edge runtime.
TARGET_SPEEDUP_VS_FLOAT = 1.5     # int8 vs float, both in onnxruntime, batch 1
TARGET_DROP_POINTS = 1.0          # int8 accuracy vs the float model's
TARGET_SIZE_PCT = 26.0            # int8 file vs float file
TARGET_FLOAT_MAX_DIFF = 1e-4      # exported float logits vs JAX
TARGET_INT8_AGREEMENT = 0.99      # exported int8 argmax vs JAX float


def targets(rows: Sequence[Mapping[str, Any]], timing: Mapping[str, Any],
            float_accuracy: float) -> dict[str, Any]:
  """Issue 25's edge targets, each value with whether it is met."""
  by = {r["name"]: r for r in rows}
  lat = timing["latency"]
  f, q = by["onnx-float"], by["onnx-int8"]
  out = {
      "int8_speedup_vs_onnx_float_batch1": lat["onnx-float"]["latency_ms_batch1"]
                                           / lat["onnx-int8"]["latency_ms_batch1"],
      "int8_speedup_vs_onnx_float_batched": lat["onnx-float"]["latency_ms_batched"]
                                            / lat["onnx-int8"]["latency_ms_batched"],
      "int8_speedup_vs_jax_float_batch1": lat["jax-float"]["latency_ms_batch1"]
                                          / lat["onnx-int8"]["latency_ms_batch1"],
      "int8_speedup_vs_jax_float_batched": lat["jax-float"]["latency_ms_batched"]
                                           / lat["onnx-int8"]["latency_ms_batched"],
      "int8_accuracy_drop_points": 100.0 * (float_accuracy - q["accuracy"]),
      "int8_size_pct_of_onnx_float": 100.0 * q["bytes"] / f["bytes"],
      "float_max_abs_logit_diff": f["vs_jax_float_max_abs_diff"],
      "int8_argmax_agreement": q["vs_jax_float_argmax_agreement"],
  }
  out["met"] = {
      "int8_speedup_vs_onnx_float_batch1":
          out["int8_speedup_vs_onnx_float_batch1"] >= TARGET_SPEEDUP_VS_FLOAT,
      "int8_faster_than_jax_float_batch1": out["int8_speedup_vs_jax_float_batch1"] > 1.0,
      "int8_accuracy_drop_points": out["int8_accuracy_drop_points"] <= TARGET_DROP_POINTS,
      "int8_size_pct_of_onnx_float": out["int8_size_pct_of_onnx_float"] <= TARGET_SIZE_PCT,
      "float_max_abs_logit_diff": out["float_max_abs_logit_diff"] <= TARGET_FLOAT_MAX_DIFF,
      "int8_argmax_agreement": out["int8_argmax_agreement"] >= TARGET_INT8_AGREEMENT}
  return out


def notes(t: Mapping[str, Any]) -> list[str]:
  """One report line per target."""
  met = t["met"]

  def word(key):
    return "met" if met[key] else "NOT met"
  return [
      f"onnxruntime int8 vs float at batch 1: x{t['int8_speedup_vs_onnx_float_batch1']:.2f} "
      f"(target >= {TARGET_SPEEDUP_VS_FLOAT:g}: {word('int8_speedup_vs_onnx_float_batch1')}); "
      f"batched x{t['int8_speedup_vs_onnx_float_batched']:.2f}",
      f"onnxruntime int8 vs JAX float at batch 1: x{t['int8_speedup_vs_jax_float_batch1']:.2f} "
      f"(target > 1: {word('int8_faster_than_jax_float_batch1')}); batched "
      f"x{t['int8_speedup_vs_jax_float_batched']:.2f}",
      f"onnxruntime int8 accuracy drop {t['int8_accuracy_drop_points']:.2f} points (target <= "
      f"{TARGET_DROP_POINTS:g}: {word('int8_accuracy_drop_points')}); file "
      f"{t['int8_size_pct_of_onnx_float']:.1f}% of the float ONNX file (target <= "
      f"{TARGET_SIZE_PCT:g}%: {word('int8_size_pct_of_onnx_float')})",
      f"exported float logits vs JAX: max |diff| {t['float_max_abs_logit_diff']:.2g} (target <= "
      f"{TARGET_FLOAT_MAX_DIFF:g}: {word('float_max_abs_logit_diff')}); int8 argmax agreement "
      f"{100 * t['int8_argmax_agreement']:.1f}% (target >= {100 * TARGET_INT8_AGREEMENT:g}%: "
      f"{word('int8_argmax_agreement')})"]
