"""SMILES validity: the valid share and the checker choice (RDKit when installed, the grammar
fallback otherwise; the grammar itself: tests/test_smiles_grammar.py)."""

import sys

import pytest

from sedd_jax.protein_ligand import smiles as smiles_lib

VALID = ["CCO", "c1ccccc1", "CC(=O)Oc1ccccc1C(=O)O", "[Na+].[Cl-]"]
INVALID = ["", "C(C", "CC)", "c1cccc", "C=="]


def test_grammar_validity_share():
  assert smiles_lib.smiles_validity(VALID + INVALID, checker="grammar") == pytest.approx(
      len(VALID) / (len(VALID) + len(INVALID)))
  assert smiles_lib.smiles_validity([], checker="grammar") == 0.0


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
