"""Post-training INT8 quantization of a classifier with qwix, embedding tables included.

Three modes, all with int8 weights and per-output-channel float32 scales:

* ``"weights"``: activations stay float; kernels are dequantized on the fly (smallest change in
  accuracy; on CPU usually *slower* than float32, see libraries.md).
* ``"dynamic"``: each weight matmul also quantizes its input activation to int8 on the fly, with
  one scale per row (token), and runs an int8 x int8 matmul with int32 accumulation.
* ``"static"``: like dynamic, but one fixed per-tensor activation scale per matmul, calibrated on
  batches of the task's training split (`calibrate`). Cheapest at run time, most exposed to the
  activation outliers of BERT-style residual streams (Bondarenko et al. 2021): check accuracy.

Only matmuls against *weights* are quantized; activation x activation products (attention scores,
probabilities x values) stay float, because per-tensor int8 there is where accuracy collapses.

How weights are found. qwix's `PtqProvider` recognises a kernel when it is a parameter of the module
that runs the matmul, which covers `nn.Dense`. The Transformer-XL attention keeps its projections in
child `_Kernel` modules and runs the einsums in the parent, so qwix alone would leave them float.
`plan` therefore traces the model once under `jax.eval_shape` with an interceptor that remembers the
identity of every parameter handed out by `Module.param` and, for each matmul or embedding lookup,
follows its operand back to that parameter: the result maps every weight path to its operation and
to the axes that keep their own scales (the non-contracted axes; the rows of an embedding table).
qwix has no integer embedding lookup (it only rewrites matmuls), so `jnp.take` on a quantized table
is intercepted here: gather int8 rows and their scales, multiply.

Layout: training computes projections as 2-D matmuls, which the interceptor cannot follow, so
`plan` and `quantized_model` switch the model to its einsum layout (`einsum_layout`; same
parameters); `plan` logs any kernel it still leaves float.

    plan = quantize.plan(model, tokens)                    # {path: LeafPlan}
    qparams = quantize.quantize_params(params, plan)       # WithAux(QArray) leaves, rest float
    qmodel = quantize.quantized_model(model, "dynamic")
    logits, _ = qmodel.apply({"params": qparams}, tokens, token_mask)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
# qwix's PTQ leaf type and its quantization recipe are not re-exported by qwix 0.1.x; both are what
# `qwix.PtqProvider` itself consumes, so the saved artifacts stay loadable by plain qwix models.
from qwix._src.core.qarray import HowToQuantize
from qwix._src.providers.ptq import WithAux

MODES = ("weights", "dynamic", "static")
CALIBRATIONS = ("absmax", "percentile")
QTYPE = jnp.int8
QMAX = 127.0
STATS_COLLECTION = "act_stats"


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one weight is quantized: the op that consumes it and the axes with their own scales."""
  op: str                              # "dot_general", "einsum:<subscripts>" or "embedding"
  channelwise_axes: tuple[int, ...]    # axes that keep one scale per index (others share one)

  def how(self) -> HowToQuantize:
    return HowToQuantize(qtype=QTYPE, channelwise_axes=list(self.channelwise_axes),
                         tiled_axes={}, calibration_method="absmax")

  def to_json(self) -> dict[str, Any]:
    return {"op": self.op, "channelwise_axes": list(self.channelwise_axes)}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "LeafPlan":
    return cls(str(data["op"]), tuple(int(a) for a in data["channelwise_axes"]))


@flax.struct.dataclass
class QWeight(WithAux):
  """qwix's PTQ weight (an int8 QArray + how it was quantized) whose `astype` casts the scales.

  The model casts kernels to its compute dtype (`kernel.astype(dtype)`); qwix's own `WithAux.astype`
  only handles plain arrays.
  """

  def astype(self, dtype):
    return self.replace(array=self.array.astype(dtype))


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"quantization mode {mode!r}: allowed values are {', '.join(MODES)}.")


def _path(module: nn.Module, name: str) -> str:
  return "/".join(tuple(str(p) for p in module.path) + (name,))


def _module_key(op: str) -> str:
  """The variable name of an op's activation statistics inside its module."""
  return op.replace(",", "_").replace("->", "_to_").replace(":", "_")


class Int8Provider(qwix.PtqProvider):
  """qwix PTQ provider for int8 weights (+ int8 activations), embeddings and weight discovery.

  Args:
    mode: one of MODES.
    act_scales: for mode "static": {"<module path>/<op key>": absmax} from `calibrate`.
    discover: trace-only mode used by `plan`: run every op in float and record the weights.
    record: run as `mode` but also `sow` each weight matmul's input |max| (or percentile) into the
      "act_stats" collection (for `calibrate`).
    percentile: with record, the per-batch statistic is this percentile of |x| instead of the max.
  """

  def __init__(self, mode: str = "weights", act_scales: Mapping[str, float] | None = None, *,
               discover: bool = False, record: bool = False, percentile: float | None = None):
    _check_mode(mode)
    rule = qwix.QuantizationRule(module_path=".*", weight_qtype=QTYPE,
                                 act_qtype=QTYPE if mode == "dynamic" else None)
    super().__init__([rule])
    self.mode = mode
    self.act_scales = dict(act_scales or {})
    self.discover = discover
    self.record = record
    self.percentile = percentile
    self.found: dict[str, LeafPlan] = {}
    self._param_ids: dict[int, tuple[str, Any]] = {}
    if mode == "static" and not (discover or record) and not self.act_scales:
      raise ValueError("mode='static' needs act_scales from quantize.calibrate(...) (calibration "
                       "batches from the task's training split).")

  # -- weight discovery ---------------------------------------------------------------------------

  def nn_param(self, module: nn.Module, name: str, *args, **kwargs):
    out = super().nn_param(module, name, *args, **kwargs)
    if self.discover:
      # Keep a reference: an id is only unique while its object is alive.
      self._param_ids[id(out)] = (_path(module, name), out)
    return out

  def _param_path(self, x: Any) -> str | None:
    """The path of the parameter `x` was derived from by unary ops (astype, reshape), if any."""
    while True:
      if id(x) in self._param_ids:
        return self._param_ids[id(x)][0]
      parent = getattr(x, "parent", None) if isinstance(x, jax.core.Tracer) else None
      if parent is None or len(parent.in_tracers) != 1:
        return None
      x = parent.in_tracers[0]

  def _found(self, path: str | None, plan: LeafPlan) -> None:
    if path is not None:
      self.found[path] = plan

  # -- quantized ops ------------------------------------------------------------------------------

  def _stat(self, x: jax.Array) -> jax.Array:
    ax = jnp.abs(x.astype(jnp.float32))
    return jnp.percentile(ax, self.percentile) if self.percentile else jnp.max(ax)

  def _record(self, x: jax.Array, op: str) -> None:
    module = flax.linen.module._context.module_stack[-1]  # pylint: disable=protected-access
    module.sow(STATS_COLLECTION, _module_key(op), self._stat(x))

  def _static_lhs(self, x: jax.Array, op: str) -> qwix.QArray:
    module = flax.linen.module._context.module_stack[-1]  # pylint: disable=protected-access
    key = _path(module, _module_key(op))
    if key not in self.act_scales:
      raise ValueError(f"No calibrated activation scale for {key!r}; the artifact's act_scales "
                       f"do not match this model (recalibrate).")
    scale = max(float(self.act_scales[key]), 1e-8) / QMAX
    q = jnp.clip(jnp.round(x / scale), -QMAX, QMAX).astype(QTYPE)
    return qwix.QArray(qvalue=q, scale=jnp.full((1,) * x.ndim, scale, x.dtype), qtype=QTYPE)

  def einsum(self, einsum_str: str, *operands: jax.Array, **kwargs) -> jax.Array:
    if len(operands) == 2 and isinstance(operands[1], WithAux):
      lhs, rhs = operands
      op = f"einsum:{einsum_str}"
      if self.record:
        self._record(lhs, op)
      if self.mode == "static":
        return qwix.einsum(einsum_str, self._static_lhs(lhs, op), rhs.array)
      return super().einsum(einsum_str, *operands, **kwargs)
    if self.discover and len(operands) == 2:
      inputs, output = einsum_str.replace(" ", "").split("->")
      rhs_subs = inputs.split(",")[1]
      keep = tuple(i for i, c in enumerate(rhs_subs) if c in output)
      self._found(self._param_path(operands[1]), LeafPlan(f"einsum:{einsum_str}", keep))
    # Activation x activation products (attention) stay float.
    return jnp.einsum(einsum_str, *operands, **kwargs)

  def dot_general(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                  *, out_sharding=None):
    if isinstance(rhs, WithAux):
      if self.record:
        self._record(lhs, "dot_general")
      if self.mode == "static":
        return qwix.dot_general(self._static_lhs(lhs, "dot_general"), rhs.array,
                                dimension_numbers)
      return super().dot_general(lhs, rhs, dimension_numbers, out_sharding=out_sharding)
    if self.discover:
      (_, rhs_contract), (_, rhs_batch) = dimension_numbers
      keep = tuple(i for i in range(rhs.ndim) if i not in rhs_contract and i not in rhs_batch)
      self._found(self._param_path(rhs), LeafPlan("dot_general", keep))
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type,
                               out_sharding=out_sharding)

  def take(self, a, indices, axis=None, *args, **kwargs):
    """jnp.take: int8 embedding rows x their scales for a quantized table, else unchanged."""
    if isinstance(a, WithAux) and axis == 0 and not args and not kwargs:
      q = a.array
      rows = jnp.take(q.qvalue, indices, axis=0)
      scales = jnp.take(q.scale, indices, axis=0)
      return rows.astype(q.scale.dtype) * scales
    if self.discover and axis == 0 and getattr(a, "ndim", 0) == 2:
      self._found(self._param_path(a), LeafPlan("embedding", (0,)))
    return jnp.take(a, indices, axis, *args, **kwargs)

  def get_intercept_map(self):
    return super().get_intercept_map() | {"jax.numpy.take": self.take}


def quantized_model(model: nn.Module, mode: str = "dynamic",
                    act_scales: Mapping[str, float] | None = None, **provider_kwargs: Any
                    ) -> nn.Module:
  """`model` with its `__call__` intercepted by an `Int8Provider` (apply with quantized params)."""
  return qwix.quantize_model(einsum_layout(model), Int8Provider(mode, act_scales, **provider_kwargs))


def einsum_layout(model: nn.Module) -> nn.Module:
  """The same model computing its projections as einsums over the kernels' own shapes.

  Training uses 2-D matmuls (`TransformerXLConfig.flat_matmuls`), which qwix cannot see through;
  parameters and results are the same in both layouts.
  """
  config = getattr(model, "config", None)
  if config is None or not getattr(config, "flat_matmuls", False):
    return model
  return model.clone(config=dataclasses.replace(config, flat_matmuls=False))


def plan(model: nn.Module, *sample_args: Any, embeddings: bool = True, min_size: int = 0,
         **sample_kwargs: Any) -> dict[str, LeafPlan]:
  """Finds every weight consumed by a matmul (and embedding lookups): {param path: LeafPlan}.

  Traces `model.init(key, *sample_args, **sample_kwargs)` abstractly (no weights materialised).

  Args:
    model: a float flax linen model (e.g. `heads.Classifier`).
    sample_args/sample_kwargs: inputs of the right shapes and dtypes.
    embeddings: also quantize embedding tables (one scale per row).
    min_size: leave weights with fewer elements than this in float.
  """
  provider = Int8Provider("weights", discover=True)
  qmodel = qwix.quantize_model(einsum_layout(model), provider)
  shapes = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), *sample_args, **sample_kwargs))
  sizes = {"/".join(k): int(np.prod(v.shape)) for k, v in
           flax.traverse_util.flatten_dict(nn.unbox(shapes["params"])).items()}
  out = {}
  for path, leaf in sorted(provider.found.items()):
    if path not in sizes:
      continue
    if leaf.op == "embedding" and not embeddings:
      continue
    if sizes[path] < min_size:
      continue
    out[path] = leaf
  if not out:
    raise ValueError("quantize.plan found no weight matmul in the model; nothing to quantize.")
  missed = sorted(p for p, n in sizes.items() if p not in out and p not in provider.found
                  and n >= max(min_size, 1) and p.endswith("kernel"))
  if missed:
    logging.warning("quantize.plan: kernels not consumed by a recognised matmul stay float: %s",
                    missed)
  return out


def quantize_params(params: Any, leaf_plans: Mapping[str, LeafPlan]) -> Any:
  """Float params -> the same tree with planned leaves replaced by WithAux(int8 QArray)."""
  flat = flax.traverse_util.flatten_dict(nn.unbox(params), sep="/")
  missing = sorted(set(leaf_plans) - set(flat))
  if missing:
    raise ValueError(f"quantization plan names parameters the model lacks: {missing[:5]}")
  out = {}
  for path, value in flat.items():
    leaf = leaf_plans.get(path)
    if leaf is None:
      out[path] = value
    else:
      value = jnp.asarray(value, jnp.float32)
      out[path] = QWeight(qwix.quantize(value, QTYPE, channelwise_axes=leaf.channelwise_axes),
                          leaf.how())
  return flax.traverse_util.unflatten_dict(out, sep="/")


def dequantize_params(qparams: Any) -> Any:
  """WithAux(QArray) leaves -> float arrays (for error norms; the float model can then run)."""
  return jax.tree.map(lambda x: qwix.dequantize(x.array) if isinstance(x, WithAux) else x,
                      qparams, is_leaf=lambda x: isinstance(x, WithAux))


def is_quantized(x: Any) -> bool:
  return isinstance(x, WithAux)


def calibrate(model: nn.Module, qparams: Any, batches: Iterable[Mapping[str, np.ndarray]], *,
              method: str = "absmax", percentile: float = 99.99,
              apply_kwargs: Sequence[str] = ("tokens", "token_mask"),
              inputs_fn: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
              ) -> dict[str, float]:
  """Per-tensor input scales for mode "static", from calibration batches (the train split).

  Each weight matmul's input statistic (|x| max, or the `percentile` of |x| with
  method="percentile") is computed per batch and averaged over batches (averaging per-batch maxima
  is less sensitive to one outlier batch than the overall max).

  The model is called with the batch's `apply_kwargs` as keywords, or with `inputs_fn(batch)`
  (keyword arguments) when given.

  Returns {"<module path>/<op key>": scale}, where int8 = round(x * 127 / scale).
  """
  if method not in CALIBRATIONS:
    raise ValueError(f"calibration method {method!r}: allowed values are {', '.join(CALIBRATIONS)}.")
  if method == "percentile" and not 0.0 < percentile <= 100.0:
    raise ValueError(f"calibration percentile={percentile}: must be in (0, 100].")
  qmodel = quantized_model(model, "weights", record=True,
                           percentile=percentile if method == "percentile" else None)

  inputs_fn = inputs_fn or (lambda batch: {k: batch[k] for k in apply_kwargs})

  @jax.jit
  def stats(qp, batch):
    _, state = qmodel.apply({"params": qp}, **inputs_fn(batch), mutable=[STATS_COLLECTION])
    return state[STATS_COLLECTION]

  totals: dict[str, float] = {}
  n = 0
  for batch in batches:
    flat = flax.traverse_util.flatten_dict(jax.device_get(stats(
        qparams, batch)), sep="/")
    for key, values in flat.items():
      totals[key] = totals.get(key, 0.0) + float(np.max(np.asarray(values)))
    n += 1
  if not n:
    raise ValueError("calibrate() got no batches; pass batches of the task's training split.")
  return {k: v / n for k, v in sorted(totals.items())}


def quantized_bytes(qparams: Any) -> int:
  """Bytes of all leaves (int8 values + float scales + float leaves)."""
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(qparams)))
