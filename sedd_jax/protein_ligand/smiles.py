"""SMILES validity of sampled ligands: RDKit when installed, else a grammar check.

- `grammar_valid_smiles(s)`: the grammar check (`sedd_jax.data.smiles_grammar`; no chemistry).
- `validity_checker(checker)`: (name, function) for `auto` | `rdkit` | `grammar`.
- `validity_report(smiles)` / `smiles_validity(smiles)`: the JSON report / the valid fraction.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from sedd_jax.data.smiles_grammar import grammar_valid_smiles

logger = logging.getLogger(__name__)


def _rdkit_checker() -> Callable[[str], bool] | None:
  try:
    from rdkit import Chem  # pylint: disable=import-outside-toplevel
    from rdkit import RDLogger  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  RDLogger.DisableLog("rdApp.*")
  return lambda s: bool(s) and Chem.MolFromSmiles(s) is not None


def validity_checker(checker: str = "auto") -> tuple[str, Callable[[str], bool]]:
  """(name, function) of the SMILES checker: `rdkit` when installed (or asked), else `grammar`.

  Raises ImportError if `rdkit` is asked for and not installed.
  """
  if checker not in ("auto", "rdkit", "grammar"):
    raise ValueError(f"checker {checker!r}; choose auto, rdkit or grammar")
  if checker != "grammar":
    fn = _rdkit_checker()
    if fn is not None:
      return "rdkit", fn
    if checker == "rdkit":
      raise ImportError("rdkit is not installed (pip install rdkit, or the chem extra: "
                        "pip install -e '.[chem]')")
  return "grammar", grammar_valid_smiles


def validity_report(smiles_list: Sequence[str], checker: str = "auto") -> dict[str, Any]:
  """The validity of `smiles_list` as a JSON-able dict: `checker` (which one was used: `rdkit`
  or `grammar`, see `validity_checker`), `num`, `num_valid`, `validity` (fraction; 0.0 for no
  strings) and `valid` (one bool per string)."""
  name, fn = validity_checker(checker)
  valid = [bool(fn(s)) for s in smiles_list]
  n = len(valid)
  return {"checker": name, "num": n, "num_valid": sum(valid),
          "validity": sum(valid) / n if n else 0.0, "valid": valid}


def smiles_validity(smiles_list: Sequence[str], checker: str = "auto") -> float:
  """Fraction of valid SMILES in `smiles_list` (0.0 for an empty list): parsed by RDKit when it
  is installed (`checker="auto"`), else by `grammar_valid_smiles`."""
  report = validity_report(smiles_list, checker)
  logger.debug("SMILES validity (%s): %d / %d", report["checker"], report["num_valid"],
               report["num"])
  return report["validity"]
