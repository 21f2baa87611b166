"""The SMILES grammar check (no RDKit) on known strings and on the bundled ligands."""

import csv
import gzip
import io

from helpers import ROOT
from sedd_jax.data.smiles_grammar import grammar_valid_smiles

VALID = ["CCO", "c1ccccc1", "CC(=O)Oc1ccccc1C(=O)O", "C[C@H](N)C(=O)O", "[Na+].[Cl-]",
         "C1CC2CCC1C2", "O=C(O)C%10CC%10", "F/C=C/F", "C#N", "[13CH4]", "c1ccc2c(c1)[nH]cc2",
         "CC(C)(C)C", "C1=CC=CC=C1", "[O-][N+](=O)c1ccccc1", "C=1CCCCC1"]
INVALID = ["", "C(C", "CC)", "c1cccc", "C==", "()C", "C(=O", "CC.", "[C", "CC>CC", "C1CC(",
           "=CC", "C()C", ".C", "CC..C", "C-", "(C)C", "C[Xx]C", "C C", "1CC1", "C(C)(", "C%1",
           "C1CC((N", " CCO", None]


def test_grammar_checker_on_known_strings():
  for s in VALID:
    assert grammar_valid_smiles(s), s
  for s in INVALID:
    assert not grammar_valid_smiles(s), s


def test_grammar_checker_accepts_the_bundled_ligands():
  with gzip.open(ROOT / "data" / "protein_ligand_pairs.csv.gz", "rt") as f:
    smiles = [row["smiles"] for row in csv.DictReader(io.StringIO(f.read()))]
  assert len(smiles) == 5000
  assert all(grammar_valid_smiles(s) for s in smiles)
