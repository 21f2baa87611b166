"""Plumbing shared by the command lines of `sedd_jax.sample` and `sedd_jax.evaluate` (and the
output checks of `sedd_jax.convert`).

- `CliError`: a bad command line or input file, reported as one line with exit code 2.
- `run_cli(parser, run_fn, argv)`: parses, sets up logging (`--verbose`), runs, maps errors.
- `load_config(spec)`: a `--config FILE.py[:VARIANT]` flag's config (CliError if unreadable).
- `json_safe(obj)`: NaN / inf -> None in a JSON-able dict or list (strict JSON output).
- `sampler_options(args, cfg, **extra)`: the sample CLI's --steps/--predictor/--eps (defaults
  `cfg.sampling`), checked by `sampler.check_options` (CliError naming the flag).
- `check_seed(seed)`: CliError naming `--seed` unless 0 <= seed < 2^32.
- `check_outputs(outputs, inputs, keep_out, folders)`: before any work, CliError naming both
  paths' flags when an output would replace an input (the same file through a symlink or a hard
  link included), land inside a folder that must stay as it is (a run's checkpoints, a data
  store), is an existing folder, or cannot be written.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pathlib
import tempfile
from typing import Any, Iterable, Mapping, Sequence

logger = logging.getLogger("sedd_jax.cli")

QUIET_LOGGERS = ("absl", "jax")  # their INFO lines only with --verbose


class CliError(ValueError):
  """A bad command line or input file (reported as one line, exit code 2)."""


def load_config(spec: str):
  """The config of `spec` (FILE.py[:VARIANT]); CliError naming the flag if it cannot be read."""
  from sedd_jax import config as config_lib  # noqa: PLC0415
  try:
    return config_lib.load_config(spec)
  except (OSError, ValueError) as e:
    raise CliError(f"--config {spec}: {e}") from None


def sampler_options(args, cfg, **extra) -> tuple[int, str, float]:
  """(steps, predictor, eps) of the reverse process: the flags, else `cfg.sampling`'s
  (`sampler.resolve_options` with `extra`, on the graph of `cfg.graph`; a protein-ligand
  config's ligand graph has the same type). The check's messages start with the option's name,
  the flag's name: CliError `--<message>`."""
  from sedd_jax import diffusion  # noqa: PLC0415
  from sedd_jax.sampling import sampler  # noqa: PLC0415

  try:
    return sampler.resolve_options(diffusion.get_graph(cfg.graph), cfg.sampling,
                                   steps=args.steps, predictor=args.predictor, eps=args.eps,
                                   **extra)
  except ValueError as e:
    option, _, rest = str(e).partition(" ")
    raise CliError(f"--{option.replace('_', '-')} {rest}") from None


SEED_LIMIT = 2**32


def check_seed(seed: int, flag: str = "--seed") -> None:
  """CliError naming `flag` unless `seed` is in [0, 2^32) (what numpy's and jax's generators
  take, with room for the seed + 1 of a second stream)."""
  if not 0 <= seed < SEED_LIMIT:
    raise CliError(f"{flag} must be an integer in [0, 2^32); got {seed}")


# {label: path} or (label, path) pairs (a label may name several paths); None paths are skipped.
Paths = Mapping[str, Any] | Iterable[tuple[str, Any]]


def _pairs(paths: Paths | None) -> list[tuple[str, Any]]:
  items = paths.items() if isinstance(paths, Mapping) else (paths or ())
  return [(label, path) for label, path in items if path is not None]


def _real(path) -> str:
  return os.path.realpath(os.fspath(path))


def _same_file(a, b) -> bool:
  """Whether `a` and `b` name one file: the same inode when both exist (symlinks, hard links),
  else the same resolved path."""
  try:
    return os.path.samefile(a, b)
  except OSError:
    return _real(a) == _real(b)


def _inside(path, folder) -> bool:
  """Whether `path` resolves to `folder` or into it, or is a hard link of a file in it."""
  real, top = _real(path), _real(folder)
  if os.path.commonpath([real, top]) == top:
    return True
  try:
    st = os.stat(real)
  except OSError:
    return False
  if st.st_nlink < 2 or not os.path.isfile(real):
    return False
  for root, _, names in os.walk(top):
    for name in names:
      try:
        other = os.stat(os.path.join(root, name))
      except OSError:
        continue
      if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
        return True
  return False


def _check_writable(label: str, path, folder: bool) -> None:
  """CliError unless `path` can be written: a file path (`folder`: a folder path) whose nearest
  existing folder takes a new file (tried, not guessed from the mode bits), or an existing
  writable file. Missing parent folders are created when the output is written."""
  text = os.fspath(path)
  real = pathlib.Path(_real(path))
  if real.is_dir():
    if not folder:
      raise CliError(f"{label} {text} is a folder; give a file path")
    into = real
  elif real.exists():
    if folder:
      raise CliError(f"{label} {text} exists and is not a folder")
    if real.is_file():  # a device or a FIFO (e.g. /dev/stdout) is left to the writer
      try:
        open(real, "ab").close()  # opened for appending: nothing is changed
      except OSError as e:
        raise CliError(f"{label} {text} cannot be written ({e.strerror or e})") from None
    return
  else:
    if not folder and text.endswith(("/", os.sep)):
      raise CliError(f"{label} {text} is a folder path; give a file path")
    into = next(p for p in real.parents if p.exists())
    if not into.is_dir():
      raise CliError(f"{label} {text}: {into} is not a folder")
  try:
    with tempfile.TemporaryFile(dir=into):
      pass
  except OSError as e:
    raise CliError(f"{label} {text}: cannot write into {into} ({e.strerror or e})") from None


def check_outputs(outputs: Paths, inputs: Paths | None = None, keep_out: Paths | None = None,
                  folders: Paths | None = None) -> None:
  """Refuses, before any work, a command whose outputs would lose something (CliError).

  Args (each {label: path} or (label, path) pairs; None paths are skipped):
    outputs: the files the command writes, labels naming the flag ("--out", "--report's JSON").
    inputs: the files it reads: no output may be one of them (the same path, or the same file
      through a symlink or a hard link).
    keep_out: folders that no output may be or lie inside of (a run's checkpoints, a data
      store), nor be a hard link of a file in.
    folders: the folders the command writes into (created if missing).

  Every output must also be new or an existing file the command may write, never an existing
  folder, under a folder that takes a new file; no two outputs may be the same file.
  """
  written = [(k, v, True) for k, v in _pairs(folders)] + [(k, v, False) for k, v in
                                                          _pairs(outputs)]
  for i, (label, path, _) in enumerate(written):
    for in_label, src in _pairs(inputs):
      if _same_file(path, src):
        raise CliError(f"{label} {os.fspath(path)} would overwrite {in_label} "
                       f"{os.fspath(src)} (the same file); choose another output path")
    for k_label, folder in _pairs(keep_out):
      if _inside(path, folder):
        raise CliError(f"{label} {os.fspath(path)} lies inside {k_label} {os.fspath(folder)}; "
                       "writing there could corrupt it: choose an output path outside it")
    for other_label, other, _ in written[:i]:
      if _same_file(path, other):
        raise CliError(f"{label} {os.fspath(path)} is the same file as {other_label}; choose "
                       "another output path")
  for label, path, folder in written:
    _check_writable(label, path, folder)


def json_safe(obj):
  """`obj` (nested dicts, lists, floats, ...) with every non-finite float replaced by None."""
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [json_safe(v) for v in obj]
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def run_cli(parser: argparse.ArgumentParser, run_fn, argv: Sequence[str] | None) -> int:
  """Parses argv, sets up logging and runs `run_fn(args)`; a CliError or a bad data store
  (`StoreError`) becomes one line + exit 2.

  At the default verbosity the INFO lines of the libraries (QUIET_LOGGERS: orbax logs through
  absl) are hidden; `--verbose` shows them.
  """
  from sedd_jax.data.store import StoreError  # noqa: PLC0415

  parser.add_argument("--verbose", action="store_true",
                      help="also show the INFO lines of jax, orbax and absl")
  args = parser.parse_args(argv)
  if not logging.getLogger().handlers:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.NOTSET if args.verbose else logging.WARNING)
  try:
    return run_fn(args)
  except (CliError, StoreError) as e:
    logger.error("error: %s", e)
    return 2
