"""What the Transformer-XL backbone takes: its config, the named sizes, its memory, input checks.

    config = get_variant("small", attention="causal", dtype="bfloat16")
    memory = init_memory(config, batch_size)         # all-invalid, mem_len slots per layer
    check_inputs(config, tokens, memory)             # ValueError on a malformed input

Every `TransformerXLConfig` field is checked when the config is made (a ValueError names the field
and what it allows); `attention_kernel` and `attention_groups` resolve the "auto" attention
settings for the running backend. The modules that read the config are in `transformer_xl`, which
also exports the config, `get_variant`, `VARIANTS`, `SEGMENT_LEN`, `Memory` and `init_memory`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.model import kernels

# Attention modes (TransformerXLConfig.attention).
ATTENTIONS = ("bidirectional", "causal")
# How attention is computed (TransformerXLConfig.attention_impl).
ATTENTION_IMPLS = ("einsum", "sdpa", "cudnn", "auto")
# What a classification head reads (TransformerXLConfig.pooling).
POOLINGS = ("cls", "mean")
# Compute dtypes the fused (cuDNN) attention takes.
_FUSED_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def _on_cuda() -> bool:
  """True when the default backend is an NVIDIA GPU (where cuDNN attention exists)."""
  try:
    device = jax.devices()[0]
    return device.platform == "gpu" and "cuda" in device.client.platform_version.lower()
  except (RuntimeError, AttributeError):
    return False


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
                                  # 0), the position term passed as its bias (faster and
                                  # smaller on an H200: bench/NOTES.md 'Kernel notes'). "sdpa":
                                  # that call on XLA (any backend; for checks). Same parameters
                                  # and results for all.
  head_groups: int = 0            # einsum attention in this many independent groups of heads
                                  # (separate ops). XLA:CPU runs each batched attention product
                                  # on one thread, so two groups let two threads share the
                                  # attention. 0 = auto: 2 on CPU when n_head is even, else 1.
                                  # Same parameters and results (attention dropout masks are
                                  # drawn per group).
  pooling: str = "cls"            # classifier head input: "cls" = the first position's state,
                                  # "mean" = the mean over real tokens (NSP always reads cls).
  ngram_buckets: int = 0          # classifier only: > 0 adds a bag of hashed token 1- and
                                  # 2-grams (this many embedding rows, fastText-style) with its
                                  # own linear path to the logits (wide & deep); 0 = none.
  layer_heads: tuple[int, ...] = ()    # heads of each layer (structured pruning shrinks them);
                                       # () = n_head in every layer. "4,2" is read as (4, 2).
  layer_d_inner: tuple[int, ...] = ()  # feed-forward width of each layer; () = d_inner in all.

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layer", "n_head", "d_head", "d_inner"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"TransformerXLConfig.{name}={value!r}: must be a positive integer.")
    if self.d_model % 2:
      raise ValueError(f"TransformerXLConfig.d_model={self.d_model}: must be even (the sinusoid "
                       "position table is a sin half and a cos half).")
    for name in ("mem_len", "n_token_types", "ngram_buckets"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"TransformerXLConfig.{name}={value!r}: must be an integer >= 0.")
    if not isinstance(self.clamp_len, (int, np.integer)) or isinstance(self.clamp_len, bool):
      raise ValueError(f"TransformerXLConfig.clamp_len={self.clamp_len!r}: must be an integer "
                       "(> 0 caps distances, <= 0 means no cap).")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"TransformerXLConfig.attention={self.attention!r}: allowed values are "
                       f"{', '.join(ATTENTIONS)}.")
    if self.activation not in kernels.ACTIVATIONS:
      raise ValueError(f"TransformerXLConfig.activation={self.activation!r}: allowed values are "
                       f"{', '.join(kernels.ACTIVATIONS)}.")
    if self.pooling not in POOLINGS:
      raise ValueError(f"TransformerXLConfig.pooling={self.pooling!r}: allowed values are "
                       f"{', '.join(POOLINGS)}.")
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
    for name, default in (("layer_heads", self.n_head), ("layer_d_inner", self.d_inner)):
      value = getattr(self, name)
      if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
      try:
        value = tuple(int(v) for v in value)
      except (TypeError, ValueError):
        value = None
      if value is None or (value and (len(value) != self.n_layer or min(value) < 1)):
        raise ValueError(f"TransformerXLConfig.{name}={getattr(self, name)!r}: must be empty "
                         f"(every layer {default}) or n_layer={self.n_layer} positive integers.")
      object.__setattr__(self, name, value)
    if (self.layer_heads or self.layer_d_inner) and not self.untie_r:
      raise ValueError("TransformerXLConfig.layer_heads/layer_d_inner need untie_r=True (the "
                       "shared position biases have one row per head of every layer).")
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

  def heads_of(self, layer: int) -> int:
    """Attention heads of layer `layer`."""
    return self.layer_heads[layer] if self.layer_heads else self.n_head

  def d_inner_of(self, layer: int) -> int:
    """Feed-forward width of layer `layer`."""
    return self.layer_d_inner[layer] if self.layer_d_inner else self.d_inner

  def with_layer_sizes(self, heads: Sequence[int], d_inner: Sequence[int]
                       ) -> "TransformerXLConfig":
    """This config with the given heads / feed-forward width per layer, in one normal form: n_head
    and d_inner are layer 0's, layer_heads / layer_d_inner stay () where all layers agree (so a
    config saved with a model and one read back from its parameter shapes are equal)."""
    heads, d_inner = tuple(int(h) for h in heads), tuple(int(f) for f in d_inner)
    return dataclasses.replace(
        self, n_layer=len(heads), n_head=heads[0], d_inner=d_inner[0],
        layer_heads=heads if len(set(heads)) > 1 else (),
        layer_d_inner=d_inner if len(set(d_inner)) > 1 else (),
        head_groups=(self.head_groups if self.head_groups
                     and all(h % self.head_groups == 0 for h in heads) else 0))

  def layer_config(self, layer: int) -> "TransformerXLConfig":
    """The config layer `layer` is built from: n_head / d_inner are that layer's (head_groups
    falls back to auto where it does not divide them); itself when the layers are uniform."""
    if not (self.layer_heads or self.layer_d_inner):
      return self
    heads = self.heads_of(layer)
    return dataclasses.replace(
        self, n_head=heads, d_inner=self.d_inner_of(layer), layer_heads=(), layer_d_inner=(),
        head_groups=self.head_groups if self.head_groups and heads % self.head_groups == 0 else 0)

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
