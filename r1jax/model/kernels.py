"""The custom-VJP kernels of the Transformer-XL and its heads: pure jax functions, no parameters.

Each computes what its plain jax formulation computes (the same values, up to float rounding where
a docstring says so) with a forward or backward pass shaped for speed or memory, mostly on XLA:CPU
(bench/train_throughput.py; bench/NOTES.md, including its section "Kernel notes moved out of the
code"):

* `layer_norm`, `softmax` and `activation_dropout` (the feed-forward's activation + dropout) keep
  only what their backward needs;
* `matmul` and `tied_logits` make their weight gradient in the orientation XLA:CPU runs faster;
* `split_head_major` and `rel_shift` (the relative-position "shift" that turns a [Q, P] table of
  query x position scores into [Q, K] query x key scores without a gather) write their transposes
  directly instead of leaving them to autodiff;
* dropout masks come from a cheap counter-based hash (`keep_mask`), not threefry.

The flax modules that use them (LayerNorm, Dense, Dropout, the attention) are in `transformer_xl`.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x) = x / 2 * (1 + erf(x / sqrt(2))), the formula of BERT and PyTorch.

  nn.gelu(approximate=False) writes it with erfc, whose XLA:CPU expansion (two rational
  approximations, an exp and selects) costs several times erf's (bench/NOTES.md 'Kernel notes');
  the two agree to 1e-6.
  """
  return x * 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


# Feed-forward activations by name (TransformerXLConfig.activation).
ACTIVATIONS = {
    "gelu": gelu,
    "relu": nn.relu,
    "relu6": nn.relu6,
}


# --------------------------------------------------------------------------------------------------
# Normalisation, softmax and matmuls.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis, statistics in float32, output in x's dtype.

  The custom VJP keeps only the normalised input and the inverse deviation for the backward
  pass (autodiff through the mean/variance would keep four or five [..., d] float32 arrays per
  norm, the largest share of a small model's activation memory after the feed-forward).
  """
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  centred = x32 - mean
  var = jnp.mean(centred * centred, axis=-1, keepdims=True)
  xhat = centred / jnp.sqrt(var + eps)
  y = xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(x.dtype), (xhat.astype(x.dtype), jax.lax.rsqrt(var + eps), scale, bias)


def _layer_norm_bwd(eps, res, g):
  del eps
  xhat, rstd, scale, bias = res
  g32 = g.astype(jnp.float32)
  xhat = xhat.astype(jnp.float32)
  lead = tuple(range(g.ndim - 1))
  dscale = jnp.sum(g32 * xhat, axis=lead).astype(scale.dtype)
  dbias = jnp.sum(g32, axis=lead).astype(bias.dtype)
  # With -scale and -rstd, not the forward's scale and 1 / std: XLA:CPU would otherwise share the
  # forward's [..., d] broadcasts of them with the backward and keep both as arrays until then.
  gs = g32 * (-scale.astype(jnp.float32))
  dx = (gs - jnp.mean(gs, axis=-1, keepdims=True)
        - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True)) * (-rstd)
  return dx.astype(g.dtype), dscale, dbias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@jax.custom_vjp
def softmax(x: jax.Array) -> jax.Array:
  """Softmax over the last axis whose backward pass keeps only the probabilities."""
  return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x):
  p = jax.nn.softmax(x, axis=-1)
  return p, p


def _softmax_bwd(p, g):
  return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [N, I] @ w [I, O] -> [N, O], whose weight gradient is made in the faster orientation.

  The weight gradient contracts over the N rows of both x and dy. XLA:CPU runs that product
  (outside YNNPACK) markedly slower when I > O than dy^T x, [O, I], plus the transpose of that
  small result (bench/NOTES.md 'Kernel notes'). XLA folds a plain transpose back into the
  product, so the [O, I] result passes through an optimization barrier first. Only on CPU: GPU
  and TPU matmul libraries take either orientation. Same sums as the plain product's gradient,
  equal up to float rounding.
  """
  return x @ w


def _matmul_fwd(x, w):
  return x @ w, (x, w)


def _matmul_bwd(res, g):
  x, w = res
  dx = g @ w.T
  contract_rows = (((0,), (0,)), ((), ()))
  if x.shape[1] > w.shape[1] and jax.default_backend() == "cpu":
    dw = jax.lax.optimization_barrier(jax.lax.dot_general(g, x, contract_rows)).T
  else:
    dw = jax.lax.dot_general(x, g, contract_rows)
  return dx, dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


_ROWS = (((0,), (0,)), ((), ()))   # dot_general dimensions: contract the rows of both operands


@jax.custom_vjp
def tied_logits(x: jax.Array, embedding: jax.Array) -> jax.Array:
  """x [N, d] x embedding [V, d] -> float32 [N, V]; the embedding's gradient made as [d, V].

  Autodiff's embedding gradient g^T x ([V, N] x [N, d]) makes XLA:CPU copy the [N, V] logit
  gradient transposed and run a slower product; x^T g runs faster, and its [d, V] result
  transposes cheaply (bench/NOTES.md 'Kernel notes'). The optimization barrier keeps XLA from
  folding that transpose back into the product, as in `matmul`. CPU only.
  """
  return jax.lax.dot_general(x, embedding, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _tied_logits_fwd(x, embedding):
  return tied_logits(x, embedding), (x, embedding)


def _tied_logits_bwd(res, g):
  x, embedding = res
  dx = jax.lax.dot_general(g, embedding, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)
  if jax.default_backend() == "cpu":
    d_emb = jax.lax.optimization_barrier(
        jax.lax.dot_general(x, g, _ROWS, preferred_element_type=jnp.float32)).T
  else:
    d_emb = jax.lax.dot_general(g, x, _ROWS, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), d_emb.astype(embedding.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


# --------------------------------------------------------------------------------------------------
# Attention layout: head-major projections and the relative shift.


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def split_head_major(x: jax.Array, groups: int = 1) -> tuple[jax.Array, ...]:
  """[B, K, n, H, D] projections -> n * groups head-major [H / groups, B, K, D] arrays.

  Ordered projection-major: (q heads 0.., q heads H/groups.., ..., v heads ..) for n = 3. The
  same values as transposing and slicing. The custom VJP concatenates and stacks the transposed
  gradients in one pass; autodiff's transpose pads each gradient to [n, H, B, K, D] and adds the
  pads, which XLA:CPU runs markedly slower (bench/NOTES.md 'Kernel notes').
  """
  t = jnp.transpose(x, (2, 3, 0, 1, 4))
  size = x.shape[3] // groups
  return tuple(t[i, j * size:(j + 1) * size] for i in range(x.shape[2]) for j in range(groups))


def _split_head_major_fwd(x, groups):
  return split_head_major(x, groups), None


def _split_head_major_bwd(groups, _, grads):
  per_projection = [[jnp.transpose(g, (1, 2, 0, 3)) for g in grads[i:i + groups]]
                    for i in range(0, len(grads), groups)]
  return (jnp.stack([jnp.concatenate(gs, axis=2) for gs in per_projection], axis=2),)


split_head_major.defvjp(_split_head_major_fwd, _split_head_major_bwd)


def _skew(x: jax.Array, width: int, offset: int, slope: int) -> jax.Array:
  """[..., Q, N] -> [..., Q, width]: out[..., i, c] = x[..., i, c + offset - slope * i], 0 where
  that column is outside [0, N). `slope` is +1 or -1.

  Only pad/reshape/slice, which XLA fuses into one loop: x is padded with zero columns to a row
  length W and the flat buffer is read back with a row stride of W - slope, which moves each row
  by `slope` columns more than the one before. W is the smallest power of two that keeps every
  out-of-range read inside the zero columns, so the loop's index arithmetic (a division by W)
  is a shift, which XLA:CPU runs markedly faster (bench/NOTES.md 'Kernel notes').
  """
  *lead, q, n = x.shape
  cols = np.arange(width)[None, :] + offset - slope * np.arange(q)[:, None]
  need = n + max(int(cols.max()) - (n - 1), -int(cols.min()), 0)
  w = 1 << (need - 1).bit_length()
  stride = w - slope
  front, start = max(-offset, 0), max(offset, 0)
  back = max(start + q * stride - (front + q * w), 0)
  no_pad = [(0, 0)] * len(lead)
  flat = jnp.pad(x, no_pad + [(0, 0), (0, w - n)]).reshape(*lead, q * w)
  flat = jnp.pad(flat, no_pad + [(front, back)])
  flat = jax.lax.slice_in_dim(flat, start, start + q * stride, axis=-1)
  return flat.reshape(*lead, q, stride)[..., :width]


def rel_shift(x: jax.Array, klen: int) -> jax.Array:
  """Skews query x position scores into query x key scores.

  Args:
    x: [..., Q, P] scores against positions that descend by one per column, starting at K - 1.
    klen: K.

  Returns:
    [..., Q, K] with out[..., i, j] = x[..., i, j + Q - 1 - i], i.e. the score for distance
    (K - Q) + i - j. For P = K + Q - 1 (bidirectional) every entry is exact; for P = K (causal)
    the entries with j > (K - Q) + i have no column (distance < 0) and are 0 (the causal mask
    hides them).
  """
  return _rel_shift(x, klen, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _rel_shift(x: jax.Array, klen: int, plen: int) -> jax.Array:
  del plen  # x.shape[-1], static for the backward (its output width)
  return _skew(x, klen, x.shape[-2] - 1, 1)


def _rel_shift_fwd(x, klen, plen):
  return _rel_shift(x, klen, plen), None


def _rel_shift_bwd(klen, plen, _, g):
  # The transpose is the opposite skew (row i moves right by Q - 1 - i, zeros where no key
  # maps), written directly so that its row length is a power of two (see `_skew`); autodiff's
  # transpose of the forward ops pads with a row length of P.
  del klen
  return (_skew(g, plen, 1 - g.shape[-2], -1),)


_rel_shift.defvjp(_rel_shift_fwd, _rel_shift_bwd)


# --------------------------------------------------------------------------------------------------
# Dropout.


_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive counters over the 32-bit range


def _fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def dropout_seeds(key: jax.Array) -> jax.Array:
  """Two uint32 seeds for `keep_mask` from a (dropout) PRNG key: one small threefry draw."""
  return jax.random.bits(key, (2,), jnp.uint32)


def keep_mask(seeds: jax.Array, shape: Sequence[int], keep_prob: float) -> jax.Array:
  """bool `shape`, each entry True with probability `keep_prob`, for dropout.

  Threefry (jax.random.bernoulli) is a large share of a small model's training step on a CPU.
  Here each element hashes its own flat index with two 32-bit `seeds` (from `dropout_seeds`):
  counter-based like Philox, with two MurmurHash3 finaliser rounds instead of ten Philox rounds,
  much cheaper than threefry (bench/NOTES.md 'Kernel notes'), statistically fine for dropout,
  and the same mask whatever the sharding, since the counter is the global element index.

  The index is summed from per-axis constant rows, seeds[0] first, so no full-size term is the
  same in two masks: XLA would otherwise share one layer's index array with every layer's mask and
  read it back from memory (a mask-sized array per use) instead of computing it in place.

  Args:
    seeds: uint32 [2].
    shape: mask shape, fewer than 2^32 elements.
    keep_prob: probability of True.
  """
  shape = tuple(int(s) for s in shape)
  size = int(np.prod(shape))
  if size >= 2 ** 32:
    raise ValueError(f"keep_mask: shape {shape} has {size} >= 2^32 elements; the 32-bit element "
                     "counter would repeat. Split the array or use jax.random.bernoulli.")
  x = jnp.broadcast_to(seeds[0], shape)
  for axis, n in enumerate(shape):
    stride = int(np.prod(shape[axis + 1:]))
    row = np.arange(n, dtype=np.uint32) * np.uint32(stride)   # this axis's share of the index
    x = x + jax.lax.broadcast_in_dim(jnp.asarray(row), shape, (axis,))
  x = _fmix32(x)
  x = _fmix32((x + seeds[1]) * jnp.uint32(_GOLDEN))
  threshold = min(int(round(keep_prob * 2.0 ** 32)), 2 ** 32 - 1)
  return x < jnp.uint32(threshold)


def apply_dropout(x: jax.Array, seeds: jax.Array, keep_prob: float) -> jax.Array:
  """x scaled by 1 / keep_prob where `keep_mask` keeps it, else 0."""
  return jax.lax.select(keep_mask(seeds, x.shape, keep_prob),
                        x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def activation_dropout(x: jax.Array, seeds: jax.Array, keep_prob: float,
                       activation: str) -> jax.Array:
  """apply_dropout(ACTIVATIONS[activation](x), seeds, keep_prob), keeping only x for the backward.

  Autodiff of the two would keep the activation's derivative terms (erf(x / sqrt(2)) for GELU) as
  a second [..., d_inner] array and run the activation and the dropout as two passes over memory.
  Here the forward is one pass from x, and the backward recomputes the mask and the derivative
  from x in the same pass as the incoming gradient.
  """
  return apply_dropout(ACTIVATIONS[activation](x), seeds, keep_prob)


def _activation_dropout_fwd(x, seeds, keep_prob, activation):
  return activation_dropout(x, seeds, keep_prob, activation), (x, seeds)


def _gelu_grad(x: jax.Array) -> jax.Array:
  """d gelu / dx = Phi(x) + x phi(x). Phi is written 1/2 - erf(-x / sqrt(2)) / 2, not with gelu's
  erf(x / sqrt(2)): XLA would see the forward's erf again, share it, and keep it as an array
  until the backward (one [..., d_inner] array per layer) instead of recomputing it in place."""
  cdf = 0.5 - 0.5 * jax.lax.erf(x * (-1.0 / math.sqrt(2.0)))
  return cdf + x * (1.0 / math.sqrt(2.0 * math.pi)) * jnp.exp(-0.5 * x * x)


def _activation_dropout_bwd(keep_prob, activation, res, g):
  x, seeds = res
  if activation == "gelu":
    # The select last: XLA:CPU runs this pass faster than when it selects g first (as
    # apply_dropout(g) * grad); bench/NOTES.md 'Kernel notes'.
    return apply_dropout(g * _gelu_grad(x), seeds, keep_prob), None
  _, act_vjp = jax.vjp(ACTIVATIONS[activation], x)
  return act_vjp(apply_dropout(g, seeds, keep_prob))[0], None


activation_dropout.defvjp(_activation_dropout_fwd, _activation_dropout_bwd)
