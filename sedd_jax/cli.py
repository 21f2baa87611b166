"""Plumbing shared by the command lines of `sedd_jax.sample` and `sedd_jax.evaluate`.

- `CliError`: a bad command line or input file, reported as one line with exit code 2.
- `run_cli(parser, run_fn, argv)`: parses, sets up logging (`--verbose`), runs, maps errors.
- `load_config(spec)`: a `--config FILE.py[:VARIANT]` flag's config (CliError if unreadable).
- `json_safe(obj)`: NaN / inf -> None in a JSON-able dict or list (strict JSON output).
- `sampler_options(args, cfg, **extra)`: the sample CLI's --steps/--predictor/--eps (defaults
  `cfg.sampling`), checked by `sampler.check_options` (CliError naming the flag).
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Sequence

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
