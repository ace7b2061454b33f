"""Quantize stage: post-training INT8 of a finetuned classifier, measured against the float model.

    python -m r1jax.main --config=configs/quantize.py --workdir=DIR --config.init_from=FINETUNE_DIR

`run(config, workdir)`: validates the config, loads the float classifier of `init_from` (refusing a
checkpoint without a classification head; a multimodal classifier of finetune's multimodal mode
is taken too, measured on its image+text task, its ONNX files reading tokens, token_mask and
images), writes it as the float reference artifact, finds every
weight matmul and embedding table (`compress.quantize.plan`), quantizes them to int8 with
per-channel (per-row) scales, calibrates static activation ranges on the task's training split when
the static mode is asked for, saves one artifact per mode, reloads each from disk and checks it
against the in-memory quantized model, measures everything on the test split, exports the primary
artifact with `jax.export`, exports the float model and an int8 one to ONNX (DIR/float/model.onnx,
DIR/artifact/model.onnx; `compress.edge`) and measures them in onnxruntime beside JAX, and writes
DIR/summary.json, DIR/report.md and DIR/tradeoff.png.
"""
from __future__ import annotations

import itertools
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from r1jax import configlib
from r1jax import errors
from r1jax.compress import artifact as artifact_lib
from r1jax.compress import edge
from r1jax.compress import measure
from r1jax.compress import quantize as quant_lib
from r1jax.compress import spec as spec_lib
from r1jax.compress import stage_lib

# Targets of the issue, reported in the summary (met or not).
TARGET_SIZE_PCT = 26.0
TARGET_DROP_POINTS = 1.0


def modes_of(config: ml_collections.ConfigDict) -> list[str]:
  return [m.strip() for m in config.quant.modes.split(",") if m.strip()]


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             process_count: int | None = None) -> configlib.Validator:
  """Checks that need no data or compilation; raises ConfigError naming each bad key.

  (num_devices / process_count are accepted for the common validate() signature; this stage runs
  on one device.)"""
  del num_devices, process_count
  v = configlib.Validator(config)
  v.stage("quantize")
  v.int_at_least("seed", 0)
  stage_lib.validate_common(v)
  modes = v.string("quant.modes")
  if modes is not None:
    listed = modes_of(config)
    bad = [m for m in listed if m not in quant_lib.MODES]
    v.require(listed and not bad, "quant.modes",
              f"{modes!r}: a comma-separated list among {', '.join(quant_lib.MODES)}.")
    primary = v.string("quant.primary")
    v.require(primary in listed, "quant.primary", f"{primary!r} must be one of quant.modes "
              f"({listed}).")
  v.boolean("quant.embeddings")
  v.int_at_least("quant.min_size", 0)
  v.choice("quant.calibration", quant_lib.CALIBRATIONS)
  v.number_in("quant.percentile", 0.0, 100.0, low_open=True)
  v.positive_int("quant.calibration_batches")
  v.positive_int("quant.calibration_batch_size")
  v.choice("export.onnx", edge.ONNX_SETTINGS)
  v.raise_if_any("quantize config")
  return v


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or returns the summary of a finished) quantization in `workdir`."""
  validate(config)
  return stage_lib.run_once(config, workdir, _run)


def _calibration_batches(config: ml_collections.ConfigDict, spec: Any, data: Any) -> list:
  stream = measure.batches(spec, data.train.records, batch_size=config.quant.calibration_batch_size,
                           train=True, seed=config.seed)
  return [{k: np.asarray(v) for k, v in b.items()}
          for b in itertools.islice(stream, config.quant.calibration_batches)]


def _onnx_wanted(config: ml_collections.ConfigDict) -> bool:
  """export.onnx: "on" needs the [edge] extra (refused before any work), "auto" uses it when
  installed."""
  if config.export.onnx == "on":
    edge.require()
    return True
  if config.export.onnx == "auto" and not edge.available():
    logging.info("No ONNX export: onnx / onnxruntime are not installed (pip install "
                 "\"r1jax[edge]\"; export.onnx=off silences this).")
    return False
  return config.export.onnx == "auto"


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  onnx_wanted = _onnx_wanted(config)
  src = stage_lib.load_source(config, multimodal=True)
  spec = stage_lib.prepare_workdir(workdir, src.spec)
  modes = modes_of(config)
  stage_lib.write_config(config, workdir, spec, source=src.path, source_step=src.step)
  data = measure.task_data(spec)
  reference = stage_lib.float_reference(workdir, spec, src.params, src.path)

  model = spec_lib.classifier_module(spec)
  sample = spec_lib.model_inputs(spec, *(jnp.zeros(s.shape, s.dtype)
                                         for s in spec.input_specs(1)))
  plans = quant_lib.plan(model, **sample, embeddings=config.quant.embeddings,
                         min_size=config.quant.min_size)
  qparams = jax.jit(lambda p: quant_lib.quantize_params(p, plans))(src.params)
  float_left = sorted(p for p in artifact_lib._flatten(src.params)  # pylint: disable=protected-access
                      if p not in plans)
  logging.info("Quantized %d weights to int8; %d small leaves (biases, LayerNorm) stay float.",
               len(plans), len(float_left))

  act_scales = None
  if "static" in modes:
    calib = _calibration_batches(config, spec, data)
    act_scales = quant_lib.calibrate(
        model, qparams, calib, method=config.quant.calibration,
        percentile=config.quant.percentile,
        inputs_fn=lambda b: spec_lib.model_inputs(spec, *spec.inputs_of(b)))
    logging.info("Calibrated %d activation ranges on %d training batches.", len(act_scales),
                 len(calib))

  test = stage_lib.test_batches(config, spec, data)
  probe = {k: jnp.asarray(test[0][k]) for k in spec.input_names}
  float_logits = reference.predict(probe)
  named = [(stage_lib.REFERENCE, reference)]
  checks = {}
  for mode in modes:
    directory = os.path.join(workdir, stage_lib.ARTIFACT_DIR if mode == config.quant.primary
                             else f"int8_{mode}")
    scales = act_scales if mode == "static" else None
    art = artifact_lib.save(
        directory, spec, qparams, kind="int8",
        quantization={"mode": mode, "act_scales": scales,
                      "calibration": ({"method": config.quant.calibration,
                                       "percentile": config.quant.percentile,
                                       "batches": config.quant.calibration_batches,
                                       "split": spec.task["train"]} if scales else None)},
        metadata={"source": src.path, "float_leaves": float_left})
    # The artifact as loaded from disk must compute what the in-memory quantized model computes.
    qmodel = quant_lib.quantized_model(model, mode, scales)
    live = jax.jit(lambda p, *xs, qm=qmodel: spec_lib.apply_logits(qm, spec, p, *xs))(
        qparams, *spec.inputs_of(probe))
    loaded = art.predict(probe)
    checks[mode] = {
        "roundtrip_max_abs_diff": float(jnp.max(jnp.abs(loaded - live))),
        "max_abs_logit_error_vs_float": float(jnp.max(jnp.abs(loaded - float_logits))),
        "argmax_agreement_vs_float": float(jnp.mean(
            (loaded.argmax(-1) == float_logits.argmax(-1)).astype(jnp.float32)))}
    named.append((f"int8-{mode}", art))

  rows = stage_lib.measure_all(config, named, test,
                               extras={f"int8-{m}": {"mode": m, **checks[m]} for m in modes})
  primary = dict(named)[f"int8-{config.quant.primary}"]
  exported = stage_lib.maybe_export(config, primary)
  onnx_summary = None
  if onnx_wanted:
    # model.onnx beside DIR/float (float) and DIR/artifact (int8 by onnxruntime's quantizer),
    # measured in onnxruntime and, in turn with them, the float model in JAX.
    try:
      paths = edge.export_pair(reference, primary.path)
    except errors.BadInput as e:
      if config.export.onnx == "on":
        raise
      # "auto": a model the converter cannot express keeps its JAX artifacts; the reason is kept.
      logging.warning("No ONNX export (export.onnx=auto): %s", e)
      onnx_summary = {"error": str(e)}
    else:
      onnx_rows, timing = edge.measure(reference, paths, test,
                                       latency_batch_size=config.report.latency_batch_size,
                                       warmup=config.report.latency_warmup,
                                       repeats=config.report.latency_repeats)
      rows = measure.add_relative(list(rows) + onnx_rows, reference=stage_lib.REFERENCE)
      onnx_targets = edge.targets(onnx_rows, timing, rows[0]["accuracy"])
      onnx_summary = {"files": paths, "quantization": edge.QUANTIZATION, **timing,
                      "targets": onnx_targets}
  by_name = {r["name"]: r for r in rows}
  targets = {}
  notes = []
  for mode in modes:
    r = by_name[f"int8-{mode}"]
    targets[mode] = {
        "size_pct": r["size_pct"], "size_target_met": r["size_pct"] <= TARGET_SIZE_PCT,
        "accuracy_drop_points": r["accuracy_drop_points"],
        "accuracy_target_met": r["accuracy_drop_points"] <= TARGET_DROP_POINTS,
        "latency_batch1_vs_float": r["latency_ms_batch1"] / by_name["float"]["latency_ms_batch1"],
        "latency_batched_vs_float": (r["latency_ms_batched"] /
                                     by_name["float"]["latency_ms_batched"])}
    notes.append(f"int8-{mode}: size {r['size_pct']:.1f}% of float (target <= "
                 f"{TARGET_SIZE_PCT:g}%), accuracy drop {r['accuracy_drop_points']:.2f} points "
                 f"(target <= {TARGET_DROP_POINTS:g}), latency x{1 / r['speedup_batch1']:.2f} "
                 f"(batch 1) / x{1 / r['speedup_batched']:.2f} (batched) of float; roundtrip "
                 f"max |diff| {checks[mode]['roundtrip_max_abs_diff']:.2g}")
  if onnx_summary and "targets" in onnx_summary:
    notes += edge.notes(onnx_summary["targets"])
  elif onnx_summary:
    notes.append(f"No ONNX export: {onnx_summary['error']}")
  notes.append(f"Quantized leaves: {len(plans)} (matmul kernels per output channel, embedding "
               f"tables per row); float leaves: {len(float_left)} (biases, LayerNorm, relative "
               f"position biases).")
  summary = {"source": src.path, "source_step": src.step, "modes": modes,
             "primary": config.quant.primary, "artifact": primary.path, "export": exported,
             "onnx": onnx_summary,
             "quantized_leaves": {p: l.to_json() for p, l in plans.items()},
             "float_leaves": float_left, "checks": checks, "targets": targets,
             "calibration": ({"method": config.quant.calibration,
                              "percentile": config.quant.percentile,
                              "batches": config.quant.calibration_batches} if act_scales else None)}
  logging.info("Quantization done: %s", "; ".join(notes))
  return stage_lib.finish(config, workdir, rows, title="INT8 post-training quantization",
                          notes=notes, summary=summary)
