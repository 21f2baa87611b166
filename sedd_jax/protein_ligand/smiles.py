"""SMILES validity of sampled ligands: RDKit when installed, else a grammar check.

- `grammar_valid_smiles(s)`: the tokenizer's regex tokens, balanced branches and ring closures,
  bracket atoms of known elements (no chemistry).
- `validity_checker(checker)`: (name, function) for `auto` | `rdkit` | `grammar`.
- `validity_report(smiles)` / `smiles_validity(smiles)`: the JSON report / the valid fraction.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Sequence

from sedd_jax.data.tokenizers import SmilesTokenizer
from sedd_jax.data.tokenizers import TokenizeError

logger = logging.getLogger(__name__)


_BOND = frozenset("-=#:/\\~")
_ORGANIC = frozenset(["B", "C", "N", "O", "P", "S", "F", "Cl", "Br", "I", "b", "c", "n", "o", "s",
                      "p", "*"])
_ELEMENTS = frozenset(
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As "
    "Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd "
    "Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am "
    "Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og".split()
    + ["*", "b", "c", "n", "o", "s", "p", "se", "as", "te"])
# Inside brackets: [isotope] symbol [chirality] [H count] [charge] [:class].
_BRACKET = re.compile(
    r"^\[(\d{1,3})?"
    r"(\*|[A-Z][a-z]?|se|as|te|b|c|n|o|s|p)"
    r"(@@|@(?:TH|AL|SP|TB|OH)?\d{0,2})?"
    r"(H\d?)?"
    r"(\+{1,3}|-{1,3}|[+-]\d{1,2})?"
    r"(:\d+)?\]$")


def grammar_valid_smiles(smiles: str) -> bool:
  """Grammar check of one SMILES string (no chemistry): it splits into the tokenizer's regex
  tokens exactly, is non-empty, parentheses balance and never open a branch before an atom or
  hold an empty one, ring-closure labels (digits, %nn) pair up, bonds sit between atoms, bracket
  atoms are well formed, '.' separates non-empty fragments, and nothing else ('>', '+', '@', '?',
  '$' outside brackets) appears."""
  if not isinstance(smiles, str) or not smiles or smiles != smiles.strip():
    return False
  try:
    tokens = SmilesTokenizer.split(smiles)
  except TokenizeError:
    return False
  depth = 0
  open_rings: set[str] = set()
  prev = "start"  # start | atom | bond | open | close | ring | dot
  for tok in tokens:
    if tok in _ORGANIC or tok.startswith("["):
      if tok.startswith("["):
        m = _BRACKET.match(tok)
        if not m or m.group(2) not in _ELEMENTS:
          return False
      prev = "atom"
    elif tok in _BOND:
      if prev not in ("atom", "ring", "close", "open"):
        return False
      prev = "bond"
    elif tok == "(":
      if prev not in ("atom", "ring", "close"):
        return False
      depth += 1
      prev = "open"
    elif tok == ")":
      if prev not in ("atom", "ring", "close") or depth == 0:
        return False
      depth -= 1
      prev = "close"
    elif tok.isdigit() or tok.startswith("%"):
      if prev not in ("atom", "ring", "bond"):
        return False
      open_rings ^= {tok}
      prev = "ring"
    elif tok == ".":
      if prev not in ("atom", "ring", "close") or depth != 0:
        return False
      prev = "dot"
    else:
      return False
  return prev in ("atom", "ring", "close") and depth == 0 and not open_rings


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
