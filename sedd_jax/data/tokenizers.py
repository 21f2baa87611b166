"""Tokenizers: proteins in the ESM-2 alphabet, ligands as regex-split SMILES.

Protein ids (ESM-2, 33 symbols)::

  <cls> 0, <pad> 1, <eos> 2, <unk> 3,
  L A G V S E R T I D P K Q N F Y M H W C X B U Z O -> 4..28,
  '.' 29, '-' 30, <null_1> 31, <mask> 32.

With the absorbing graph `graph.tokens = 32` and `<mask> = 32` is the absorbing state, so model
outputs have 33 classes. Rare residues X/B/U/Z/O keep tokens of their own; lowercase letters are
upper-cased; one trailing `*` (stop codon) is accepted and stripped; any other character raises
`TokenizeError` naming the character, its column and (when given) the file and line.

SMILES ids mirror the protein layout: `<cls> 0, <pad> 1, <eos> 2, <unk> 3`, the vocabulary built
from data (sorted) at 4.., and `<mask>` last, so an absorbing graph over SMILES has
`tokens = vocab_size - 1` and the mask as its last index.
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

ESM2_ALPHABET: tuple[str, ...] = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H",
    "W", "C", "X", "B", "U", "Z", "O",
    ".", "-", "<null_1>", "<mask>",
)
RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO"
STANDARD_RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
RARE_RESIDUES = "XBUZO"


def residue_mask(dim: int, allow_rare: bool = False) -> np.ndarray:
  """(dim,) bool: the ESM-2 ids a protein sampler may emit (the 20 standard residues, plus
  X/B/U/Z/O when `allow_rare`); dim is the graph's dimension (33 with the absorbing graph)."""
  letters = STANDARD_RESIDUES + (RARE_RESIDUES if allow_rare else "")
  allowed = np.zeros((dim,), bool)
  allowed[[ESM2_ALPHABET.index(a) for a in letters if ESM2_ALPHABET.index(a) < dim]] = True
  return allowed
GAPS = ".-"

CLS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 32

SMILES_REGEX = (r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?|>|\*"
                r"|\$|\%[0-9]{2}|[0-9])")
SMILES_SPECIALS: tuple[str, ...] = ("<cls>", "<pad>", "<eos>", "<unk>")
SMILES_MASK = "<mask>"


class TokenizeError(ValueError):
  """A sequence holding a character (or token) outside the tokenizer's alphabet."""


def _where(source: str | None, line: int | None) -> str:
  if source is None:
    return ""
  return f" in {source}:{line}" if line is not None else f" in {source}"


class ProteinTokenizer:
  """ESM-2 alphabet tokenizer (33 ids; see the module docstring).

  Args:
    allow_gaps: accept the alignment characters '.' and '-' (ids 29, 30). Off by default: the
      training data are unaligned sequences, and a gap there is a data error.
  """

  alphabet = ESM2_ALPHABET
  vocab_size = len(ESM2_ALPHABET)  # 33
  cls_id, pad_id, eos_id, unk_id, mask_id = CLS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID
  num_tokens_absorb = 32  # graph.tokens for the absorbing graph; <mask> = 32 is the extra state

  def __init__(self, allow_gaps: bool = False):
    self.allow_gaps = allow_gaps
    allowed = RESIDUES + (GAPS if allow_gaps else "")
    # bytes -> id translation table; 0xFF marks a byte outside the alphabet.
    table = bytearray(b"\xff" * 256)
    for ch in allowed:
      table[ord(ch)] = ESM2_ALPHABET.index(ch)
      table[ord(ch.lower())] = ESM2_ALPHABET.index(ch)
    self._table = bytes(table)
    self._valid = bytes(b for b in range(256) if table[b] != 0xFF)
    self._standard = bytes(STANDARD_RESIDUES + STANDARD_RESIDUES.lower(), "ascii")

  def encode_bytes(self, seq: bytes, *, source: str | None = None, line: int | None = None,
                   name: str | None = None) -> bytes:
    """Encodes ASCII `seq` to ids as a byte string (one byte per residue; the fast path).

    Raises:
      TokenizeError: on a character outside the alphabet (naming it, its column, `name`, and
        `source:line` when given).
    """
    if seq.endswith(b"*"):
      seq = seq[:-1]
    bad = seq.translate(None, self._valid)
    if bad:
      col = next(i for i, b in enumerate(seq) if b in bad)
      ch = chr(seq[col])
      what = f"sequence {name!r}" if name else "sequence"
      hint = " (a stop '*' is accepted only at the end)" if ch == "*" else ""
      if ch == "." or ch == "-":
        hint = " (alignment gap; pass allow_gaps=True to keep it)"
      raise TokenizeError(
          f"invalid character {ch!r} (0x{seq[col]:02x}) at column {col + 1} of {what}"
          f"{_where(source, line)}{hint}")
    return seq.translate(self._table)

  def encode(self, seq: str, *, source: str | None = None, line: int | None = None,
             name: str | None = None) -> np.ndarray:
    """Encodes a residue string to ids: `(len,)` int32 (trailing `*` stripped, case-folded)."""
    try:
      raw = seq.encode("ascii")
    except UnicodeEncodeError as e:
      raise TokenizeError(f"non-ASCII character {seq[e.start]!r} at column {e.start + 1} of "
                          f"{'sequence ' + repr(name) if name else 'sequence'}"
                          f"{_where(source, line)}") from None
    ids = self.encode_bytes(raw, source=source, line=line, name=name)
    return np.frombuffer(ids, dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray, mask: str = "<mask>",
             stop_at_pad: bool = True) -> str:
    """Ids `(len,)` -> string. Stops at the first `<pad>` (or `<eos>`); `<cls>` is skipped.

    Args:
      ids: token ids, any integer dtype.
      mask: how `<mask>` is shown (e.g. "_" for one character per position).
      stop_at_pad: stop at the first `<pad>`/`<eos>`; otherwise show them as tokens.
    """
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i in (PAD_ID, EOS_ID) and stop_at_pad:
        break
      if i == CLS_ID:
        continue
      if i == MASK_ID:
        out.append(mask)
      elif 0 <= i < len(ESM2_ALPHABET):
        out.append(ESM2_ALPHABET[i])
      else:
        raise TokenizeError(f"id {i} outside the ESM-2 alphabet (0..{len(ESM2_ALPHABET) - 1})")
    return "".join(out)

  def standard_fraction(self, seq: bytes) -> float:
    """Fraction of the 20 standard amino acids among the residues of ASCII `seq` (0 if empty)."""
    if seq.endswith(b"*"):
      seq = seq[:-1]
    if not seq:
      return 0.0
    return 1.0 - len(seq.translate(None, self._standard)) / len(seq)


class SmilesTokenizer:
  """Regex SMILES tokenizer (Schwaller et al. 2019) with a vocabulary built from data.

  Ids: `<cls> 0, <pad> 1, <eos> 2, <unk> 3`, data tokens (sorted) from 4, `<mask>` last.

  Args:
    tokens: the data tokens (without specials), in id order.
  """

  regex = re.compile(SMILES_REGEX)
  cls_id, pad_id, eos_id, unk_id = 0, 1, 2, 3

  def __init__(self, tokens: Sequence[str]):
    tokens = list(tokens)
    dup = [t for t, c in collections.Counter(tokens).items() if c > 1]
    if dup or any(t in SMILES_SPECIALS or t == SMILES_MASK for t in tokens):
      raise ValueError(f"SMILES vocabulary holds duplicates or special tokens: {dup or tokens}")
    self.vocab: tuple[str, ...] = SMILES_SPECIALS + tuple(tokens) + (SMILES_MASK,)
    self._ids = {t: i for i, t in enumerate(self.vocab)}
    self.mask_id = len(self.vocab) - 1

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  @classmethod
  def split(cls, smiles: str, *, source: str | None = None, line: int | None = None) -> list[str]:
    """Splits SMILES into regex tokens; raises TokenizeError if a character matches no token."""
    parts = cls.regex.findall(smiles)
    if sum(map(len, parts)) != len(smiles):
      pos = 0
      for m in cls.regex.finditer(smiles):
        if m.start() != pos:
          break
        pos = m.end()
      raise TokenizeError(f"SMILES character {smiles[pos]!r} at column {pos + 1} matches no "
                          f"token{_where(source, line)}: {smiles!r}")
    return parts

  @classmethod
  def build(cls, smiles: Iterable[str], min_count: int = 1) -> "SmilesTokenizer":
    """Builds the vocabulary from an iterable of SMILES strings (tokens seen >= min_count)."""
    counts: collections.Counter[str] = collections.Counter()
    for s in smiles:
      counts.update(cls.split(s))
    return cls(sorted(t for t, c in counts.items() if c >= min_count))

  def encode(self, smiles: str, *, strict: bool = True, source: str | None = None,
             line: int | None = None) -> np.ndarray:
    """SMILES -> `(n_tokens,)` int32. Unknown tokens raise (strict) or map to `<unk>`."""
    ids = []
    for t in self.split(smiles, source=source, line=line):
      i = self._ids.get(t)
      if i is None or i < len(SMILES_SPECIALS) or i == self.mask_id:
        if strict:
          raise TokenizeError(f"SMILES token {t!r} is not in the vocabulary"
                              f"{_where(source, line)}: {smiles!r}")
        i = self.unk_id
      ids.append(i)
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray, mask: str = "<mask>") -> str:
    """Ids -> SMILES; stops at the first `<pad>`/`<eos>`, skips `<cls>`."""
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i in (self.pad_id, self.eos_id):
        break
      if i == self.cls_id:
        continue
      if i == self.mask_id:
        out.append(mask)
      elif 0 <= i < len(self.vocab):
        out.append(self.vocab[i])
      else:
        raise TokenizeError(f"id {i} outside the SMILES vocabulary (0..{len(self.vocab) - 1})")
    return "".join(out)

  def to_json(self) -> dict:
    return {"type": "smiles_regex", "regex": SMILES_REGEX, "vocab": list(self.vocab),
            "special": {"cls": self.cls_id, "pad": self.pad_id, "eos": self.eos_id,
                        "unk": self.unk_id, "mask": self.mask_id}}

  def save(self, path: str | os.PathLike) -> None:
    """Writes the vocabulary as JSON (see `to_json`)."""
    with open(path, "w") as f:
      json.dump(self.to_json(), f, indent=1)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "SmilesTokenizer":
    """Reads a vocabulary written by `save`; a missing or malformed file raises naming it."""
    try:
      with open(path) as f:
        d = json.load(f)
      vocab = d["vocab"]
    except FileNotFoundError:
      raise FileNotFoundError(f"SMILES vocabulary {path} does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"SMILES vocabulary {path} is malformed: {e}") from None
    if d.get("regex") != SMILES_REGEX:
      raise ValueError(f"SMILES vocabulary {path} was built with another regex")
    n = len(SMILES_SPECIALS)
    if tuple(vocab[:n]) != SMILES_SPECIALS or vocab[-1] != SMILES_MASK:
      raise ValueError(f"SMILES vocabulary {path} has unexpected special tokens")
    return cls(vocab[n:-1])
