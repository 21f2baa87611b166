"""Reference data of a config (`sedd_jax.data.reference`): the training split, a sample of it,
and its tokens in chunks, on the bundled FASTA's store (read back independently); protein-ligand
pairs; padding."""

import csv
import re

import numpy as np
import pytest

from helpers import FAA, PAIRS, load_config
from sedd_jax.data import fasta, prepare, reference, tokenizers
from sedd_jax.data import store as store_lib


@pytest.fixture(scope="module")
def train_split(faa_store):
  """(config whose data.prepared is the store, the store's train split as a list of arrays)."""
  st = store_lib.Store(faa_store, "train")
  return load_config(overrides={"data.prepared": str(faa_store)}), [
      np.array(st[i]) for i in range(len(st))]


def test_training_split_is_fasta_records_in_file_order(train_split):
  """Each kept sequence is a FASTA record (stop codon dropped), in the file's order."""
  cfg, seqs = train_split
  split = reference.training_split(cfg)
  assert len(split) == len(seqs) > 100
  for i in (0, 17, len(seqs) - 1):
    np.testing.assert_array_equal(split[i], seqs[i])
  tok = tokenizers.ProteinTokenizer()
  records = [r.text.rstrip("*") for r in fasta.read_fasta(FAA, fasta.Skips("skip"))]
  texts = [tok.decode(s) for s in seqs]
  assert set(texts) <= set(records)
  assert sorted(texts, key=records.index) == texts


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


def test_reference_pairs_decode_to_the_csv_pairs(tmp_path):
  prepare.prepare(PAIRS, tmp_path / "p", on_error="skip", valid_fraction=0.2, test_fraction=0.2)
  st, smiles_tok = reference.reference_pairs(
      load_config(overrides={"data.prepared": str(tmp_path / "p")}), "test")
  with open(PAIRS, newline="") as f:
    rows = {(r["aa_sequence"], r["smiles"]) for r in csv.DictReader(f)}
  tok = tokenizers.ProteinTokenizer()
  assert len(st) > 0
  for i in range(len(st)):
    assert (tok.decode(st[i]), smiles_tok.decode(st.get(i, "ligand"))) in rows


def test_reference_pairs_of_a_missing_store_say_what_to_run(tmp_path):
  cfg = load_config(overrides={"data.prepared": str(tmp_path / "none")})
  with pytest.raises(store_lib.StoreError, match="run python -m sedd_jax.data.prepare"):
    reference.reference_pairs(cfg, "test")


def test_an_empty_split_names_the_store_and_how_to_prepare_one(tmp_path, train_split):
  """The split, the store and the prepare command that fills the split; a split with
  sequences passes unchanged."""
  cfg, seqs = train_split
  train = reference.training_split(cfg)
  assert reference.require_sequences(train) is train
  prepare.prepare(PAIRS, tmp_path / "p", on_error="skip", valid_fraction=0.2, test_fraction=0.0)
  pairs = load_config(overrides={"data.prepared": str(tmp_path / "p")})
  with pytest.raises(store_lib.StoreError, match=re.escape(
      f"the test split of the store {tmp_path / 'p'} is empty: prepare it again with a test "
      f"share, e.g. python -m sedd_jax.data.prepare --input {PAIRS} --output {tmp_path / 'p'} "
      "--test-fraction 0.02 --overwrite")):
    reference.reference_pairs(pairs, "test")


def test_pad_tokens():
  tokens, lengths = reference.pad_tokens([np.array([5, 6, 7]), np.array([8])], 4)
  pad = tokenizers.PAD_ID
  np.testing.assert_array_equal(tokens, [[5, 6, 7, pad], [8, pad, pad, pad]])
  np.testing.assert_array_equal(lengths, [3, 1])
  assert tokens.dtype == np.int32 and lengths.dtype == np.int32
