"""SMILES validity: the grammar checker on known strings and on the bundled ligands, and the
checker choice (RDKit when installed, the grammar fallback otherwise)."""

import csv
import gzip
import io
import sys

import pytest

from helpers import ROOT
from sedd_jax.protein_ligand import smiles as smiles_lib

VALID = ["CCO", "c1ccccc1", "CC(=O)Oc1ccccc1C(=O)O", "C[C@H](N)C(=O)O", "[Na+].[Cl-]",
         "C1CC2CCC1C2", "O=C(O)C%10CC%10", "F/C=C/F", "C#N", "[13CH4]", "c1ccc2c(c1)[nH]cc2",
         "CC(C)(C)C", "C1=CC=CC=C1", "[O-][N+](=O)c1ccccc1", "C=1CCCCC1"]
INVALID = ["", "C(C", "CC)", "c1cccc", "C==", "()C", "C(=O", "CC.", "[C", "CC>CC", "C1CC(",
           "=CC", "C()C", ".C", "CC..C", "C-", "(C)C", "C[Xx]C", "C C", "1CC1", "C(C)(", "C%1"]


def test_grammar_checker_on_known_strings():
  for s in VALID:
    assert smiles_lib.grammar_valid_smiles(s), s
  for s in INVALID:
    assert not smiles_lib.grammar_valid_smiles(s), s
  assert smiles_lib.smiles_validity(VALID + INVALID, checker="grammar") == pytest.approx(
      len(VALID) / (len(VALID) + len(INVALID)))
  assert smiles_lib.smiles_validity([], checker="grammar") == 0.0


def test_grammar_checker_accepts_the_bundled_ligands():
  with gzip.open(ROOT / "data" / "protein_ligand_pairs.csv.gz", "rt") as f:
    smiles = [row["smiles"] for row in csv.DictReader(io.StringIO(f.read()))]
  assert len(smiles) == 5000
  assert smiles_lib.smiles_validity(smiles, checker="grammar") == 1.0


# SMILES checker: RDKit (the `chem` extra) or the grammar fallback.
# Grammatical SMILES that are not molecules: pentavalent carbon, a 5-ring of aromatic carbons.
GRAMMATICAL_NOT_CHEMICAL = ["C(C)(C)(C)(C)C", "c1cccc1"]
CHEMICAL = ["CCO", "c1ccccc1", "CC(=O)Oc1ccccc1C(=O)O"]


def test_rdkit_is_used_when_installed():
  pytest.importorskip("rdkit")  # an optional extra: `pip install -e '.[chem]'` (in `.[test]`)
  report = smiles_lib.validity_report(CHEMICAL + GRAMMATICAL_NOT_CHEMICAL + ["C(C"])
  assert report["checker"] == "rdkit"
  assert report["valid"] == [True, True, True, False, False, False]
  assert report["num_valid"] == 3 and report["validity"] == 0.5
  assert all(smiles_lib.grammar_valid_smiles(s) for s in GRAMMATICAL_NOT_CHEMICAL)


def test_grammar_fallback_without_rdkit(monkeypatch):
  monkeypatch.setitem(sys.modules, "rdkit", None)  # `import rdkit` raises ImportError
  report = smiles_lib.validity_report(CHEMICAL + GRAMMATICAL_NOT_CHEMICAL + ["C(C"])
  assert report["checker"] == "grammar"
  assert report["valid"] == [True] * 5 + [False]
  with pytest.raises(ImportError, match="chem"):
    smiles_lib.validity_checker("rdkit")
  assert smiles_lib.validity_report([]) == {"checker": "grammar", "num": 0, "num_valid": 0,
                                       "validity": 0.0, "valid": []}
