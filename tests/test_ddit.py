"""DDiT: parity with the PyTorch reference, shapes, padding, dropout, precision, remat."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import cases, ddit_out_and_grads, grads_and_out, randomize
from helpers import ddit_config as model_cfg
from sedd_jax import parity
from sedd_jax.model import DDiT, import_state_dict
from sedd_jax.model import attention as attention_lib
from sedd_jax.model import ddit as ddit_lib
from sedd_jax.model import fp8 as fp8_lib
from sedd_jax.model import layers


def fixture_model(fx, **kw):
  """A DDiT holding the fixture's weights, in eval mode; sizes from the fixture's meta."""
  meta = fx.meta["model"]
  cfg = model_cfg(**{k: meta[k] for k in ("hidden_size", "n_heads", "n_blocks", "cond_dim",
                                           "dropout", "scale_by_sigma", "length")}, **kw)
  absorb = fx.meta["graph"] == "absorb"
  model = DDiT(cfg, fx.meta["tokens"] + int(absorb), absorb, nnx.Rngs(0))
  import_state_dict(model, {k[len("param/"):]: v for k, v in fx.inputs.items()
                            if k.startswith("param/")})
  model.eval()
  return model


@nnx.jit
def apply(model, indices, sigma, lengths=None):
  return model(indices, sigma, lengths)


@pytest.mark.parametrize("backend", ["xla", "chunked"])
@pytest.mark.parametrize("path,out", cases("model"))
def test_model_parity(path, out, backend):
  fx = parity.load_fixture(path)
  # a chunk that does not divide the length, so padding inside `chunked` is exercised
  model = fixture_model(fx, attention=backend, attention_chunk=12 if backend == "chunked" else 0)
  expected = fx.outputs[out]
  if out == "log_score":
    got = apply(model, fx.inputs["indices"], fx.inputs["sigma"])
  elif out == "loss":
    diffusion = pytest.importorskip("sedd_jax.diffusion")
    meta = fx.meta
    graph = diffusion.get_graph({"type": meta["graph"], "tokens": meta["tokens"]})
    noise = diffusion.get_noise({"type": meta["noise"], "eps": meta.get("eps", 1e-3),
                                 "sigma_min": meta.get("sigma_min", 1e-4),
                                 "sigma_max": meta.get("sigma_max", 20.0)})
    t = jnp.asarray(fx.inputs["loss/t"])
    x = jnp.asarray(fx.inputs["loss/x"], jnp.int32)
    x0 = jnp.asarray(fx.inputs["loss/x0"], jnp.int32)
    log_score = apply(model, x, noise.total_noise(t))
    got = diffusion.score_entropy_loss(graph, noise, log_score, x, x0, t)
  else:
    pytest.fail(f"{path}: no test for output {out!r}")
  assert got.shape == expected.shape and got.dtype == jnp.float32
  err = float(np.max(np.abs(np.asarray(got) - expected)))
  assert err <= parity.tolerance(expected), f"{path.name} {out} [{backend}]: max err {err:.3g}"


def test_fresh_model_is_zero_initialised():
  d = 11
  model = DDiT(model_cfg(), d, True, nnx.Rngs(0))
  idx = jnp.array([[0, 3, 10, 10, 5]], jnp.int32)
  sigma = jnp.array([0.3], jnp.float32)
  out = apply(model, idx, sigma)
  assert out.shape == (1, 5, d) and out.dtype == jnp.float32
  want = -math.log(math.expm1(0.3)) - math.log(d - 1)
  at_input = np.asarray(jax.nn.one_hot(idx, d)) > 0
  np.testing.assert_allclose(np.asarray(out)[~at_input], want, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out)[at_input], 0.0)
  uniform = DDiT(model_cfg(scale_by_sigma=False), d, False, nnx.Rngs(0))
  np.testing.assert_array_equal(apply(uniform, idx, sigma), 0.0)


def test_params_are_float32_with_readable_names():
  model = DDiT(model_cfg(dtype="bfloat16"), 9, True, nnx.Rngs(0))
  names = {".".join(map(str, p)) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
  assert "blocks.1.attn_qkv.kernel" in names and "vocab_embed.embedding" in names
  for _, v in nnx.iter_graph(model):
    if isinstance(v, nnx.Param):
      assert v.get_value().dtype == jnp.float32


def test_shapes_are_checked():
  model = DDiT(model_cfg(), 9, True, nnx.Rngs(0))
  idx = jnp.zeros((2, 6), jnp.int32)
  with pytest.raises(ValueError, match=r"indices must be \(B, L\).*\(12,\)"):
    model(idx.reshape(-1), jnp.ones((2,)))
  with pytest.raises(ValueError, match=r"sigma must be \(B,\) = \(2,\).*\(2, 1\)"):
    model(idx, jnp.ones((2, 1)))
  with pytest.raises(ValueError, match=r"lengths must be \(B,\) = \(2,\).*\(3,\)"):
    model(idx, jnp.ones((2,)), jnp.ones((3,), jnp.int32))
  with pytest.raises(ValueError, match="integer"):
    model(idx.astype(jnp.float32), jnp.ones((2,)))


@pytest.mark.parametrize("kw,match", [
    (dict(attention="flash"), "model.attention"),
    (dict(dtype="float64"), "model.dtype"),
    (dict(remat="all"), "model.remat"),
    (dict(dropout_rng="philox"), "model.dropout_rng"),
    (dict(residual_dtype="float16"), "model.residual_dtype"),
    (dict(matmul="int8"), "model.matmul"),
    (dict(norm_impl="triton"), "model.norm_impl"),
    (dict(gelu_impl="erf"), "model.gelu_impl"),
    (dict(hidden_size=15), "n_heads"),
])
def test_bad_config_is_named(kw, match):
  with pytest.raises(ValueError, match=match):
    DDiT(model_cfg(**kw), 9, True, nnx.Rngs(0))


def test_scale_by_sigma_needs_absorb():
  with pytest.raises(ValueError, match="scale_by_sigma"):
    DDiT(model_cfg(scale_by_sigma=True), 9, False, nnx.Rngs(0))


@pytest.mark.parametrize("backend", ["xla", "chunked"])
def test_padding_does_not_change_real_positions(backend):
  model = randomize(DDiT(model_cfg(attention=backend, attention_chunk=4), 9, True, nnx.Rngs(0)))
  model.eval()
  key = jax.random.key(1)
  idx = jax.random.randint(key, (2, 10), 0, 9)
  lengths = jnp.array([10, 6], jnp.int32)
  other = idx.at[1, 6:].set(jnp.array([1, 2, 8, 0]))
  sigma = jnp.array([0.2, 1.3])
  a = np.asarray(apply(model, idx, sigma, lengths))
  b = np.asarray(apply(model, other, sigma, lengths))
  np.testing.assert_allclose(a[0], b[0], atol=1e-6)
  np.testing.assert_allclose(a[1, :6], b[1, :6], atol=1e-6)
  # and equal to running the real prefix alone
  short = np.asarray(apply(model, idx[1:, :6], sigma[1:]))
  np.testing.assert_allclose(a[1, :6], short[0], atol=1e-5)


def test_dropout_follows_train_and_eval():
  cfg = model_cfg(dropout=0.5)
  model = randomize(DDiT(cfg, 9, True, nnx.Rngs(params=0, dropout=1)))
  idx = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 9
  sigma = jnp.array([0.5, 2.0])
  model.eval()
  e1, e2 = apply(model, idx, sigma), apply(model, idx, sigma)
  np.testing.assert_array_equal(e1, e2)
  model.train()
  t1, t2 = apply(model, idx, sigma), apply(model, idx, sigma)
  assert not np.allclose(t1, t2) and not np.allclose(t1, e1)
  model.eval()
  np.testing.assert_array_equal(apply(model, idx, sigma), e1)


def test_bfloat16_compute_is_close_to_float32():
  f32 = randomize(DDiT(model_cfg(dtype="float32"), 9, True, nnx.Rngs(0)), scale=0.1)
  bf16 = DDiT(model_cfg(dtype="bfloat16"), 9, True, nnx.Rngs(0))
  nnx.update(bf16, nnx.state(f32, nnx.Param))
  f32.eval(), bf16.eval()
  idx = jax.random.randint(jax.random.key(3), (2, 12), 0, 9)
  sigma = jnp.array([0.1, 3.0])
  a, b = apply(f32, idx, sigma), apply(bf16, idx, sigma)
  assert b.dtype == jnp.float32
  assert not np.array_equal(a, b)  # bf16 really is used
  assert float(jnp.max(jnp.abs(a - b))) < 3e-2 * float(jnp.max(jnp.abs(a)))


def test_remat_policies_give_the_same_gradients():
  idx = jax.random.randint(jax.random.key(4), (2, 8), 0, 9)
  sigma = jnp.array([0.4, 1.1])
  lengths = jnp.array([8, 5], jnp.int32)
  results = {}
  for remat in ddit_lib.REMAT_POLICIES:  # the policies inside the scan, against the plain loop
    model = randomize(DDiT(model_cfg(remat=remat, n_blocks=1, scan_blocks=remat != "none"), 9,
                           True, nnx.Rngs(0)))
    model.eval()
    results[remat] = jax.tree.leaves(grads_and_out(model, idx, sigma, lengths)[0])
  for remat in ("mlp", "block", "block_save_dots"):
    for a, b in zip(results["none"], results[remat]):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=remat)
  assert all(np.all(np.isfinite(g)) for g in results["none"])


def test_scanned_blocks_equal_the_loop_in_train_mode():
  """scan_blocks=True and False (with remat=block): the same log scores and gradients, dropout
  masks included."""
  idx = jax.random.randint(jax.random.key(5), (2, 8), 0, 9)
  sigma = jnp.array([0.3, 1.7])
  lengths = jnp.array([8, 6], jnp.int32)
  results = []
  for scan in (False, True):
    model = randomize(DDiT(model_cfg(scan_blocks=scan, remat="block", dropout=0.3), 9,
                           True, nnx.Rngs(params=0, dropout=1)))
    grads, out = grads_and_out(model, idx, sigma, lengths)
    results.append((out, nnx.state(grads, nnx.Param)))
  (out_loop, g_loop), (out_scan, g_scan) = results
  # the same parameter tree (per-block names) either way: checkpoints and torch import agree
  assert jax.tree.structure(g_loop) == jax.tree.structure(g_scan)
  g_loop, g_scan = jax.tree.leaves(g_loop), jax.tree.leaves(g_scan)
  np.testing.assert_allclose(out_scan, out_loop, atol=1e-5, rtol=1e-5)
  assert len(g_loop) == len(g_scan)
  for a, b in zip(g_loop, g_scan):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_bfloat16_residual_stream_is_close_to_float32():
  f32 = randomize(DDiT(model_cfg(), 9, True, nnx.Rngs(0)), scale=0.1)
  bf16 = DDiT(model_cfg(residual_dtype="bfloat16"), 9, True, nnx.Rngs(0))
  nnx.update(bf16, nnx.state(f32, nnx.Param))
  f32.eval(), bf16.eval()
  idx = jax.random.randint(jax.random.key(6), (2, 12), 0, 9)
  sigma = jnp.array([0.2, 2.5])
  x = jax.ShapeDtypeStruct((2, 12, 16), jnp.bfloat16)
  block = jax.eval_shape(lambda x: bf16.blocks[0](x, *layers.rotary_cos_sin(12, 8),
                                                  jnp.ones((2, 8))), x)
  assert block.dtype == jnp.bfloat16
  a, b = apply(f32, idx, sigma), apply(bf16, idx, sigma)
  assert b.dtype == jnp.float32 and not np.array_equal(a, b)
  assert float(jnp.max(jnp.abs(a - b))) < 3e-2 * float(jnp.max(jnp.abs(a)))


def test_auto_residual_stream_is_bfloat16_only_under_bfloat16_compute_on_gpus(monkeypatch):
  resolve = ddit_lib.resolve_residual_dtype
  for name in ("float32", "bfloat16"):  # explicit choices hold everywhere
    assert resolve(name, jnp.bfloat16) == resolve(name, jnp.float32) == jnp.dtype(name)
  monkeypatch.setattr(attention_lib, "cuda_capability", lambda: None)  # a CPU
  assert resolve("auto", jnp.bfloat16) == resolve("auto", jnp.float32) == jnp.float32
  monkeypatch.setattr(attention_lib, "cuda_capability", lambda: (7, 0))  # a V100 as well
  assert resolve("auto", jnp.bfloat16) == jnp.bfloat16
  assert resolve("auto", jnp.float32) == jnp.float32  # the parity tests' arithmetic
  model = DDiT(model_cfg(dtype="bfloat16"), 9, True, nnx.Rngs(0))  # "auto" by default
  assert model.residual_dtype == jnp.bfloat16


def test_fp8_falls_back_without_fp8_gpus(caplog, monkeypatch):
  monkeypatch.setattr(fp8_lib, "fp8_available", lambda: False)  # also on FP8 GPUs
  with caplog.at_level("WARNING"):
    model = DDiT(model_cfg(matmul="fp8"), 9, True, nnx.Rngs(0))
  assert "no FP8 matmuls" in caplog.text
  assert model.blocks[0].mlp_in.dot_general is jax.lax.dot_general


def test_scanned_blocks_equal_the_loop_in_bfloat16():
  """The scan stacks the Linear weights already cast to bf16: the same numbers as the loop's
  casts inside each Linear."""
  idx = jax.random.randint(jax.random.key(8), (2, 8), 0, 9)
  sigma = jnp.array([0.6, 2.2])
  outs = []
  for scan in (False, True):
    model = randomize(DDiT(model_cfg(scan_blocks=scan, dtype="bfloat16"), 9, True, nnx.Rngs(0)),
                      scale=0.1)
    model.eval()
    outs.append(apply(model, idx, sigma))
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-5, rtol=1e-5)


@nnx.jit
def apply_packed(model, indices, sigma, lengths, segment_ids, positions):
  return model(indices, sigma, lengths, segment_ids=segment_ids, positions=positions)


def pack_rows(seqs, width):
  """One row of `seqs` placed one after another: (tokens, lengths, segment_ids, positions)."""
  tok = np.ones((1, width), np.int32)
  seg = np.zeros((1, width), np.int32)
  pos = np.zeros((1, width), np.int32)
  start = 0
  for s, x in enumerate(seqs, 1):
    n = len(x)
    tok[0, start:start + n], seg[0, start:start + n] = x, s
    pos[0, start:start + n] = np.arange(n)
    start += n
  return tok, np.array([start], np.int32), seg, pos


@pytest.mark.parametrize("backend", ["xla", "chunked"])
def test_packed_sequence_scores_equal_the_sequence_alone(backend):
  """Isolation: a sequence's log-scores in a packed row equal the sequence alone (f32, 1e-5)."""
  model = randomize(DDiT(model_cfg(attention=backend, attention_chunk=5), 9, True,
                         nnx.Rngs(0)))
  model.eval()
  rng = np.random.default_rng(4)
  seqs = [rng.integers(0, 9, n) for n in (5, 7, 2)]
  tok, lengths, seg, pos = pack_rows(seqs, 16)
  sigma = jnp.array([0.7])
  packed = np.asarray(apply_packed(model, tok, sigma, lengths, seg, pos))
  start = 0
  for x in seqs:
    alone = np.asarray(apply(model, jnp.asarray(x[None], jnp.int32), sigma))
    np.testing.assert_allclose(packed[0, start:start + len(x)], alone[0], atol=1e-5, rtol=0)
    start += len(x)


def test_model_reads_packed_positions():
  # Rotary attention sees only offsets within a segment, so shifting a segment's positions
  # changes nothing, stretching them changes its scores.
  model = randomize(DDiT(model_cfg(), 9, True, nnx.Rngs(0)))
  model.eval()
  tok, lengths, seg, positions = pack_rows([np.arange(4) % 9, np.arange(5) % 9], 12)
  sigma = jnp.array([0.7])
  right = np.asarray(apply_packed(model, tok, sigma, lengths, seg, positions))
  shifted = np.asarray(apply_packed(model, tok, sigma, lengths, seg, positions + 4 * (seg == 2)))
  stretched = np.asarray(apply_packed(model, tok, sigma, lengths, seg,
                                      positions * (1 + (seg == 2))))
  np.testing.assert_allclose(shifted, right, atol=1e-5, rtol=0)
  np.testing.assert_allclose(stretched[0, :4], right[0, :4], atol=1e-5, rtol=0)
  assert np.max(np.abs(stretched[0, 4:9] - right[0, 4:9])) > 1e-3


def test_packing_inputs_are_checked():
  model = DDiT(model_cfg(), 9, True, nnx.Rngs(0))
  idx = jnp.zeros((2, 8), jnp.int32)
  with pytest.raises(ValueError, match=r"segment_ids must be \(B, L\) = \(2, 8\)"):
    model(idx, jnp.ones((2,)), segment_ids=jnp.ones((2, 7), jnp.int32))
  with pytest.raises(ValueError, match="positions must be"):
    model(idx, jnp.ones((2,)), positions=jnp.ones((2, 8)))


def test_the_saved_input_gelu_keeps_the_model_outputs_and_gradients():
  """model.gelu_impl=saved_input: the same forward, bit for bit, and the same parameter
  gradients to float32 rounding (its GELU' is computed in float32 from the closed form)."""
  out_ref, g_ref = ddit_out_and_grads(gelu_impl="reference", n_blocks=2)
  out_new, g_new = ddit_out_and_grads(gelu_impl="saved_input", n_blocks=2)
  np.testing.assert_array_equal(np.asarray(out_new), np.asarray(out_ref))
  assert len(g_ref) == len(g_new) > 0
  for a, b in zip(g_new, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@nnx.jit(static_argnames="layer")
def hidden(model, indices, sigma, lengths=None, segment_ids=None, positions=None, *, layer):
  return model.hidden_states(indices, sigma, lengths, layer=layer, segment_ids=segment_ids,
                             positions=positions)


@nnx.jit
def head(model, h, sigma, indices):
  """The output layer and score head on hidden states h (B, L, H): DDiT's last steps."""
  c = jax.nn.silu(model.sigma_map(sigma))
  return layers.score_head(model.output_layer(h, c), sigma, indices, model.scale_by_sigma)


@pytest.mark.parametrize("scan", [False, True])
def test_hidden_states_close_with_the_forward(scan):
  """Layer -1 through the output layer and the score head is __call__'s log score; layer 0 is
  the token embedding and layer 1 block 0 applied to it by hand; layers index the three
  states as a list (-3 is 0, 2 is -1)."""
  model = randomize(DDiT(model_cfg(scan_blocks=scan), 9, True, nnx.Rngs(0)))
  model.eval()
  idx = jax.random.randint(jax.random.key(3), (2, 8), 0, 9)
  sigma, lengths = jnp.array([0.4, 1.9]), jnp.array([8, 6], jnp.int32)
  last = hidden(model, idx, sigma, lengths, layer=-1)
  assert last.shape == (2, 8, 16) and last.dtype == jnp.float32
  np.testing.assert_allclose(head(model, last, sigma, idx), apply(model, idx, sigma, lengths),
                             atol=1e-5, rtol=1e-5)
  emb = np.asarray(model.vocab_embed.embedding[...])[np.asarray(idx)]
  np.testing.assert_array_equal(hidden(model, idx, sigma, lengths, layer=0), emb)
  cos, sin = layers.rotary_cos_sin(8, 8)
  one = model.blocks[0](jnp.asarray(emb), cos, sin, jax.nn.silu(model.sigma_map(sigma)), lengths)
  np.testing.assert_allclose(hidden(model, idx, sigma, lengths, layer=1), one, atol=1e-5,
                             rtol=1e-5)
  assert [model.layer_blocks(k) for k in (-3, -2, -1, 0, 1, 2)] == [0, 1, 2, 0, 1, 2]


def test_packed_hidden_states_equal_the_sequence_alone():
  model = randomize(DDiT(model_cfg(), 9, True, nnx.Rngs(0)))
  model.eval()
  rng = np.random.default_rng(5)
  seqs = [rng.integers(0, 9, n) for n in (5, 7, 2)]
  tok, lengths, seg, pos = pack_rows(seqs, 16)
  sigma = jnp.array([0.7])
  packed = np.asarray(hidden(model, tok, sigma, lengths, seg, pos, layer=-1))
  start = 0
  for x in seqs:
    alone = np.asarray(hidden(model, jnp.asarray(x[None], jnp.int32), sigma, layer=-1))
    np.testing.assert_allclose(packed[0, start:start + len(x)], alone[0], atol=1e-5, rtol=0)
    start += len(x)


@pytest.mark.parametrize("layer", [3, -4, True, 1.0])
def test_hidden_states_layer_is_checked(layer):
  model = DDiT(model_cfg(), 9, True, nnx.Rngs(0))
  with pytest.raises(ValueError, match=rf"layer {layer!r} is out of range for a model of 2 "
                     r"blocks: use -3..2 \(0 = the token embedding"):
    model.hidden_states(jnp.zeros((1, 4), jnp.int32), jnp.ones((1,)), layer=layer)
