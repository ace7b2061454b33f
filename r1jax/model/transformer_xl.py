"""Transformer-XL backbone in Flax linen: config, variants, relative attention, layers, memory.

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

Both modes use the "relative shift" reshape trick to turn a [Q, P] table of query x position scores
into [Q, K] query x key scores without a gather.

Memory: the memory of layer l is the *input* of layer l (the embedding output for l = 0). After a
segment, new_mem_l = stop_gradient(concat(mem_l, input_l)[-mem_len:]), and the validity mask is
carried the same way: padded tokens become invalid memory slots and are never attended. As in the
original code, memory made in training mode holds the training-mode (dropout) activations of the
layer inputs. Memory may be zero-length (the first segment of a stream) or a fixed-length
all-invalid block (static shapes under jit): both give identical outputs, because attention depends
only on relative distances and invalid slots are masked. Memory is kept in the compute dtype.

Speed and memory (bench/train_throughput.py, bench/NOTES.md): dropout masks come from a cheap
counter-based hash (`keep_mask`), not threefry; LayerNorm, softmax and the feed-forward's
activation + dropout (`activation_dropout`) have custom VJPs that keep only what their backward
needs; dense layers and the attention projections run as 2-D matmuls
(`flat_matmuls`), and attention scores are head-major, because XLA:CPU emits the gradients of
those forms as fast plain matmuls. Parameters and results are those of the plain formulation.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from r1jax.model import axes

def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x) = x / 2 * (1 + erf(x / sqrt(2))), the formula of BERT and PyTorch.

  nn.gelu(approximate=False) writes it with erfc, whose XLA:CPU expansion (two rational
  approximations, an exp and selects) costs 3x erf's; the two agree to 1e-6.
  """
  return x * 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


ACTIVATIONS = {
    "gelu": gelu,
    "relu": nn.relu,
    "relu6": nn.relu6,
}
ATTENTIONS = ("bidirectional", "causal")
# How attention is computed (TransformerXLConfig.attention_impl).
ATTENTION_IMPLS = ("einsum", "sdpa", "cudnn", "auto")

# Masked scores get this finite value (never -inf: bf16/fp16 would turn inf - inf into NaN). Scores
# are float32 when masked, so -1e9 underflows exp() to exactly 0 next to any unmasked score.
MASK_VALUE = -1e9
_FUSED_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def _on_cuda() -> bool:
  """True when the default backend is an NVIDIA GPU (where cuDNN attention exists)."""
  try:
    device = jax.devices()[0]
    return device.platform == "gpu" and "cuda" in device.client.platform_version.lower()
  except (RuntimeError, AttributeError):
    return False


# Initialiser scale of weights and relative biases (transformer_xl.md: N(0, 0.02)).
INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class TransformerXLConfig:
  """Hyperparameters of the Transformer-XL backbone (see `get_variant` for named sizes)."""
  vocab_size: int = 1000          # V, rows of the word-embedding table.
  d_model: int = 64               # d, model width (even: the sinusoid table is sin | cos halves).
  n_layer: int = 2                # number of layers (unrolled, named layer_{i}).
  n_head: int = 4                 # H, attention heads.
  d_head: int = 16                # D, width per head (H * D need not equal d).
  d_inner: int = 256              # feed-forward width.
  mem_len: int = 32               # steps of memory kept per layer (0 = no memory).
  clamp_len: int = -1             # > 0 caps relative distances at +-clamp_len; <= 0 = no cap.
  same_length: bool = False       # causal only: every query sees at most mem_len keys.
  attention: str = "bidirectional"  # "bidirectional" (MLM) or "causal" (LM).
  pre_lnorm: bool = False         # LayerNorm before attention/FF (no final LayerNorm), else after.
  activation: str = "gelu"        # feed-forward activation: gelu | relu | relu6.
  dropout: float = 0.1            # dropout on embeddings, positions, sublayer outputs, FF hidden.
  dropatt: float = 0.0            # dropout on attention probabilities.
  layer_norm_eps: float = 1e-5    # LayerNorm epsilon (original and HF use 1e-5).
  untie_r: bool = True            # one (r_w_bias, r_r_bias) pair per layer, else one shared pair.
  n_token_types: int = 0          # > 0 adds a token-type (segment A/B) embedding table.
  dtype: Any = "float32"          # compute dtype (e.g. "bfloat16").
  param_dtype: Any = "float32"    # parameter dtype.
  remat: bool = False             # rematerialise each layer in the backward pass (saves memory).
  flat_matmuls: bool = True       # projections as 2-D matmuls (fast XLA:CPU weight gradients);
                                  # False: einsums over the kernels' own shapes (what qwix PTQ
                                  # intercepts; same parameters, same results).
  attention_impl: str = "auto"    # "auto": cudnn where it applies, else einsum. "einsum":
                                  # explicit head-major products (any backend, any dtype,
                                  # attention dropout). "cudnn": fused flash attention via
                                  # jax.nn.dot_product_attention (NVIDIA GPU, bf16/fp16, dropatt
                                  # 0), the position term passed as its bias (H200, base, seq 512:
                                  # 1.28x tokens/s, 0.65x memory). "sdpa": that call on XLA (any
                                  # backend; for checks). Same parameters and results for all.
  head_groups: int = 0            # einsum attention in this many independent groups of heads
                                  # (separate ops). XLA:CPU runs each batched attention product
                                  # on one thread, so two groups let two threads share the
                                  # attention. 0 = auto: 2 on CPU when n_head is even, else 1.
                                  # Same parameters and results (attention dropout masks are
                                  # drawn per group).

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layer", "n_head", "d_head", "d_inner"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"TransformerXLConfig.{name}={value!r}: must be a positive integer.")
    if self.d_model % 2:
      raise ValueError(f"TransformerXLConfig.d_model={self.d_model}: must be even (the sinusoid "
                       "position table is a sin half and a cos half).")
    for name in ("mem_len", "n_token_types"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"TransformerXLConfig.{name}={value!r}: must be an integer >= 0.")
    if not isinstance(self.clamp_len, (int, np.integer)) or isinstance(self.clamp_len, bool):
      raise ValueError(f"TransformerXLConfig.clamp_len={self.clamp_len!r}: must be an integer "
                       "(> 0 caps distances, <= 0 means no cap).")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"TransformerXLConfig.attention={self.attention!r}: allowed values are "
                       f"{', '.join(ATTENTIONS)}.")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"TransformerXLConfig.activation={self.activation!r}: allowed values are "
                       f"{', '.join(ACTIVATIONS)}.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"TransformerXLConfig.attention_impl={self.attention_impl!r}: allowed "
                       f"values are {', '.join(ATTENTION_IMPLS)}.")
    if self.attention_impl in ("sdpa", "cudnn") and self.dropatt:
      raise ValueError(f"TransformerXLConfig.attention_impl={self.attention_impl!r} has no "
                       f"attention-probability dropout (dropatt={self.dropatt}); set dropatt=0.0 "
                       "or attention_impl='einsum' (or 'auto', which falls back to einsum).")
    if (not isinstance(self.head_groups, (int, np.integer)) or isinstance(self.head_groups, bool)
        or self.head_groups < 0 or (self.head_groups and self.n_head % self.head_groups)):
      raise ValueError(f"TransformerXLConfig.head_groups={self.head_groups!r}: must be 0 (auto) "
                       f"or a divisor of n_head={self.n_head}.")
    if self.same_length and self.attention != "causal":
      raise ValueError("TransformerXLConfig.same_length=True needs attention='causal' (got "
                       f"{self.attention!r}); bidirectional attention always sees all memory.")
    if self.same_length and self.mem_len == 0:
      raise ValueError("TransformerXLConfig.same_length=True with mem_len=0 would hide every key; "
                       "set mem_len > 0 or same_length=False.")
    for name in ("dropout", "dropatt"):
      value = getattr(self, name)
      if not 0.0 <= value < 1.0:
        raise ValueError(f"TransformerXLConfig.{name}={value!r}: must be in [0, 1).")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"TransformerXLConfig.layer_norm_eps={self.layer_norm_eps!r}: must be > 0.")
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      try:
        dt = jnp.dtype(value)
      except TypeError:
        dt = None
      if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"TransformerXLConfig.{name}={value!r}: must be a floating dtype such as "
                         "'float32' or 'bfloat16'.")
      object.__setattr__(self, name, dt)
    if self.attention_impl == "cudnn" and self.dtype not in _FUSED_DTYPES:
      raise ValueError(f"TransformerXLConfig.attention_impl='cudnn' needs dtype bfloat16 or "
                       f"float16 (got {self.dtype}); set dtype='bfloat16' or "
                       "attention_impl='auto'.")

  def attention_kernel(self, deterministic: bool) -> str:
    """The attention implementation a call runs: `attention_impl` with "auto" resolved."""
    if self.attention_impl != "auto":
      return self.attention_impl
    fused = (_on_cuda() and self.dtype in _FUSED_DTYPES and (deterministic or not self.dropatt))
    return "cudnn" if fused else "einsum"

  def attention_groups(self) -> int:
    """The number of head groups the einsum attention runs: `head_groups` with 0 resolved."""
    if self.head_groups:
      return self.head_groups
    return 2 if jax.default_backend() == "cpu" and self.n_head % 2 == 0 else 1

  @property
  def is_causal(self) -> bool:
    return self.attention == "causal"


VARIANTS: dict[str, dict[str, Any]] = {
    # Fast enough for CPU tests and demos.
    "tiny": dict(vocab_size=1000, d_model=64, n_layer=2, n_head=4, d_head=16, d_inner=256,
                 mem_len=32),
    "small": dict(vocab_size=8000, d_model=256, n_layer=4, n_head=4, d_head=64, d_inner=1024,
                  mem_len=128),
    # The seed's table: 1024 positions of context = segment 512 + memory 512.
    "base": dict(vocab_size=50000, d_model=768, n_layer=12, n_head=12, d_head=64, d_inner=3072,
                 mem_len=512),
}
# Segment length each variant is sized for (a data setting, not a model field).
SEGMENT_LEN = {"tiny": 32, "small": 128, "base": 512}


def get_variant(name: str, **overrides: Any) -> TransformerXLConfig:
  """The named variant ("tiny", "small" or "base") with `overrides` applied to its fields."""
  if name not in VARIANTS:
    raise ValueError(f"Unknown Transformer-XL variant {name!r}: allowed values are "
                     f"{', '.join(VARIANTS)}.")
  fields = {f.name for f in dataclasses.fields(TransformerXLConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"Unknown TransformerXLConfig field(s) {unknown}: allowed fields are "
                     f"{', '.join(sorted(fields))}.")
  return TransformerXLConfig(**{**VARIANTS[name], **overrides})


# --------------------------------------------------------------------------------------------------
# Memory.


class Memory(NamedTuple):
  """Per-layer memory: `states` n_layer arrays [B, M, d]; `mask` bool [B, M], True = valid."""
  states: tuple[jax.Array, ...]
  mask: jax.Array

  @property
  def length(self) -> int:
    """M, the number of memory slots (valid or not)."""
    return int(self.mask.shape[1])

  @classmethod
  def empty(cls, n_layer: int, batch_size: int, d_model: int, length: int = 0,
            dtype: Any = jnp.float32) -> "Memory":
    """Memory of `length` all-invalid zero slots (length 0 = no memory yet)."""
    states = tuple(jnp.zeros((batch_size, length, d_model), dtype) for _ in range(n_layer))
    return cls(states, jnp.zeros((batch_size, length), bool))

  @classmethod
  def from_mems(cls, mems: Sequence[jax.Array]) -> "Memory":
    """Wraps an HF-style tuple of n_layer arrays [B, M, d] (every slot valid)."""
    mems = tuple(mems)
    if not mems:
      raise ValueError("mems is empty: pass one [B, M, d] array per layer, or None.")
    b, m = jnp.shape(mems[0])[:2]
    return cls(mems, jnp.ones((b, m), bool))

  def reset(self, rows: jax.Array) -> "Memory":
    """Invalidates the memory of rows where `rows` [B] is True (a new document starts there)."""
    return Memory(self.states, self.mask & ~jnp.asarray(rows, bool)[:, None])


def init_memory(config: TransformerXLConfig, batch_size: int, length: int | None = None) -> Memory:
  """All-invalid memory for `config`; `length` defaults to mem_len (static shapes under jit)."""
  length = config.mem_len if length is None else length
  return Memory.empty(config.n_layer, batch_size, config.d_model, length, config.dtype)


# --------------------------------------------------------------------------------------------------
# Input checks (shapes at trace time; values only for concrete host data, never a sync under jit).


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct))


def _dtype_of(x: Any) -> np.dtype:
  dtype = getattr(x, "dtype", None)
  return np.dtype(dtype) if dtype is not None else np.asarray(x).dtype


def check_int_range(name: str, x: Any, high: int, what: str) -> None:
  """Raises ValueError if concrete int array `x` has a value outside [0, high); skips tracers."""
  if not _is_concrete(x):
    return
  arr = np.asarray(x)
  if arr.size == 0:
    return
  lo, hi = int(arr.min()), int(arr.max())
  if lo < 0 or hi >= high:
    bad = lo if lo < 0 else hi
    raise ValueError(f"{name} contains {bad}, outside {what} [0, {high - 1}].")


def check_inputs(config: TransformerXLConfig, tokens: Any, memory: Memory | Sequence[Any] | None
                 = None, token_mask: Any = None, token_types: Any = None) -> None:
  """Raises ValueError for malformed backbone inputs.

  Shapes are always checked (they are static, so this happens while tracing, before compiling).
  Token ids and token types are range-checked only when they are concrete host values (numpy
  arrays, lists or committed jax arrays); under jit they are tracers and are not checked, so no
  host sync is ever added. The engine calls this on host batches.

  Args:
    config: the model config.
    tokens: int [B, Q].
    memory: None, a `Memory`, or a sequence of n_layer arrays [B, M, d].
    token_mask: None or bool [B, Q].
    token_types: None or int [B, Q].
  """
  shape = tuple(jnp.shape(tokens))
  if len(shape) != 2 or shape[1] < 1:
    raise ValueError(f"tokens must have shape [batch, length] with length >= 1, got {shape}.")
  if not np.issubdtype(_dtype_of(tokens), np.integer):
    raise ValueError(f"tokens must be integer ids, got dtype {_dtype_of(tokens)}.")
  batch = shape[0]
  check_int_range("tokens", tokens, config.vocab_size, "the vocabulary")
  if token_mask is not None and tuple(jnp.shape(token_mask)) != shape:
    raise ValueError(f"token_mask shape {tuple(jnp.shape(token_mask))} != tokens shape {shape}.")
  if token_types is not None:
    if config.n_token_types == 0:
      raise ValueError("token_types were given but config.n_token_types=0: set n_token_types "
                       "(e.g. 2 for segments A/B) or pass token_types=None.")
    if tuple(jnp.shape(token_types)) != shape:
      raise ValueError(f"token_types shape {tuple(jnp.shape(token_types))} != tokens shape "
                       f"{shape}.")
    check_int_range("token_types", token_types, config.n_token_types, "the token types")
  if memory is None:
    return
  states = memory.states if isinstance(memory, Memory) else tuple(memory)
  what = "memory.states" if isinstance(memory, Memory) else "mems"
  if len(states) != config.n_layer:
    raise ValueError(f"{what} has {len(states)} arrays; the model has n_layer={config.n_layer} "
                     "(one [batch, mem_length, d_model] array per layer).")
  mem_shape = None
  for i, s in enumerate(states):
    s_shape = tuple(jnp.shape(s))
    if len(s_shape) != 3 or s_shape[0] != batch or s_shape[2] != config.d_model:
      raise ValueError(f"{what}[{i}] has shape {s_shape}; expected [batch={batch}, mem_length, "
                       f"d_model={config.d_model}].")
    if mem_shape is not None and s_shape != mem_shape:
      raise ValueError(f"{what}[{i}] has shape {s_shape} but {what}[0] has {mem_shape}: all "
                       "layers need the same memory length.")
    mem_shape = s_shape
  if isinstance(memory, Memory):
    mask_shape = tuple(jnp.shape(memory.mask))
    if mask_shape != mem_shape[:2]:
      raise ValueError(f"memory.mask has shape {mask_shape}; expected {mem_shape[:2]} "
                       "[batch, mem_length].")


def _resolve_memory(memory: Any, mems: Any) -> Memory | Sequence[Any] | None:
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


def _skew(x: jax.Array, width: int, offset: int, slope: int) -> jax.Array:
  """[..., Q, N] -> [..., Q, width]: out[..., i, c] = x[..., i, c + offset - slope * i], 0 where
  that column is outside [0, N). `slope` is +1 or -1.

  Only pad/reshape/slice, which XLA fuses into one loop: x is padded with zero columns to a row
  length W and the flat buffer is read back with a row stride of W - slope, which moves each row
  by `slope` columns more than the one before. W is the smallest power of two that keeps every
  out-of-range read inside the zero columns, so the loop's index arithmetic (a division by W)
  is a shift: on XLA:CPU the gradient skew of the small model's [4, 32, 128, 255] position
  scores takes 2.4 ms with W = 256 and 5.5 ms with W = 255.
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

  Threefry (jax.random.bernoulli) costs about 40 ms per 4M elements on a 2-core CPU, a quarter of a
  small model's training step. Here each element hashes its own flat index with two 32-bit
  `seeds` (from `dropout_seeds`): counter-based like Philox, with two MurmurHash3 finaliser rounds
  instead of ten Philox rounds, about 15x cheaper than threefry, statistically fine for dropout,
  and the same mask whatever the sharding, since the counter is the global element index.

  The index is summed from per-axis constant rows, seeds[0] first, so no full-size term is the
  same in two masks: XLA would otherwise share one layer's index array with every layer's mask and
  read it back from memory (16 MB per use at the small model's feed-forward) instead of computing
  it in place.

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
  until the backward (16 MB per layer at the small model) instead of recomputing it in place."""
  cdf = 0.5 - 0.5 * jax.lax.erf(x * (-1.0 / math.sqrt(2.0)))
  return cdf + x * (1.0 / math.sqrt(2.0 * math.pi)) * jnp.exp(-0.5 * x * x)


def _activation_dropout_bwd(keep_prob, activation, res, g):
  x, seeds = res
  if activation == "gelu":
    # The select last: XLA:CPU runs this pass in 4 ms for the small model's [32, 128, 1024] where
    # selecting g first (as apply_dropout(g) * grad) takes 6.
    return apply_dropout(g * _gelu_grad(x), seeds, keep_prob), None
  _, act_vjp = jax.vjp(ACTIVATIONS[activation], x)
  return act_vjp(apply_dropout(g, seeds, keep_prob))[0], None


activation_dropout.defvjp(_activation_dropout_fwd, _activation_dropout_bwd)


class Dropout(nn.Module):
  """Inverted dropout (as nn.Dropout: kept entries scaled by 1 / (1 - rate)) with `keep_mask`.

  Draws its key from the "dropout" rng collection, like nn.Dropout.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool, activation: str | None = None
               ) -> jax.Array:
    """Dropout of x, or of ACTIVATIONS[activation](x) in one pass when `activation` is given."""
    if deterministic or self.rate == 0.0:
      return x if activation is None else ACTIVATIONS[activation](x)
    seeds = dropout_seeds(self.make_rng("dropout"))
    if activation is None:
      return apply_dropout(x, seeds, 1.0 - self.rate)
    return activation_dropout(x, seeds, 1.0 - self.rate, activation)


# --------------------------------------------------------------------------------------------------
# Modules.


def _normal(axes_names: Sequence[str | None], std: float = INIT_STD):
  return nn.with_logical_partitioning(nn.initializers.normal(std), tuple(axes_names))


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


class LayerNorm(nn.Module):
  """LayerNorm with params `scale` and `bias` [d] (as nn.LayerNorm), computed by `layer_norm`."""
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
    return layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)


def make_layer_norm(config: TransformerXLConfig, name: str) -> LayerNorm:
  """LayerNorm with the config's epsilon and dtypes; scale/bias replicated (NORM axis)."""
  return LayerNorm(epsilon=config.layer_norm_eps, dtype=config.dtype,
                   param_dtype=config.param_dtype, name=name)


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
  (outside YNNPACK) at about half speed when I > O: [4096, 1024]^T [4096, 256] takes 18 ms on one
  core, while dy^T x, [256, 1024], takes 10.6 ms and its transpose a fraction of a millisecond.
  XLA folds a plain transpose back into the product, so the [O, I] result passes through an
  optimization barrier first. Only on CPU: GPU and TPU matmul libraries take either orientation.
  Same sums as the plain product's gradient, equal up to float rounding.
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


class Dense(nn.Module):
  """nn.Dense (same `kernel` [I, O] and `bias` [O] parameters and initialisers) computed as one
  2-D matmul over the flattened leading axes.

  Why not nn.Dense: its [B, Q, I] x [I, O] product differentiates into a weight gradient with two
  contracting axes, which XLA:CPU lowers with a transposed copy of the output gradient and a
  strided matmul about 3x slower than the forward one; with [B * Q, I] operands the weight
  gradient is a plain 2-D product (see `matmul` for its orientation).
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
      y = matmul(x.reshape(-1, x.shape[-1]), kernel.astype(self.dtype))
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
  y = matmul(x.reshape(-1, int(np.prod(inner))), kernel.reshape(int(np.prod(inner)), -1))
  return y.reshape(lead + out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _split_head_major(x: jax.Array, groups: int = 1) -> tuple[jax.Array, ...]:
  """[B, K, n, H, D] projections -> n * groups head-major [H / groups, B, K, D] arrays.

  Ordered projection-major: (q heads 0.., q heads H/groups.., ..., v heads ..) for n = 3. The
  same values as transposing and slicing. The custom VJP concatenates and stacks the transposed
  gradients in one pass; autodiff's transpose pads each gradient to [n, H, B, K, D] and adds the
  pads, which XLA:CPU runs 2.6x slower (2.9 vs 1.1 ms for the small model's q, k, v).
  """
  t = jnp.transpose(x, (2, 3, 0, 1, 4))
  size = x.shape[3] // groups
  return tuple(t[i, j * size:(j + 1) * size] for i in range(x.shape[2]) for j in range(groups))


def _split_head_major_fwd(x, groups):
  return _split_head_major(x, groups), None


def _split_head_major_bwd(groups, _, grads):
  per_projection = [[jnp.transpose(g, (1, 2, 0, 3)) for g in grads[i:i + groups]]
                    for i in range(0, len(grads), groups)]
  return (jnp.stack([jnp.concatenate(gs, axis=2) for gs in per_projection], axis=2),)


_split_head_major.defvjp(_split_head_major_fwd, _split_head_major_bwd)


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
  bd = rel_shift(bd, klen)                                                    # [H, B, Q, K]
  scores = (ac + bd) * (1.0 / math.sqrt(dh))
  scores = jnp.where(jnp.swapaxes(allowed, 0, 1), scores, MASK_VALUE)
  probs = dropout(softmax(scores).astype(q.dtype))
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
      parts = _split_head_major(_project(x, qkv_kernel, flat=flat), groups)
      qs, ks, vs = parts[:groups], parts[groups:2 * groups], parts[2 * groups:]
    else:
      # Queries only for the segment's rows; keys and values for memory and segment.
      qs = _split_head_major(_project(x[:, mlen:], qkv_kernel[:, :1], flat=flat), groups)
      kv = _split_head_major(_project(x, qkv_kernel[:, 1:], flat=flat), groups)
      ks, vs = kv[:groups], kv[groups:]
    # The table as [H, D, P] (as in `_fused`): its gradient, a product over all B * Q query rows,
    # then comes out as [D, P] per head, which XLA:CPU runs 1.6x faster than [P, D] (167 vs 105
    # GFLOP/s for the small model on one core).
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

  def _fused(self, x, qlen, pos_emb, allowed, r_w_bias, r_r_bias, kernels, impl):
    """The same attention through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU).

    The content term (q + r_w_bias) k^T is the fused kernel's own product; the position term
    rel_shift((q + r_r_bias) r^T), scaled and masked, is its additive bias [B, H, Q, K]. The
    kernel never materialises the content scores or the probabilities (forward or backward); the
    bias and its gradient are the only [B, H, Q, K] arrays left, in the compute dtype.
    """
    cfg = self.config
    dtype, dh, flat = cfg.dtype, cfg.d_head, cfg.flat_matmuls
    qkv_kernel, r_kernel, o_kernel = kernels
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
    bd = rel_shift(bd.reshape(qr.shape[:3] + (r.shape[2],)), klen)           # [H, B, Q, K]
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
  atomics on a GPU (15 ms of a 65 ms base step on an H200). For the usual T <= 4 it is a chain of
  selects whose gradient is T masked sums over [B, Q, d], elementwise work that fuses; beyond, a
  one-hot [B, Q, T] x [T, d] product (on XLA:CPU its [T, B*Q] x [B*Q, d] gradient needs a
  transposed copy of the [B*Q, d] gradient, 9 ms per small-model step for T = 2).
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
  `r_w_bias`/`r_r_bias` [H, D] here when untie_r=False, and `layer_{i}/...` per layer.
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
      setattr(self, f"layer_{i}", layer_cls(cfg))
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
    tokens = jnp.asarray(tokens)
    batch, qlen = tokens.shape
    if memory is None:
      memory = Memory.empty(cfg.n_layer, batch, cfg.d_model, 0, cfg.dtype)
    elif not isinstance(memory, Memory):
      memory = Memory.from_mems(memory)
    mlen = memory.length
    klen = mlen + qlen
    token_mask = (jnp.ones((batch, qlen), bool) if token_mask is None
                  else jnp.asarray(token_mask, bool))
    act_axes = (axes.BATCH, axes.LENGTH, axes.ACT_EMBED)

    h = self.word_emb(tokens) * jnp.asarray(math.sqrt(cfg.d_model), cfg.dtype)
    if cfg.n_token_types:
      types = jnp.zeros_like(tokens) if token_types is None else jnp.asarray(token_types)
      h = h + _token_type_embedding(types, jnp.asarray(self.type_emb.embedding, cfg.dtype))
    h = axes.constrain(self.drop(h, deterministic=deterministic), act_axes)

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


def count_params(config: TransformerXLConfig, *, pretrain_heads: bool = False) -> int:
  """Number of parameters of the backbone (or of `heads.PretrainModel`), via eval_shape only."""
  if pretrain_heads:
    from r1jax.model import heads  # pylint: disable=g-import-not-at-top
    model = heads.PretrainModel(config)
  else:
    model = TransformerXL(config)
  tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"]))))
