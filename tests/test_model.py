"""Tests of the Transformer-XL backbone and heads (r1jax.model.transformer_xl, .heads)."""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import model as r1model
from r1jax.model import config as model_config
from r1jax.model import heads
from r1jax.model import kernels
from r1jax.model import transformer_xl as txl

SMALL = dict(vocab_size=50, d_model=16, n_layer=2, n_head=2, d_head=8, d_inner=32, mem_len=6,
             dropout=0.0)


def _config(**overrides):
  return txl.TransformerXLConfig(**{**SMALL, **overrides})


def _random_params(model, tokens, seed=0, **kwargs):
  """Params with larger-than-init random values, so every term of the score matters."""
  params = nn.unbox(model.init(jax.random.key(seed), tokens, **kwargs)["params"])
  leaves, treedef = jax.tree.flatten_with_path(params)
  rng = np.random.default_rng(seed)
  new = []
  for path, x in leaves:
    noise = rng.standard_normal(x.shape).astype(np.float32)
    is_scale = jax.tree_util.keystr(path).endswith("['scale']")
    new.append(jnp.asarray(1.0 + 0.2 * noise if is_scale else 0.3 * noise))
  return jax.tree.unflatten(treedef, new)


# --------------------------------------------------------------------------------------------------
# A naive reference: explicit loops over (batch, head, query, key), distances written out.


def _layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _sinusoid(dist, d):
  inv_freq = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))
  return np.concatenate([np.sin(dist * inv_freq), np.cos(dist * inv_freq)])


_ERF = np.vectorize(math.erf)
_ACT = {"gelu": lambda x: 0.5 * x * (1.0 + _ERF(x / math.sqrt(2.0))),
        "relu": lambda x: np.maximum(x, 0.0)}


def _naive_forward(cfg, params, tokens, mem_states, mem_mask, token_mask):
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  b_size, q_len = tokens.shape
  m_len = mem_mask.shape[1]
  k_len = m_len + q_len
  n_h, d_h, d = cfg.n_head, cfg.d_head, cfg.d_model
  key_valid = np.concatenate([mem_mask, token_mask], axis=1)
  h = p["word_emb"]["embedding"][tokens] * math.sqrt(d)
  for l in range(cfg.n_layer):
    lp = p[f"layer_{l}"]
    ap = lp["attn"]
    r_w = ap["r_w_bias"] if cfg.untie_r else p["r_w_bias"]
    r_r = ap["r_r_bias"] if cfg.untie_r else p["r_r_bias"]
    x = np.concatenate([np.asarray(mem_states[l], np.float64), h], axis=1)
    if cfg.pre_lnorm:
      x = _layer_norm(x, lp["attn_norm"], cfg.layer_norm_eps)
    w = ap["qkv"]["kernel"]
    q = np.einsum("bkd,dhn->bkhn", x, w[:, 0])[:, m_len:]
    k = np.einsum("bkd,dhn->bkhn", x, w[:, 1])
    v = np.einsum("bkd,dhn->bkhn", x, w[:, 2])
    out = np.zeros((b_size, q_len, n_h, d_h))
    for b in range(b_size):
      for hh in range(n_h):
        for i in range(q_len):
          scores, allowed = [], []
          for j in range(k_len):
            dist = m_len + i - j
            ok = bool(key_valid[b, j])
            if cfg.is_causal:
              ok &= dist >= 0 and (not cfg.same_length or dist < cfg.mem_len)
            if cfg.clamp_len > 0:
              dist = max(-cfg.clamp_len, min(cfg.clamp_len, dist))
            r = _sinusoid(dist, d) @ ap["r_net"]["kernel"][:, hh]
            scores.append(((q[b, i, hh] + r_w[hh]) @ k[b, j, hh]
                           + (q[b, i, hh] + r_r[hh]) @ r) / math.sqrt(d_h))
            allowed.append(ok)
          scores = np.where(allowed, scores, -np.inf)
          prob = np.exp(scores - scores.max())
          prob /= prob.sum()
          out[b, i, hh] = prob @ v[b, :, hh]
    a = np.einsum("bqhn,hnd->bqd", out, ap["out"]["kernel"])
    h = h + a if cfg.pre_lnorm else _layer_norm(h + a, lp["attn_norm"], cfg.layer_norm_eps)
    y = _layer_norm(h, lp["ff_norm"], cfg.layer_norm_eps) if cfg.pre_lnorm else h
    y = _ACT[cfg.activation](y @ lp["ff_in"]["kernel"] + lp["ff_in"]["bias"])
    y = y @ lp["ff_out"]["kernel"] + lp["ff_out"]["bias"]
    h = h + y if cfg.pre_lnorm else _layer_norm(h + y, lp["ff_norm"], cfg.layer_norm_eps)
  return h


def _memory(cfg, b_size, m_len, valid_from, seed):
  """Random memory whose first `valid_from[b]` slots of row b are invalid."""
  rng = np.random.default_rng(seed)
  states = tuple(jnp.asarray(rng.standard_normal((b_size, m_len, cfg.d_model)), jnp.float32)
                 for _ in range(cfg.n_layer))
  mask = np.arange(m_len)[None, :] >= np.asarray(valid_from)[:, None]
  return txl.Memory(states, jnp.asarray(mask))


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(clamp_len=3, pre_lnorm=True, untie_r=False, activation="relu"),
    dict(attention="causal", same_length=True, clamp_len=4),
    # The fused formulation (position term as the bias of jax.nn.dot_product_attention).
    dict(attention_impl="sdpa"),
    dict(attention_impl="sdpa", attention="causal", same_length=True, clamp_len=4),
    # Heads in one group, or one group per head (the CPU default is 2).
    dict(head_groups=1),
    dict(n_head=4, head_groups=4, attention="causal", same_length=True, clamp_len=4),
])
def test_matches_naive_loop(overrides):
  cfg = _config(**overrides)
  model = txl.TransformerXL(cfg)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (2, 5)).astype(np.int32)
  token_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  memory = _memory(cfg, 2, 4, valid_from=[0, 2], seed=1)
  params = _random_params(model, tokens)
  hidden, _ = model.apply({"params": params}, tokens, memory, token_mask)
  ref = _naive_forward(cfg, params, tokens, memory.states, np.asarray(memory.mask), token_mask)
  np.testing.assert_allclose(np.asarray(hidden), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_rel_shift_matches_gather(causal):
  q_len, k_len = 3, 7
  p_len = k_len if causal else k_len + q_len - 1
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, q_len, p_len)))
  shifted = np.asarray(kernels.rel_shift(x, k_len))
  for i in range(q_len):
    for j in range(k_len):
      dist = (k_len - q_len) + i - j
      if dist >= 0 or not causal:
        assert shifted[0, i, j] == x[0, i, k_len - 1 - dist]   # column of that distance
      else:
        assert shifted[0, i, j] == 0                            # no column: a future key


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_len,k_len", [(3, 7), (5, 5), (16, 48)])
def test_rel_shift_gradient_is_the_transpose(causal, q_len, k_len):
  # rel_shift's custom VJP (the opposite skew) against autodiff of a gather formulation.
  p_len = k_len if causal else k_len + q_len - 1
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 3, q_len, p_len)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((2, 3, q_len, k_len)), jnp.float32)

  def reference(x):
    col = np.arange(k_len)[None, :] + q_len - 1 - np.arange(q_len)[:, None]   # [Q, K]
    index = np.broadcast_to(np.minimum(col, p_len - 1), x.shape[:-1] + (k_len,))
    return jnp.where(col < p_len, jnp.take_along_axis(x, jnp.asarray(index), axis=-1), 0.0)

  out, vjp = jax.vjp(lambda x: kernels.rel_shift(x, k_len), x)
  ref_out, ref_vjp = jax.vjp(reference, x)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
  np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(ref_vjp(g)[0]))


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_padding_changes_nothing_at_valid_positions(attention):
  cfg = _config(attention=attention, clamp_len=5)
  model = txl.TransformerXL(cfg)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (2, 6)).astype(np.int32)
  token_mask = np.ones((2, 6), bool)
  token_mask[1, 4:] = False
  params = _random_params(model, tokens)
  memory = _memory(cfg, 2, 6, valid_from=[3, 6], seed=1)     # row 1: memory all invalid
  hidden, new_memory = model.apply({"params": params}, tokens, memory, token_mask)

  # Other ids at padded positions, other garbage in invalid memory slots.
  tokens2 = tokens.copy()
  tokens2[1, 4:] = (tokens[1, 4:] + 7) % cfg.vocab_size
  states2 = tuple(jnp.where(memory.mask[..., None], s, 100.0 * (s + 1.0)) for s in memory.states)
  hidden2, new_memory2 = model.apply({"params": params}, tokens2,
                                     txl.Memory(states2, memory.mask), token_mask)
  valid = token_mask
  np.testing.assert_allclose(np.asarray(hidden2)[valid], np.asarray(hidden)[valid], atol=1e-5)
  assert not np.allclose(np.asarray(hidden2)[~valid], np.asarray(hidden)[~valid])

  # Row 1 without any memory at all gives the same valid outputs as all-invalid memory.
  alone, _ = model.apply({"params": params}, tokens[1:], None, token_mask[1:])
  np.testing.assert_allclose(np.asarray(alone)[0, :4], np.asarray(hidden)[1, :4], atol=1e-5)

  # Padded tokens become invalid memory slots: mem_len 6 keeps the segment's 6 steps.
  np.testing.assert_array_equal(np.asarray(new_memory.mask), token_mask)
  np.testing.assert_array_equal(np.asarray(new_memory2.mask), token_mask)


@pytest.mark.parametrize("overrides", [dict(), dict(same_length=True, clamp_len=5),
                                       dict(pre_lnorm=True)])
def test_causal_segments_equal_one_pass(overrides):
  seg, n_seg = 4, 3
  cfg = _config(attention="causal", mem_len=seg * (n_seg - 1), **overrides)
  model = txl.TransformerXL(cfg)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, seg * n_seg)).astype(np.int32)
  params = _random_params(model, tokens)
  whole, _ = model.apply({"params": params}, tokens)
  apply = jax.jit(model.apply)
  memory = txl.init_memory(cfg, 3)                # fixed length, all invalid
  parts = []
  for s in range(n_seg):
    h, memory = apply({"params": params}, tokens[:, s * seg:(s + 1) * seg], memory)
    parts.append(np.asarray(h))
  np.testing.assert_allclose(np.concatenate(parts, axis=1), np.asarray(whole), atol=1e-5)
  assert memory.length == cfg.mem_len and bool(memory.mask.all())


def test_no_gradient_through_memory():
  cfg = _config(attention="causal")
  model = txl.TransformerXL(cfg)
  rng = np.random.default_rng(0)
  seg1, seg2 = (rng.integers(0, cfg.vocab_size, (2, 5)).astype(np.int32) for _ in range(2))
  params = _random_params(model, seg1)
  start = _memory(cfg, 2, cfg.mem_len, valid_from=[0, 0], seed=3)

  def two_segments(p, mem_states):
    h1, memory = model.apply({"params": p}, seg1, txl.Memory(mem_states, start.mask))
    h2, _ = model.apply({"params": p}, seg2, memory)
    return jnp.sum(h2 ** 2), jnp.sum(h1 ** 2)

  def second_only(p, memory):
    h2, _ = model.apply({"params": p}, seg2, memory)
    return jnp.sum(h2 ** 2)

  g_params, g_mem = jax.grad(lambda p, m: two_segments(p, m)[0], argnums=(0, 1))(
      params, start.states)
  # Nothing flows back into segment 1 or its memory: same as treating the memory as a constant.
  assert all(float(jnp.abs(g).max()) == 0.0 for g in g_mem)
  _, memory1 = model.apply({"params": params}, seg1, start)
  g_const = jax.grad(second_only)(params, memory1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_params, g_const)
  # The test can fail: segment 1's own output does depend on the memory it reads.
  g_first = jax.grad(lambda m: two_segments(params, m)[1])(start.states)
  assert all(float(jnp.abs(g).max()) > 0.0 for g in g_first)


def test_zero_length_and_fixed_memory_agree_bidirectional():
  cfg = _config()
  model = txl.TransformerXL(cfg)
  rng = np.random.default_rng(0)
  segs = [rng.integers(0, cfg.vocab_size, (2, q)).astype(np.int32) for q in (4, 9, 3)]
  params = _random_params(model, segs[0])
  mem_a, mem_b = None, txl.init_memory(cfg, 2)
  seen = 0
  for tokens in segs:
    h_a, mem_a = model.apply({"params": params}, tokens, mem_a)
    h_b, mem_b = model.apply({"params": params}, tokens, mem_b)
    np.testing.assert_allclose(np.asarray(h_a), np.asarray(h_b), atol=1e-5)
    seen += tokens.shape[1]
    # Zero-length memory grows to mem_len then stays; fixed memory is always mem_len long.
    assert mem_a.length == min(cfg.mem_len, seen) and mem_b.length == cfg.mem_len
    np.testing.assert_array_equal(np.asarray(mem_b.mask)[:, -mem_a.length:], True)
    np.testing.assert_allclose(np.asarray(mem_b.states[1])[:, -mem_a.length:],
                               np.asarray(mem_a.states[1]), atol=1e-5)


def test_mems_tuple_form_and_reset():
  cfg = _config()
  model = txl.TransformerXL(cfg)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 4)).astype(np.int32)
  params = _random_params(model, tokens)
  memory = _memory(cfg, 2, 3, valid_from=[0, 0], seed=1)
  h_mem, _ = model.apply({"params": params}, tokens, memory)
  h_tuple, new = model.apply({"params": params}, tokens, mems=memory.states)
  np.testing.assert_allclose(np.asarray(h_tuple), np.asarray(h_mem), atol=1e-6)
  assert isinstance(new, txl.Memory) and new.length == 6
  # reset clears row 1's memory: its output equals running without memory.
  h_reset, _ = model.apply({"params": params}, tokens, memory.reset(np.array([False, True])))
  h_none, _ = model.apply({"params": params}, tokens)
  np.testing.assert_allclose(np.asarray(h_reset)[1], np.asarray(h_none)[1], atol=1e-5)
  np.testing.assert_allclose(np.asarray(h_reset)[0], np.asarray(h_mem)[0], atol=1e-6)


def test_bf16_compute_fp32_params():
  cfg = _config(attention="causal", n_layer=2)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)).astype(np.int32)
  model32 = txl.TransformerXL(cfg)
  params = _random_params(model32, tokens)
  model16 = txl.TransformerXL(dataclasses.replace(cfg, dtype="bfloat16"))
  variables16 = model16.init(jax.random.key(0), tokens)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(variables16)))
  memory = txl.init_memory(model16.config, 2)
  assert memory.states[0].dtype == jnp.bfloat16
  h16, mem16 = model16.apply({"params": params}, tokens[:, :4], memory)
  h16b, _ = model16.apply({"params": params}, tokens[:, 4:], mem16)
  h32, mem32 = model32.apply({"params": params}, tokens[:, :4], txl.init_memory(cfg, 2))
  h32b, _ = model32.apply({"params": params}, tokens[:, 4:], mem32)
  assert h16.dtype == jnp.bfloat16 and mem16.states[0].dtype == jnp.bfloat16
  # Stated tolerance: hidden states are LayerNorm outputs of size ~1; bf16 keeps 8 mantissa bits,
  # so after 2 layers and 2 segments we allow 0.1 max and 0.02 mean absolute difference
  # (measured: 0.046 max, 0.008 mean).
  for lo, hi in ((h16, h32), (h16b, h32b)):
    diff = np.abs(np.asarray(lo, np.float32) - np.asarray(hi))
    assert np.isfinite(diff).all()
    assert diff.max() < 0.1 and diff.mean() < 0.02, (diff.max(), diff.mean())


def test_dropout_and_remat():
  cfg = _config(dropout=0.1, dropatt=0.1)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 5)).astype(np.int32)
  model = txl.TransformerXL(cfg)
  params = _random_params(model, tokens)
  remat = txl.TransformerXL(dataclasses.replace(cfg, remat=True))
  rngs = {"dropout": jax.random.key(1)}

  def loss(p, m):
    h, _ = m.apply({"params": p}, tokens, deterministic=False, rngs=rngs)
    return jnp.sum(h ** 2)

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  l1, g1 = grad(params, model)
  l2, g2 = grad(params, remat)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g2)
  h_eval, _ = model.apply({"params": params}, tokens)
  h_train, _ = model.apply({"params": params}, tokens, deterministic=False, rngs=rngs)
  assert not np.allclose(np.asarray(h_eval), np.asarray(h_train))


def test_variants_and_layer_names():
  tiny = txl.get_variant("tiny")
  assert (tiny.d_model, tiny.n_layer, tiny.mem_len) == (64, 2, 32)
  base = txl.get_variant("base", attention="causal")
  assert (base.vocab_size, base.d_model, base.n_layer, base.n_head, base.d_inner) == (
      50000, 768, 12, 12, 3072)
  assert base.mem_len + txl.SEGMENT_LEN["base"] == 1024 and base.attention == "causal"
  abstract = jax.eval_shape(heads.PretrainModel(txl.get_variant("small")).init,
                            jax.random.key(0), jax.ShapeDtypeStruct((1, 4), jnp.int32))
  names = sorted(abstract["params"]["backbone"])
  assert [n for n in names if n.startswith("layer_")] == [f"layer_{i}" for i in range(4)]
  count = heads.count_params(base)
  assert 125e6 < count < 135e6, count     # 38.4M embedding + 12 x ~7.7M


def test_heads_shapes_and_tying():
  cfg = _config(n_token_types=2)
  b, q, p = 3, 7, 2
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (b, q)).astype(np.int32)
  types = (np.arange(q) >= 4).astype(np.int32)[None].repeat(b, 0)
  positions = rng.integers(0, q, (b, p)).astype(np.int32)
  model = heads.PretrainModel(cfg, num_kg_labels=2)
  variables = model.init(jax.random.key(0), tokens, None, None, types, positions)
  assert sorted(variables["params"]) == ["backbone", "kg_head", "mlm_head", "nsp_head"]
  assert sorted(nn.unbox(variables)["params"]["mlm_head"]) == ["bias", "dense", "norm"]
  params = nn.unbox(variables["params"])
  out, memory = model.apply({"params": params}, tokens, None, None, types, positions)
  assert out["mlm_logits"].shape == (b, p, cfg.vocab_size)
  assert out["mlm_logits"].dtype == jnp.float32
  assert out["nsp_logits"].shape == (b, 2)
  assert out["hidden"].shape == (b, q, cfg.d_model) and out["pooled"].shape == (b, cfg.d_model)
  assert memory.length == cfg.mem_len
  # Gathering before the head == the head at every position, then picking.
  full, _ = model.apply({"params": params}, tokens, None, None, types)
  assert full["mlm_logits"].shape == (b, q, cfg.vocab_size)
  picked = np.take_along_axis(np.asarray(full["mlm_logits"]), positions[..., None], axis=1)
  np.testing.assert_allclose(np.asarray(out["mlm_logits"]), picked, atol=1e-5)
  # The output projection is the word embedding (tied).
  bumped = jax.tree.map(lambda x: x, params)
  bumped["backbone"]["word_emb"]["embedding"] = params["backbone"]["word_emb"]["embedding"] * 0
  zeroed, _ = model.apply({"params": bumped}, tokens, None, None, types, positions)
  np.testing.assert_allclose(np.asarray(zeroed["mlm_logits"]),
                             np.broadcast_to(params["mlm_head"]["bias"], (b, p, cfg.vocab_size)))
  kg = model.apply({"params": params}, tokens[:, :5], np.ones((b, 5), bool),
                   method=heads.PretrainModel.kg_logits)
  assert kg.shape == (b, 2)

  for multi_label, n in ((False, 3), (True, 4)):
    clf = heads.Classifier(_config(), num_classes=n, multi_label=multi_label)
    v = clf.init(jax.random.key(0), tokens)
    assert sorted(v["params"]) == ["backbone", "cls_head"]
    logits, aux = clf.apply(v, tokens, np.ones((b, q), bool))
    assert logits.shape == (b, n) and aux["pooled"].shape == (b, cfg.d_model)
    assert aux["hidden"].shape == (b, q, cfg.d_model)


def test_mean_pooling_reads_the_real_tokens_only():
  """pooling="mean": same parameters as "cls"; padding (any amount) leaves the logits unchanged,
  and the pooled vector is the mean of the real positions' hidden states."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, 50, (2, 6)).astype(np.int32)
  mask = np.array([[True] * 6, [True] * 4 + [False] * 2])
  cls_model = heads.Classifier(_config(), num_classes=3)
  mean_model = heads.Classifier(_config(pooling="mean"), num_classes=3)
  params = _random_params(mean_model, tokens)
  assert jax.tree.structure(params) == jax.tree.structure(_random_params(cls_model, tokens))
  logits, aux = mean_model.apply({"params": params}, tokens, mask)
  hidden = np.asarray(aux["hidden"])
  pooler = params["cls_head"]["pooler"]
  for r, n in enumerate((6, 4)):
    summary = hidden[r, :n].mean(axis=0)
    expected = np.tanh(summary @ np.asarray(pooler["kernel"]) + np.asarray(pooler["bias"]))
    np.testing.assert_allclose(np.asarray(aux["pooled"][r]), expected, rtol=1e-5, atol=1e-5)
  padded = np.concatenate([tokens, np.zeros((2, 5), np.int32)], axis=1)
  padded_mask = np.concatenate([mask, np.zeros((2, 5), bool)], axis=1)
  again, _ = mean_model.apply({"params": params}, padded, padded_mask)
  np.testing.assert_allclose(np.asarray(again), np.asarray(logits), rtol=1e-5, atol=1e-5)
  cls_logits, _ = cls_model.apply({"params": params}, tokens, mask)
  assert not np.allclose(np.asarray(cls_logits), np.asarray(logits))
  with pytest.raises(ValueError, match=r"pooling='max'.*cls, mean"):
    _config(pooling="max")


def test_ngram_bag_hashes_real_tokens_and_pairs_only():
  tokens = np.array([[2, 7, 9, 3, 0, 0], [2, 7, 9, 7, 9, 3]], np.int32)
  mask = tokens != 0
  ids, valid = heads.ngram_ids(tokens, mask, 101)
  ids, valid = np.asarray(ids), np.asarray(valid)
  assert ids.shape == valid.shape == (2, 11) and ids.min() >= 0 and ids.max() < 101
  assert valid[0].tolist() == [True] * 4 + [False] * 2 + [True] * 3 + [False] * 2
  # The same n-gram hashes to the same bucket wherever it is: "7 9" twice in row 1, once in row 0.
  assert ids[1, 6 + 1] == ids[1, 6 + 3] == ids[0, 6 + 1]
  assert ids[0, 1] == ids[1, 1] == ids[1, 3]
  model = heads.Classifier(_config(pooling="mean", ngram_buckets=101), num_classes=3)
  variables = model.init(jax.random.key(0), tokens)
  table = variables["params"]["cls_head"]["ngram_emb"]
  assert table.value.shape == (101, _config().d_model) and table.names == ("vocab", "embed")
  wide = variables["params"]["cls_head"]["ngram_out"]["kernel"]  # the bag's own path to the logits
  assert wide.value.shape == (_config().d_model, 3) and wide.names == ("embed", "classes")
  params = nn.unbox(variables["params"])
  logits, _ = model.apply({"params": params}, tokens, mask)
  padded = np.concatenate([tokens, np.zeros((2, 3), np.int32)], axis=1)
  again, _ = model.apply({"params": params}, padded, padded != 0)
  np.testing.assert_allclose(np.asarray(again), np.asarray(logits), rtol=1e-5, atol=1e-5)
  params["cls_head"]["ngram_emb"] = params["cls_head"]["ngram_emb"] * 2
  assert not np.allclose(np.asarray(model.apply({"params": params}, tokens, mask)[0]),
                         np.asarray(logits))


def test_bad_input_raises():
  with pytest.raises(ValueError, match=r"variant 'huge'.*tiny, small, base"):
    txl.get_variant("huge")
  with pytest.raises(ValueError, match=r"activation='swish'.*gelu, relu, relu6"):
    txl.get_variant("tiny", activation="swish")
  with pytest.raises(ValueError, match=r"attention='both'.*bidirectional, causal"):
    txl.get_variant("tiny", attention="both")
  with pytest.raises(ValueError, match=r"field\(s\) \['layers'\]"):
    txl.get_variant("tiny", layers=3)
  with pytest.raises(ValueError, match="same_length=True needs attention='causal'"):
    txl.get_variant("tiny", same_length=True)
  with pytest.raises(ValueError, match="dtype='int8'"):
    txl.get_variant("tiny", dtype="int8")

  cfg = _config()
  model = txl.TransformerXL(cfg)
  tokens = np.zeros((2, 4), np.int32)
  variables = model.init(jax.random.key(0), tokens)
  apply = jax.jit(model.apply)           # shape errors surface while tracing, before compiling
  with pytest.raises(ValueError, match=r"tokens must have shape \[batch, length\].*\(8,\)"):
    apply(variables, np.zeros((8,), np.int32))
  with pytest.raises(ValueError, match=r"tokens contains 50, outside the vocabulary \[0, 49\]"):
    model.apply(variables, np.full((2, 4), 50, np.int32))
  with pytest.raises(ValueError, match=r"tokens contains -1"):
    model_config.check_inputs(cfg, np.full((2, 4), -1, np.int32))
  with pytest.raises(ValueError, match="integer ids"):
    model.apply(variables, np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match=r"mems has 1 arrays; the model has n_layer=2"):
    apply(variables, tokens, mems=(jnp.zeros((2, 3, 16)),))
  with pytest.raises(ValueError, match=r"mems\[1\] has shape \(2, 3, 8\).*d_model=16"):
    apply(variables, tokens, mems=(jnp.zeros((2, 3, 16)), jnp.zeros((2, 3, 8))))
  with pytest.raises(ValueError, match=r"memory.states\[0\] has shape \(3, 3, 16\).*batch=2"):
    apply(variables, tokens, txl.init_memory(cfg, 3, length=3))
  with pytest.raises(ValueError, match="memory.mask has shape"):
    mem = txl.init_memory(cfg, 2, length=3)
    apply(variables, tokens, txl.Memory(mem.states, mem.mask[:, :2]))
  with pytest.raises(ValueError, match="token_mask shape"):
    apply(variables, tokens, None, np.ones((2, 5), bool))
  with pytest.raises(ValueError, match="n_token_types=0"):
    apply(variables, tokens, None, None, tokens)
  with pytest.raises(ValueError, match="not both"):
    model.apply(variables, tokens, txl.init_memory(cfg, 2), mems=txl.init_memory(cfg, 2).states)
  pre = heads.PretrainModel(cfg)
  pv = pre.init(jax.random.key(0), tokens)
  with pytest.raises(ValueError, match=r"mlm_positions contains 4, outside the segment"):
    pre.apply(pv, tokens, mlm_positions=np.array([[0, 4], [1, 2]], np.int32))
  with pytest.raises(ValueError, match="kg_logits needs a knowledge head"):
    pre.apply(pv, tokens, method=heads.PretrainModel.kg_logits)
  with pytest.raises(ValueError, match="num_classes=1"):
    heads.Classifier(cfg, num_classes=1).init(jax.random.key(0), tokens)


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_fused_attention_gradients_match_einsum(attention):
  """attention_impl='sdpa' (the formulation cuDNN runs) has einsum's outputs and gradients."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50, (2, 5)).astype(np.int32)
  token_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  results = []
  for impl in ("einsum", "sdpa"):
    cfg = _config(attention=attention, attention_impl=impl)
    model = txl.TransformerXL(cfg)
    memory = _memory(cfg, 2, 4, valid_from=[0, 2], seed=1)
    params = _random_params(model, tokens)

    def loss(p, model=model, memory=memory):
      hidden, _ = model.apply({"params": p}, tokens, memory, token_mask)
      return (hidden * jnp.arange(hidden.shape[-1])).sum()
    results.append(jax.value_and_grad(loss)(params))
  (l0, g0), (l1, g1) = results
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("memory_len", [0, 4])
def test_head_groups_gradients_match(memory_len):
  """Attention in 1, 2 or 4 head groups: the same loss and gradients (memory off and on)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50, (2, 5)).astype(np.int32)
  token_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  results = []
  for groups in (1, 2, 4):
    cfg = _config(n_head=4, head_groups=groups)
    model = txl.TransformerXL(cfg)
    memory = _memory(cfg, 2, memory_len, valid_from=[0, 2], seed=1) if memory_len else None
    params = _random_params(model, tokens)

    def loss(p, model=model, memory=memory):
      hidden, _ = model.apply({"params": p}, tokens, memory, token_mask)
      return (hidden * jnp.arange(hidden.shape[-1])).sum()
    results.append(jax.value_and_grad(loss)(params))
  (l0, g0), *rest = results
  for l1, g1 in rest:
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
      np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


def test_attention_impl_choice():
  assert txl.get_variant("tiny").attention_impl == "auto"
  # "auto" takes cuDNN only on an NVIDIA GPU with bf16/fp16 compute: einsum on this CPU.
  assert txl.get_variant("tiny", dtype="bfloat16").attention_kernel(deterministic=True) == "einsum"
  assert txl.get_variant("tiny", attention_impl="sdpa").attention_kernel(False) == "sdpa"
  with pytest.raises(ValueError, match=r"attention_impl='flash'.*einsum, sdpa, cudnn, auto"):
    txl.get_variant("tiny", attention_impl="flash")
  with pytest.raises(ValueError, match=r"'cudnn' needs dtype bfloat16 or float16.*float32"):
    txl.get_variant("tiny", attention_impl="cudnn")
  with pytest.raises(ValueError, match=r"'sdpa' has no attention-probability dropout"):
    txl.get_variant("tiny", attention_impl="sdpa", dropatt=0.1)
  # Head groups: auto is 2 on CPU when n_head is even; an explicit value must divide n_head.
  assert txl.get_variant("tiny").attention_groups() == 2
  assert txl.get_variant("tiny", n_head=3).attention_groups() == 1
  assert txl.get_variant("tiny", head_groups=4).attention_groups() == 4
  for bad in (3, -1, 2.0):
    with pytest.raises(ValueError, match=rf"head_groups={bad!r}: must be 0 \(auto\) or a "
                                         r"divisor of n_head=4"):
      txl.get_variant("tiny", head_groups=bad)


def test_package_exports():
  assert r1model.TransformerXL is txl.TransformerXL
  assert r1model.get_variant("tiny") == txl.get_variant("tiny")


@pytest.mark.parametrize("n_types", [1, 2, 3, 6])
def test_token_type_embedding_equals_lookup(n_types):
  # The select chain (T <= 4) and the one-hot product (T > 4): values and table gradient of a
  # plain lookup.
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.standard_normal((n_types, 8)), jnp.float32)
  types = jnp.asarray(rng.integers(0, n_types, (3, 5)), jnp.int32)
  g = jnp.asarray(rng.standard_normal((3, 5, 8)), jnp.float32)
  out, vjp = jax.vjp(lambda t: txl._token_type_embedding(types, t), table)
  ref_out, ref_vjp = jax.vjp(lambda t: t[types], table)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
  np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(ref_vjp(g)[0]), rtol=1e-6, atol=1e-6)
