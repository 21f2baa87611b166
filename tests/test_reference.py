"""Tests of sedd_jax.data.reference: the training split, protein-ligand pairs, padding."""

import csv
import pathlib

import numpy as np
import pytest

from sedd_jax import config as config_lib
from sedd_jax.data import fasta, prepare, reference, tokenizers
from sedd_jax.data import store as store_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def _cfg(prepared):
  return config_lib.load_config(str(ROOT / "configs/uniref50.py:tiny"),
                                {"data.prepared": str(prepared)})


def test_training_sequences_are_the_train_split_in_store_order(tmp_path):
  prepare.prepare(DATA / "pyhmmer_938293_first200.faa", tmp_path / "s", on_error="skip")
  seqs, lengths = reference.training_sequences(_cfg(tmp_path / "s"))
  want = store_lib.Store(tmp_path / "s", "train")
  assert len(seqs) == len(want) == lengths.size > 150
  for i in (0, 17, len(want) - 1):
    np.testing.assert_array_equal(seqs[i], want[i])
  np.testing.assert_array_equal(lengths, [s.size for s in seqs])
  # Each kept sequence is a FASTA record (stop codon dropped), in the file's order.
  tok = tokenizers.ProteinTokenizer()
  records = [r.text.rstrip("*") for r in fasta.read_fasta(DATA / "pyhmmer_938293_first200.faa",
                                                          fasta.Skips("skip"))]
  texts = [tok.decode(s) for s in seqs]
  assert set(texts) <= set(records)
  assert sorted(texts, key=records.index) == texts
  some, _ = reference.training_sequences(_cfg(tmp_path / "s"), limit=10, seed=3)
  picked = [texts.index(tok.decode(s)) for s in some]
  assert len(set(picked)) == 10 and picked == sorted(picked)  # no repeats, store order
  again, _ = reference.training_sequences(_cfg(tmp_path / "s"), limit=10, seed=3)
  assert all(np.array_equal(a, b) for a, b in zip(some, again))


def test_reference_pairs_decode_to_the_csv_pairs(tmp_path):
  csv_path = DATA / "pairs_first60.csv"
  prepare.prepare(csv_path, tmp_path / "p", on_error="skip", valid_fraction=0.2,
                  test_fraction=0.2)
  st, smiles_tok = reference.reference_pairs(_cfg(tmp_path / "p"), "test")
  with open(csv_path, newline="") as f:
    rows = {(r["aa_sequence"], r["smiles"]) for r in csv.DictReader(f)}
  tok = tokenizers.ProteinTokenizer()
  assert len(st) > 0
  for i in range(len(st)):
    assert (tok.decode(st[i]), smiles_tok.decode(st.get(i, "ligand"))) in rows


def test_pad_tokens():
  tokens, lengths = reference.pad_tokens([np.array([5, 6, 7]), np.array([8])], 4)
  pad = tokenizers.PAD_ID
  np.testing.assert_array_equal(tokens, [[5, 6, 7, pad], [8, pad, pad, pad]])
  np.testing.assert_array_equal(lengths, [3, 1])
  assert tokens.dtype == np.int32 and lengths.dtype == np.int32


def test_reference_pairs_of_a_missing_store_say_what_to_run(tmp_path):
  cfg = config_lib.load_config(str(ROOT / "configs/uniref50.py:tiny"),
                               {"data.prepared": str(tmp_path / "none")})
  with pytest.raises(store_lib.StoreError, match="run python -m sedd_jax.data.prepare"):
    reference.reference_pairs(cfg, "test")
  assert reference.training_sequences(cfg) is None
