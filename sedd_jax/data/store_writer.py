"""The store writer of `sedd_jax.data.prepare`: records -> filtered, deduplicated, split tracks.

`write_store(src, folder, fmt, opts)` streams the records of `src` (FASTA, peers' layout or
protein-ligand CSV), drops those `PrepareOptions` filters out (length bounds, fraction of the 20
standard amino acids, duplicates, ligands too long), reports bad records to the `--on-error`
policy (letters outside the alphabets, SMILES failing the grammar check of
`sedd_jax.data.smiles_grammar`), assigns each kept sequence a split from an
8-byte keyed hash of its ESM-2 ids (`Splitter`; the peers' layout keeps splits.json's) and
appends it to `<folder>/<split>/tokens.npy` + `offsets.npy` (ligand_* likewise), streamed by
`NpyWriter` with constant memory apart from the deduplication set. It returns the store's
manifest (the layout is in `sedd_jax.data.prepare`'s docstring); `prepare` writes it and moves
the folder into place.
"""

from __future__ import annotations

import array
import dataclasses
import datetime
import hashlib
import json
import logging
import pathlib
import sys
import time
from typing import Iterator

import numpy as np

from sedd_jax.data import fasta as fasta_lib
from sedd_jax.data import pairs as pairs_lib
from sedd_jax.data import smiles_grammar
from sedd_jax.data import tokenizers

log = logging.getLogger("sedd_jax.data.prepare")

SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 1
_NPY_HEADER_BYTES = 128
_STANDARD = bytes(tokenizers.STANDARD_RESIDUES + tokenizers.STANDARD_RESIDUES.lower(), "ascii")


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  """Filters and split settings of `prepare` (all recorded in the manifest)."""

  min_length: int = 30
  max_length: int = 1000
  min_standard_fraction: float = 0.95
  valid_fraction: float = 0.02
  test_fraction: float = 0.02
  dedup: bool = True
  on_error: str = "raise"  # raise | skip
  split_salt: str = ""  # changes the hash split
  max_ligand_length: int = 128  # SMILES tokens (protein-ligand pairs)
  protein_column: str | None = None
  smiles_column: str | None = None
  delimiter: str | None = None

  def validate(self) -> None:
    if not 1 <= self.min_length <= self.max_length:
      raise ValueError(f"need 1 <= min_length <= max_length, got {self.min_length}, "
                       f"{self.max_length}")
    if not 0.0 <= self.min_standard_fraction <= 1.0:
      raise ValueError(f"min_standard_fraction must be in [0, 1], got "
                       f"{self.min_standard_fraction}")
    if (self.valid_fraction < 0 or self.test_fraction < 0
        or self.valid_fraction + self.test_fraction >= 1):
      raise ValueError(f"need valid_fraction, test_fraction >= 0 with sum < 1, got "
                       f"{self.valid_fraction}, {self.test_fraction}")
    if self.on_error not in fasta_lib.ON_ERROR:
      raise ValueError(f"on_error must be one of {fasta_lib.ON_ERROR}, got {self.on_error!r}")


class NpyWriter:
  """Streams a 1-D array into a .npy file (header written last, in a reserved 128-byte slot);
  `close()` returns the element count. `np.load` reads the file as usual."""

  def __init__(self, path: pathlib.Path, dtype: np.dtype):
    self.path = path
    self.dtype = np.dtype(dtype)
    self._f = open(path, "wb", buffering=1 << 22)
    self._f.write(b"\0" * _NPY_HEADER_BYTES)
    self.nbytes = 0

  def write(self, data: bytes | np.ndarray) -> None:
    if isinstance(data, np.ndarray):
      data = np.ascontiguousarray(data, dtype=self.dtype).tobytes()
    self._f.write(data)
    self.nbytes += len(data)

  def close(self) -> int:
    n = self.nbytes // self.dtype.itemsize
    header = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                   "shape": (n,)}).encode("latin1")
    pad = _NPY_HEADER_BYTES - 10 - len(header) - 1
    assert pad >= 0, header
    self._f.seek(0)
    self._f.write(b"\x93NUMPY\x01\x00" + (_NPY_HEADER_BYTES - 10).to_bytes(2, "little")
                  + header + b" " * pad + b"\n")
    self._f.close()
    return n


class TrackWriter:
  """tokens.npy + offsets.npy of one track of one split; `close()` returns its statistics."""

  def __init__(self, directory: pathlib.Path, prefix: str, dtype: np.dtype):
    self.tokens = NpyWriter(directory / f"{prefix}tokens.npy", dtype)
    self.offsets = NpyWriter(directory / f"{prefix}offsets.npy", np.int64)
    self._pending = array.array("q", [0])
    self.count = 0
    self.total = 0
    self.min_len = sys.maxsize
    self.max_len = 0

  def add(self, ids: bytes | np.ndarray) -> None:
    self.tokens.write(ids)
    n = len(ids)
    self.total += n
    self.count += 1
    self.min_len = min(self.min_len, n)
    self.max_len = max(self.max_len, n)
    self._pending.append(self.total)
    if len(self._pending) >= 65536:
      self.offsets.write(self._pending.tobytes())
      self._pending = array.array("q")

  def close(self) -> dict:
    self.offsets.write(self._pending.tobytes())
    self.tokens.close()
    self.offsets.close()
    return {"sequences": self.count, "tokens": self.total,
            "min_length": self.min_len if self.count else 0, "max_length": self.max_len,
            "mean_length": self.total / self.count if self.count else 0.0}


def file_sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
  return h.hexdigest()


def source_record(path: pathlib.Path) -> dict:
  """What a manifest records of a source file: name, bytes, modification time (ns), sha256."""
  st = path.stat()
  return {"name": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
          "sha256": file_sha256(path)}


def source_files(src: pathlib.Path, fmt: str) -> list[pathlib.Path]:
  """The files a store of `src` read as `fmt` is made from (recorded in its manifest)."""
  if fmt == "peers":
    return [fasta_lib.peers_layout(src)[0], src / "splits.json"]
  return [src]


class Splitter:
  """Split from an 8-byte digest: u = digest / 2^64; test if u < f_test, valid if < f_test + f_val."""

  def __init__(self, valid_fraction: float, test_fraction: float):
    self.t_test = int(test_fraction * 2**64)
    self.t_valid = int((test_fraction + valid_fraction) * 2**64)

  def __call__(self, digest: int) -> str:
    if digest < self.t_test:
      return "test"
    return "valid" if digest < self.t_valid else "train"


def digest(data: bytes, salt: bytes) -> int:
  """The 8-byte BLAKE2b hash of `data` keyed with `salt`, as an int in [0, 2^64)."""
  return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=salt).digest(), "little")


class _Progress:

  def __init__(self, every_s: float):
    self.every_s = every_s
    self.t0 = self._last = time.perf_counter()

  def maybe_log(self, read: int, residues: int, kept: int, skipped: int, force: bool = False):
    now = time.perf_counter()
    if not force and now - self._last < self.every_s:
      return
    self._last = now
    dt = max(now - self.t0, 1e-9)
    log.info("prepare: %d records read (%.0f seq/s, %.2fM residues/s), %d kept, %d skipped, "
             "%.1f s", read, read / dt, residues / dt / 1e6, kept, skipped, dt)


def _smiles_vocabulary(src: pathlib.Path, opts: PrepareOptions) -> tokenizers.SmilesTokenizer:
  """The SMILES tokenizer of every token in the valid SMILES of the pairs of `src` (a first
  pass; bad rows are reported by the main pass)."""
  quiet = fasta_lib.Skips("skip", max_logged=0)
  valid = smiles_grammar.grammar_valid_smiles
  counts: dict[str, int] = {}
  for r in pairs_lib.read_pairs(src, opts.protein_column, opts.smiles_column, opts.delimiter,
                                quiet):
    if not valid(r.smiles):
      continue  # reported in the main pass
    for t in tokenizers.SmilesTokenizer.split(r.smiles):
      counts[t] = counts.get(t, 0) + 1
  return tokenizers.SmilesTokenizer(sorted(counts))


def _records(src: pathlib.Path, fmt: str, opts: PrepareOptions, skips: fasta_lib.Skips
             ) -> Iterator[tuple[bytes, int, int, str | None]]:
  """(sequence, line, record index, SMILES or None) of each record of `src`."""
  if fmt == "csv":
    return ((r.protein, r.line, r.index, r.smiles) for r in pairs_lib.read_pairs(
        src, opts.protein_column, opts.smiles_column, opts.delimiter, skips))
  path = fasta_lib.peers_layout(src)[0] if fmt == "peers" else src
  return ((r.sequence, r.line, r.index, None) for r in fasta_lib.read_fasta(path, skips))


class _Selector:
  """The filters, deduplication and split of one record: `(split, ids, ligand ids)` of a kept
  record, None for a dropped one (counted in `filtered`, or reported to `skips`)."""

  def __init__(self, src: pathlib.Path, fmt: str, opts: PrepareOptions,
               skips: fasta_lib.Skips, smiles_tok: tokenizers.SmilesTokenizer | None):
    self.src, self.opts, self.skips, self.smiles_tok = src, opts, skips, smiles_tok
    self.filtered = {k: 0 for k in ("too_short", "too_long", "low_standard_fraction",
                                    "duplicate")}
    if smiles_tok is not None:
      self.filtered.update(ligand_too_long=0)
    self.split_of_index = None
    if fmt == "peers":
      self.split_of_index = fasta_lib.peers_layout(src)[1]
      self.filtered.update(not_in_splits=0)
    self.smiles_ok = smiles_grammar.grammar_valid_smiles if smiles_tok is not None else None
    self.prot_tok = tokenizers.ProteinTokenizer()
    self.salt = opts.split_salt.encode()
    self.splitter = Splitter(opts.valid_fraction, opts.test_fraction)
    self.seen: set[int] = set()

  def _drop(self, reason: str) -> None:
    self.filtered[reason] += 1

  def __call__(self, seq: bytes, line: int, index: int, smi: str | None):
    opts, n = self.opts, len(seq)
    if smi is not None:  # CSV proteins were not checked by the reader
      try:
        self.prot_tok.encode_bytes(seq, source=str(self.src), line=line)
      except tokenizers.TokenizeError as e:
        return self.skips.report("invalid_character", f"{e}", self.src, line)
    if n < opts.min_length:
      return self._drop("too_short")
    if n > opts.max_length:
      return self._drop("too_long")
    min_std = opts.min_standard_fraction
    if min_std > 0 and (n - len(seq.translate(None, _STANDARD))) < min_std * n:
      return self._drop("low_standard_fraction")
    ids = seq.translate(self.prot_tok._table)  # residue byte -> ESM-2 id
    key = digest(ids, self.salt)
    lig_ids = None
    if smi is not None:
      try:
        if not self.smiles_ok(smi):
          tokenizers.SmilesTokenizer.split(smi, source=str(self.src), line=line)  # a bad char?
          return self.skips.report(
              "invalid_smiles", f"{fasta_lib.location(self.src, line)}: invalid SMILES {smi!r} "
              "(fails the SMILES grammar: branches, ring closures, bonds, bracket atoms)",
              self.src, line)
        lig_ids = self.smiles_tok.encode(smi, source=str(self.src), line=line)
      except tokenizers.TokenizeError as e:
        return self.skips.report("invalid_smiles", f"{e}", self.src, line)
      if len(lig_ids) > opts.max_ligand_length:
        return self._drop("ligand_too_long")
    if opts.dedup:
      dup = key if smi is None else digest(ids + b"\0" + smi.encode(), self.salt)
      if dup in self.seen:
        return self._drop("duplicate")
      self.seen.add(dup)
    if self.split_of_index is None:
      return self.splitter(key), ids, lig_ids
    split = self.split_of_index(index)
    if split is None:
      return self._drop("not_in_splits")
    return split, ids, lig_ids


def write_store(src: pathlib.Path, folder: pathlib.Path, fmt: str, opts: PrepareOptions,
                log_every_s: float = 10.0) -> dict:
  """Writes the splits of `src` (format `fmt`: fasta | csv | peers) into the empty `folder`.

  Returns:
    The store's manifest (`folder/<split>/manifest.json` are written here, the top one not).

  Raises:
    fasta.DataError: bad input (naming file and line), no sequence kept, or an empty train split.
  """
  skips = fasta_lib.Skips(opts.on_error)
  smiles_tok = None
  if fmt == "csv":
    smiles_tok = _smiles_vocabulary(src, opts)
    smiles_tok.save(folder / "smiles_vocab.json")
  select = _Selector(src, fmt, opts, skips, smiles_tok)
  lig_dtype = np.uint8 if smiles_tok is None or smiles_tok.vocab_size <= 256 else np.uint16
  writers = {}
  for s in SPLITS:
    (folder / s).mkdir()
    writers[s] = {"protein": TrackWriter(folder / s, "", np.uint8)}
    if smiles_tok is not None:
      writers[s]["ligand"] = TrackWriter(folder / s, "ligand_", lig_dtype)
  progress = _Progress(log_every_s)
  read = residues = kept = 0
  for seq, line, index, smi in _records(src, fmt, opts, skips):
    read += 1
    if read & 4095 == 0:
      progress.maybe_log(read, residues, kept, skips.total)
    if seq.endswith(b"*"):
      seq = seq[:-1]
    residues += len(seq)
    picked = select(seq, line, index, smi)
    if picked is None:
      continue
    split, ids, lig_ids = picked
    writers[split]["protein"].add(ids)
    if lig_ids is not None:
      writers[split]["ligand"].add(lig_ids)
    kept += 1
  progress.maybe_log(read, residues, kept, skips.total, force=True)
  stats = {s: {t: w.close() for t, w in writers[s].items()} for s in SPLITS}
  if kept == 0:
    raise fasta_lib.DataError(
        f"{src}: no sequence kept out of {read} records read (filtered {select.filtered}, "
        f"skipped {skips.summary()}); check the filters (--min-length, --max-length, "
        "--min-standard-fraction) and the input", src)
  if stats["train"]["protein"]["sequences"] == 0:
    raise fasta_lib.DataError(f"{src}: the train split is empty ({kept} kept sequences all went "
                              "to valid/test)", src)
  counts = {"records_read": read, "residues_read": residues, "kept": kept,
            "filtered": select.filtered, "skipped": skips.summary()}
  return _manifest(src, folder, fmt, opts, stats, counts, smiles_tok, lig_dtype)


def _manifest(src: pathlib.Path, folder: pathlib.Path, fmt: str, opts: PrepareOptions,
              stats: dict, counts: dict, smiles_tok: tokenizers.SmilesTokenizer | None,
              lig_dtype: type) -> dict:
  """The store's manifest; writes each split's own manifest.json."""
  kind = "protein" if smiles_tok is None else "protein_ligand"
  tracks = list(stats["train"])
  protein_vocab = {"name": "esm2", "alphabet": list(tokenizers.ESM2_ALPHABET),
                   "pad_id": tokenizers.PAD_ID, "mask_id": tokenizers.MASK_ID}
  manifest = {
      "format_version": FORMAT_VERSION,
      "kind": kind,
      "tracks": tracks,
      "dtype": {t: np.dtype(np.uint8 if t == "protein" else lig_dtype).name for t in tracks},
      "source": {"path": str(src.resolve()), "format": fmt,
                 "files": [source_record(p) for p in source_files(src, fmt)]},
      "filters": dataclasses.asdict(opts),
      "vocabulary": {"protein": protein_vocab},
      **counts,
      "splits": {s: {"sequences": stats[s]["protein"]["sequences"],
                     **{f"{t}_{k}": v for t, st in stats[s].items() for k, v in st.items()
                        if k != "sequences"}} for s in SPLITS},
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  if smiles_tok is not None:
    manifest["vocabulary"]["ligand"] = {"file": "smiles_vocab.json", **smiles_tok.to_json()}
  for s in SPLITS:
    with open(folder / s / "manifest.json", "w") as f:
      json.dump({"split": s, "kind": kind, "tracks": tracks, "dtype": manifest["dtype"],
                 **stats[s]["protein"],
                 **({"ligand": stats[s]["ligand"]} if "ligand" in stats[s] else {})}, f, indent=1)
  return manifest
