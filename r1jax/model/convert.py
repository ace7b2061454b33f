"""HuggingFace TransfoXL weights -> r1jax `TransformerXLConfig` and backbone params.

    import transformers
    hf = transformers.TransfoXLModel.from_pretrained(...)      # or TransfoXLLMHeadModel
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    config, params = from_hf_transfo_xl(state, hf.config.to_dict())
    hidden, memory = TransformerXL(config).apply({"params": params}, tokens, memory)

The result runs in causal mode and reproduces `TransfoXLModel(...).last_hidden_state` when HF starts
from empty memory (`mems=[torch.zeros(0, B, d)] * n_layer`; HF's own `mems=None` starts from
mem_len unmasked zero vectors instead). For pretraining put the params under "backbone".

Supported: a single input-embedding table (div_val=1; then `cutoffs` only shape HF's adaptive
*softmax*, which is an LM output layer this converter does not carry: `crit.*` weights are ignored),
an optional d_embed -> d_model projection (folded into the table, exactly), tied or untied r biases,
pre- or post-LayerNorm. PyTorch Linear weights are [out, in]; Flax kernels are their transpose.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from r1jax.model import transformer_xl as txl

# transformers.TransfoXLConfig defaults (the WT103 model), used for keys a config dict lacks.
HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=267735, cutoffs=[20000, 40000, 200000], d_model=1024, d_embed=1024, n_head=16,
    d_head=64, d_inner=4096, div_val=4, pre_lnorm=False, n_layer=18, mem_len=1600,
    clamp_len=1000, same_length=True, attn_type=0, dropout=0.1, dropatt=0.0, untie_r=True,
    layer_norm_epsilon=1e-5)

_IGNORED_PREFIXES = ("crit.", "pos_emb.inv_freq")


def _hf_config_dict(hf_config: Any) -> dict[str, Any]:
  if hasattr(hf_config, "to_dict"):
    hf_config = hf_config.to_dict()
  if not isinstance(hf_config, Mapping):
    raise ValueError(f"hf_config must be a dict or a transformers config, got "
                     f"{type(hf_config).__name__}.")
  return {**HF_DEFAULTS, **dict(hf_config)}


def config_from_hf(hf_config: Any, **overrides: Any) -> txl.TransformerXLConfig:
  """The r1jax config of an HF TransfoXL config (causal, relu); `overrides` replace fields."""
  hf = _hf_config_dict(hf_config)
  if hf["attn_type"] != 0:
    raise ValueError(f"HF attn_type={hf['attn_type']} is not supported: only attn_type=0 "
                     "(relative positions, the published Transformer-XL) is.")
  if hf["div_val"] != 1:
    raise ValueError(f"HF adaptive input embeddings (div_val={hf['div_val']}, cutoffs="
                     f"{list(hf['cutoffs'])}) are not supported: convert a model with div_val=1 "
                     "(and cutoffs=[]), which has a single embedding table.")
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=hf["d_model"], n_layer=hf["n_layer"],
      n_head=hf["n_head"], d_head=hf["d_head"], d_inner=hf["d_inner"], mem_len=hf["mem_len"],
      clamp_len=hf["clamp_len"], same_length=hf["same_length"], attention="causal",
      pre_lnorm=hf["pre_lnorm"], activation="relu", dropout=hf["dropout"],
      dropatt=hf["dropatt"], layer_norm_eps=hf["layer_norm_epsilon"], untie_r=hf["untie_r"],
      n_token_types=0)
  known = {f.name for f in dataclasses.fields(txl.TransformerXLConfig)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f"Unknown TransformerXLConfig field(s) {unknown}: allowed fields are "
                     f"{', '.join(sorted(known))}.")
  return txl.TransformerXLConfig(**{**fields, **overrides})


def from_hf_transfo_xl(state_dict: Mapping[str, Any], hf_config: Any, **overrides: Any
                       ) -> tuple[txl.TransformerXLConfig, dict[str, Any]]:
  """Converts an HF TransfoXLModel / TransfoXLLMHeadModel state dict.

  Args:
    state_dict: parameter name -> array (numpy, or anything `np.asarray` accepts); names with or
      without the "transformer." prefix of the LM-head model.
    hf_config: the HF config as a dict (`config.to_dict()`) or the config object.
    **overrides: TransformerXLConfig fields to change, e.g. dtype="bfloat16", or
      attention="bidirectional" to continue training a causal checkpoint as an MLM.

  Returns:
    (config, params) with params the backbone's "params" collection (plain nested dict of numpy
    arrays in config.param_dtype), for `TransformerXL(config).apply({"params": params}, ...)`.
  """
  config = config_from_hf(hf_config, **overrides)
  hf = _hf_config_dict(hf_config)
  state = {}
  for name, value in state_dict.items():
    name = name[len("transformer."):] if name.startswith("transformer.") else name
    if not name.startswith(_IGNORED_PREFIXES):
      state[name] = value
  used: set[str] = set()
  dtype = np.dtype(config.param_dtype)

  def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in state:
      raise ValueError(f"HF state dict lacks {name!r} (needed for n_layer={config.n_layer}, "
                       f"untie_r={config.untie_r}).")
    arr = np.asarray(state[name], np.float32)
    if arr.shape != shape:
      raise ValueError(f"HF weight {name!r} has shape {arr.shape}, expected {shape} from the "
                       "config.")
    used.add(name)
    return arr

  d, h, dh, di = config.d_model, config.n_head, config.d_head, config.d_inner
  emb = take("word_emb.emb_layers.0.weight", (config.vocab_size, hf["d_embed"]))
  if "word_emb.emb_projs.0" in state:
    emb = emb @ take("word_emb.emb_projs.0", (d, hf["d_embed"])).T   # fold d_embed -> d
  elif hf["d_embed"] != d:
    raise ValueError(f"HF d_embed={hf['d_embed']} != d_model={d} but the state dict has no "
                     "'word_emb.emb_projs.0'.")
  params: dict[str, Any] = {"word_emb": {"embedding": emb}}

  def biases(prefix: str) -> dict[str, np.ndarray]:
    return {"r_w_bias": take(prefix + "r_w_bias", (h, dh)),
            "r_r_bias": take(prefix + "r_r_bias", (h, dh))}

  if not config.untie_r:
    params.update(biases(""))
  for i in range(config.n_layer):
    a, f = f"layers.{i}.dec_attn.", f"layers.{i}.pos_ff."
    attn = {
        "qkv": {"kernel": take(a + "qkv_net.weight", (3 * h * dh, d)).T.reshape(d, 3, h, dh)},
        "r_net": {"kernel": take(a + "r_net.weight", (h * dh, d)).T.reshape(d, h, dh)},
        "out": {"kernel": take(a + "o_net.weight", (d, h * dh)).T.reshape(h, dh, d)},
    }
    if config.untie_r:
      attn.update(biases(a))
    else:
      # PyTorch lists a shared parameter under every name it is reachable by.
      for key, shared in biases(a).items() if a + "r_w_bias" in state else ():
        if not np.array_equal(shared, params[key]):
          raise ValueError(f"untie_r=False but HF weight {a + key!r} differs from the shared "
                           f"{key!r}: the checkpoint looks untied; set untie_r=True.")
    params[f"layer_{i}"] = {
        "attn": attn,
        "attn_norm": {"scale": take(a + "layer_norm.weight", (d,)),
                      "bias": take(a + "layer_norm.bias", (d,))},
        "ff_in": {"kernel": take(f + "CoreNet.0.weight", (di, d)).T,
                  "bias": take(f + "CoreNet.0.bias", (di,))},
        "ff_out": {"kernel": take(f + "CoreNet.3.weight", (d, di)).T,
                   "bias": take(f + "CoreNet.3.bias", (d,))},
        "ff_norm": {"scale": take(f + "layer_norm.weight", (d,)),
                    "bias": take(f + "layer_norm.bias", (d,))},
    }
  unused = sorted(set(state) - used)
  if unused:
    raise ValueError(f"HF state dict has weights this converter does not map: {unused[:8]}"
                     f"{' ...' if len(unused) > 8 else ''} (check n_layer and untie_r in the "
                     "config).")
  params = jax.tree.map(lambda x: np.ascontiguousarray(x, dtype), params)
  _check_against_model(config, params)
  return config, params


def _check_against_model(config: txl.TransformerXLConfig, params: dict[str, Any]) -> None:
  """Raises if `params` does not have exactly the backbone's structure and shapes."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  abstract = jax.eval_shape(txl.TransformerXL(config).init, jax.random.key(0), tokens)
  expected = jax.tree.map(lambda x: x.shape, nn.unbox(abstract["params"]))
  got = jax.tree.map(lambda x: x.shape, params)
  if expected != got:
    raise ValueError(f"Converted params do not match TransformerXL({config}): expected "
                     f"{expected}, got {got}.")
