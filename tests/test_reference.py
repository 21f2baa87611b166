"""Reference data of a config (`sedd_jax.data.reference`): the training split, a sample of it,
and its tokens in chunks, on the bundled FASTA's store (read back independently)."""

import numpy as np
import pytest

from helpers import load_config
from sedd_jax.data import reference
from sedd_jax.data import store as store_lib


@pytest.fixture(scope="module")
def train_split(faa_store):
  """(config whose data.prepared is the store, the store's train split as a list of arrays)."""
  st = store_lib.Store(faa_store, "train")
  return load_config(overrides={"data.prepared": str(faa_store)}), [
      np.array(st[i]) for i in range(len(st))]


def test_training_tokens_are_the_split_end_to_end_in_chunks(train_split):
  cfg, seqs = train_split
  chunks = list(reference.training_tokens(cfg, chunk=1000))
  whole = np.concatenate(seqs)
  assert len(chunks) == -(-whole.size // 1000)  # ceil: every chunk full but the last
  assert all(c.size == 1000 for c in chunks[:-1]) and 0 < chunks[-1].size <= 1000
  np.testing.assert_array_equal(np.concatenate(chunks), whole)


def test_training_sequences_draws_distinct_sequences_in_store_order(train_split):
  cfg, seqs = train_split
  index = {s.tobytes(): i for i, s in enumerate(seqs)}
  assert len(index) == len(seqs)  # prepare removed duplicates: a sequence names its index
  drawn = reference.training_sequences(cfg, limit=7, seed=3)
  idx = [index[s.tobytes()] for s in drawn]
  assert len(idx) == 7 and idx == sorted(set(idx))
  assert [index[s.tobytes()] for s in reference.training_sequences(cfg, 7, seed=3)] == idx
  assert [index[s.tobytes()] for s in reference.training_sequences(cfg, 7, seed=4)] != idx
  every = reference.training_sequences(cfg, limit=len(seqs) + 1)
  assert [index[s.tobytes()] for s in every] == list(range(len(seqs)))


def test_training_split_lengths_and_no_split(train_split, tmp_path):
  cfg, seqs = train_split
  np.testing.assert_array_equal(reference.training_split(cfg).lengths, [len(s) for s in seqs])
  none = load_config(overrides={"data.prepared": str(tmp_path / "none")})
  assert reference.training_split(none) is None
  assert reference.training_sequences(none, limit=3) is None
  assert reference.training_tokens(none) is None
