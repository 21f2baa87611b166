"""Export CLI: python -m sedd_jax.export --workdir RUN --out DIR

Writes a self-contained bundle of a trained model (`sedd_jax.bundle`): `config.json` (the run's
config: graph, noise, model shape; the vocabulary, the sedd_jax version, the checkpoint step and
the run it came from), `model.safetensors` (the EMA weights, or the raw parameters with
`--weights raw`, one tensor per parameter under its flat dotted name), `data_stats.json` (the
training split's length histogram and residue composition, when the run's prepared data are
there) and a `README.md` model card (data, steps, the evaluation numbers of the run's
eval_*.json files). `--workdir` is a run folder (its newest loadable checkpoint) or a checkpoint
folder (`RUN/checkpoints/<step>`).

`sedd_jax.load(DIR)` reads the bundle and gives the same numbers as the run it came from. The
bundle is written to a temporary folder beside DIR and renamed when complete; an existing DIR
is refused unless it is empty or a bundle and `--overwrite` is given (a file or another folder
is never replaced).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
from typing import Sequence

from sedd_jax.cli import CliError
from sedd_jax.cli import run_cli

logger = logging.getLogger("sedd_jax.export")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m sedd_jax.export",
                              description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="training run folder (newest loadable "
                 "checkpoint) or a checkpoint folder (<workdir>/checkpoints/<step>)")
  p.add_argument("--out", required=True, help="the bundle folder to write")
  p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                 help="which weights: ema (default) or raw (the optimiser's parameters)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
  return p


def read_evals(run: pathlib.Path) -> list[tuple[str, dict]]:
  """(file name, contents) of the run folder's eval_*.json files (a file that cannot be read
  is skipped with a warning)."""
  out = []
  for f in sorted(run.glob("eval_*.json")):
    try:
      data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
      logger.warning("skipping %s: %s", f, e)
      continue
    if isinstance(data, dict):
      out.append((f.name, data))
  return out


def run(args) -> int:
  from sedd_jax import api
  from sedd_jax import bundle

  out = pathlib.Path(args.out)
  workdir = pathlib.Path(args.workdir)
  if bundle.is_bundle(workdir):
    raise CliError(f"--workdir {workdir} is a bundle already; give the run folder it came from")
  try:
    bundle.check_out(out, args.overwrite)  # before the slow load
  except ValueError as e:
    raise CliError(f"--out: {e}") from None
  try:
    model = api.load(workdir, weights=args.weights)
  except (ValueError, FileNotFoundError) as e:
    raise CliError(f"--workdir: {e}") from None
  src = model.source
  run_dir = pathlib.Path(src["run"] or src["checkpoint"])
  source = {k: src[k] for k in ("run", "checkpoint", "step", "weights")}
  try:
    path = bundle.write(out, model.model, model.cfg, source=source, stats=model.data_stats(),
                        evals=read_evals(run_dir), overwrite=args.overwrite)
  except ValueError as e:
    raise CliError(f"--out: {e}") from None
  msg = (f"exported step {src['step']} ({src['weights']} weights) of {src['checkpoint']} to "
         f"{path}")
  logger.info("%s", msg)
  sys.stdout.write(msg + "\n")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point; returns the exit code (2 on a bad input, with a one-line error)."""
  return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
  sys.exit(main())
