"""Transformer-XL backbone in Flax linen: relative attention, layers, memory handling.

Notation: B batch, Q segment (query) length, M memory length, K = M + Q key length, d model width,
H heads, D head width, V vocabulary.

The backbone is pure: memory goes in and comes out as an explicit `Memory` pytree, never through a
mutable collection. Two attention modes share every parameter:

* ``"causal"`` is the original language-model formulation (Dai et al. 2019; kimiyoung/transformer-xl
  and the HuggingFace port): query i of the segment sits at absolute slot M + i of the K keys, sees
  keys j <= M + i, and scores them with
      ((q_i + r_w_bias) . k_j + (q_i + r_r_bias) . W_r R[M + i - j]) / sqrt(D)
  where R is the sinusoid table; ``same_length`` additionally hides keys at distance >= mem_len, and
  ``clamp_len > 0`` caps distances.
* ``"bidirectional"`` (for MLM; XLNet's ``attn_type="bi"``) lets every query see every valid key,
  memory included, with the same score and the true signed distance M + i - j (negative for keys
  to the right), capped to +-clamp_len when clamp_len > 0.

Both modes use the "relative shift" reshape trick (`kernels.rel_shift`) to turn a [Q, P] table
of query x position scores into [Q, K] query x key scores without a gather.

Memory: the memory of layer l is the *input* of layer l (the embedding output for l = 0). After a
segment, new_mem_l = stop_gradient(concat(mem_l, input_l)[-mem_len:]), and the validity mask is
carried the same way: padded tokens become invalid memory slots and are never attended. As in the
original code, memory made in training mode holds the training-mode (dropout) activations of the
layer inputs. Memory may be zero-length (the first segment of a stream) or a fixed-length
all-invalid block (static shapes under jit): both give identical outputs, because attention depends
only on relative distances and invalid slots are masked. Memory is kept in the compute dtype.

Speed and memory (bench/train_throughput.py, bench/NOTES.md): LayerNorm, softmax, dropout and
the matmuls run through the custom-VJP kernels of `kernels`; dense layers and the attention
projections run as 2-D matmuls (`flat_matmuls`), and attention scores are head-major, because
XLA:CPU emits the gradients of those forms as fast plain matmuls. Parameters and results are those
of the plain formulation.

The config, its variants, `Memory` and the input checks are in `config` (and exported here).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from r1jax.model import axes
from r1jax.model import kernels
# The config and memory live in `config`; these names are also this module's public API
# (transformer_xl.TransformerXLConfig, get_variant, ...), as they were before the split.
from r1jax.model.config import check_inputs
from r1jax.model.config import get_variant  # pylint: disable=unused-import
from r1jax.model.config import init_memory  # pylint: disable=unused-import
from r1jax.model.config import Memory
from r1jax.model.config import SEGMENT_LEN  # pylint: disable=unused-import
from r1jax.model.config import TransformerXLConfig
from r1jax.model.config import VARIANTS  # pylint: disable=unused-import

# Masked scores get this finite value (never -inf: bf16/fp16 would turn inf - inf into NaN). Scores
# are float32 when masked, so -1e9 underflows exp() to exactly 0 next to any unmasked score.
MASK_VALUE = -1e9

# Initialiser scale of weights and relative biases (transformer_xl.md: N(0, 0.02)).
INIT_STD = 0.02


def _resolve_memory(memory: Any, mems: Any) -> Memory | Sequence[Any] | None:
  """The `memory` or `mems` argument of `TransformerXL.__call__`, whichever was given."""
  if memory is not None and mems is not None:
    raise ValueError("Pass either memory= (a Memory) or mems= (a tuple of arrays), not both.")
  return memory if memory is not None else mems


# --------------------------------------------------------------------------------------------------
# Relative positions.


def relative_positions(klen: int, qlen: int, bidirectional: bool, clamp_len: int) -> np.ndarray:
  """Relative distances, descending: [K-1, ..., 0] (causal, length K) or [K-1, ..., -(Q-1)]
  (bidirectional, length K + Q - 1), capped at +-clamp_len when clamp_len > 0. float32 [P]."""
  end = -qlen if bidirectional else -1
  pos = np.arange(klen - 1, end, -1, dtype=np.float32)
  if clamp_len > 0:
    pos = np.clip(pos, -clamp_len, clamp_len)
  return pos


def sinusoid_table(positions: np.ndarray | jax.Array, d_model: int) -> jax.Array:
  """[P] positions -> [P, d] = concat(sin(p * f), cos(p * f)), f = 1 / 10000^(2k / d)."""
  inv_freq = 1.0 / (10000.0 ** (np.arange(0.0, d_model, 2.0, dtype=np.float32) / d_model))
  angles = jnp.asarray(positions, jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def attention_pattern(qlen: int, mlen: int, config: TransformerXLConfig) -> np.ndarray:
  """Static bool [Q, K] of key slots a query may see before validity masking (True = allowed)."""
  dist = mlen + np.arange(qlen)[:, None] - np.arange(mlen + qlen)[None, :]
  if not config.is_causal:
    return np.ones_like(dist, dtype=bool)
  allowed = dist >= 0
  if config.same_length:
    # Original/HF same_length mask, in closed form: each query sees distances 0 .. mem_len - 1.
    allowed &= dist < config.mem_len
  return allowed


# --------------------------------------------------------------------------------------------------
# Dropout.


class Dropout(nn.Module):
  """Inverted dropout (as nn.Dropout: kept entries scaled by 1 / (1 - rate)), masks from
  `kernels.keep_mask`.

  Draws its key from the "dropout" rng collection, like nn.Dropout.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool, activation: str | None = None
               ) -> jax.Array:
    """Dropout of x, or of kernels.ACTIVATIONS[activation](x) in one pass when `activation` is
    given."""
    if deterministic or self.rate == 0.0:
      return x if activation is None else kernels.ACTIVATIONS[activation](x)
    seeds = kernels.dropout_seeds(self.make_rng("dropout"))
    if activation is None:
      return kernels.apply_dropout(x, seeds, 1.0 - self.rate)
    return kernels.activation_dropout(x, seeds, 1.0 - self.rate, activation)


# --------------------------------------------------------------------------------------------------
# Modules.


def _normal(axes_names: Sequence[str | None], std: float = INIT_STD):
  return nn.with_logical_partitioning(nn.initializers.normal(std), tuple(axes_names))


class LayerNorm(nn.Module):
  """LayerNorm with params `scale` and `bias` [d] (as nn.LayerNorm), computed by
  `kernels.layer_norm`."""
  epsilon: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
                       (d,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (axes.NORM,)),
                      (d,), self.param_dtype)
    return kernels.layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)


def make_layer_norm(config: TransformerXLConfig, name: str) -> LayerNorm:
  """LayerNorm with the config's epsilon and dtypes; scale/bias replicated (NORM axis)."""
  return LayerNorm(epsilon=config.layer_norm_eps, dtype=config.dtype,
                   param_dtype=config.param_dtype, name=name)


class Dense(nn.Module):
  """nn.Dense (same `kernel` [I, O] and `bias` [O] parameters and initialisers) computed as one
  2-D matmul over the flattened leading axes.

  Why not nn.Dense: its [B, Q, I] x [I, O] product differentiates into a weight gradient with two
  contracting axes, which XLA:CPU lowers with a transposed copy of the output gradient and a
  strided matmul much slower than the forward one (bench/NOTES.md 'Kernel notes'); with
  [B * Q, I] operands the weight gradient is a plain 2-D product (see `kernels.matmul` for its
  orientation).
  """
  features: int
  kernel_init: Any
  bias_init: Any
  dtype: Any
  param_dtype: Any
  use_bias: bool = True
  flat: bool = True  # False: one einsum (see TransformerXLConfig.flat_matmuls)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., I] -> [..., O]."""
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    x = jnp.asarray(x, self.dtype)
    if self.flat:
      y = kernels.matmul(x.reshape(-1, x.shape[-1]), kernel.astype(self.dtype))
      y = y.reshape(x.shape[:-1] + (self.features,))
    else:
      y = jnp.einsum("...i,io->...o", x, kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def make_dense(config: TransformerXLConfig, features: int, kernel_axes: tuple[str, str],
               name: str, use_bias: bool = True) -> Dense:
  """Dense with N(0, 0.02) kernel over `kernel_axes` (in, out) and a zero bias over `out`."""
  return Dense(
      features, use_bias=use_bias, dtype=config.dtype, param_dtype=config.param_dtype,
      kernel_init=_normal(kernel_axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (kernel_axes[1],)),
      flat=config.flat_matmuls, name=name)


def _relative_biases(module: nn.Module, config: TransformerXLConfig) -> tuple[jax.Array, jax.Array]:
  shape = (config.n_head, config.d_head)
  init = _normal((axes.HEADS, axes.KV))
  return (module.param("r_w_bias", init, shape, config.param_dtype),
          module.param("r_r_bias", init, shape, config.param_dtype))


class _Kernel(nn.Module):
  """Holds one projection weight as `<name>/kernel`, like nn.Dense, for einsums that slice it."""
  shape: tuple[int, ...]
  logical_axes: tuple[str, ...]
  param_dtype: Any

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("kernel", _normal(self.logical_axes), self.shape, self.param_dtype)


def _project(x: jax.Array, kernel: jax.Array, in_axes: int = 1, flat: bool = True) -> jax.Array:
  """Contracts the last `in_axes` axes of x [B, L, ...] with the first ones of `kernel`, as one
  2-D [B * L, I] x [I, O] matmul (for the fast XLA:CPU weight gradient, see `Dense`), or as one
  einsum over the kernel's own shape when `flat` is False."""
  if not flat:
    inner, out = "ijk"[:in_axes], "nopq"[:kernel.ndim - in_axes]
    return jnp.einsum(f"bl{inner},{inner}{out}->bl{out}", x, kernel)
  lead, inner = x.shape[:x.ndim - in_axes], x.shape[x.ndim - in_axes:]
  out = kernel.shape[in_axes:]
  # -1 rows (not prod(lead)) keeps a symbolic batch size working under jax.export.
  y = kernels.matmul(x.reshape(-1, int(np.prod(inner))), kernel.reshape(int(np.prod(inner)), -1))
  return y.reshape(lead + out)


def _relative_attention(q: jax.Array, k: jax.Array, v: jax.Array, r: jax.Array,
                        r_w_bias: jax.Array, r_r_bias: jax.Array, allowed: jax.Array, klen: int,
                        dropout: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """Relative attention of head-major queries over keys (einsum path, some or all heads).

  Args:
    q: [H, B, Q, D]; k, v: [H, B, K, D]; r: [H, D, P] projected position table.
    r_w_bias, r_r_bias: [H, D].
    allowed: bool [B, 1, Q, K].
    dropout: applied to the probabilities.

  Returns:
    [H, B, Q, D].
  """
  h, _, _, dh = q.shape
  # Content and position terms in float32, as in the original (sum, then scale).
  ac = jnp.einsum("hbqn,hbkn->hbqk", q + r_w_bias.astype(q.dtype)[:, None, None], k,
                  preferred_element_type=jnp.float32)                         # [H, B, Q, K]
  qr = (q + r_r_bias.astype(q.dtype)[:, None, None]).reshape(h, -1, dh)        # [H, B * Q, D]
  bd = jax.lax.dot_general(qr, r, (((2,), (1,)), ((0,), (0,))),
                           preferred_element_type=jnp.float32)
  bd = bd.reshape(q.shape[:3] + (r.shape[2],))                                # [H, B, Q, P]
  bd = kernels.rel_shift(bd, klen)                                            # [H, B, Q, K]
  scores = (ac + bd) * (1.0 / math.sqrt(dh))
  scores = jnp.where(jnp.swapaxes(allowed, 0, 1), scores, MASK_VALUE)
  probs = dropout(kernels.softmax(scores).astype(q.dtype))
  return jnp.einsum("hbqk,hbkn->hbqn", probs, v)                              # [H, B, Q, D]


class RelativeAttention(nn.Module):
  """Multi-head attention with Transformer-XL relative positions (output projection included)."""
  config: TransformerXLConfig

  @nn.compact
  def __call__(self, x: jax.Array, qlen: int, pos_emb: jax.Array, allowed: jax.Array,
               r_w_bias: jax.Array | None, r_r_bias: jax.Array | None,
               deterministic: bool) -> jax.Array:
    """Attention of the last `qlen` rows of `x` over all its rows.

    Args:
      x: [B, K, d] concat(memory, segment), LayerNorm-ed already under pre_lnorm.
      qlen: Q; queries are x[:, K - Q:].
      pos_emb: [P, d] sinusoid table of the distances (see `relative_positions`).
      allowed: bool [B, 1, Q, K], True where query i may attend key j.
      r_w_bias, r_r_bias: [H, D] shared biases, or None to own per-layer biases (untie_r).
      deterministic: disables attention dropout.

    Returns:
      [B, Q, d].
    """
    cfg = self.config
    dtype = cfg.dtype
    h, dh = cfg.n_head, cfg.d_head
    klen = x.shape[1]
    mlen = klen - qlen
    if r_w_bias is None:
      r_w_bias, r_r_bias = _relative_biases(self, cfg)
    qkv_kernel = _Kernel((cfg.d_model, 3, h, dh), (axes.EMBED, axes.QKV, axes.HEADS, axes.KV),
                         cfg.param_dtype, name="qkv")().astype(dtype)
    r_kernel = _Kernel((cfg.d_model, h, dh), (axes.EMBED, axes.HEADS, axes.KV),
                       cfg.param_dtype, name="r_net")().astype(dtype)
    o_kernel = _Kernel((h, dh, cfg.d_model), (axes.HEADS, axes.KV, axes.EMBED),
                       cfg.param_dtype, name="out")().astype(dtype)
    x = x.astype(dtype)
    flat = cfg.flat_matmuls
    impl = cfg.attention_kernel(deterministic)
    if impl != "einsum":
      return self._fused(x, qlen, pos_emb, allowed, r_w_bias, r_r_bias,
                         (qkv_kernel, r_kernel, o_kernel), impl)
    # Scores are computed head-major, [H, B, Q, *]: the position term's product with the [H, D, P]
    # table then comes out of the matmul in the layout the relative shift and the softmax use, and
    # its gradients are plain batched products (batch-major [B, H, Q, P] scores cost a [B, H, Q, P]
    # transposing copy each way and a strided matmul for the table's gradient).
    #
    # The heads run in `groups` independent groups (separate products and softmaxes): XLA:CPU runs
    # a batched product on one thread, so with one group the attention leaves the second core to
    # whatever else is ready; two groups give the two threads a product each.
    groups = cfg.attention_groups()
    head_major = (axes.ACT_HEADS, axes.BATCH, axes.LENGTH, axes.ACT_KV)
    if mlen == 0:
      # One fused projection: [B, Q, d] x [d, 3, H, D] -> [B, Q, 3, H, D] -> 3 x groups arrays.
      parts = kernels.split_head_major(_project(x, qkv_kernel, flat=flat), groups)
      qs, ks, vs = parts[:groups], parts[groups:2 * groups], parts[2 * groups:]
    else:
      # Queries only for the segment's rows; keys and values for memory and segment.
      qs = kernels.split_head_major(_project(x[:, mlen:], qkv_kernel[:, :1], flat=flat), groups)
      kv = kernels.split_head_major(_project(x, qkv_kernel[:, 1:], flat=flat), groups)
      ks, vs = kv[:groups], kv[groups:]
    # The table as [H, D, P] (as in `_fused`): its gradient, a product over all B * Q query rows,
    # then comes out as [D, P] per head, which XLA:CPU runs faster than [P, D] (bench/NOTES.md
    # 'Kernel notes').
    r = jnp.einsum("pd,dhn->hnp", pos_emb.astype(dtype), r_kernel)            # [H, D, P]
    dropout = functools.partial(Dropout(cfg.dropatt), deterministic=deterministic)
    size = h // groups
    outs = []
    for i, (q, k, v) in enumerate(zip(qs, ks, vs)):
      q, k, v = (axes.constrain(t, head_major) for t in (q, k, v))             # [H/g, B, *, D]
      heads = slice(i * size, (i + 1) * size)
      outs.append(_relative_attention(q, k, v, r[heads], r_w_bias[heads], r_r_bias[heads],
                                      allowed, klen, dropout))
    out = outs[0] if groups == 1 else jnp.concatenate(outs)                   # [H, B, Q, D]
    out = jnp.transpose(out, (1, 2, 0, 3))                                    # [B, Q, H, D]
    out = axes.constrain(out, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, axes.ACT_KV))
    return _project(out, o_kernel, in_axes=2, flat=flat)                      # [B, Q, d]

  def _fused(self, x, qlen, pos_emb, allowed, r_w_bias, r_r_bias, projections, impl):
    """The same attention through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU).

    The content term (q + r_w_bias) k^T is the fused kernel's own product; the position term
    rel_shift((q + r_r_bias) r^T), scaled and masked, is its additive bias [B, H, Q, K]. The
    kernel never materialises the content scores or the probabilities (forward or backward); the
    bias and its gradient are the only [B, H, Q, K] arrays left, in the compute dtype.
    """
    cfg = self.config
    dtype, dh, flat = cfg.dtype, cfg.d_head, cfg.flat_matmuls
    qkv_kernel, r_kernel, o_kernel = projections
    klen = x.shape[1]
    mlen = klen - qlen
    btnh = (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, axes.ACT_KV)
    if mlen == 0:
      qkv = _project(x, qkv_kernel, flat=flat)                                # [B, Q, 3, H, D]
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      q = _project(x[:, mlen:], qkv_kernel[:, 0], flat=flat)                  # [B, Q, H, D]
      kv = _project(x, qkv_kernel[:, 1:], flat=flat)                          # [B, K, 2, H, D]
      k, v = kv[:, :, 0], kv[:, :, 1]
    q, k, v = (axes.constrain(t, btnh) for t in (q, k, v))
    r = jnp.einsum("pd,dhn->hnp", pos_emb.astype(dtype), r_kernel)            # [H, D, P]
    scale = 1.0 / math.sqrt(dh)
    # The position term head-major, as in the einsum path: one batched [H, B*Q, D] x [H, D, P]
    # product whose output is already in the layout the relative shift reads; only the shifted
    # [H, B, Q, K] result is then moved to the kernel's [B, H, Q, K] (whole Q x K blocks).
    qr = jnp.transpose(q + r_r_bias.astype(dtype), (2, 0, 1, 3))              # [H, B, Q, D]
    bd = jax.lax.dot_general(qr.reshape(qr.shape[0], -1, dh), r,
                             (((2,), (1,)), ((0,), (0,))))                    # [H, B*Q, P]
    bd = kernels.rel_shift(bd.reshape(qr.shape[:3] + (r.shape[2],)), klen)    # [H, B, Q, K]
    mask_value = max(MASK_VALUE, float(jnp.finfo(dtype).min) / 2)
    bias = jnp.where(allowed, jnp.swapaxes(bd, 0, 1) * jnp.asarray(scale, dtype),
                     jnp.asarray(mask_value, dtype))                          # [B, H, Q, K]
    out = jax.nn.dot_product_attention(
        q + r_w_bias.astype(dtype), k, v, bias=bias, scale=scale,
        implementation="cudnn" if impl == "cudnn" else "xla")                # [B, Q, H, D]
    out = axes.constrain(out, btnh)
    return _project(out, o_kernel, in_axes=2, flat=flat)                      # [B, Q, d]


class TransformerXLLayer(nn.Module):
  """Relative attention + position-wise feed-forward, post-LN (original default) or pre-LN."""
  config: TransformerXLConfig

  @nn.compact
  def __call__(self, h: jax.Array, mem: jax.Array, pos_emb: jax.Array, allowed: jax.Array,
               r_w_bias: jax.Array | None, r_r_bias: jax.Array | None,
               deterministic: bool) -> jax.Array:
    """[B, Q, d] segment + [B, M, d] memory -> [B, Q, d] (see RelativeAttention for the rest)."""
    cfg = self.config
    act_axes = (axes.BATCH, axes.LENGTH, axes.ACT_EMBED)
    qlen = h.shape[1]
    attn_norm = make_layer_norm(cfg, "attn_norm")
    x = jnp.concatenate([mem.astype(h.dtype), h], axis=1) if mem.shape[1] else h   # [B, K, d]
    if cfg.pre_lnorm:
      x = attn_norm(x)
    a = RelativeAttention(cfg, name="attn")(x, qlen, pos_emb, allowed, r_w_bias, r_r_bias,
                                             deterministic)
    a = Dropout(cfg.dropout)(a, deterministic=deterministic)
    h = h + a if cfg.pre_lnorm else attn_norm(h + a)
    h = axes.constrain(h, act_axes)

    ff_norm = make_layer_norm(cfg, "ff_norm")
    y = ff_norm(h) if cfg.pre_lnorm else h
    y = make_dense(cfg, cfg.d_inner, (axes.EMBED, axes.MLP), "ff_in")(y)
    y = axes.constrain(y, (axes.BATCH, axes.LENGTH, axes.ACT_MLP))
    y = Dropout(cfg.dropout)(y, deterministic=deterministic, activation=cfg.activation)
    y = make_dense(cfg, cfg.d_model, (axes.MLP, axes.EMBED), "ff_out")(y)
    y = Dropout(cfg.dropout)(y, deterministic=deterministic)
    h = h + y if cfg.pre_lnorm else ff_norm(h + y)
    return axes.constrain(h, act_axes)


def _token_type_embedding(types: jax.Array, table: jax.Array) -> jax.Array:
  """[B, Q] type ids, [T, d] table -> [B, Q, d] rows of the table. Same values as a lookup.

  Not a gather: its gradient is a scatter-add of all B * Q rows into T rows, which serialises on
  atomics on a GPU (bench/NOTES.md 'Kernel notes'). For the usual T <= 4 it is a chain of
  selects whose gradient is T masked sums over [B, Q, d], elementwise work that fuses; beyond, a
  one-hot [B, Q, T] x [T, d] product (on XLA:CPU its [T, B*Q] x [B*Q, d] gradient needs a
  transposed copy of the [B*Q, d] gradient, which costs time on XLA:CPU).
  """
  n = table.shape[0]
  if n > 4:
    return jax.nn.one_hot(types, n, dtype=table.dtype) @ table
  types = types[..., None]
  out = jnp.broadcast_to(table[0], types.shape[:-1] + table.shape[1:])
  for t in range(1, n):
    out = jnp.where(types == t, table[t], out)
  return out


class TransformerXL(nn.Module):
  """The Transformer-XL backbone: tokens (+ memory) -> hidden states (+ new memory).

  Parameters: `word_emb/embedding` [V, d], optional `type_emb/embedding` [n_token_types, d],
  `r_w_bias`/`r_r_bias` [H, D] here when untie_r=False, and `layer_{i}/...` per layer, whose
  attention has `config.heads_of(i)` heads and feed-forward `config.d_inner_of(i)` units.
  """
  config: TransformerXLConfig

  def setup(self):
    cfg = self.config
    self.word_emb = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                             param_dtype=cfg.param_dtype,
                             embedding_init=_normal((axes.VOCAB, axes.EMBED)))
    if cfg.n_token_types:
      self.type_emb = nn.Embed(cfg.n_token_types, cfg.d_model, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype,
                               embedding_init=_normal((axes.TYPES, axes.EMBED)))
    if not cfg.untie_r:
      self.r_w_bias, self.r_r_bias = _relative_biases(self, cfg)
    # deterministic (argument 7, counting self) must stay a Python bool under remat.
    layer_cls = (nn.remat(TransformerXLLayer, static_argnums=(7,)) if cfg.remat
                 else TransformerXLLayer)
    for i in range(cfg.n_layer):
      setattr(self, f"layer_{i}", layer_cls(cfg.layer_config(i)))
    self.drop = Dropout(cfg.dropout)

  def embedding_table(self) -> jax.Array:
    """The word-embedding table [V, d] (param dtype), for tied output heads."""
    return self.word_emb.embedding

  def __call__(self, tokens: jax.Array, memory: Memory | Sequence[jax.Array] | None = None,
               token_mask: jax.Array | None = None, token_types: jax.Array | None = None, *,
               mems: Sequence[jax.Array] | None = None,
               deterministic: bool = True) -> tuple[jax.Array, Memory]:
    """Runs one segment.

    Args:
      tokens: int [B, Q].
      memory: None (no memory), a `Memory` (states n_layer x [B, M, d], mask [B, M]), or an
        HF-style sequence of n_layer arrays [B, M, d] (all slots valid).
      token_mask: bool [B, Q], False at padding (never attended, invalid in the new memory).
      token_types: int [B, Q] (needs config.n_token_types > 0); zeros when None.
      mems: keyword alias of `memory` for the HF-style tuple form.
      deterministic: True disables dropout; False needs rngs={"dropout": key}.

    Returns:
      hidden [B, Q, d] (compute dtype) and the new `Memory` (length min(mem_len, M + Q),
      stop-gradient, compute dtype).
    """
    cfg = self.config
    memory = _resolve_memory(memory, mems)
    check_inputs(cfg, tokens, memory, token_mask, token_types)
    h = self.embed(tokens, token_types, deterministic=deterministic)
    return self.encode(h, memory, token_mask, deterministic=deterministic)

  def embed(self, tokens: jax.Array, token_types: jax.Array | None = None, *,
            deterministic: bool = True) -> jax.Array:
    """tokens int [B, Q] (+ token_types) -> the first layer's input [B, Q, d]: the scaled word
    embedding plus the token-type row, after embedding dropout. Other inputs (image patches,
    `r1jax.model.vision`) build rows of the same width and join these before `encode`."""
    cfg = self.config
    tokens = jnp.asarray(tokens)
    h = self.word_emb(tokens) * jnp.asarray(math.sqrt(cfg.d_model), cfg.dtype)
    if cfg.n_token_types:
      types = jnp.zeros_like(tokens) if token_types is None else jnp.asarray(token_types)
      h = h + _token_type_embedding(types, jnp.asarray(self.type_emb.embedding, cfg.dtype))
    return axes.constrain(self.drop(h, deterministic=deterministic),
                          (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))

  def encode(self, h: jax.Array, memory: Memory | Sequence[jax.Array] | None = None,
             token_mask: jax.Array | None = None, *, deterministic: bool = True
             ) -> tuple[jax.Array, Memory]:
    """The layers over embedded inputs h [B, Q, d] (from `embed`, or rows joined to them):
    returns (hidden [B, Q, d], new Memory) as `__call__` does."""
    cfg = self.config
    batch, qlen = h.shape[:2]
    if memory is None:
      memory = Memory.empty(cfg.n_layer, batch, cfg.d_model, 0, cfg.dtype)
    elif not isinstance(memory, Memory):
      memory = Memory.from_mems(memory)
    mlen = memory.length
    klen = mlen + qlen
    token_mask = (jnp.ones((batch, qlen), bool) if token_mask is None
                  else jnp.asarray(token_mask, bool))
    act_axes = (axes.BATCH, axes.LENGTH, axes.ACT_EMBED)

    pos = relative_positions(klen, qlen, not cfg.is_causal, cfg.clamp_len)
    pos_emb = self.drop(sinusoid_table(pos, cfg.d_model).astype(cfg.dtype),
                        deterministic=deterministic)
    key_valid = jnp.concatenate([jnp.asarray(memory.mask, bool), token_mask], axis=1)  # [B, K]
    allowed = (jnp.asarray(attention_pattern(qlen, mlen, cfg))[None, None]
               & key_valid[:, None, None, :])                                          # [B,1,Q,K]

    shared = (None, None) if cfg.untie_r else (self.r_w_bias, self.r_r_bias)
    keep = min(cfg.mem_len, klen)
    new_states = []
    for i in range(cfg.n_layer):
      mem_i = jnp.asarray(memory.states[i]).astype(cfg.dtype)
      new_states.append(jax.lax.stop_gradient(
          jnp.concatenate([mem_i, h], axis=1)[:, klen - keep:]))
      h = getattr(self, f"layer_{i}")(h, mem_i, pos_emb, allowed, *shared, deterministic)
    h = axes.constrain(self.drop(h, deterministic=deterministic), act_axes)
    new_mask = jax.lax.stop_gradient(key_valid[:, klen - keep:])
    return h, Memory(tuple(new_states), new_mask)
