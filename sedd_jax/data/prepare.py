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
rules and the atomic replacement of a store:

* `prepare(input, output, ...)`: the whole job (the CLI's `main`).
* `check_paths` / `check_output` / `check_replaceable`: what an output may be. Absent, an empty
  folder or a store; never the input or a folder holding it; `--overwrite` replaces a store
  only when its folder holds nothing but the store's files (`foreign_entries` lists the rest).
  Everything else is refused in one line (`store.StoreError`) and left untouched.
* `source_difference(manifest, src, fmt)`: how a store's recorded source differs from `src`.
* `scratch_folder` / `remove_stale_scratch`: the temporary sibling folders
  `.<name>.tmp-<host>-<pid>-<hex>` (`.old-` while a store is replaced); those of processes of
  this host that are gone (`kill -9`) are removed by the next prepare of the same output.

Errors (bad input, a refused output, a full disk: the partial store removed) are one line and
exit code 2 from the CLI.

Store layout (written to a temporary sibling directory and renamed at the end, so a crash never
corrupts an earlier store)::

  OUTPUT/manifest.json                  counts, filters, vocabularies, source (name, bytes,
                                        mtime, sha256 per file), skips
  OUTPUT/smiles_vocab.json              (protein-ligand only) SmilesTokenizer vocabulary
  OUTPUT/{train,valid,test}/tokens.npy  (N_tokens,) uint8 ESM-2 ids, sequences concatenated
  OUTPUT/{train,valid,test}/offsets.npy (N + 1,) int64; sequence i = tokens[off[i]:off[i+1]]
  OUTPUT/{train,valid,test}/ligand_tokens.npy, ligand_offsets.npy   (protein-ligand only)
  OUTPUT/{train,valid,test}/manifest.json  the split's counts and length statistics
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import sys
import time
import uuid

from sedd_jax.data import fasta as fasta_lib
from sedd_jax.data import store as store_lib
from sedd_jax.data import store_writer
from sedd_jax.data.store_writer import SPLITS
from sedd_jax.data.store_writer import PrepareOptions

log = logging.getLogger(__name__)

DEFAULT_INPUT = "data/uniprot_mmseqs2_example.fasta.gz"
DEFAULT_OUTPUT = "data/prepared/uniprot"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # the OSErrors reported as a full disk
# This host in the names of scratch folders (another host's, on a shared file system, is never
# judged by the pids of this one).
HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


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
    output: the store directory: absent, an empty folder or a store, never the input nor a
      folder holding it (`check_paths`). If it is a store and `overwrite` is False, it is kept
      and its manifest returned when it was prepared from the same source (sha256) with the
      same settings; otherwise FileExistsError. Anything else (a file, a folder of other files)
      is refused and left untouched.
    fmt: auto | fasta | csv | peers (auto: from the path, `fasta.detect_format`).
    overwrite: replace an existing store (atomically, after the new one is complete) whose
      folder holds nothing but the store's files (`store.store_files`); a store folder holding
      anything else (a user's notes, a run) is refused and left untouched.
    log_every_s: seconds between progress lines.
    options: filters and split settings; keyword arguments override its fields.

  Temporary folders left by prepare processes of this host that are gone (`kill -9`) beside
  `output` are removed first (`remove_stale_scratch`).

  Raises:
    fasta.DataError: bad input (naming file and line), or no sequence kept.
    store.StoreError: `output` is (or holds) the input, is a file or a folder that is not a
      store, is a store holding other files (with `overwrite`), or the disk filled up (the
      partial store removed).
    FileExistsError: `output` is a store (another source or settings, or incomplete) and not
      `overwrite`.
  """
  opts = dataclasses.replace(options or PrepareOptions(), **kwargs)
  opts.validate()
  src = pathlib.Path(input_path)
  out = pathlib.Path(output)
  if not src.exists():
    raise FileNotFoundError(f"input {src} does not exist")
  check_paths(src, out)
  if fmt == "auto":
    fmt = fasta_lib.detect_format(src)
  if fmt not in ("fasta", "csv", "peers"):
    raise ValueError(f"format must be auto, fasta, csv or peers, got {fmt!r}")
  if store_lib.is_store(out):
    if not overwrite:
      existing, why = _up_to_date(out, src, fmt, opts)
      if existing is not None:
        log.info("store %s is up to date (same source sha256 and settings); nothing to do", out)
        return existing
      raise FileExistsError(f"store {out} already exists, {why} (pass overwrite=True / "
                            "--overwrite to replace it)")
    check_replaceable(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  remove_stale_scratch(out)
  tmp = scratch_folder(out, "tmp")
  tmp.mkdir()
  try:
    t0 = time.perf_counter()
    manifest = store_writer.write_store(src, tmp, fmt, opts, log_every_s)
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    with open(tmp / "manifest.json", "w") as f:
      json.dump(manifest, f, indent=1)
    _commit(tmp, out, overwrite)
  except BaseException as e:
    if isinstance(e, OSError) and e.errno in DISK_FULL:
      raise _disk_full(out, tmp) from None
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  log.info("prepared %s -> %s: %s sequences (train/valid/test %s) in %.1f s; filtered %s; "
           "skipped %s", src, out, manifest["kept"],
           "/".join(str(manifest["splits"][s]["sequences"]) for s in SPLITS),
           manifest["seconds"], manifest["filtered"], manifest["skipped"])
  return manifest


def _disk_full(out: pathlib.Path, tmp: pathlib.Path) -> store_lib.StoreError:
  """Removes the partial store `tmp` of `out`; the one-line error saying the disk is full,
  where, how much was written and how much is free now."""
  written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.exists() else 0
  shutil.rmtree(tmp, ignore_errors=True)
  free = shutil.disk_usage(out.parent).free
  return store_lib.StoreError(
      f"disk full: no space left on the device of {out} while writing the store "
      f"({written / 1e6:.1f} MB written before it filled, {free / 1e6:.1f} MB free now); the "
      "partial store is removed: free some space or choose another output path")


def check_paths(src: pathlib.Path, out: pathlib.Path,
                names: tuple[str, str] = ("the input", "--output")) -> None:
  """StoreError unless the store `out` can be written from the input `src`: `out` is not `src`
  nor a folder above it (a store is never written over its source), and `check_output` holds.
  `names`: how the messages call the input and the output (the flags, or config keys)."""
  src_name, out_name = names
  real = src.resolve()
  if out.resolve() in (real, *real.parents):
    raise store_lib.StoreError(f"{out_name} {out} is (or holds) {src_name} {src}: a store is "
                               "never written over its source; choose another output folder")
  check_output(out, out_name)


def check_output(out: pathlib.Path, name: str = "--output") -> None:
  """StoreError (`name`: the flag or key naming `out`) unless `out` is absent under a folder,
  an empty folder or a store (`store.is_store`): `prepare` replaces only what it wrote
  itself."""
  if not out.exists() and not out.is_symlink():
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
      parent = parent.parent
    if not parent.is_dir():
      raise store_lib.StoreError(f"{name} {out} cannot be created: {parent} is a file, not a "
                                 "folder")
    return
  if not out.is_dir():
    raise store_lib.StoreError(f"{name} {out} is an existing file, not a folder: a store is a "
                               "folder; choose another path")
  if any(out.iterdir()) and not store_lib.is_store(out):
    raise store_lib.StoreError(
        f"{name} {out} is a folder that is not a prepared store (it has no manifest.json "
        "written by sedd_jax.data.prepare); it is left untouched, even with --overwrite: "
        "choose another path")


def check_replaceable(out: pathlib.Path, name: str = "--output") -> None:
  """StoreError unless the folder `out` is a store holding nothing but the store's files
  (`store.store_files` of its manifest): what --overwrite may replace."""
  check_output(out, name)
  foreign = foreign_entries(out)
  if foreign:
    listed = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
    raise store_lib.StoreError(
        f"{name} {out} is a store that also holds what prepare did not write ({listed}); "
        "--overwrite replaces only a folder that holds nothing but its store: move those out or "
        "choose another output path (nothing was changed)")


def foreign_entries(out: pathlib.Path) -> list[str]:
  """What the store folder `out` holds besides the files of its store: paths relative to `out`,
  folders with a trailing '/'."""
  with open(out / "manifest.json") as f:
    own = set(store_lib.store_files(json.load(f)))

  def named(entry: pathlib.Path, rel: str) -> str:
    return rel + "/" if entry.is_dir() and not entry.is_symlink() else rel

  foreign = []
  for entry in sorted(out.iterdir()):
    if entry.name in SPLITS and entry.is_dir() and not entry.is_symlink():
      foreign += [named(e, f"{entry.name}/{e.name}") for e in sorted(entry.iterdir())
                  if f"{entry.name}/{e.name}" not in own]
    elif entry.name not in own:
      foreign.append(named(entry, entry.name))
  return foreign


def scratch_folder(out: pathlib.Path, kind: str, pid: int | None = None) -> pathlib.Path:
  """A new sibling folder of the store `out` for this process (`pid`, default this one):
  `.<name>.<kind>-<host>-<pid>-<hex>`, kind "tmp" (the store being written) or "old" (the
  store being replaced)."""
  pid = os.getpid() if pid is None else pid
  return out.parent / f".{out.name}.{kind}-{HOST}-{pid}-{uuid.uuid4().hex[:8]}"


def remove_stale_scratch(out: pathlib.Path) -> list[pathlib.Path]:
  """Removes the `scratch_folder`s of `out` left by processes of this host that are gone (also
  the older names without a host, `.<name>.tmp-<pid>-<hex>`); keeps those of live processes
  (another prepare in progress) and of other hosts. Returns the removed folders."""
  pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(?:(.+)-)?(\d+)-[0-9a-f]{{8}}")
  removed = []
  for entry in sorted(out.parent.iterdir()):
    m = pattern.fullmatch(entry.name)
    if not m or m[1] not in (None, HOST) or _alive(int(m[2])) or not entry.is_dir():
      continue
    shutil.rmtree(entry, ignore_errors=True)
    log.info("removed %s, left by prepare process %s of this host, which is gone", entry, m[2])
    removed.append(entry)
  return removed


def _alive(pid: int) -> bool:
  """Whether process `pid` of this host exists (signal 0)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's
    return True
  except (OverflowError, ValueError):
    return False
  return True


def _up_to_date(out: pathlib.Path, src: pathlib.Path, fmt: str,
                opts: PrepareOptions) -> tuple[dict | None, str]:
  """(the manifest of the store `out`, "") if it is a complete store of `src` with the settings
  `opts`; else (None, why not)."""
  with open(out / "manifest.json") as f:
    manifest = json.load(f)
  missing = [n for n in store_lib.store_files(manifest) if not (out / n).exists()]
  if missing:
    return None, f"incomplete ({missing[0]} is missing)"
  have, want = manifest.get("filters", {}), dataclasses.asdict(opts)
  keys = list(want) + [k for k in have if k not in want]
  diff = {k: (have.get(k), want.get(k)) for k in keys if have.get(k) != want.get(k)}
  if diff:
    return None, "prepared with other settings (" + ", ".join(
        f"{k} {a!r} in the store, {b!r} now" for k, (a, b) in diff.items()) + ")"
  other = source_difference(manifest, src, fmt)
  return (manifest, "") if other is None else (None, f"prepared from another source ({other})")


def source_difference(manifest: dict, src: pathlib.Path, fmt: str,
                      trust_path: bool = False) -> str | None:
  """How the source recorded in a store's `manifest` differs from `src` read as `fmt`, saying
  what differs first; None when it is the same: same format, file names and sizes, and same
  sha256. With `trust_path`, a file at the recorded path with the recorded size and
  modification time stands for its hash (an unmoved, untouched large source is not re-read);
  any other file is hashed (an in-place edit of the same size is caught).
  """
  recorded = manifest.get("source", {})
  if recorded.get("format") != fmt:
    return f"read as {fmt!r}, {recorded.get('format')!r} when the store was prepared"
  paths = store_writer.source_files(src, fmt)
  files = recorded.get("files", [])
  names = [p.name for p in paths]
  if [f.get("name") for f in files] != names:
    return f"files {names}, {[f.get('name') for f in files]} when the store was prepared"
  stats = [p.stat() for p in paths]
  for f, p, st in zip(files, paths, stats):
    if f.get("bytes") != st.st_size:
      return f"{p.name}: {st.st_size} bytes, {f.get('bytes')} bytes when the store was prepared"
  unmoved = trust_path and recorded.get("path") == str(src.resolve())
  for f, p, st in zip(files, paths, stats):
    if unmoved and f.get("mtime_ns") == st.st_mtime_ns:
      continue
    if f.get("sha256") != store_writer.file_sha256(p):
      return f"{p.name}: same size, other content (sha256)"
  return None


def _commit(tmp: pathlib.Path, out: pathlib.Path, overwrite: bool) -> None:
  """Moves the complete store `tmp` to `out`: renamed into place when `out` is absent or an
  empty folder; with `overwrite`, an existing store is set aside, replaced and removed, after
  `check_replaceable` again (a file that appeared in it meanwhile stops the replacement)."""
  if not out.exists() or (out.is_dir() and not any(out.iterdir())):
    try:
      os.rename(tmp, out)  # replaces an empty folder
      return
    except OSError:
      if not out.exists():
        raise
  if not overwrite:  # another process finished first
    raise FileExistsError(f"store {out} already exists (pass overwrite=True / --overwrite)")
  check_replaceable(out)
  old = scratch_folder(out, "old")
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
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing store whose folder holds nothing else (a folder "
                 "with other files, or a file, is refused and left untouched)")
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
  except (ValueError, OSError) as e:  # bad input or output (DataError, StoreError): one line
    log.error("%s", e)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
