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
The peers' layout (consensus.fasta + splits.json) keeps the splits of splits.json. The
filtering and writing pass is `sedd_jax.data.store_writer`; this module holds the CLI, the path
rules and the atomic replacement of a store.

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
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import sys
import time
import uuid

from sedd_jax.data import fasta as fasta_lib
from sedd_jax.data import store_writer
from sedd_jax.data.store_writer import SPLITS
from sedd_jax.data.store_writer import PrepareOptions

log = logging.getLogger(__name__)

DEFAULT_INPUT = "data/uniprot_mmseqs2_example.fasta.gz"
DEFAULT_OUTPUT = "data/prepared/uniprot"


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
    manifest = store_writer.write_store(src, tmp, fmt, opts, log_every_s)
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
  paths = store_writer.source_files(src, fmt)
  files = recorded.get("files", [])
  have = [(f.get("name"), f.get("bytes")) for f in files]
  want = [(p.name, p.stat().st_size) for p in paths]
  if have != want:
    return f"files (name, bytes) {have} recorded, {want} now"
  if trust_path and recorded.get("path") == str(src.resolve()):
    return None
  if [f.get("sha256") for f in files] != [store_writer.file_sha256(p) for p in paths]:
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
