"""Streaming reader of protein-ligand pairs: a CSV/TSV (plain or gzip) with a header row.

Like the FASTA reader (`sedd_jax.data.fasta`), it streams one row at a time and names the file
and line of bad input: file-level problems (empty file, no protein/SMILES column, truncated gzip,
malformed CSV) raise `DataError`; a short row or an empty field goes through the
`Skips` policy.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import io
import zlib
from typing import Callable, Iterator

from sedd_jax.data.fasta import DataError, PathLike, Skips, location, open_binary

PROTEIN_COLUMNS = ("aa_sequence", "sequence", "protein_sequence", "target_sequence", "protein",
                   "target", "seq", "prot_seq")
SMILES_COLUMNS = ("smiles", "ligand_smiles", "canonical_smiles", "isomeric_smiles",
                  "compound_iso_smiles", "drug", "ligand", "compound")


@dataclasses.dataclass(frozen=True)
class PairRecord:
  """One protein-ligand pair from a CSV/TSV row (`line`: physical line where the row ends)."""

  protein: bytes
  smiles: str
  line: int
  index: int
  name: str = ""


def _find_column(header: list[str], wanted: str | None, candidates: tuple[str, ...],
                 what: str, path: PathLike) -> int:
  lower = [h.strip().lower() for h in header]
  if wanted is not None:
    if wanted.strip().lower() not in lower:
      raise DataError(f"{location(path, 1)}: no {what} column {wanted!r}; the header has {header}",
                      path, 1)
    return lower.index(wanted.strip().lower())
  for c in candidates:
    if c in lower:
      return lower.index(c)
  raise DataError(f"{location(path, 1)}: no {what} column found; the header has {header}; expected "
                  f"one of {list(candidates)} (or name it explicitly)", path, 1)


def read_pairs(path: PathLike, protein_column: str | None = None,
               smiles_column: str | None = None, delimiter: str | None = None,
               skips: Skips | None = None, name_column: str | None = None
               ) -> Iterator[PairRecord]:
  """Streams protein-ligand pairs from a CSV/TSV (plain or gzip) with a header row.

  Columns default to the first header match (case-insensitive) of PROTEIN_COLUMNS and
  SMILES_COLUMNS; the delimiter defaults to tab if the header holds one, else comma.

  Raises:
    DataError: empty file, missing columns (naming the header), truncated gzip, and (under
      on_error=raise) rows with too few fields or an empty protein/SMILES, naming `path:line`.
  """
  skips = skips or Skips()
  lineno = 0
  with table_errors(path, lambda: lineno), open_table(path, "no CSV header") as (text, first):
    if delimiter is None:
      delimiter = "\t" if "\t" in first else ","
    header = next(csv.reader([first], delimiter=delimiter))
    pi = _find_column(header, protein_column, PROTEIN_COLUMNS, "protein sequence", path)
    si = _find_column(header, smiles_column, SMILES_COLUMNS, "SMILES", path)
    ni = None
    if name_column is not None:
      ni = _find_column(header, name_column, (), "name", path)
    need = max(pi, si, ni or 0) + 1
    reader = csv.reader(text, delimiter=delimiter)
    index = -1
    for row in reader:
      lineno = reader.line_num + 1
      if not row or (len(row) == 1 and not row[0].strip()):
        continue
      index += 1
      if len(row) < need:
        skips.report("short_row", f"{location(path, lineno)}: row has {len(row)} fields, needs "
                     f"{need} (columns {header[pi]!r}, {header[si]!r})", path, lineno)
        continue
      protein = row[pi].strip().encode("ascii", errors="replace")
      smiles = row[si].strip()
      if not protein or not smiles:
        which = "protein sequence" if not protein else "SMILES"
        skips.report("empty_field", f"{location(path, lineno)}: empty {which}", path, lineno)
        continue
      yield PairRecord(protein, smiles, lineno, index, row[ni] if ni is not None else "")


@contextlib.contextmanager
def open_table(path: PathLike, what: str) -> Iterator[tuple[io.TextIOBase, str]]:
  """Opens a plain or gzip text table (UTF-8; a byte order mark is dropped): (the text stream
  after its first line, that line); a DataError naming `path` when the file is empty (`what`:
  what the file lacks)."""
  with open_binary(path) as raw:
    # utf-8-sig: a byte order mark before the header is dropped
    text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
    first = text.readline()
    if not first.strip():
      raise DataError(f"{path}: empty file ({what})", path, 1)
    yield text, first


@contextlib.contextmanager
def table_errors(path: PathLike, line: Callable[[], int]) -> Iterator[None]:
  """Turns a truncated gzip stream or malformed CSV into a DataError naming `path` and the line
  after `line()` (the last line read)."""
  try:
    yield
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    n = line() + 1
    raise DataError(f"{location(path, n)}: truncated or corrupt gzip stream ({e})", path,
                    n) from None
  except csv.Error as e:
    n = line() + 1
    raise DataError(f"{location(path, n)}: malformed CSV ({e})", path, n) from None
