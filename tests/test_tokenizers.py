"""Tests of sedd_jax.data.tokenizers: ESM-2 protein ids and the regex SMILES tokenizer."""

import numpy as np
import pytest

from sedd_jax.data import tokenizers
from sedd_jax.data.tokenizers import ProteinTokenizer, SmilesTokenizer, TokenizeError


def test_esm2_alphabet_layout():
  tok = ProteinTokenizer()
  assert tok.vocab_size == 33 and len(tokenizers.ESM2_ALPHABET) == 33
  assert tokenizers.ESM2_ALPHABET[:4] == ("<cls>", "<pad>", "<eos>", "<unk>")
  assert "".join(tokenizers.ESM2_ALPHABET[4:29]) == "LAGVSERTIDPKQNFYMHWCXBUZO"
  assert tokenizers.ESM2_ALPHABET[29:] == (".", "-", "<null_1>", "<mask>")
  assert (tok.pad_id, tok.mask_id, tok.num_tokens_absorb) == (1, 32, 32)


def test_protein_round_trip_all_residues():
  tok = ProteinTokenizer()
  seq = "LAGVSERTIDPKQNFYMHWCXBUZO"
  ids = tok.encode(seq)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, np.arange(4, 29))
  assert tok.decode(ids) == seq
  rng = np.random.default_rng(0)
  for _ in range(20):
    s = "".join(rng.choice(list(seq), size=rng.integers(1, 300)))
    assert tok.decode(tok.encode(s)) == s


def test_rare_residues_kept_as_own_tokens():
  tok = ProteinTokenizer()
  ids = tok.encode("MXBUZOK")
  assert ids.tolist() == [20, 24, 25, 26, 27, 28, 15]
  assert tok.unk_id not in ids.tolist()


def test_lowercase_upper_cased_and_trailing_stop_stripped():
  tok = ProteinTokenizer()
  assert tok.decode(tok.encode("mkvLx")) == "MKVLX"
  assert tok.decode(tok.encode("MKV*")) == "MKV"


@pytest.mark.parametrize("seq,char,col", [("MKJV", "J", 3), ("MK1V", "1", 3), ("M*KV", "*", 2),
                                          ("MK V", " ", 3), ("MK-V", "-", 3)])
def test_bad_characters_reported_with_file_and_line(seq, char, col):
  tok = ProteinTokenizer()
  with pytest.raises(TokenizeError) as e:
    tok.encode(seq, source="prots.fasta", line=12, name="P1")
  msg = str(e.value)
  assert repr(char) in msg and f"column {col}" in msg and "prots.fasta:12" in msg and "P1" in msg


def test_non_ascii_reported():
  with pytest.raises(TokenizeError, match="non-ASCII"):
    ProteinTokenizer().encode("MKÄ")


def test_gaps_only_when_allowed():
  tok = ProteinTokenizer(allow_gaps=True)
  assert tok.encode("M-K.").tolist() == [20, 30, 15, 29]
  assert tok.decode(tok.encode("M-K.")) == "M-K."


def test_decode_stops_at_pad_and_shows_mask():
  tok = ProteinTokenizer()
  ids = [0, 20, 32, 15, 1, 5, 5]
  assert tok.decode(ids) == "M<mask>K"
  assert tok.decode(ids, mask="_") == "M_K"
  assert tok.decode(np.asarray([20, 2, 5])) == "M"
  with pytest.raises(TokenizeError, match="outside"):
    tok.decode([40])


def test_standard_fraction():
  tok = ProteinTokenizer()
  assert tok.standard_fraction(b"MKVL") == 1.0
  assert tok.standard_fraction(b"MKXX") == 0.5
  assert tok.standard_fraction(b"mkxx*") == 0.5
  assert tok.standard_fraction(b"") == 0.0


SMILES = ["CC(=O)Oc1ccccc1C(=O)O", "Clc1ccc(cc1)C(=O)Nc2ccc3[nH]ncc3c2", "C[C@@H](N)C(=O)O",
          "Brc1ccccc1.[Na+]", "C1CC%10CC1"]


def test_smiles_split_matches_regex_and_round_trips():
  tok = SmilesTokenizer.build(SMILES)
  assert SmilesTokenizer.split("CC(Cl)Br") == ["C", "C", "(", "Cl", ")", "Br"]
  assert "[C@@H]" in tok.vocab and "%10" in tok.vocab and "[nH]" in tok.vocab
  for s in SMILES:
    ids = tok.encode(s)
    assert ids.dtype == np.int32 and ids.min() >= 4
    assert tok.decode(ids) == s


def test_smiles_special_ids_and_mask_last():
  tok = SmilesTokenizer.build(SMILES)
  assert tok.vocab[:4] == ("<cls>", "<pad>", "<eos>", "<unk>")
  assert tok.mask_id == tok.vocab_size - 1 and tok.vocab[-1] == "<mask>"
  assert tok.decode([tok.encode("CC")[0], tok.mask_id, tok.pad_id, 5]) == "C<mask>"


def test_smiles_unknown_token_and_bad_character():
  tok = SmilesTokenizer.build(["CCO"])
  with pytest.raises(TokenizeError, match="'N' is not in the vocabulary"):
    tok.encode("CCN", source="pairs.csv", line=4)
  assert tok.encode("CCN", strict=False).tolist()[-1] == tok.unk_id
  with pytest.raises(TokenizeError) as e:
    SmilesTokenizer.split("CC&C", source="pairs.csv", line=9)
  assert "'&'" in str(e.value) and "column 3" in str(e.value) and "pairs.csv:9" in str(e.value)


def test_smiles_vocab_json_round_trip(tmp_path):
  tok = SmilesTokenizer.build(SMILES)
  tok.save(tmp_path / "v.json")
  back = SmilesTokenizer.load(tmp_path / "v.json")
  assert back.vocab == tok.vocab
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="bad.json"):
    SmilesTokenizer.load(tmp_path / "bad.json")
  with pytest.raises(FileNotFoundError, match="missing.json"):
    SmilesTokenizer.load(tmp_path / "missing.json")


def test_residue_mask_allows_exactly_the_residues():
  from sedd_jax.data.tokenizers import residue_mask
  standard = residue_mask(33)
  assert standard.shape == (33,)
  assert np.flatnonzero(standard).tolist() == list(range(4, 24))  # L A G ... C in ESM-2 order
  with_rare = residue_mask(33, allow_rare=True)
  assert np.flatnonzero(with_rare).tolist() == list(range(4, 29))  # + X B U Z O
  assert not standard[32] and not with_rare[32]  # never <mask>
