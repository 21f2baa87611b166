"""Embeddings: the token embedding and the forward process at layer 0, batching / packing /
neighbour invariance, the hidden states of the model itself, and the errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import ddit_config, randomize
from sedd_jax import diffusion
from sedd_jax.data import tokenizers
from sedd_jax.model import DDiT
from sedd_jax.sampling import embedding

GRAPH = diffusion.Absorbing(32)
NOISE = diffusion.LogLinear(eps=1e-3)
SEQS = ["MKVLAGHTRE", "ACD", "WWYYPPGGSSTTNNQQ", "MK", "LLLLLLLLLLLLLLLLLLLL", "EDRKHHC"]
MODEL = randomize(DDiT(ddit_config(length=32, n_blocks=1), GRAPH.dim, True, nnx.Rngs(0)),
                  scale=0.1)


def run(seqs=SEQS, **kw):
  return embedding.embed(MODEL, GRAPH, NOISE, seqs, max_length=32, **kw)


@pytest.mark.parametrize("t", [0.0, 0.5])
def test_embeddings_do_not_depend_on_batching_packing_or_neighbours(t):
  """Packed rows (batch sizes 4 and 1), one sequence per row, and the first sequence alone
  give the same rows to float tolerance: exactly L_i rows of H, their mean the `mean`; at t = 0
  the first sequence's rows are DDiT.hidden_states of it alone at sigma(0)."""
  a = run(t=t, batch_size=4)
  for other in (run(t=t, batch_size=4, pack=False), run(SEQS[:1], t=t, batch_size=4)):
    for x, y in zip(other.per_residue, a.per_residue):
      np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
  assert [e.shape for e in a.per_residue] == [(len(s), 16) for s in SEQS]
  assert all(e.dtype == np.float32 for e in a.per_residue) and a.mean.dtype == np.float32
  np.testing.assert_allclose(a.mean, np.stack([e.mean(0) for e in a.per_residue]), rtol=1e-6)
  if t == 0.0:
    np.testing.assert_allclose(run(t=t, batch_size=1).mean, a.mean, atol=1e-5, rtol=1e-5)
    ids = tokenizers.ProteinTokenizer().encode(SEQS[0])[None]
    direct = MODEL.hidden_states(jnp.asarray(ids), NOISE.total_noise(jnp.zeros((1,))))
    np.testing.assert_allclose(a.per_residue[0], direct[0], atol=1e-5, rtol=1e-5)
  else:
    assert not np.allclose(a.mean, run(batch_size=4).mean, atol=1e-3)  # t = 0.5 masks


def test_layer_zero_is_the_token_embedding_masked_at_the_forward_rate():
  """Layer 0 rows are embedding-table rows: the residue's at t = 0, the residue's or the
  mask's at t = 0.5 with the forward process's mask rate 1 - e^{-sigma(t)} (binomial, 4
  sigma); the masks follow the seed."""
  table = np.asarray(MODEL.vocab_embed.embedding[...])
  ids = [tokenizers.ProteinTokenizer().encode(s) for s in SEQS]
  clean = run(layer=0)
  for e, x in zip(clean.per_residue, ids):
    np.testing.assert_array_equal(e, table[x])
  noisy = run(layer=0, t=0.5, seed=1)
  masked = []
  for e, x in zip(noisy.per_residue, ids):
    is_mask = np.all(e == table[GRAPH.mask], axis=1)
    np.testing.assert_array_equal(e[~is_mask], table[x[~is_mask]])
    masked.append(is_mask)
  masked = np.concatenate(masked)
  p = float(-jnp.expm1(-NOISE.total_noise(jnp.float32(0.5))))
  n = masked.size
  assert abs(masked.sum() - n * p) < 4 * np.sqrt(n * p * (1 - p)), (masked.sum(), n * p)
  again = run(layer=0, t=0.5, seed=1)
  other = run(layer=0, t=0.5, seed=2)
  np.testing.assert_array_equal(np.concatenate(again.per_residue),
                                np.concatenate(noisy.per_residue))
  assert not np.array_equal(np.concatenate(other.per_residue),
                            np.concatenate(noisy.per_residue))


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match=r"layer 2 is out of range for a model of 1 blocks: use "
                     r"-2..1"):
    run(layer=2)
  with pytest.raises(ValueError, match=r"t must be in \[0, 1\]; got 1.5"):
    run(t=1.5)
  with pytest.raises(ValueError, match=r"seqs\[1\] has length 40 > max_length 32"):
    run(["MK", "A" * 40])
  with pytest.raises(ValueError, match="embed needs a model with hidden_states"):
    embedding.embed(lambda x, sigma: x, GRAPH, NOISE, SEQS, max_length=32)
