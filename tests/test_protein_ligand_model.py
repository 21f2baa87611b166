"""The dual-track protein-ligand DDiT: shapes, padding masks, batch independence, the config."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import LIGAND_TOKENS, PL_B as B, PL_LL as LL, PL_LP as LP  # the test sizes
from helpers import ROOT, config_module
from helpers import protein_ligand_config, protein_ligand_model as make_model
from sedd_jax.data.tokenizers import SmilesTokenizer
from sedd_jax.model import attention as attention_lib
from sedd_jax.protein_ligand import model as pl_model


tiny_cfg = functools.partial(protein_ligand_config, frozen=False)  # the tests edit it


def inputs(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  p = jax.random.randint(k[0], (B, LP), 4, 29)
  lig = jax.random.randint(k[1], (B, LL), 4, LIGAND_TOKENS)
  plen = jnp.array([LP, 9, 5, 12], jnp.int32)
  llen = jnp.array([LL, 3, 7, 6], jnp.int32)
  p = jnp.where(jnp.arange(LP) < plen[:, None], p, 1)
  lig = jnp.where(jnp.arange(LL) < llen[:, None], lig, 1)
  sp = jax.random.uniform(k[2], (B,), minval=0.1, maxval=3.0)
  sl = jax.random.uniform(k[3], (B,), minval=0.1, maxval=3.0)
  return p, lig, sp, sl, plen, llen


def test_output_shapes_per_track():
  model = make_model()
  p, lig, sp, sl, plen, llen = inputs()
  out_p, out_l = apply(model, p, lig, sp, sl, plen, llen)
  assert out_p.shape == (B, LP, 33) and out_p.dtype == jnp.float32
  assert out_l.shape == (B, LL, LIGAND_TOKENS + 1) and out_l.dtype == jnp.float32
  assert np.all(np.isfinite(out_p)) and np.all(np.isfinite(out_l))
  out_p, none = apply(model, p, None, sp, None, plen, None, tracks="protein")
  assert out_p.shape == (B, LP, 33) and none is None
  none, out_l = apply(model, None, lig, None, sl, None, llen, tracks="ligand")
  assert out_l.shape == (B, LL, LIGAND_TOKENS + 1) and none is None
  none, out_l = apply(model, p, lig, jnp.zeros(B), sl, plen, llen, heads=("ligand",))
  assert none is None and out_l.shape == (B, LL, LIGAND_TOKENS + 1)
  # The output at the input token is 0 (the reference's convention).
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(out_l), np.asarray(lig)[..., None],
                                                   -1), 0.0)


def test_bad_inputs_raise():
  model = make_model(random=False)
  p, lig, sp, sl, plen, llen = inputs()
  with pytest.raises(ValueError, match="sigma"):
    model(p, lig, sp[:, None], sl, plen, llen)
  with pytest.raises(ValueError, match="tracks"):
    model(p, lig, sp, sl, plen, llen, tracks="neither")
  with pytest.raises(ValueError, match="head"):
    model(p, None, sp, None, plen, None, tracks="protein", heads=("ligand",))
  with pytest.raises(ValueError, match="batches differ"):
    model(p, lig[:2], sp, sl[:2], plen, llen[:2])


def test_fresh_model_starts_as_two_independent_ddits():
  """Cross-attention gates are zero-initialised: at init the joint run equals the single runs."""
  model = make_model(random=False)
  p, lig, sp, sl, plen, llen = inputs()
  out_p, out_l = apply(model, p, lig, sp, sl, plen, llen)
  alone_p, _ = apply(model, p, None, sp, None, plen, None, tracks="protein")
  _, alone_l = apply(model, None, lig, None, sl, None, llen, tracks="ligand")
  np.testing.assert_allclose(out_p, alone_p, atol=1e-6)
  np.testing.assert_allclose(out_l, alone_l, atol=1e-6)


@nnx.jit(static_argnames=("tracks", "heads"))
def apply(model, *args, tracks="both", heads=None):
  return model(*args, tracks=tracks, heads=heads)


def _outputs(model, *args, fn=apply):
  out_p, out_l = fn(model, *args)
  return np.asarray(out_p), np.asarray(out_l)


def batch_independent(model, i=0, j=2, fn=apply) -> bool:
  """Changing example j (tokens, lengths, sigmas of both tracks) leaves example i's outputs
  unchanged (and does change example j's)."""
  p, lig, sp, sl, plen, llen = inputs()
  base_p, base_l = _outputs(model, p, lig, sp, sl, plen, llen, fn=fn)
  k = jax.random.split(jax.random.PRNGKey(7), 2)
  p2 = p.at[j].set(jax.random.randint(k[0], (LP,), 4, 29))
  lig2 = lig.at[j].set(jax.random.randint(k[1], (LL,), 4, LIGAND_TOKENS))
  new_p, new_l = _outputs(model, p2, lig2, sp.at[j].set(0.7), sl.at[j].set(2.2),
                          plen.at[j].set(LP - 1), llen.at[j].set(LL), fn=fn)
  assert not np.allclose(new_p[j], base_p[j]) and not np.allclose(new_l[j], base_l[j])
  return (np.allclose(new_p[i], base_p[i], atol=1e-5) and
          np.allclose(new_l[i], base_l[i], atol=1e-5))


def test_examples_are_independent():
  model = make_model()
  for i in (0, 1, 3):
    assert batch_independent(model, i=i, j=2)


def test_independence_check_catches_attention_across_the_batch(monkeypatch):
  """The PyTorch fork's bug class: keys/values of every example in one pool. The check above
  must fail for such a model."""
  real = attention_lib.dot_product_attention

  def leaky(q, k, v, lengths=None, **kw):
    del lengths
    b, lk, h, d = k.shape
    pool_k = jnp.broadcast_to(k.reshape(1, b * lk, h, d), (b, b * lk, h, d))
    pool_v = jnp.broadcast_to(v.reshape(1, b * lk, h, d), (b, b * lk, h, d))
    return real(q, pool_k, pool_v, None, **kw)

  model = make_model()
  monkeypatch.setattr(attention_lib, "dot_product_attention", leaky)
  fresh = nnx.jit(lambda m, *a: m(*a))  # a new trace, with the leaky attention
  assert not batch_independent(model, i=0, j=2, fn=fresh)


def test_padding_keys_do_not_change_outputs():
  model = make_model()
  p, lig, sp, sl, plen, llen = inputs()
  base_p, base_l = _outputs(model, p, lig, sp, sl, plen, llen)
  k = jax.random.split(jax.random.PRNGKey(3), 2)
  pad_p = jnp.arange(LP) >= plen[:, None]
  pad_l = jnp.arange(LL) >= llen[:, None]
  p2 = jnp.where(pad_p, jax.random.randint(k[0], (B, LP), 0, 33), p)
  lig2 = jnp.where(pad_l, jax.random.randint(k[1], (B, LL), 0, LIGAND_TOKENS + 1), lig)
  new_p, new_l = _outputs(model, p2, lig2, sp, sl, plen, llen)
  real_p = ~np.asarray(pad_p)
  real_l = ~np.asarray(pad_l)
  np.testing.assert_allclose(new_p[real_p], base_p[real_p], atol=1e-5)
  np.testing.assert_allclose(new_l[real_l], base_l[real_l], atol=1e-5)
  # And the lengths are what makes it so: without them the padding leaks in.
  leak_p, _ = _outputs(model, p2, lig2, sp, sl, None, None)
  ref_p, _ = _outputs(model, p, lig, sp, sl, None, None)
  assert not np.allclose(leak_p[real_p], ref_p[real_p], atol=1e-5)


def test_cross_attention_mixes_the_tracks():
  """With live gates the protein output of example i depends on ligand i (and vice versa)."""
  model = make_model()
  p, lig, sp, sl, plen, llen = inputs()
  base_p, base_l = _outputs(model, p, lig, sp, sl, plen, llen)
  lig2 = lig.at[0, 0].set((lig[0, 0] + 1 - 4) % (LIGAND_TOKENS - 4) + 4)
  p2 = p.at[1, 0].set((p[1, 0] + 1 - 4) % 25 + 4)
  new_p, _ = _outputs(model, p, lig2, sp, sl, plen, llen)
  _, new_l = _outputs(model, p2, lig, sp, sl, plen, llen)
  assert not np.allclose(new_p[0], base_p[0])
  assert not np.allclose(new_l[1], base_l[1])


def test_no_cross_attention_option():
  cfg = tiny_cfg()
  cfg.model.cross_attention = False
  model = make_model(cfg)
  groups = pl_model.param_groups(model)
  assert "protein_cross" not in groups and "ligand_cross" not in groups
  p, lig, sp, sl, plen, llen = inputs()
  out_p, _ = apply(model, p, lig, sp, sl, plen, llen)
  alone_p, _ = apply(model, p, None, sp, None, plen, None, tracks="protein")
  np.testing.assert_allclose(out_p, alone_p, atol=1e-6)


def test_remat_gives_the_same_output():
  cfg = tiny_cfg()
  model = make_model(cfg)
  cfg.model.remat = "block"
  model_r = make_model(cfg)
  args = inputs()
  for a, b in zip(_outputs(model, *args), _outputs(model_r, *args)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_config_variants():
  mod = config_module("protein_ligand")
  cfg = mod.get_config("tiny")
  assert cfg.task == "protein_ligand" and cfg.mode in mod.MODES
  assert cfg.ligand.length == 128 and cfg.graph.tokens == 32
  assert cfg.data.fasta.endswith("protein_ligand_pairs.csv.gz")
  assert (ROOT / cfg.data.fasta).exists()
  cfg.ligand.length = 64  # the data's ligand width follows the model's
  assert cfg.data.ligand_length == 64 and cfg.data.max_ligand_length == 64
  small = mod.get_config("small")
  assert small.model.hidden_size == 768 and small.model.dtype == "bfloat16"
  with pytest.raises(ValueError, match="variant"):
    mod.get_config("huge")


def test_ligand_vocab_resolved_from_prepared_data(tmp_path):
  tok = SmilesTokenizer.build(["CCO", "c1ccccc1", "CC(=O)N", "[Na+].[Cl-]"])
  tok.save(tmp_path / "smiles_vocab.json")
  cfg = config_module("protein_ligand").get_config("tiny")
  cfg.model.update(hidden_size=32, n_heads=2, n_blocks=1, cond_dim=16)
  cfg.data.prepared = str(tmp_path)
  with pytest.raises(ValueError, match="resolve_ligand_vocab"):
    pl_model.get_graphs(cfg)
  model = pl_model.build_model(cfg, nnx.Rngs(0))
  assert cfg.ligand.graph.tokens == tok.mask_id == tok.vocab_size - 1
  assert model.ligand_dim == tok.vocab_size and model.protein_dim == 33
  _, lgraph = pl_model.get_graphs(cfg)
  assert lgraph.mask == tok.mask_id


def _checkpoint_calls(model, *args) -> int:
  """Number of rematerialised (jax.checkpoint) calls in the forward pass's jaxpr."""
  graphdef, state = nnx.split(model)

  def forward(state):
    out_p, out_l = nnx.merge(graphdef, state)(*args)
    return jnp.sum(out_p) + jnp.sum(out_l)

  eqns = jax.make_jaxpr(forward)(state).jaxpr.eqns
  return sum(e.primitive.name in ("checkpoint", "remat", "remat2") for e in eqns)


def test_remat_policy_is_honoured():
  """remat=mlp recomputes the GELU of every self-attention block of both tracks (2 layers x 2
  tracks), remat=block each layer (the gradients of DDiTBlock's remat are checked in
  test_ddit)."""
  cfg = tiny_cfg()
  args = inputs()
  for remat, calls in (("none", 0), ("mlp", 4), ("block", 2)):
    cfg.model.remat = remat
    assert _checkpoint_calls(make_model(cfg), *args) == calls, remat


def test_protein_track_alone_packs_like_the_ddit():
  model = make_model()
  model.eval()
  rng = np.random.default_rng(3)
  seqs = [rng.integers(4, 29, n).astype(np.int32) for n in (5, 8)]
  tok = np.ones((1, LP), np.int32)
  seg = np.zeros((1, LP), np.int32)
  pos = np.zeros((1, LP), np.int32)
  tok[0, :5], tok[0, 5:13] = seqs
  seg[0, :5], seg[0, 5:13] = 1, 2
  pos[0, :5], pos[0, 5:13] = np.arange(5), np.arange(8)
  sigma = jnp.array([0.9])
  run = nnx.jit(lambda m, x, s, n, g, p: m(x, None, s, None, n, tracks="protein",
                                           protein_segment_ids=g, protein_positions=p)[0])
  packed = run(model, tok, sigma, jnp.array([13]), seg, pos)
  for start, x in ((0, seqs[0]), (5, seqs[1])):
    alone = model(x[None], None, sigma, None, tracks="protein")[0]
    np.testing.assert_allclose(packed[0, start:start + len(x)], alone[0], atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="tracks='protein'"):
    model(tok, jnp.ones((1, LL), jnp.int32), sigma, sigma, protein_segment_ids=seg)
