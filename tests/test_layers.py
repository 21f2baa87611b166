"""The DDiT's layers against closed forms: sigma embedding, rotary tables and rotation,
LayerNorm, modulate, the scale_by_sigma head, torch's init bounds, and dropout's bits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

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


def _gelu_tanh_grad_f64(h: np.ndarray) -> np.ndarray:
  """d/dh of 0.5 h (1 + tanh(c (h + 0.044715 h^3))), c = sqrt(2 / pi), in float64."""
  c, a = math.sqrt(2 / math.pi), 0.044715
  t = np.tanh(c * (h + a * h ** 3))
  return 0.5 * (1 + t) + 0.5 * h * (1 - t ** 2) * c * (1 + 3 * a * h ** 2)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_gelu_saved_input_is_the_reference_forward_with_the_closed_form_gradient(dtype, tol):
  """The forward is jax.nn.gelu's bit for bit; the gradient is the float64 closed form's to the
  dtype's rounding (absolute: GELU' cancels to ~0 for h << 0), as autodiff's is."""
  h = (jax.random.normal(jax.random.key(0), (4, 257)) * 3).astype(dtype)
  ref = layers.gelu(h, "reference")
  got = layers.gelu(h, "saved_input")
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))
  g = jax.random.normal(jax.random.key(1), h.shape).astype(dtype)
  dh = jax.vjp(lambda x: layers.gelu(x, "saved_input"), h)[1](g)[0]
  want = np.asarray(g, np.float64) * _gelu_tanh_grad_f64(np.asarray(h, np.float64))
  np.testing.assert_allclose(np.asarray(dh, np.float64), want, rtol=tol, atol=tol)
  auto = jax.vjp(lambda x: layers.gelu(x, "reference"), h)[1](g)[0]
  err = lambda x: np.max(np.abs(np.asarray(x, np.float64) - want))  # noqa: E731
  assert err(dh) <= err(auto) * 1.01 + 1e-7  # no less accurate than autodiff
  assert float(jax.grad(lambda x: layers.gelu(x, "saved_input"))(jnp.float32(0.0))) == 0.5


def test_gelu_saved_input_keeps_only_its_input_for_the_backward_pass(capsys):
  h = jax.random.normal(jax.random.key(0), (2, 8, 64), jnp.bfloat16)

  def kept(impl):  # the (2, 8, 64) arrays autodiff keeps between the forward and backward pass
    capsys.readouterr()
    print_saved_residuals(lambda x: jnp.sum(layers.gelu(x, impl) * x), h)
    return [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("bf16[2,8,64]")]

  assert len(kept("saved_input")) == 2  # h (for the GELU) and GELU(h) (for the product)
  assert len(kept("reference")) >= 4  # h and the tanh formula's intermediates
  with pytest.raises(ValueError, match="model.gelu_impl 'erf'"):
    layers.gelu(h, "erf")
