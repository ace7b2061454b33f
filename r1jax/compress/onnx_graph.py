"""A traced JAX function -> an ONNX graph, one jaxpr equation at a time (float inference graphs).

Why our own converter: `jax2onnx` (0.17.1, the version on the index) was tried first and does not
serve here: it pins orbax-checkpoint < 0.11.37 (r1jax needs 0.12) and pulls equinox, dm-pix,
netron and huggingface-hub, and with jax 0.10 it fails while tracing our classifier
(`TracerBoolConversionError` on the static shape check of `check_inputs`), with a symbolic batch
and with a fixed one alike (bench/NOTES_edge.md). A jaxpr is small and stable: the classifier
lowers to about 35 primitives, each mapped below to one or a few standard ONNX ops (opset 17).

How it works. `to_onnx(fn, example_args, input_names, output_names)` traces `fn` with
`jax.make_jaxpr` on arguments whose leading dimension is the symbolic `batch` (`jax.export`'s shape
polymorphism), then walks the equations:
- an equation whose inputs are all known constants (parameters closed over by `fn`, literals, and
  everything computed from them alone: transposed or reshaped kernels, masks) is evaluated here
  with JAX and its result becomes a constant, so every weight reaches its MatMul or Gather as an
  initializer (what onnxruntime's quantizer looks for), unless the result is larger than its
  inputs (`_grows_at_most`: a product of two weights, a broadcast), which runs in the graph;
- r1jax.model.kernels' LayerNorm and softmax (custom-VJP calls, recognised by name) become
  LayerNormalization and Softmax; other call-like equations (jit, custom_vjp_call) are inlined;
- every other equation emits ONNX nodes (broadcasts stay implicit where ONNX's broadcasting
  gives the same shape; no-op reshapes and transposes are skipped); shapes that depend on the
  batch are constants with -1 where one dimension does, else computed from `Shape(first input)[0]`
  (dimensions linear in the batch, as jax's shape polymorphism gives).
A primitive without a mapping raises `errors.BadInput` naming it; so does a form of gather or pad
the mapping does not cover.

    model = onnx_graph.to_onnx(fn, [tokens_spec, mask_spec], ["tokens", "token_mask"], ["logits"])
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import errors

OPSET = 17
BATCH = "batch"
_CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_vjp_call", "custom_jvp_call",
          "remat", "checkpoint")
_IDENTITY = ("stop_gradient", "copy", "copy_p", "optimization_barrier", "reduce_precision")
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow",
           "eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater",
           "ge": "GreaterOrEqual"}
_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "tanh": "Tanh",
          "logistic": "Sigmoid", "erf": "Erf", "abs": "Abs", "sign": "Sign", "sin": "Sin",
          "cos": "Cos", "floor": "Floor", "ceil": "Ceil"}


def _onnx():
  try:
    import onnx  # Lazy: only the ONNX export needs onnx (the [edge] extra).
  except ImportError as e:
    raise errors.missing_extra(e, extra="edge", what="ONNX export") from e
  return onnx


class _T:
  """A runtime tensor of the graph: its name and its abstract value (shape may hold `batch`).

  `expand`: the tensor named is the value before a broadcast (size 1 on the broadcast axes, same
  rank); elementwise ops use it as is (ONNX broadcasts), any other op gets it Expanded first.
  """

  def __init__(self, name: str, aval: Any, expand: bool = False):
    self.name, self.aval, self.expand = name, aval, expand
    self.mid = tuple(aval.shape)  # the stored tensor's shape while `expand`


class _Builder:
  """Nodes and initializers of the graph being built, and the batch size as a tensor."""

  def __init__(self, onnx):
    self.onnx, self.helper = onnx, onnx.helper
    self.nodes, self.inits, self.count = [], [], 0
    self.batch_name = ""   # int64 [1]: the batch size, set once the first input is known
    self.reshape_of: dict[str, str] = {}   # Reshape output -> the tensor it reshapes

  def fresh(self, hint: str) -> str:
    self.count += 1
    return f"{hint}_{self.count}"

  def const(self, value: Any, hint: str = "c") -> str:
    array = np.asarray(value)
    if array.size > FOLD_MIN and (array == array.flat[0]).all():
      # A uniform constant (an encoder's all-True attention pattern, [1, 1, Q, K]: 64 kB at 256
      # tokens, 4% of the tiny int8 file) is one value Expanded in the graph; onnxruntime folds
      # it back when it loads the model.
      one = self.const(array.reshape(-1)[:1].reshape((1,) * array.ndim), hint)
      return self.op("Expand", [one, self.const(np.array(array.shape, np.int64), "shape")], hint)
    name = self.fresh(hint)
    self.inits.append(self.onnx.numpy_helper.from_array(array, name))
    return name

  def op(self, op_type: str, inputs: Sequence[str], hint: str = "", **attrs) -> str:
    out = self.fresh(hint or op_type.lower())
    self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], **attrs))
    return out

  def dim(self, d: Any) -> str | int:
    """A dimension: an int, or the name of an int64 [1] tensor (linear in the batch)."""
    if isinstance(d, (int, np.integer)):
      return int(d)
    c0, c1, c2 = (int(d._evaluate({BATCH: v})) for v in (0, 1, 2))  # pylint: disable=protected-access
    if c2 - c1 != c1 - c0:
      raise errors.BadInput(f"ONNX export: dimension {d} is not linear in the batch size.")
    out = self.batch_name
    if c1 - c0 != 1:
      out = self.op("Mul", [out, self.const(np.array([c1 - c0], np.int64))])
    if c0:
      out = self.op("Add", [out, self.const(np.array([c0], np.int64))])
    return out

  def reshape_target(self, dims: Sequence[Any]) -> str:
    """The shape input of a Reshape to `dims`: a constant (-1 for the one batch-dependent or
    inferred dimension) where it can be, so that onnxruntime can fold and fuse it."""
    free = [i for i, d in enumerate(dims) if not isinstance(d, (int, np.integer)) or d == -1]
    if len(free) <= 1 and all(d != 0 for d in dims if isinstance(d, (int, np.integer))):
      return self.const(np.array([-1 if i in free else int(d) for i, d in enumerate(dims)],
                                 np.int64), "shape")
    return self.shape(dims)

  def shape(self, dims: Sequence[Any]) -> str:
    """An int64 [len(dims)] shape tensor for Reshape / Expand."""
    parts = [self.dim(d) for d in dims]
    if all(isinstance(p, int) for p in parts):
      return self.const(np.array(parts, np.int64), "shape")
    pieces = [self.const(np.array([p], np.int64)) if isinstance(p, int) else p for p in parts]
    return self.op("Concat", pieces, "shape", axis=0)


def _dtype_code(onnx, dtype: Any) -> int:
  return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _static(shape: Sequence[Any]) -> bool:
  return all(isinstance(d, (int, np.integer)) for d in shape)


def _name(b: _Builder, x: Any) -> str:
  """The name of a value's tensor, broadcast to its full shape."""
  if isinstance(x, str):
    return x
  if isinstance(x, np.ndarray):
    return b.const(x)
  if x.expand:
    x.name, x.expand = b.op("Expand", [x.name, b.shape(x.aval.shape)]), False
  return x.name


def _shape_of(x: Any) -> tuple:
  return tuple(x.shape) if isinstance(x, np.ndarray) else tuple(x.aval.shape)


def _same(a: Sequence[Any], c: Sequence[Any]) -> bool:
  return len(a) == len(c) and all(x is y or x == y for x, y in zip(a, c))


def _broadcasting(b: _Builder, eqn, ins) -> list[str]:
  """Operand names for an elementwise op: broadcast values stay unexpanded when ONNX's
  multidirectional broadcasting of the operands' stored shapes gives the output shape."""
  out = tuple(eqn.outvars[0].aval.shape)
  stored = [x.mid if isinstance(x, _T) and x.expand else _shape_of(x) for x in ins]
  rank = max(len(s) for s in stored)
  dims = []
  for axis in range(rank):
    sizes = [s[axis - rank + len(s)] for s in stored if axis - rank + len(s) >= 0]
    big = [d for d in sizes if not (isinstance(d, (int, np.integer)) and d == 1)]
    dims.append(big[0] if big else 1)
  if not _same(dims, out):
    lazy = [i for i, x in enumerate(ins) if isinstance(x, _T)]
    if lazy:
      _name(b, ins[lazy[0]])
    else:  # constants only (a result not folded, see _grows_at_most): one of them at full size
      ins = [np.broadcast_to(ins[0], out).copy()] + list(ins[1:])
  return [x.name if isinstance(x, _T) else _name(b, x) for x in ins]


def _transpose(b: _Builder, x: str, perm: Sequence[int]) -> str:
  perm = [int(p) for p in perm]
  return x if perm == list(range(len(perm))) else b.op("Transpose", [x], perm=perm)


# --------------------------------------------------------------------------------------------------
# Equation handlers: (builder, eqn, inputs) -> list of output names. Inputs are _T or np.ndarray.


def _reshape_to(b, x, shape, in_shape=None):
  """Reshape unless the shape is already `shape`; a Reshape of a Reshape reads the first's input."""
  if in_shape is None and not isinstance(x, str):
    in_shape = _shape_of(x)
  if in_shape is not None and _same(in_shape, shape):
    return _name(b, x)
  if isinstance(x, np.ndarray) and _static(shape):
    return b.const(x.reshape([int(d) for d in shape]))
  name = _name(b, x)
  target = b.reshape_target(shape)
  out = b.op("Reshape", [b.reshape_of.get(name, name), target])
  b.reshape_of[out] = b.reshape_of.get(name, name)
  return out


def _dot_general(b, eqn, ins):
  lhs, rhs = ins
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  ls, rs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  lf = [i for i in range(len(ls)) if i not in lc and i not in lb]
  rf = [i for i in range(len(rs)) if i not in rc and i not in rb]
  k = int(np.prod([ls[i] for i in lc]))
  out_shape = eqn.outvars[0].aval.shape
  if not rb and (isinstance(rhs, np.ndarray) or isinstance(lhs, np.ndarray)):
    # Activation x weight: one 2-D initializer [K, N] (onnxruntime's quantizer finds it), and
    # MatMul's broadcasting over the leading axes: [..., K] @ [K, N] -> [..., N].
    if isinstance(rhs, np.ndarray):
      x, xs, xf, xc, w, wf, wc = lhs, ls, lf, lc, rhs, rf, rc
    else:  # weight x activation: the same product with the operands' roles swapped
      x, xs, xf, xc, w, wf, wc = rhs, rs, rf, rc, lhs, lf, lc
    w2 = np.transpose(w, list(wc) + wf).reshape(k, -1).astype(eqn.outvars[0].aval.dtype)
    if isinstance(x, np.ndarray):  # constant x weight, left to the graph (_grows_at_most):
      x = b.op("Identity", [b.const(x)])  # onnxruntime's quantizer skips a constant input
    free = [xs[i] for i in xf]
    y = _transpose(b, _name(b, x), xf + list(xc))
    y = _reshape_to(b, y, free + [k], free + [xs[i] for i in xc])
    y = b.op("MatMul", [y, b.const(w2, "weight")])
    wfree = [w.shape[i] for i in wf]
    y = _reshape_to(b, y, free + wfree, free + [w2.shape[1]])
    if isinstance(rhs, np.ndarray):
      return [y]
    # [rhs free..., lhs free...] -> [lhs free..., rhs free...]
    nx, nw = len(free), len(wfree)
    return [_transpose(b, y, list(range(nx, nx + nw)) + list(range(nx)))]
  # Batched product of two activations: [batch..., M, K] x [batch..., K, N].
  def arrange(v, perm):  # a constant is transposed here, a runtime tensor in the graph
    return np.transpose(v, perm) if isinstance(v, np.ndarray) else _transpose(b, _name(b, v), perm)
  x = arrange(lhs, list(lb) + lf + list(lc))
  y = arrange(rhs, list(rb) + list(rc) + rf)
  bdims = [ls[i] for i in lb]
  m = [ls[i] for i in lf]
  n = [rs[i] for i in rf]
  m1 = m if len(m) == 1 else [int(np.prod(m)) if _static(m) else -1]
  n1 = n if len(n) == 1 else [int(np.prod(n)) if _static(n) else -1]
  x = _reshape_to(b, x, bdims + m1 + [k], bdims + m + [ls[i] for i in lc])
  y = _reshape_to(b, y, bdims + [k] + n1, [rs[i] for i in rb] + [rs[i] for i in rc] + n)
  return [_reshape_to(b, b.op("MatMul", [x, y]), out_shape, bdims + m1 + n1)]


def _broadcast_in_dim(b, eqn, ins):
  (x,) = ins[:1]
  shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
  in_shape = eqn.invars[0].aval.shape
  mid = [in_shape[dims.index(i)] if i in dims else 1 for i in range(len(shape))]
  if isinstance(x, np.ndarray):
    y = b.const(x.reshape([int(m) for m in mid]))
  else:
    y = _reshape_to(b, x, mid)
  out = _T(y, eqn.outvars[0].aval, expand=not _same(mid, shape))
  out.mid = tuple(mid)
  return [out]


def _gather(b, eqn, ins):
  operand, indices = ins
  dn = eqn.params["dimension_numbers"]
  out_rank = len(eqn.outvars[0].aval.shape)
  op_shape = eqn.invars[0].aval.shape
  if (isinstance(operand, np.ndarray) and dn.collapsed_slice_dims == (0,)
      and dn.start_index_map == (0,) and dn.offset_dims == (out_rank - 1,)
      and not dn.operand_batching_dims and tuple(eqn.params["slice_sizes"])[1:] == op_shape[1:]):
    # A table lookup (jnp.take(table, ids, axis=0)): indices [..., 1] -> Gather on axis 0.
    ids = b.op("Squeeze", [_name(b, indices), b.const(np.array([-1], np.int64))])
    return [b.op("Gather", [b.const(operand, "table"), ids], axis=0)]
  if (isinstance(indices, np.ndarray) and indices.ndim == 1
      and dn.offset_dims == tuple(range(out_rank)) and not dn.operand_batching_dims):
    # A slice at constant offsets (x[:, 1:], x[i]): Slice, then drop the collapsed axes.
    starts = [0] * len(op_shape)
    for axis, start in zip(dn.start_index_map, indices.tolist()):
      starts[axis] = start
    sizes = eqn.params["slice_sizes"]
    axes = [i for i in range(len(op_shape)) if i in dn.start_index_map]
    for i in axes:  # gather clamps a start so that the slice stays inside the operand
      starts[i] = max(0, min(starts[i], op_shape[i] - sizes[i]))
    y = b.op("Slice", [_name(b, operand), b.const(np.array([starts[i] for i in axes], np.int64)),
                       b.const(np.array([starts[i] + sizes[i] for i in axes], np.int64)),
                       b.const(np.array(axes, np.int64))])
    if dn.collapsed_slice_dims:
      y = b.op("Squeeze", [y, b.const(np.array(dn.collapsed_slice_dims, np.int64))])
    return [y]
  raise errors.BadInput(f"ONNX export: this form of the JAX primitive 'gather' has no ONNX "
                        f"mapping in r1jax.compress.onnx_graph ({dn}).")


def _select_n(b, eqn, ins):
  if len(ins) != 3 or eqn.invars[0].aval.dtype != np.bool_:
    raise errors.BadInput("ONNX export: 'select_n' with an integer predicate or more than two "
                          "cases has no ONNX mapping in r1jax.compress.onnx_graph.")
  pred, on_false, on_true = _broadcasting(b, eqn, ins)
  if eqn.outvars[0].aval.dtype == np.bool_:  # onnxruntime has no boolean Where
    return [b.op("Or", [b.op("And", [pred, on_true]),
                        b.op("And", [b.op("Not", [pred]), on_false])])]
  return [b.op("Where", [pred, on_true, on_false])]


def _pad(b, eqn, ins):
  x, value = ins
  config = eqn.params["padding_config"]
  if any(interior for _, _, interior in config):
    raise errors.BadInput("ONNX export: 'pad' with interior padding has no ONNX mapping.")
  pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
  value = value if isinstance(value, np.ndarray) else None
  if value is None:
    raise errors.BadInput("ONNX export: 'pad' with a computed padding value has no ONNX mapping.")
  return [b.op("Pad", [_name(b, x), b.const(np.array(pads, np.int64)),
                       b.const(np.asarray(value, eqn.invars[0].aval.dtype))], mode="constant")]


def _reduce(kind):
  def handle(b, eqn, ins):
    axes = [int(a) for a in eqn.params["axes"]]
    x = _name(b, ins[0])
    dtype = eqn.invars[0].aval.dtype
    if kind == "ReduceSum":
      return [b.op("ReduceSum", [x, b.const(np.array(axes, np.int64))], keepdims=0)]
    if dtype == np.bool_:
      x = b.op("Cast", [x], to=_dtype_code(b.onnx, np.int32))
      y = b.op(kind, [x], axes=axes, keepdims=0)
      return [b.op("Cast", [y], to=_dtype_code(b.onnx, np.bool_))]
    return [b.op(kind, [x], axes=axes, keepdims=0)]
  return handle


def _minmax(kind, boolean):
  def handle(b, eqn, ins):
    op = boolean if eqn.outvars[0].aval.dtype == np.bool_ else kind
    return [b.op(op, _broadcasting(b, eqn, ins))]
  return handle


def _slice(b, eqn, ins):
  starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
  strides = eqn.params["strides"] or [1] * len(starts)
  shape = eqn.invars[0].aval.shape
  axes = [i for i in range(len(starts))
          if starts[i] != 0 or strides[i] != 1 or not limits[i] == shape[i]]
  if not axes:
    return [_name(b, ins[0])]
  if not _static([starts[i] for i in axes]):
    raise errors.BadInput("ONNX export: a 'slice' starting at a batch-dependent offset has no "
                          "ONNX mapping.")
  arr = lambda v: b.const(np.array(v, np.int64))  # noqa: E731
  return [b.op("Slice", [_name(b, ins[0]), arr([starts[i] for i in axes]),
                         b.shape([limits[i] for i in axes]), arr(axes),
                         arr([strides[i] for i in axes])])]


def _concatenate(b, eqn, ins):
  axis = eqn.params["dimension"]
  keep = [_name(b, x) for x, v in zip(ins, eqn.invars) if v.aval.shape[axis] != 0]
  return [keep[0] if len(keep) == 1 else b.op("Concat", keep, axis=axis)]


def _shift(direction):
  def handle(b, eqn, ins):
    dtype = eqn.outvars[0].aval.dtype
    x, y = (_name(b, v) for v in ins)
    if np.dtype(dtype).kind == "u":
      return [b.op("BitShift", [x, y], direction=direction)]
    # int32 logical shifts: the same bits as uint32 (onnxruntime's BitShift is unsigned only).
    unsigned = _dtype_code(b.onnx, np.dtype(f"uint{np.dtype(dtype).itemsize * 8}"))
    z = b.op("BitShift", [b.op("Cast", [x], to=unsigned), b.op("Cast", [y], to=unsigned)],
             direction=direction)
    return [b.op("Cast", [z], to=_dtype_code(b.onnx, dtype))]
  return handle


def _simple(b, eqn, ins):
  name = eqn.primitive.name
  dtype = eqn.outvars[0].aval.dtype
  if name in _BINARY or name in ("ne", "and", "or", "xor", "rem", "clamp"):
    args = _broadcasting(b, eqn, ins)
  else:
    args = [_name(b, x) for x in ins]
  if name in _BINARY:
    return [b.op(_BINARY[name], args)]
  if name == "ne":
    return [b.op("Not", [b.op("Equal", args)])]
  if name in ("and", "or", "xor"):
    op = name.capitalize() if dtype == np.bool_ else "Bitwise" + name.capitalize()
    return [b.op(op, args)]
  if name == "not":
    return [b.op("Not" if dtype == np.bool_ else "BitwiseNot", args)]
  if name == "rem":  # lax.rem takes the dividend's sign, as C's fmod
    return [b.op("Mod", args, fmod=1)]
  if name in _UNARY:
    return [b.op(_UNARY[name], args)]
  if name == "rsqrt":
    return [b.op("Reciprocal", [b.op("Sqrt", args)])]
  if name == "square":
    return [b.op("Mul", args * 2)]
  if name == "integer_pow":
    return [b.op("Pow", args + [b.const(np.asarray(eqn.params["y"], dtype))])]
  if name == "convert_element_type":
    return [b.op("Cast", args, to=_dtype_code(b.onnx, eqn.params["new_dtype"]))]
  if name in ("reshape", "squeeze", "expand_dims"):
    return [_reshape_to(b, ins[0], eqn.outvars[0].aval.shape)]
  if name == "transpose":
    return [_transpose(b, args[0], eqn.params["permutation"])]
  if name == "clamp":
    low, x, high = args
    return [b.op("Max", [b.op("Min", [x, high]), low])]
  if name == "argmax":
    (axis,) = eqn.params["axes"]
    y = b.op("ArgMax", args[:1], axis=int(axis), keepdims=0)
    return [b.op("Cast", [y], to=_dtype_code(b.onnx, eqn.params["index_dtype"]))]
  if name in _IDENTITY:
    return args
  raise KeyError(name)


_HANDLERS: dict[str, Callable[..., list]] = {
    "dot_general": _dot_general, "broadcast_in_dim": _broadcast_in_dim, "gather": _gather,
    "select_n": _select_n, "pad": _pad, "reduce_sum": _reduce("ReduceSum"),
    "reduce_max": _reduce("ReduceMax"), "reduce_min": _reduce("ReduceMin"),
    "reduce_or": _reduce("ReduceMax"), "reduce_and": _reduce("ReduceMin"),
    "max": _minmax("Max", "Or"), "min": _minmax("Min", "And"), "slice": _slice,
    "concatenate": _concatenate, "shift_right_logical": _shift("RIGHT"),
    "shift_left": _shift("LEFT"),
}
_SIMPLE = (set(_BINARY) | set(_UNARY) | set(_IDENTITY)
           | {"ne", "and", "or", "xor", "not", "rem", "rsqrt", "square", "integer_pow",
              "convert_element_type", "reshape", "squeeze", "expand_dims", "transpose", "clamp",
              "argmax"})
SUPPORTED = tuple(sorted(set(_HANDLERS) | _SIMPLE | set(_CALLS)))


# --------------------------------------------------------------------------------------------------
# r1jax.model.kernels' custom-VJP kernels, recognised by name: one ONNX op each instead of the
# dozen small ops their forward pass lowers to (onnxruntime pays per node; XLA fuses them). A
# handler returns None for a form it does not cover, and the kernel is then inlined.


def _kernel_name(eqn) -> str:
  inner = eqn.params.get("call_jaxpr") if eqn.primitive.name == "custom_vjp_call" else None
  info = getattr(getattr(inner, "jaxpr", inner), "debug_info", None)
  return getattr(info, "func_name", "") or ""


def _layer_norm(b, eqn, ins):
  """kernels.layer_norm(x, scale, bias, eps): eps is the scalar literal its forward adds."""
  eps = {float(v.val) for e in eqn.params["call_jaxpr"].jaxpr.eqns if e.primitive.name == "add"
         for v in e.invars if isinstance(v, jax.extend.core.Literal) and np.ndim(v.val) == 0}
  if len(eps) != 1 or eqn.invars[0].aval.dtype != np.float32:
    return None
  return [b.op("LayerNormalization", [_name(b, x) for x in ins], axis=-1, epsilon=eps.pop())]


def _softmax(b, eqn, ins):
  return [b.op("Softmax", [_name(b, ins[0])], axis=-1)]


# (kernels._rel_shift as one Gather on the flattened scores was tried: no faster than its
# pad/reshape/slice body in onnxruntime, bench/NOTES_edge.md.)
_KERNELS = {"layer_norm": _layer_norm, "softmax": _softmax}


# --------------------------------------------------------------------------------------------------
# The walk.


def _inner_jaxpr(eqn):
  for key in ("call_jaxpr", "jaxpr", "fun_jaxpr"):
    inner = eqn.params.get(key)
    if inner is not None:
      return (inner.jaxpr, inner.consts) if hasattr(inner, "consts") else (inner, ())
  raise errors.BadInput(f"ONNX export: cannot inline the JAX call '{eqn.primitive.name}'.")


FOLD_MIN = 1024  # constant results up to this many elements are always stored as such


def _grows_at_most(ins: Sequence[np.ndarray], outvars) -> bool:
  """Whether storing an equation's result instead of computing it keeps the file as small: a
  product of two weights (attention's projected position table: [H, D, P] from a [d, H, D]
  kernel) or a broadcast is computed in the graph (onnxruntime folds it when it loads the model),
  so that the weight stays a 2-D MatMul operand the quantizer makes int8."""
  size = sum(int(np.prod(v.aval.shape)) for v in outvars)
  return size <= max(FOLD_MIN, sum(x.size for x in ins))


def _walk(b: _Builder, jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list:
  env: dict[Any, Any] = {}

  def read(v):
    if isinstance(v, jax.extend.core.Literal):
      return np.asarray(v.val, v.aval.dtype)
    return env[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = np.asarray(c)
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    kernel = _KERNELS.get(_kernel_name(eqn))
    outs = None
    if kernel is not None and not all(isinstance(x, np.ndarray) for x in ins):
      outs = kernel(b, eqn, ins)
      outs = None if outs is None else [_T(n, v.aval) for n, v in zip(outs, eqn.outvars)]
    if outs is not None:
      pass
    elif name in _CALLS:
      inner, inner_consts = _inner_jaxpr(eqn)
      outs = _walk(b, inner, inner_consts, ins)
    elif (all(isinstance(x, np.ndarray) for x in ins)
          and all(_static(v.aval.shape) for v in eqn.outvars)
          and (_grows_at_most(ins, eqn.outvars) or name not in _HANDLERS and name not in _SIMPLE)):
      result = eqn.primitive.bind(*[jnp.asarray(x) for x in ins], **eqn.params)
      outs = [np.asarray(r) for r in (result if eqn.primitive.multiple_results else [result])]
    elif name in _HANDLERS or name in _SIMPLE:
      handler = _HANDLERS.get(name, _simple)
      outs = [_T(n, v.aval) if isinstance(n, str) else n
              for n, v in zip(handler(b, eqn, ins), eqn.outvars)]
      if name in _IDENTITY:
        outs = ins
    else:
      raise errors.BadInput(
          f"ONNX export: the JAX primitive '{name}' has no ONNX mapping in "
          f"r1jax.compress.onnx_graph (supported: {', '.join(SUPPORTED)}); express the model "
          f"without it or add a mapping.")
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in jaxpr.outvars]


def _reachable(nodes, inits, outputs):
  """The nodes and initializers the outputs depend on (a folded Reshape chain leaves dead ones)."""
  producer = {o: n for n in nodes for o in n.output}
  needed, stack, keep = set(), list(outputs), set()
  while stack:
    name = stack.pop()
    if name in needed:
      continue
    needed.add(name)
    node = producer.get(name)
    if node is not None and id(node) not in keep:
      keep.add(id(node))
      stack.extend(i for i in node.input if i)
  return ([n for n in nodes if id(n) in keep], [i for i in inits if i.name in needed])


def to_onnx(fn: Callable[..., Any], example_args: Sequence[jax.ShapeDtypeStruct],
            input_names: Sequence[str], output_names: Sequence[str], *,
            symbolic_batch: bool = True, metadata: dict[str, str] | None = None) -> Any:
  """The ONNX ModelProto of `fn(*args)` (arrays in, a tuple/list or one array out).

  Args:
    fn: a JAX function of arrays; parameters it closes over become initializers.
    example_args: shapes and dtypes of the arguments; their leading axis is the batch.
    input_names / output_names: names of the graph's inputs and outputs.
    symbolic_batch: trace with a symbolic leading axis (one graph for every batch size); False
      keeps the example's batch size.
    metadata: strings stored in the model's metadata_props (e.g. label names).
  """
  onnx = _onnx()
  b = _Builder(onnx)
  specs = list(example_args)
  if symbolic_batch:
    (sym,) = jax.export.symbolic_shape(BATCH)
    specs = [jax.ShapeDtypeStruct((sym, *s.shape[1:]), s.dtype) for s in specs]
  closed = jax.make_jaxpr(fn)(*specs)
  inputs = [onnx.helper.make_tensor_value_info(
      n, _dtype_code(onnx, s.dtype), [BATCH if not isinstance(d, int) else d for d in s.shape])
            for n, s in zip(input_names, specs)]
  shape0 = b.op("Shape", [input_names[0]], "input_shape")
  b.batch_name = b.op("Slice", [shape0, b.const(np.array([0], np.int64)),
                                b.const(np.array([1], np.int64))], "batch_size")
  args = [_T(n, v.aval) for n, v in zip(input_names, closed.jaxpr.invars)]
  outs = _walk(b, closed.jaxpr, closed.consts, args)
  outputs = []
  for name, value, var in zip(output_names, outs, closed.jaxpr.outvars):
    b.nodes.append(onnx.helper.make_node("Identity", [_name(b, value)], [name]))
    outputs.append(onnx.helper.make_tensor_value_info(
        name, _dtype_code(onnx, var.aval.dtype),
        [BATCH if not isinstance(d, int) else d for d in var.aval.shape]))
  nodes, inits = _reachable(b.nodes, b.inits, output_names)
  graph = onnx.helper.make_graph(nodes, "r1jax", inputs, outputs, inits)
  model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                 producer_name="r1jax")
  model.ir_version = min(model.ir_version, 10)
  onnx.helper.set_model_props(model, dict(metadata or {}))
  onnx.checker.check_model(model)
  return model
