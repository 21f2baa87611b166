"""CLI: FASTA / peers' layout / protein-ligand CSV -> a memory-mappable store.

  python -m sedd_jax.data.prepare [--input FILE|DIR] [--output DIR] [--format auto|fasta|csv|peers]
      [--min-length 30] [--max-length 1000] [--min-standard-fraction 0.95]
      [--valid-fraction 0.02] [--test-fraction 0.02] [--on-error raise|skip] [--overwrite]

Without arguments it prepares the bundled UniProt set (data/uniprot_mmseqs2_example.fasta.gz) into
data/prepared/uniprot. Relative paths resolve against the current directory when the path exists
there, else against the repository root (see `resolve_path`).

The input is streamed (constant memory apart from the deduplication set: 8-byte digests, about
60 bytes per kept sequence), filtered (length bounds, fraction of the 20 standard amino acids),
deduplicated and split train/valid/test by a hash of the (upper-cased) sequence, so the split of a
sequence never depends on the order of the file or on the rest of the data. Protein-ligand pairs
are split by the protein's hash (no protein in two splits) and deduplicated per (protein, SMILES).
The peers' layout (consensus.fasta + splits.json) keeps the splits of splits.json.

Store layout (written to a temporary sibling directory and renamed at the end, so a crash never
corrupts an earlier store)::

  OUTPUT/manifest.json                  counts, filters, vocabularies, source sha256, skips
  OUTPUT/smiles_vocab.json              (protein-ligand only) SmilesTokenizer vocabulary
  OUTPUT/{train,valid,test}/tokens.npy  (N_tokens,) uint8 ESM-2 ids, sequences concatenated
  OUTPUT/{train,valid,test}/offsets.npy (N + 1,) int64; sequence i = tokens[off[i]:off[i+1]]
  OUTPUT/{train,valid,test}/ligand_tokens.npy, ligand_offsets.npy   (protein-ligand only)
  OUTPUT/{train,valid,test}/manifest.json  the split's counts and length statistics
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import pathlib
import shutil
import sys
import time
import uuid

import numpy as np

from sedd_jax.data import fasta as fasta_lib
from sedd_jax.data import tokenizers

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 1
DEFAULT_INPUT = "data/uniprot_mmseqs2_example.fasta.gz"
DEFAULT_OUTPUT = "data/prepared/uniprot"
_NPY_HEADER_BYTES = 128
_STANDARD = bytes(tokenizers.STANDARD_RESIDUES + tokenizers.STANDARD_RESIDUES.lower(), "ascii")


def repo_root() -> pathlib.Path:
  """The checkout holding this package (the folder with pyproject.toml), else the CWD."""
  root = pathlib.Path(__file__).resolve().parents[2]
  return root if (root / "pyproject.toml").exists() else pathlib.Path.cwd()


def resolve_path(path: str | os.PathLike) -> pathlib.Path:
  """Absolute paths as given; a relative path resolves against the CWD if it exists there,
  else against the repository root (so `data/...` works from any directory)."""
  p = pathlib.Path(path).expanduser()
  if p.is_absolute():
    return p
  if p.exists():
    return p.resolve()
  return repo_root() / p


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


class _NpyWriter:
  """Streams a 1-D array into a .npy file (header written last, in a reserved 128-byte slot)."""

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


class _TrackWriter:
  """tokens.npy + offsets.npy of one track of one split."""

  def __init__(self, directory: pathlib.Path, prefix: str, dtype: np.dtype):
    self.tokens = _NpyWriter(directory / f"{prefix}tokens.npy", dtype)
    self.offsets = _NpyWriter(directory / f"{prefix}offsets.npy", np.int64)
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


class _Splitter:
  """Split from an 8-byte digest: u = digest / 2^64; test if u < f_test, valid if < f_test + f_val."""

  def __init__(self, valid_fraction: float, test_fraction: float):
    self.t_test = int(test_fraction * 2**64)
    self.t_valid = int((test_fraction + valid_fraction) * 2**64)

  def __call__(self, digest: int) -> str:
    if digest < self.t_test:
      return "test"
    return "valid" if digest < self.t_valid else "train"


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


def _digest(data: bytes, salt: bytes) -> int:
  return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=salt).digest(), "little")


def prepare(input_path: str | os.PathLike, output: str | os.PathLike, fmt: str = "auto",
            overwrite: bool = False, log_every_s: float = 10.0,
            options: PrepareOptions | None = None, **kwargs) -> dict:
  """Prepares `input_path` into the store `output`; returns the manifest (see module docstring).

  Args:
    input_path: FASTA (plain/gzip), CSV/TSV of pairs (plain/gzip) or a peers' layout directory.
    output: the store directory: absent, an empty folder or a store. If it is a store and
      `overwrite` is False, it is kept and its manifest returned when it was prepared from the
      same source (sha256) with the same settings; otherwise FileExistsError. Anything else (a
      file, a folder of other files) is refused and left untouched (`check_output`).
    fmt: auto | fasta | csv | peers (auto: from the path, `fasta.detect_format`).
    overwrite: replace an existing store (atomically, after the new one is complete); never
      anything that is not a store.
    log_every_s: seconds between progress lines.
    options: filters and split settings; keyword arguments override its fields.

  Raises:
    fasta.DataError: bad input (naming file and line), or no sequence kept.
    FileExistsError: `output` is a store (another source or settings) and not `overwrite`, or
      `output` is neither a store nor an empty folder.
  """
  opts = dataclasses.replace(options or PrepareOptions(), **kwargs)
  opts.validate()
  src = pathlib.Path(input_path)
  out = pathlib.Path(output)
  if not src.exists():
    raise FileNotFoundError(f"input {src} does not exist")
  if fmt == "auto":
    fmt = fasta_lib.detect_format(src)
  if fmt not in ("fasta", "csv", "peers"):
    raise ValueError(f"format must be auto, fasta, csv or peers, got {fmt!r}")
  check_output(out)
  if _is_store(out) and not overwrite:
    existing = _up_to_date(out, src, fmt, opts)
    if existing is not None:
      log.info("store %s is up to date (same source sha256 and settings); nothing to do", out)
      return existing
    raise FileExistsError(f"store {out} already exists, prepared from another source or with "
                          "other settings (pass overwrite=True / --overwrite)")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    t0 = time.perf_counter()
    manifest = _prepare_into(src, tmp, fmt, opts, log_every_s)
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    with open(tmp / "manifest.json", "w") as f:
      json.dump(manifest, f, indent=1)
    _commit(tmp, out, overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  log.info("prepared %s -> %s: %s sequences (train/valid/test %s) in %.1f s; filtered %s; "
           "skipped %s", src, out, manifest["kept"],
           "/".join(str(manifest["splits"][s]["sequences"]) for s in SPLITS),
           manifest["seconds"], manifest["filtered"], manifest["skipped"])
  return manifest


def _is_store(out: pathlib.Path) -> bool:
  """Whether the folder `out` is recognisably a store: its manifest.json, written by `prepare`."""
  try:
    with open(out / "manifest.json") as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError):
    return False
  return isinstance(manifest, dict) and {"format_version", "splits"} <= manifest.keys()


def check_output(out: pathlib.Path) -> None:
  """Raises FileExistsError unless `out` is absent, an empty folder or a store (`_is_store`):
  `prepare` replaces only what it wrote itself."""
  if not out.exists() and not out.is_symlink():
    return
  if not out.is_dir():
    raise FileExistsError(f"output {out} is an existing file, not a folder: a store is a folder; "
                          "choose another output path")
  if any(out.iterdir()) and not _is_store(out):
    raise FileExistsError(f"output {out} is a folder that is not a prepared store (it has no "
                          "manifest.json written by sedd_jax.data.prepare); it is left untouched "
                          "even with --overwrite: choose another output path")


def _source_files(src: pathlib.Path, fmt: str) -> list[pathlib.Path]:
  if fmt == "peers":
    return [fasta_lib.peers_layout(src)[0], src / "splits.json"]
  return [src]


def _up_to_date(out: pathlib.Path, src: pathlib.Path, fmt: str,
                opts: PrepareOptions) -> dict | None:
  """The manifest of `out` if it is a complete store of `src` with the settings `opts`."""
  try:
    with open(out / "manifest.json") as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  complete = all((out / s / n).exists() for s in SPLITS
                 for n in ("tokens.npy", "offsets.npy", "manifest.json"))
  if not complete or manifest.get("filters") != dataclasses.asdict(opts):
    return None
  return manifest if source_difference(manifest, src, fmt) is None else None


def source_difference(manifest: dict, src: pathlib.Path, fmt: str,
                      trust_path: bool = False) -> str | None:
  """How the source recorded in a store's `manifest` differs from `src` read as `fmt`; None when
  it is the same: same format, file names and sizes, and same sha256 (with `trust_path`, the
  same resolved path stands in for the hashes, so an unmoved large source is not re-read).
  """
  recorded = manifest.get("source", {})
  if recorded.get("format") != fmt:
    return f"format {recorded.get('format')!r} recorded, {fmt!r} now"
  paths = _source_files(src, fmt)
  files = recorded.get("files", [])
  have = [(f.get("name"), f.get("bytes")) for f in files]
  want = [(p.name, p.stat().st_size) for p in paths]
  if have != want:
    return f"files (name, bytes) {have} recorded, {want} now"
  if trust_path and recorded.get("path") == str(src.resolve()):
    return None
  if [f.get("sha256") for f in files] != [file_sha256(p) for p in paths]:
    return "same names and sizes, other content (sha256)"
  return None


def _commit(tmp: pathlib.Path, out: pathlib.Path, overwrite: bool) -> None:
  if not out.exists() or (out.is_dir() and not any(out.iterdir())):
    try:
      os.rename(tmp, out)  # replaces an empty folder
      return
    except OSError:
      if not out.exists():
        raise
  if not overwrite:  # another process finished first
    shutil.rmtree(tmp, ignore_errors=True)
    raise FileExistsError(f"store {out} already exists (pass overwrite=True / --overwrite)")
  old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
  os.rename(out, old)
  os.rename(tmp, out)
  shutil.rmtree(old, ignore_errors=True)


def _prepare_into(src: pathlib.Path, tmp: pathlib.Path, fmt: str, opts: PrepareOptions,
                  log_every_s: float) -> dict:
  skips = fasta_lib.Skips(opts.on_error)
  filtered = {k: 0 for k in ("too_short", "too_long", "low_standard_fraction", "duplicate")}
  prot_tok = tokenizers.ProteinTokenizer()
  table = prot_tok._table  # residue byte -> ESM-2 id
  salt = opts.split_salt.encode()
  splitter = _Splitter(opts.valid_fraction, opts.test_fraction)
  seen: set[int] = set()
  progress = _Progress(log_every_s)
  kind = "protein_ligand" if fmt == "csv" else "protein"

  smiles_tok = None
  if kind == "protein_ligand":
    quiet = fasta_lib.Skips("skip", max_logged=0)
    smiles = (r.smiles for r in fasta_lib.read_pairs(
        src, opts.protein_column, opts.smiles_column, opts.delimiter, quiet))
    counts: dict[str, int] = {}
    for s in smiles:
      try:
        for t in tokenizers.SmilesTokenizer.split(s):
          counts[t] = counts.get(t, 0) + 1
      except tokenizers.TokenizeError:
        pass  # reported in the main pass
    smiles_tok = tokenizers.SmilesTokenizer(sorted(counts))
    smiles_tok.save(tmp / "smiles_vocab.json")
    filtered.update(ligand_too_long=0)
  lig_dtype = np.uint8 if smiles_tok is None or smiles_tok.vocab_size <= 256 else np.uint16

  writers = {}
  for s in SPLITS:
    (tmp / s).mkdir()
    writers[s] = {"protein": _TrackWriter(tmp / s, "", np.uint8)}
    if smiles_tok is not None:
      writers[s]["ligand"] = _TrackWriter(tmp / s, "ligand_", lig_dtype)

  split_of_index = None
  if fmt == "peers":
    fasta_path, split_of_index = fasta_lib.peers_layout(src)
    filtered.update(not_in_splits=0)
  else:
    fasta_path = src
  sources = _source_files(src, fmt)

  read = residues = kept = 0
  min_len, max_len, min_std = opts.min_length, opts.max_length, opts.min_standard_fraction

  if kind == "protein":
    records = ((r.sequence, r.line, r.index, None) for r in fasta_lib.read_fasta(fasta_path, skips))
  else:
    records = ((r.protein, r.line, r.index, r.smiles) for r in fasta_lib.read_pairs(
        src, opts.protein_column, opts.smiles_column, opts.delimiter, skips))

  for seq, line, index, smi in records:
    read += 1
    if read & 4095 == 0:
      progress.maybe_log(read, residues, kept, skips.total)
    if seq.endswith(b"*"):
      seq = seq[:-1]
    n = len(seq)
    residues += n
    if smi is not None:  # CSV proteins were not checked by the reader
      try:
        prot_tok.encode_bytes(seq, source=str(src), line=line)
      except tokenizers.TokenizeError as e:
        skips.report("invalid_character", f"{e}", src, line)
        continue
    if n < min_len:
      filtered["too_short"] += 1
      continue
    if n > max_len:
      filtered["too_long"] += 1
      continue
    if min_std > 0 and (n - len(seq.translate(None, _STANDARD))) < min_std * n:
      filtered["low_standard_fraction"] += 1
      continue
    ids = seq.translate(table)
    digest = _digest(ids, salt)
    lig_ids = None
    if smi is not None:
      try:
        lig_ids = smiles_tok.encode(smi, source=str(src), line=line)
      except tokenizers.TokenizeError as e:
        skips.report("invalid_smiles", f"{e}", src, line)
        continue
      if len(lig_ids) > opts.max_ligand_length:
        filtered["ligand_too_long"] += 1
        continue
    if opts.dedup:
      key = digest if smi is None else _digest(ids + b"\0" + smi.encode(), salt)
      if key in seen:
        filtered["duplicate"] += 1
        continue
      seen.add(key)
    if split_of_index is not None:
      split = split_of_index(index)
      if split is None:
        filtered["not_in_splits"] += 1
        continue
    else:
      split = splitter(digest)
    w = writers[split]
    w["protein"].add(ids)
    if lig_ids is not None:
      w["ligand"].add(lig_ids)
    kept += 1
  progress.maybe_log(read, residues, kept, skips.total, force=True)

  stats = {s: {t: w.close() for t, w in writers[s].items()} for s in SPLITS}
  if kept == 0:
    raise fasta_lib.DataError(
        f"{src}: no sequence kept out of {read} records read (filtered {filtered}, skipped "
        f"{skips.summary()}); check the filters (--min-length, --max-length, "
        "--min-standard-fraction) and the input", src)
  if stats["train"]["protein"]["sequences"] == 0:
    raise fasta_lib.DataError(f"{src}: the train split is empty ({kept} kept sequences all went "
                              "to valid/test)", src)

  protein_vocab = {"name": "esm2", "alphabet": list(tokenizers.ESM2_ALPHABET),
                   "pad_id": tokenizers.PAD_ID, "mask_id": tokenizers.MASK_ID}
  manifest = {
      "format_version": FORMAT_VERSION,
      "kind": kind,
      "tracks": list(writers["train"]),
      "dtype": {t: np.dtype(np.uint8 if t == "protein" else lig_dtype).name
                for t in writers["train"]},
      "source": {"path": str(src.resolve()), "format": fmt,
                 "files": [{"name": p.name, "bytes": p.stat().st_size, "sha256": file_sha256(p)}
                           for p in sources]},
      "filters": dataclasses.asdict(opts),
      "vocabulary": {"protein": protein_vocab},
      "records_read": read,
      "residues_read": residues,
      "kept": kept,
      "filtered": filtered,
      "skipped": skips.summary(),
      "splits": {s: {"sequences": stats[s]["protein"]["sequences"],
                     **{f"{t}_{k}": v for t, st in stats[s].items() for k, v in st.items()
                        if k != "sequences"}} for s in SPLITS},
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  if smiles_tok is not None:
    manifest["vocabulary"]["ligand"] = {"file": "smiles_vocab.json", **smiles_tok.to_json()}
  for s in SPLITS:
    with open(tmp / s / "manifest.json", "w") as f:
      json.dump({"split": s, "kind": kind, "tracks": manifest["tracks"],
                 "dtype": manifest["dtype"], **stats[s]["protein"],
                 **({"ligand": stats[s]["ligand"]} if "ligand" in stats[s] else {})}, f, indent=1)
  return manifest


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m sedd_jax.data.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  d = PrepareOptions()
  p.add_argument("--input", default=DEFAULT_INPUT, help="FASTA, CSV/TSV or peers' directory")
  p.add_argument("--output", default=DEFAULT_OUTPUT, help="store directory")
  p.add_argument("--format", default="auto", choices=("auto", "fasta", "csv", "peers"))
  p.add_argument("--min-length", type=int, default=d.min_length)
  p.add_argument("--max-length", type=int, default=d.max_length)
  p.add_argument("--min-standard-fraction", type=float, default=d.min_standard_fraction)
  p.add_argument("--valid-fraction", type=float, default=d.valid_fraction)
  p.add_argument("--test-fraction", type=float, default=d.test_fraction)
  p.add_argument("--max-ligand-length", type=int, default=d.max_ligand_length)
  p.add_argument("--protein-column", default=None)
  p.add_argument("--smiles-column", default=None)
  p.add_argument("--delimiter", default=None)
  p.add_argument("--split-salt", default="")
  p.add_argument("--no-dedup", action="store_true")
  p.add_argument("--on-error", default="raise", choices=fasta_lib.ON_ERROR)
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  opts = PrepareOptions(
      min_length=a.min_length, max_length=a.max_length,
      min_standard_fraction=a.min_standard_fraction, valid_fraction=a.valid_fraction,
      test_fraction=a.test_fraction, dedup=not a.no_dedup, on_error=a.on_error,
      split_salt=a.split_salt, max_ligand_length=a.max_ligand_length,
      protein_column=a.protein_column, smiles_column=a.smiles_column, delimiter=a.delimiter)
  try:
    # The input may be bundled data (found from any folder); the output is where the user says.
    output = pathlib.Path(a.output).expanduser().absolute()
    prepare(resolve_path(a.input), output, fmt=a.format, overwrite=a.overwrite,
            log_every_s=a.log_every, options=opts)
  except (fasta_lib.DataError, FileExistsError, FileNotFoundError, ValueError) as e:
    log.error("%s", e)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
