"""Conditional generation inputs: which positions are fixed, and to which tokens.

Every builder returns a `Condition`: `tokens (length,) int32` (ESM-2 ids; 0 where free) and
`mask (length,) bool` (True = fixed, kept by the sampler's projector before every step), for a
sequence of `length` residues. Positions are 0-based; spans are half-open `[start, end)` as
Python slices. `max_length` (the model's maximum, `cfg.model.length`) is checked everywhere.

* `prefix(seq, length)`, `suffix(seq, length)`: fixed start / end of a sequence of `length`.
* `infill(seq, spans)`: the whole of `seq` fixed except the `spans` to regenerate.
* `motif(segments, length, rng)`: motif segments (sequence, start or None) in a scaffold of
  `length`; a start of None is drawn uniformly among the starts that overlap nothing placed.
* `template(text, mask_char="_")`: a template string where `<mask>` or `mask_char` marks a
  position to generate, every other letter is fixed.
* `combine(*conditions)`: the union of conditions on the same length (e.g. prefix + suffix).
* `inline(length, prefix=, suffix=, motifs=, rng=)`: prefix, suffix and motif segments of one
  sequence combined (None without any); motifs as 'SEQ@POS' / 'SEQ' strings or pairs.
* `check_residues(c, allow_rare, what)`: refuses a condition fixing a residue that the sampler
  never generates (`tokenizers.residue_mask`).
* `stack(conditions, length)`: per-sequence conditions padded to one width.

Errors are ValueErrors that say what is wrong: a motif longer than the scaffold, overlapping
spans or segments, a length over the model's maximum, residues the tokenizer rejects.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

import numpy as np

from sedd_jax.data import tokenizers

_TOKENIZER = tokenizers.ProteinTokenizer()


@dataclasses.dataclass(frozen=True)
class Condition:
  """Fixed positions of one sequence: tokens (length,) int32, mask (length,) bool."""

  tokens: np.ndarray
  mask: np.ndarray

  @property
  def length(self) -> int:
    return int(self.tokens.shape[0])

  def padded(self, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) padded with free positions to `length` >= self.length: (length,) each."""
    if length < self.length:
      raise ValueError(f"cannot pad a condition of length {self.length} to {length}")
    tok = np.zeros((length,), np.int32)
    msk = np.zeros((length,), bool)
    tok[:self.length] = self.tokens
    msk[:self.length] = self.mask
    return tok, msk

  def describe(self) -> str:
    """A compact template: fixed letters as themselves, free positions as '_'."""
    letters = np.array(list(_TOKENIZER.decode(np.where(self.mask, self.tokens, 4),
                                              stop_at_pad=False)))
    letters[~self.mask] = "_"
    return "".join(letters)


def encode(seq: str, what: str = "sequence") -> np.ndarray:
  """Residue string -> (len,) int32 ESM-2 ids; ValueError naming `what` on a bad character."""
  try:
    return _TOKENIZER.encode(seq, name=what)
  except tokenizers.TokenizeError as e:
    raise ValueError(str(e)) from None


def check_length(length: int, max_length: int | None, what: str = "length") -> None:
  """ValueError unless 1 <= length <= max_length (when given)."""
  if length < 1:
    raise ValueError(f"{what} must be >= 1; got {length}")
  if max_length is not None and length > max_length:
    raise ValueError(f"{what} {length} is over the model's maximum length {max_length} "
                     "(cfg.model.length)")


def _empty(length: int) -> tuple[np.ndarray, np.ndarray]:
  return np.zeros((length,), np.int32), np.zeros((length,), bool)


def prefix(seq: str, length: int, max_length: int | None = None) -> Condition:
  """`seq` fixed at positions [0, len(seq)) of a sequence of `length`."""
  check_length(length, max_length)
  ids = encode(seq, "prefix")
  if ids.size > length:
    raise ValueError(f"prefix of {ids.size} residues is longer than the length {length}")
  tok, msk = _empty(length)
  tok[:ids.size], msk[:ids.size] = ids, True
  return Condition(tok, msk)


def suffix(seq: str, length: int, max_length: int | None = None) -> Condition:
  """`seq` fixed at positions [length - len(seq), length)."""
  check_length(length, max_length)
  ids = encode(seq, "suffix")
  if ids.size > length:
    raise ValueError(f"suffix of {ids.size} residues is longer than the length {length}")
  tok, msk = _empty(length)
  tok[length - ids.size:], msk[length - ids.size:] = ids, True
  return Condition(tok, msk)


def _check_spans(spans: Sequence[tuple[int, int]], length: int, what: str) -> None:
  ordered = sorted((int(a), int(b)) for a, b in spans)
  for a, b in ordered:
    if not 0 <= a < b <= length:
      raise ValueError(f"{what} [{a}, {b}) is empty or outside the sequence [0, {length})")
  for (a0, b0), (a1, b1) in zip(ordered, ordered[1:]):
    if a1 < b0:
      raise ValueError(f"{what}s [{a0}, {b0}) and [{a1}, {b1}) overlap")


def infill(seq: str, spans: Sequence[tuple[int, int]], max_length: int | None = None
           ) -> Condition:
  """`seq` fixed everywhere except the half-open `spans`, which are generated."""
  ids = encode(seq, "infill sequence")
  check_length(ids.size, max_length, "infill sequence length")
  if not spans:
    raise ValueError("infill needs at least one span to generate")
  _check_spans(spans, ids.size, "span")
  msk = np.ones((ids.size,), bool)
  for a, b in spans:
    msk[a:b] = False
  return Condition(ids.astype(np.int32), msk)


def parse_spans(text: str) -> list[tuple[int, int]]:
  """'10:20,40:45' -> [(10, 20), (40, 45)] (0-based, half-open)."""
  spans = []
  for part in text.split(","):
    m = re.fullmatch(r"\s*(\d+)\s*[:-]\s*(\d+)\s*", part)
    if not m:
      raise ValueError(f"span {part!r} is not START:END (0-based, end exclusive)")
    spans.append((int(m.group(1)), int(m.group(2))))
  return spans


def parse_motif(text: str) -> tuple[str, int | None]:
  """'SEQ@POS' -> (SEQ, POS) with a 0-based start; 'SEQ' or 'SEQ@?' -> (SEQ, None) (sampled)."""
  seq, _, pos = text.partition("@")
  if not seq:
    raise ValueError(f"motif {text!r} has no sequence (expected SEQ@POS, SEQ@? or SEQ)")
  if pos in ("", "?"):
    return seq, None
  if not pos.isdigit():
    raise ValueError(f"motif {text!r}: position {pos!r} is not a 0-based integer or '?'")
  return seq, int(pos)


def motif(segments: Sequence[tuple[str, int | None]], length: int,
          rng: np.random.Generator | None = None, max_length: int | None = None,
          max_tries: int = 1000) -> Condition:
  """Motif segments placed in a scaffold of `length` residues (the rest is generated).

  Args:
    segments: (sequence, start) pairs; start None = drawn uniformly among the starts where the
      segment overlaps no segment placed so far (given starts first, then the others in order;
      the whole draw is retried up to `max_tries` times if it paints itself into a corner).
    length: scaffold length.
    rng: numpy Generator for the drawn starts (required if any start is None).
    max_length: the model's maximum length.

  Raises:
    ValueError: a motif (or all motifs together) longer than the scaffold, a given start that
      runs past the end, overlapping segments, or no room to place the drawn ones.
  """
  check_length(length, max_length, "scaffold length")
  if not segments:
    raise ValueError("motif scaffolding needs at least one motif segment")
  encoded = [(encode(s, f"motif {s!r}"), p) for s, p in segments]
  for (ids, p), (s, _) in zip(encoded, segments):
    if ids.size > length:
      raise ValueError(f"motif {s!r} ({ids.size} residues) is longer than the scaffold "
                       f"length {length}")
    if p is not None and (p < 0 or p + ids.size > length):
      raise ValueError(f"motif {s!r} at {p} runs past the scaffold end {length}")
  total = sum(ids.size for ids, _ in encoded)
  if total > length:
    raise ValueError(f"the motifs hold {total} residues together, more than the scaffold "
                     f"length {length}")
  given = [(p, p + ids.size) for ids, p in encoded if p is not None]
  _check_spans(given, length, "motif segment")
  if any(p is None for _, p in encoded) and rng is None:
    raise ValueError("motif positions to sample need an rng")

  for _ in range(max_tries):
    occupied = np.zeros((length,), bool)
    for a, b in given:
      occupied[a:b] = True
    starts = []
    ok = True
    for ids, p in encoded:
      if p is None:
        n = ids.size
        # Valid starts: windows [s, s + n) with no occupied position.
        csum = np.concatenate([[0], np.cumsum(occupied)])
        free = np.flatnonzero(csum[n:] - csum[:-n] == 0) if n else np.arange(length)
        if free.size == 0:
          ok = False
          break
        p = int(rng.choice(free))
        occupied[p:p + n] = True
      starts.append(p)
    if ok:
      break
  else:
    raise ValueError(f"could not place the motifs without overlap in a scaffold of {length} "
                     f"after {max_tries} tries")
  tok, msk = _empty(length)
  for (ids, _), p in zip(encoded, starts):
    tok[p:p + ids.size], msk[p:p + ids.size] = ids, True
  return Condition(tok, msk)


def template(text: str, mask_char: str = "_", max_length: int | None = None) -> Condition:
  """A template string -> Condition: `<mask>` or `mask_char` = generate, a residue = fixed.

  Whitespace is ignored; anything else the tokenizer rejects raises ValueError.
  """
  if len(mask_char) != 1 or mask_char.isalpha():
    raise ValueError(f"mask_char must be one non-letter character; got {mask_char!r}")
  text = "".join(text.split())
  parts = re.split(r"(<mask>)", text)
  tok, msk = [], []
  for part in parts:
    if part == "<mask>":
      tok.append(0)
      msk.append(False)
      continue
    for ch in part:
      if ch == mask_char:
        tok.append(0)
        msk.append(False)
      else:
        ids = encode(ch, f"template residue {ch!r}")
        if ids.size != 1:
          raise ValueError(f"template character {ch!r} is not a residue or {mask_char!r}")
        tok.append(int(ids[0]))
        msk.append(True)
  check_length(len(tok), max_length, "template length")
  return Condition(np.array(tok, np.int32), np.array(msk, bool))


def combine(*conditions: Condition) -> Condition:
  """Union of conditions of one length; a position fixed to two different tokens raises."""
  if not conditions:
    raise ValueError("nothing to combine")
  length = conditions[0].length
  tok, msk = _empty(length)
  for c in conditions:
    if c.length != length:
      raise ValueError(f"conditions of different lengths {length} and {c.length}")
    clash = msk & c.mask & (tok != c.tokens)
    if clash.any():
      raise ValueError(f"conditions overlap with different residues at positions "
                       f"{np.flatnonzero(clash)[:10].tolist()}")
    tok = np.where(c.mask, c.tokens, tok)
    msk = msk | c.mask
  return Condition(tok.astype(np.int32), msk)


def stack(conditions: Iterable[Condition], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-sequence conditions padded to `length`: (N, length) tokens and mask."""
  pairs = [c.padded(length) for c in conditions]
  if not pairs:
    return np.zeros((0, length), np.int32), np.zeros((0, length), bool)
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


_prefix, _suffix = prefix, suffix  # the builders, under names that `inline`'s keywords leave free


def inline(length: int, *, prefix: str | None = None, suffix: str | None = None,
           motifs: Sequence[str | tuple[str, int | None]] = (),
           rng: np.random.Generator | None = None, max_length: int | None = None,
           allow_rare: bool | None = None) -> Condition | None:
  """The `prefix`, `suffix` and `motifs` of one sequence of `length` combined, or None when
  none is given. `motifs`: 'SEQ@POS', 'SEQ@?' or 'SEQ' strings (`parse_motif`) or
  (sequence, start or None) pairs; a drawn start (by `rng`) overlaps neither another motif nor
  the prefix or suffix. With `allow_rare` given, each part is checked by `check_residues`
  (named prefix, suffix, motifs). ValueErrors as the builders'."""
  check_length(length, max_length)
  parts = {}
  if prefix:
    parts["prefix"] = _prefix(prefix, length, max_length)
  if suffix:
    parts["suffix"] = _suffix(suffix, length, max_length)
  ends = combine(*parts.values()) if parts else None
  if motifs:
    segments = [parse_motif(m) if isinstance(m, str) else (str(m[0]), m[1]) for m in motifs]
    placed = motif(segments + [(_TOKENIZER.decode(c.tokens[c.mask]), int(np.argmax(c.mask)))
                               for c in parts.values()], length, rng, max_length)
    free = ~ends.mask if ends is not None else np.ones((length,), bool)
    parts["motifs"] = Condition(placed.tokens, placed.mask & free)
  if allow_rare is not None:
    for what, c in parts.items():
      check_residues(c, allow_rare, what)
  return combine(*parts.values()) if parts else None


def check_residues(c: Condition, allow_rare: bool, what: str,
                   hint: str = "pass allow_rare=True") -> None:
  """ValueError naming `what` when `c` fixes residues that the sampler never generates (the
  rule of `tokenizers.residue_mask`: X B U Z O only with `allow_rare`); `hint` says how to
  allow them (the sample CLI: "add --allow-rare")."""
  bad = c.mask & ~tokenizers.residue_mask(_TOKENIZER.vocab_size, allow_rare)[c.tokens]
  if bad.any():
    letters = "".join(sorted(set(_TOKENIZER.decode(c.tokens[bad]))))
    raise ValueError(f"{what} fixes {', '.join(letters)} (0-based positions "
                     f"{np.flatnonzero(bad)[:10].tolist()}): only the 20 standard amino acids are "
                     f"generated unless rare residues are allowed; {hint} or replace them")
