"""The grammar check of SMILES strings (no chemistry, no RDKit): used by the data preparation
(invalid SMILES of a pairs file are bad records) and by the protein-ligand validity report.

- `grammar_valid_smiles(s)`: the tokenizer's regex tokens, balanced branches and ring closures,
  bracket atoms of known elements.
"""

from __future__ import annotations

import re

from sedd_jax.data.tokenizers import SmilesTokenizer
from sedd_jax.data.tokenizers import TokenizeError


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
