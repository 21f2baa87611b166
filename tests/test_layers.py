"""The DDiT's layers against closed forms: sigma embedding, rotary tables and rotation,
LayerNorm, modulate, the scale_by_sigma head, torch's init bounds, and dropout's bits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sedd_jax.model import layers


def test_timestep_embedding_is_cos_then_sin_of_geometric_frequencies():
  sigma = jnp.array([0.0, 0.5, 3.0])
  emb = np.asarray(layers.timestep_embedding(sigma, dim=8))
  freqs = np.exp(-math.log(10_000) * np.arange(4) / 4)
  args = np.asarray(sigma)[:, None] * freqs[None]
  np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], -1), rtol=1e-6,
                             atol=1e-6)
  odd = layers.timestep_embedding(sigma, dim=7)  # odd sizes end in a zero column
  assert odd.shape == (3, 7) and float(jnp.abs(odd[:, -1]).max()) == 0.0


def test_apply_rotary_rotates_each_pair_by_its_angle():
  """Rotate-half: (x_i, x_{i + Dh/2}) turns by angle p * base^(-2i/Dh), norms kept."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  cos, sin = layers.rotary_cos_sin(5, 8)
  y = np.asarray(layers.apply_rotary(x, cos, sin))
  xn = np.asarray(x)
  p = np.arange(5)[:, None]
  theta = p * 10_000.0 ** (-2 * np.arange(4) / 8)  # (L, Dh/2)
  c, s = np.cos(theta)[None, :, None], np.sin(theta)[None, :, None]
  want = np.concatenate([xn[..., :4] * c - xn[..., 4:] * s, xn[..., 4:] * c + xn[..., :4] * s], -1)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(xn, axis=-1), rtol=1e-5)
  assert layers.apply_rotary(x.astype(jnp.bfloat16), cos, sin).dtype == jnp.bfloat16


def test_layer_norm_and_modulate():
  x = np.random.default_rng(0).normal(size=(2, 3, 6)).astype(np.float32) * 4 + 1
  norm = layers.LayerNorm(6)
  want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  out = norm(jnp.asarray(x, jnp.bfloat16))
  assert out.dtype == jnp.float32  # always float32
  np.testing.assert_allclose(norm(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
  shift, scale = jnp.full((2, 1, 6), 0.5), jnp.full((2, 1, 6), -0.25)
  np.testing.assert_allclose(layers.modulate(jnp.asarray(x), shift, scale), x * 0.75 + 0.5,
                             rtol=1e-6)


def test_score_head_scales_by_sigma_and_zeroes_the_input_token():
  d = 5
  out = jnp.ones((2, 3, d))
  idx = jnp.array([[0, 4, 2], [1, 1, 3]], jnp.int32)
  sigma = jnp.array([0.3, 2.0])  # both branches of expm1 / exp - 1
  got = np.asarray(layers.score_head(out, sigma, idx, scale_by_sigma=True))
  for b in range(2):
    want = 1.0 - math.log(math.expm1(float(sigma[b]))) - math.log(d - 1)
    for i in range(3):
      row = np.full(d, want, np.float32)
      row[int(idx[b, i])] = 0.0
      np.testing.assert_allclose(got[b, i], row, rtol=1e-6)
  plain = np.asarray(layers.score_head(out, sigma, idx, scale_by_sigma=False))
  assert plain.sum() == 2 * 3 * (d - 1)


def test_linear_uses_torch_init_bounds_or_zeros():
  layer = layers.linear(nnx.Rngs(0), 16, 32)
  bound = 1 / math.sqrt(16)
  w, b = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
  assert w.shape == (16, 32) and np.abs(w).max() <= bound and np.abs(b).max() <= bound
  assert np.abs(w).max() > 0.8 * bound  # uniform over the whole range, not a narrow normal
  assert layer.precision == jax.lax.Precision.HIGHEST  # float32 is not TF32
  zero = layers.linear(nnx.Rngs(0), 16, 32, dtype=jnp.bfloat16, zero=True, bias=False)
  assert float(jnp.abs(zero.kernel[...]).max()) == 0.0 and zero.bias is None
  assert zero.precision is None and zero.kernel[...].dtype == jnp.float32


def test_dropout_bits_rejects_an_unknown_generator():
  with pytest.raises(ValueError, match="dropout rng 'philox'"):
    layers.dropout_bits(jax.random.key(0), (4,), "philox")
  x = jnp.ones((4,))
  assert layers.dropout(x, 0.0, jax.random.key(0)) is x  # rate 0: the input itself


@pytest.mark.parametrize("impl", layers.DROPOUT_RNGS)
def test_dropout_bits_keep_the_right_fraction_independently(impl):
  """Keep fraction within 5 binomial sigmas of 1 - rate; masks of two keys and of neighbouring
  elements agree as often as independent draws do; kept values are scaled by 1 / (1 - rate)."""
  rate, shape = 0.3, (8, 64, 96)
  n = math.prod(shape)
  x = jnp.ones(shape, jnp.float32)
  a = np.asarray(layers.dropout(x, rate, jax.random.key(0), impl))
  b = np.asarray(layers.dropout(x, rate, jax.random.key(1), impl))
  np.testing.assert_array_equal(a, layers.dropout(x, rate, jax.random.key(0), impl))
  assert set(np.unique(a)) <= {0.0, np.float32(1 / 0.7)}
  sigma = math.sqrt(rate * (1 - rate) / n)
  keep_a, keep_b = a > 0, b > 0
  assert abs(keep_a.mean() - 0.7) < 5 * sigma
  agree = 0.7**2 + 0.3**2  # P(two independent masks agree)
  assert abs((keep_a == keep_b).mean() - agree) < 5 * math.sqrt(agree * (1 - agree) / n)
  for axis in range(3):  # neighbours along every axis
    same = (np.diff(keep_a.astype(np.int8), axis=axis) == 0).mean()
    assert abs(same - agree) < 5 * math.sqrt(agree * (1 - agree) / n) * 2, (axis, same)


def test_rotary_positions_restart_per_sequence():
  pos = jnp.array([[0, 1, 2, 0, 1, 0]], jnp.int32)
  cos, sin = layers.rotary_cos_sin(6, 8, positions=pos)
  ref_cos, ref_sin = layers.rotary_cos_sin(3, 8)
  assert cos.shape == (1, 6, 8)
  for start, n in ((0, 3), (3, 2), (5, 1)):
    np.testing.assert_array_equal(cos[0, start:start + n], ref_cos[:n])
    np.testing.assert_array_equal(sin[0, start:start + n], ref_sin[:n])
  # closed form: angle(p, i) = p * 10000^(-2i/Dh) for the first half
  np.testing.assert_allclose(cos[0, 2, 1], np.cos(2 * 10000 ** (-2 / 8)), rtol=1e-6)
