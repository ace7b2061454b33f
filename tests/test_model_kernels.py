"""The model's speed/memory building blocks equal the plain versions they replace.

`keep_mask`/`Dropout` (hash-based masks), `layer_norm` and `softmax` (custom VJPs), `Dense` (2-D
matmul) and `_project` are checked against flax / jax references, values and gradients.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.model import kernels
from r1jax.model import transformer_xl as txl


def test_keep_mask_rate_and_independence():
  seeds = kernels.dropout_seeds(jax.random.key(0))
  mask = np.asarray(kernels.keep_mask(seeds, (64, 1024), 0.9), np.float64).ravel()
  # 65536 draws: the rate is within 5 standard deviations of 0.9.
  assert abs(mask.mean() - 0.9) < 5 * np.sqrt(0.09 / mask.size)
  other = np.asarray(kernels.keep_mask(kernels.dropout_seeds(jax.random.key(1)), (64, 1024), 0.9),
                     np.float64).ravel()
  for a, b in ((mask, other), (mask[:-1], mask[1:]), (mask[:-1024], mask[1024:])):
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.02
  assert not np.array_equal(mask, other)
  np.testing.assert_array_equal(mask, np.asarray(kernels.keep_mask(seeds, (64, 1024), 0.9)).ravel())
  assert np.asarray(kernels.keep_mask(seeds, (1000,), 1.0)).all()


def test_keep_mask_counts_the_flat_element_index():
  # The per-axis sum is the row-major flat index: any shape gives the flat mask, reshaped.
  seeds = kernels.dropout_seeds(jax.random.key(5))
  flat = np.asarray(kernels.keep_mask(seeds, (4 * 8 * 32,), 0.7))
  for shape in ((4, 8, 32), (32, 32), (4, 256), (1, 4, 1, 8, 32)):
    np.testing.assert_array_equal(np.asarray(kernels.keep_mask(seeds, shape, 0.7)).ravel(), flat)
  assert np.asarray(kernels.keep_mask(seeds, (), 1.0)).shape == ()
  assert np.asarray(kernels.keep_mask(seeds, (3, 0, 2), 0.5)).shape == (3, 0, 2)


@pytest.mark.parametrize("activation", sorted(kernels.ACTIVATIONS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_activation_dropout_equals_autodiff_of_the_two(activation, dtype):
  x = (jax.random.normal(jax.random.key(0), (4, 16, 64)) * 3).astype(dtype)
  w = jax.random.normal(jax.random.key(1), x.shape).astype(dtype)
  seeds = kernels.dropout_seeds(jax.random.key(2))
  act = kernels.ACTIVATIONS[activation]

  def plain(x):
    return jnp.sum((kernels.apply_dropout(act(x), seeds, 0.8) * w).astype(jnp.float32))

  def fused(x):
    return jnp.sum((kernels.activation_dropout(x, seeds, 0.8, activation) * w).astype(jnp.float32))

  tol = 1e-6 if dtype == jnp.float32 else 2e-2
  f32 = lambda a: np.asarray(a, np.float32)
  np.testing.assert_allclose(f32(kernels.activation_dropout(x, seeds, 0.8, activation)),
                             f32(kernels.apply_dropout(act(x), seeds, 0.8)), rtol=tol, atol=tol)
  g_plain, g_fused = f32(jax.grad(plain)(x)), f32(jax.grad(fused)(x))
  np.testing.assert_allclose(g_fused, g_plain, rtol=tol, atol=10 * tol)
  assert (g_fused != 0).mean() > 0.3   # the gradient is not trivially zero
  layer = txl.Dropout(0.2)
  np.testing.assert_array_equal(f32(layer.apply({}, x, True, activation=activation)), f32(act(x)))


def test_keep_mask_refuses_counter_overflow():
  with pytest.raises(ValueError, match="2\\^32"):
    kernels.keep_mask(jnp.zeros(2, jnp.uint32), (2 ** 16, 2 ** 16), 0.5)


def test_dropout_scales_kept_entries_and_is_off_when_deterministic():
  x = jnp.ones((8, 256))
  layer = txl.Dropout(0.25)
  y = np.asarray(layer.apply({}, x, False, rngs={"dropout": jax.random.key(3)}))
  assert set(np.unique(y).tolist()) <= {0.0, float(np.float32(1.0) / np.float32(0.75))}
  assert 0.6 < (y > 0).mean() < 0.9
  np.testing.assert_array_equal(layer.apply({}, x, True), x)
  np.testing.assert_array_equal(txl.Dropout(0.0).apply({}, x, False), x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_matches_flax(dtype):
  x = jax.random.normal(jax.random.key(0), (3, 5, 16)) * 3 + 1
  ours = txl.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32)
  ref = nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape),
                        nn.unbox(ours.init(jax.random.key(2), x)))
  assert jax.tree.structure(params) == jax.tree.structure(ref.init(jax.random.key(2), x))
  w = jax.random.normal(jax.random.key(4), x.shape)

  def loss(p, x, m):
    return jnp.sum(m.apply(p, x).astype(jnp.float32) * w)

  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(np.asarray(ours.apply(params, x), np.float32),
                             np.asarray(ref.apply(params, x), np.float32), rtol=tol, atol=tol)
  g1 = jax.grad(loss, argnums=(0, 1))(params, x, ours)
  g2 = jax.grad(loss, argnums=(0, 1))(params, x, ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol * 10, atol=tol * 10), g1, g2)


def test_softmax_gradient_matches_jax():
  x = jax.random.normal(jax.random.key(0), (2, 3, 7)) * 4
  x = x.at[..., 0].set(-1e9)  # a masked entry, as in attention
  w = jax.random.normal(jax.random.key(1), x.shape)
  np.testing.assert_allclose(kernels.softmax(x), jax.nn.softmax(x, axis=-1), rtol=1e-6, atol=1e-7)
  g1 = jax.grad(lambda x: jnp.sum(kernels.softmax(x) * w))(x)
  g2 = jax.grad(lambda x: jnp.sum(jax.nn.softmax(x, axis=-1) * w))(x)
  np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)


def test_dense_matches_flax_dense():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  kw = dict(kernel_init=nn.initializers.normal(0.5), bias_init=nn.initializers.normal(0.5),
            dtype=jnp.float32, param_dtype=jnp.float32)
  ours, ref = txl.Dense(5, **kw), nn.Dense(5, **kw)
  params = ours.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref.init(jax.random.key(1), x))
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-6)
  g1 = jax.grad(lambda p: jnp.sum(ours.apply(p, x) ** 2))(params)
  g2 = jax.grad(lambda p: jnp.sum(ref.apply(p, x) ** 2))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), g1, g2)
  assert "bias" not in txl.Dense(5, use_bias=False, **kw).init(jax.random.key(1), x)["params"]


def test_project_is_an_einsum():
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
  k = jax.random.normal(jax.random.key(1), (4, 5, 6))
  np.testing.assert_allclose(txl._project(x, k, in_axes=2),  # pylint: disable=protected-access
                             jnp.einsum("bqhn,hnd->bqd", x, k), rtol=1e-5, atol=1e-5)
  k3 = jax.random.normal(jax.random.key(2), (5, 3, 2, 4))
  np.testing.assert_allclose(txl._project(x[:, :, 0], k3),  # pylint: disable=protected-access
                             jnp.einsum("bkd,dthn->bkthn", x[:, :, 0], k3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_in,n_out", [(12, 5), (5, 12), (6, 6)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_gradients_match_the_plain_product(n_in, n_out, dtype):
  # I > O takes the transposed weight-gradient route; both routes must give the plain gradients.
  x = jax.random.normal(jax.random.key(0), (7, n_in)).astype(dtype)
  w = jax.random.normal(jax.random.key(1), (n_in, n_out)).astype(dtype)
  t = jax.random.normal(jax.random.key(2), (7, n_out))
  ours = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(kernels.matmul(x, w) * t), argnums=(0, 1)))
  ref = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum((x @ w) * t), argnums=(0, 1)))
  (v1, (dx1, dw1)), (v2, (dx2, dw2)) = ours(x, w), ref(x, w)
  assert dw1.shape == w.shape and dw1.dtype == w.dtype and dx1.dtype == x.dtype
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  for a, b in ((v1, v2), (dx1, dx2), (dw1, dw2)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("n", [2, 3])
def test_split_head_major_equals_transpose_and_index(n):
  x = jax.random.normal(jax.random.key(0), (2, 5, n, 3, 4))     # [B, K, n, H, D]
  ws = [jax.random.normal(jax.random.key(i + 1), (3, 2, 5, 4)) for i in range(n)]

  def plain(x):
    t = jnp.transpose(x, (2, 3, 0, 1, 4))
    return sum(jnp.sum(t[i] * w) for i, w in enumerate(ws))

  def ours(x):
    return sum(jnp.sum(p * w) for p, w in zip(kernels.split_head_major(x), ws))

  parts = kernels.split_head_major(x)
  assert len(parts) == n and all(p.shape == (3, 2, 5, 4) for p in parts)
  for i, p in enumerate(parts):
    np.testing.assert_array_equal(p, jnp.transpose(x[:, :, i], (2, 0, 1, 3)))
  np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(plain)(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tied_decoder_equals_einsum(monkeypatch, backend, dtype):
  from r1jax.model import heads  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(heads.jax, "default_backend", lambda: backend)
  x = jax.random.normal(jax.random.key(0), (2, 5, 16)).astype(dtype)
  emb = jax.random.normal(jax.random.key(1), (40, 16)).astype(dtype)
  bias = jax.random.normal(jax.random.key(2), (40,))
  w = jax.random.normal(jax.random.key(3), (2, 5, 40))

  def ours(x, emb, bias):
    return jnp.sum(heads._decode(x, emb, bias) * w)

  def plain(x, emb, bias):
    logits = jnp.einsum("bpd,vd->bpv", x, emb, preferred_element_type=jnp.float32) + bias
    return jnp.sum(logits * w)

  assert heads._decode(x, emb, bias).dtype == jnp.float32
  np.testing.assert_allclose(ours(x, emb, bias), plain(x, emb, bias), rtol=1e-5)
  for a, b in zip(jax.grad(ours, (0, 1, 2))(x, emb, bias), jax.grad(plain, (0, 1, 2))(x, emb, bias)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5,
                               atol=1e-5)
