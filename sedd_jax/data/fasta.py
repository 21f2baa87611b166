"""Streaming readers for FASTA (plain or gzip) and the peers' UniRef50 layout; the input errors
and the bad-record policy shared with the pairs reader (`sedd_jax.data.pairs`).

Every reader streams in constant memory (one record at a time) and reports bad input naming the
file and line: file-level problems (empty file, not FASTA, truncated or corrupt gzip) always
raise `DataError`; record-level problems (a sequence with digits or unknown letters, an empty
sequence) go through a `Skips` policy that either raises (`on_error="raise"`) or counts the skip
by reason and logs the first few (`on_error="skip"`).

Sequences are returned as ASCII `bytes` (as read; no case folding) for speed; `.text` gives a str.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import gzip
import io
import json
import logging
import os
import pathlib
import re
import zlib
from typing import Callable, Iterator

import numpy as np

from sedd_jax.data import tokenizers

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
ON_ERROR = ("raise", "skip")
SKIP_HINT = " (use on_error=skip / --on-error skip to skip such records)"
# Bytes a protein sequence line may hold: the 25 residue letters in either case and a stop '*'.
PROTEIN_BYTES = bytes(tokenizers.RESIDUES + tokenizers.RESIDUES.lower() + "*", "ascii")



class DataError(ValueError):
  """Bad input data; the message names the file and (where known) the line."""

  def __init__(self, message: str, path: PathLike | None = None, line: int | None = None):
    super().__init__(message)
    self.path = None if path is None else str(path)
    self.line = line


def location(path: PathLike, line: int | None) -> str:
  """'path:line' (or 'path' when the line is unknown), the prefix of the readers' messages."""
  return f"{path}:{line}" if line else f"{path}"


class Skips:
  """The bad-record policy and the count of skipped records by reason.

  Args:
    on_error: "raise" (the first bad record raises DataError) or "skip" (counted, logged).
    max_logged: how many skips are logged as warnings (all are counted).
    hint: appended to the message of a raised DataError: how the caller's user can skip such
      records (the default names the option of `data.prepare` and the data config; "" for
      callers that offer no way to skip).
  """

  def __init__(self, on_error: str = "raise", max_logged: int = 10, hint: str = SKIP_HINT):
    if on_error not in ON_ERROR:
      raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    self.on_error = on_error
    self.max_logged = max_logged
    self.hint = hint
    self.counts: collections.Counter[str] = collections.Counter()
    self.examples: dict[str, str] = {}

  def report(self, reason: str, message: str, path: PathLike | None = None,
             line: int | None = None) -> None:
    """Raises DataError(message) or counts a skip under `reason`."""
    if self.on_error == "raise":
      raise DataError(message + self.hint, path, line)
    self.counts[reason] += 1
    self.examples.setdefault(reason, message)
    if sum(self.counts.values()) <= self.max_logged:
      log.warning("skipped: %s", message)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> dict[str, int]:
    return dict(sorted(self.counts.items()))


@dataclasses.dataclass(frozen=True)
class FastaRecord:
  """One FASTA record: `index` is its 0-based position in the file (bad records included)."""

  name: str
  description: str
  sequence: bytes
  line: int
  index: int

  @property
  def text(self) -> str:
    return self.sequence.decode("ascii")


def is_gzip(path: PathLike) -> bool:
  with open(path, "rb") as f:
    return f.read(2) == b"\x1f\x8b"


def open_binary(path: PathLike) -> io.BufferedIOBase:
  """Opens a plain or gzip file (detected from its magic bytes, not its name) for reading."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"input file {path} does not exist")
  if path.is_dir():
    raise DataError(f"{path} is a directory, expected a file", path)
  if is_gzip(path):
    return gzip.open(path, "rb")
  return open(path, "rb", buffering=1 << 20)


def iter_lines(path: PathLike) -> Iterator[tuple[int, bytes]]:
  """Yields (1-based line number, line without the newline) of a plain or gzip file; a UTF-8
  byte order mark at its start is dropped.

  Raises:
    DataError: for a truncated or corrupt gzip stream, naming the last line read.
  """
  lineno = 0
  try:
    with open_binary(path) as f:
      for lineno, line in enumerate(f, 1):  # noqa: B007
        if lineno == 1 and line.startswith(codecs.BOM_UTF8):
          line = line[len(codecs.BOM_UTF8):]
        yield lineno, line.rstrip(b"\r\n")
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise DataError(f"{location(path, lineno + 1)}: truncated or corrupt gzip stream after line "
                    f"{lineno} ({e})", path, lineno + 1) from None


def parse_header(description: str) -> dict:
  """Parses a FASTA description (without '>') into fields.

  UniRef (`UniRef50_Q6GZX4 Putative protein n=2 Tax=Frog virus 3 TaxID=10493 RepID=...`) gives
  `id`, `title`, `n` (int), `tax`, `taxid`, `repid`; UniProt (`sp|P12345|NAME_HUMAN ... OS=...`)
  gives `id` (the accession), `entry`, `title` and its `KEY=value` fields lower-cased; anything
  else gives `id` (the first word) and `title`.
  """
  name, _, rest = description.strip().partition(" ")
  out: dict = {"id": name}
  parts = name.split("|")
  if len(parts) >= 3 and parts[0] in ("sp", "tr"):
    out["id"], out["entry"] = parts[1], parts[2]
  matches = list(re.finditer(r"(?:^|\s)([A-Za-z]+)=", rest))
  out["title"] = rest[:matches[0].start()].strip() if matches else rest.strip()
  for m, nxt in zip(matches, matches[1:] + [None]):
    value = rest[m.end():nxt.start() if nxt else len(rest)].strip()
    out[m.group(1).lower()] = value
  if "n" in out:
    try:
      out["n"] = int(out["n"])
    except ValueError:
      pass
  return out


def _finish(path: PathLike, skips: Skips, header: bytes, header_line: int, index: int,
            chunks: list[bytes], chunk_lines: list[int]) -> FastaRecord | None:
  """The record of `header` and its sequence lines `chunks` (at `chunk_lines`), or None when
  its sequence is empty or has an inner '*' (reported to `skips`)."""
  desc = header.decode("utf-8", errors="replace")
  name = desc.split(None, 1)[0] if desc.strip() else f"record{index}"
  seq = b"".join(chunks)
  if not seq:
    skips.report("empty_sequence", f"{location(path, header_line)}: record {name!r} has an "
                 "empty sequence", path, header_line)
    return None
  star = seq.find(b"*")
  if 0 <= star < len(seq) - 1:
    # Find the line holding the first '*' that is not the final character.
    pos = 0
    for ln, ch in zip(chunk_lines, chunks):
      if pos <= star < pos + len(ch):
        break
      pos += len(ch)
    skips.report("invalid_character", f"{location(path, ln)}: stop '*' inside sequence {name!r} "
                 f"(column {star - pos + 1}); '*' is accepted only at the end", path, ln)
    return None
  return FastaRecord(name, desc, seq, header_line, index)


def read_fasta(path: PathLike, skips: Skips | None = None,
               alphabet: bytes | None = PROTEIN_BYTES) -> Iterator[FastaRecord]:
  """Streams the records of a plain or gzip FASTA file.

  Args:
    path: the file.
    skips: bad-record policy (default: raise on the first bad record).
    alphabet: the bytes a sequence line may hold (default: residue letters, either case, and a
      trailing '*'); None disables the check.

  Raises:
    DataError: empty file, not FASTA (content before the first '>'), truncated gzip, and (under
      on_error=raise) a sequence with a character outside `alphabet` or '*' before its end, or an
      empty sequence; each naming `path:line`.
  """
  skips = skips or Skips()
  header: bytes | None = None
  header_line = 0
  chunks: list[bytes] = []
  chunk_lines: list[int] = []
  bad = False
  index = -1
  seen_content = False

  for lineno, line in iter_lines(path):
    if line.startswith(b">"):
      if header is not None:
        rec = None if bad else _finish(path, skips, header, header_line, index, chunks,
                                       chunk_lines)
        if rec is not None:
          yield rec
      header, header_line, chunks, chunk_lines, bad = line[1:], lineno, [], [], False
      index += 1
      seen_content = True
      continue
    line = line.strip()
    if not line:
      continue
    if header is None:
      preview = line[:40].decode("utf-8", errors="replace")
      raise DataError(f"{location(path, lineno)}: not a FASTA file: expected a '>' header line, "
                      f"found {preview!r}", path, lineno)
    if bad:
      continue
    if alphabet is not None:
      wrong = line.translate(None, alphabet)
      if wrong:
        col = next(i for i, b in enumerate(line) if b in wrong)
        name = header.decode("utf-8", errors="replace").split(" ", 1)[0]
        ch = chr(line[col]) if line[col] < 128 else f"\\x{line[col]:02x}"
        kind = "digit" if ch.isdigit() else "character"
        skips.report("invalid_character", f"{location(path, lineno)}: invalid {kind} {ch!r} at "
                     f"column {col + 1} in sequence {name!r}", path, lineno)
        bad = True
        continue
    chunks.append(line)
    chunk_lines.append(lineno)
  if header is not None:
    rec = None if bad else _finish(path, skips, header, header_line, index, chunks, chunk_lines)
    if rec is not None:
      yield rec
  if not seen_content:
    raise DataError(f"{path}: empty file (no FASTA records)", path)


def load_splits_json(path: PathLike) -> dict[str, np.ndarray]:
  """Reads a peers' `splits.json` ({"train": [indices], "valid"|"val": [...], "test": [...]}).

  Returns:
    split name (train | valid | test) -> sorted int64 record indices into consensus.fasta.
  """
  try:
    with open(path) as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{location(path, e.lineno)}: malformed splits.json ({e.msg})", path,
                    e.lineno) from None
  if not isinstance(raw, dict):
    raise DataError(f"{path}: splits.json must be an object of split name -> index list", path)
  alias = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid",
           "test": "test"}
  out = {}
  for key, value in raw.items():
    if key.lower() not in alias:
      log.warning("%s: ignoring split %r (not train/valid/test)", path, key)
      continue
    try:
      out[alias[key.lower()]] = np.sort(np.asarray(value, dtype=np.int64).reshape(-1))
    except (TypeError, ValueError):
      raise DataError(f"{path}: split {key!r} is not a list of integer indices", path) from None
  if "train" not in out:
    raise DataError(f"{path}: splits.json has no 'train' split (keys: {sorted(raw)})", path)
  return out


def peers_layout(directory: PathLike) -> tuple[pathlib.Path, Callable[[int], str | None]]:
  """The peers' UniRef50 layout: `consensus.fasta` + `splits.json` (EvoDiff, DPLM).

  Returns:
    (path of consensus.fasta, split_of(record_index) -> "train" | "valid" | "test" | None).
  """
  directory = pathlib.Path(directory)
  fasta = next((directory / n for n in ("consensus.fasta", "consensus.fasta.gz")
                if (directory / n).exists()), None)
  must = (f"{directory}: a folder input must hold the peers' UniRef50 layout, consensus.fasta "
          "(or consensus.fasta.gz) and splits.json")
  if fasta is None:
    names = sorted(p.name for p in directory.iterdir())
    held = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise DataError(f"{must}; this one holds {held or 'nothing'} (give one FASTA file as "
                    "--input / data.fasta; several: cat them into one)", directory)
  if not (directory / "splits.json").exists():
    raise DataError(f"{must}; splits.json is missing", directory)
  splits = load_splits_json(directory / "splits.json")
  size = int(max(int(v.max()) for v in splits.values() if v.size) + 1)
  names = ("train", "valid", "test")
  code = np.full(size, -1, np.int8)
  for i, name in enumerate(names):
    if name in splits:
      code[splits[name]] = i

  def split_of(index: int) -> str | None:
    c = int(code[index]) if index < size else -1
    return names[c] if c >= 0 else None

  return fasta, split_of


def detect_format(path: PathLike) -> str:
  """'peers' for a directory with consensus.fasta, 'csv' for *.csv/*.tsv(.gz), else 'fasta'."""
  p = pathlib.Path(path)
  if p.is_dir():
    return "peers"
  suffixes = [s.lower() for s in p.suffixes]
  if suffixes and suffixes[-1] == ".gz":
    suffixes = suffixes[:-1]
  if suffixes and suffixes[-1] in (".csv", ".tsv"):
    return "csv"
  return "fasta"
