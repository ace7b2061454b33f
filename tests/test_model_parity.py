"""Parity of r1jax's causal Transformer-XL with HuggingFace's TransfoXLModel (transformers 4.37.2).

A tiny random HF model is converted with `convert.from_hf_transfo_xl`; both then run 3 consecutive
segments with memory, HF from EMPTY memory (`mems=[zeros(0, B, d)] * n_layer`). Segment lengths
5, 11, 6 with mem_len 8 cover a memory that is still filling, a segment longer than mem_len and the
steady state. r1jax runs twice: from zero-length memory and from fixed-length all-invalid memory
(the static-shape training path); both must match HF to 1e-5 in float32.
"""
import itertools

import jax
import numpy as np
import pytest
import torch
import transformers

from r1jax.model import convert
from r1jax.model import transformer_xl as txl

TOL = 1e-5
SEGMENTS = (5, 11, 6)
BATCH = 2
MEM_LEN = 8


def _hf_model(same_length, clamp_len, pre_lnorm, untie_r, seed=0):
  # Every field set: HF's defaults are the WT103 ones (adaptive softmax, same_length, ...).
  config = transformers.TransfoXLConfig(
      vocab_size=100, d_model=32, d_embed=32, n_head=4, d_head=8, d_inner=64, n_layer=2,
      mem_len=MEM_LEN, cutoffs=[], div_val=1, adaptive=False, same_length=same_length,
      clamp_len=clamp_len, untie_r=untie_r, pre_lnorm=pre_lnorm, dropout=0.0, dropatt=0.0,
      attn_type=0, layer_norm_epsilon=1e-5)
  torch.manual_seed(seed)
  model = transformers.TransfoXLModel(config).eval()
  with torch.no_grad():
    # Larger-than-init random weights, so that a wrong bias, LN or position term shows clearly.
    for name, p in model.named_parameters():
      if "layer_norm.weight" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model


def _run_hf(model, segments):
  d, n_layer = model.config.d_model, model.config.n_layer
  mems = [torch.zeros(0, BATCH, d)] * n_layer
  hidden, memories = [], []
  with torch.no_grad():
    for seg in segments:
      out = model(torch.from_numpy(seg).long(), mems=mems)
      mems = out.mems
      hidden.append(out.last_hidden_state.numpy())
      memories.append([m.numpy().transpose(1, 0, 2) for m in mems])   # [M, B, d] -> [B, M, d]
  return hidden, memories


def _run_r1jax(config, params, segments, memory):
  model = txl.TransformerXL(config)
  apply = model.apply
  hidden, memories = [], []
  for seg in segments:
    h, memory = apply({"params": params}, seg, memory)
    hidden.append(np.asarray(h))
    memories.append(memory)
  return hidden, memories


@pytest.mark.parametrize("same_length,clamp_len,pre_lnorm,untie_r",
                         list(itertools.product([False, True], [-1, 3], [False, True],
                                                [True, False])))
def test_causal_matches_hf(same_length, clamp_len, pre_lnorm, untie_r):
  hf = _hf_model(same_length, clamp_len, pre_lnorm, untie_r)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  config, params = convert.from_hf_transfo_xl(state, hf.config.to_dict())
  assert config.attention == "causal" and config.untie_r == untie_r
  rng = np.random.default_rng(1)
  segments = [rng.integers(0, 100, (BATCH, q)).astype(np.int32) for q in SEGMENTS]
  hf_hidden, hf_mems = _run_hf(hf, segments)

  for start in (None, txl.init_memory(config, BATCH)):   # zero-length, fixed-length invalid
    hidden, memories = _run_r1jax(config, params, segments, start)
    for s, (ours, ref) in enumerate(zip(hidden, hf_hidden)):
      assert ours.shape == ref.shape
      np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0, err_msg=f"segment {s}")
    # The valid part of our memory is HF's memory (HF keeps min(mem_len, M + Q) steps).
    for ours, ref in zip(memories, hf_mems):
      m = ref[0].shape[1]
      mask = np.asarray(ours.mask)
      assert mask[:, -m:].all() and not mask[:, :-m].any()
      for layer in range(config.n_layer):
        np.testing.assert_allclose(np.asarray(ours.states[layer])[:, -m:], ref[layer],
                                   atol=TOL, rtol=0)


def test_lm_head_state_dict_and_projection_fold():
  """TransfoXLLMHeadModel names ("transformer." prefix, crit.* ignored) and d_embed != d_model."""
  config = transformers.TransfoXLConfig(
      vocab_size=50, d_model=16, d_embed=12, n_head=2, d_head=8, d_inner=32, n_layer=1,
      mem_len=4, cutoffs=[], div_val=1, adaptive=False, same_length=False, clamp_len=-1,
      untie_r=True, pre_lnorm=False, dropout=0.0, dropatt=0.0)
  torch.manual_seed(0)
  hf = transformers.TransfoXLLMHeadModel(config).eval()
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  assert any(k.startswith("crit.") for k in state)
  cfg, params = convert.from_hf_transfo_xl(state, config.to_dict())
  tokens = np.random.default_rng(0).integers(0, 50, (2, 6)).astype(np.int32)
  with torch.no_grad():
    ref = hf.transformer(torch.from_numpy(tokens).long(),
                         mems=[torch.zeros(0, 2, 16)]).last_hidden_state.numpy()
  ours, _ = txl.TransformerXL(cfg).apply({"params": params}, tokens)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)


def test_converter_rejects_unsupported():
  base = dict(vocab_size=100, d_model=32, d_embed=32, n_head=4, d_head=8, d_inner=64,
              n_layer=2, mem_len=8, cutoffs=[], div_val=1, attn_type=0)
  with pytest.raises(ValueError, match=r"div_val=4.*not supported"):
    convert.from_hf_transfo_xl({}, {**base, "div_val": 4, "cutoffs": [20, 40]})
  with pytest.raises(ValueError, match="attn_type=1"):
    convert.from_hf_transfo_xl({}, {**base, "attn_type": 1})
  with pytest.raises(ValueError, match="lacks 'word_emb.emb_layers.0.weight'"):
    convert.from_hf_transfo_xl({}, base)
  hf = _hf_model(False, -1, False, True)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  with pytest.raises(ValueError, match="does not map.*layers.1"):
    convert.from_hf_transfo_xl(state, {**hf.config.to_dict(), "n_layer": 1})
  with pytest.raises(ValueError, match="Unknown TransformerXLConfig field"):
    convert.from_hf_transfo_xl(state, hf.config.to_dict(), n_layers=3)
