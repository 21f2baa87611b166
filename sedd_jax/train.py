r"""Training CLI: `python -m sedd_jax.train --config=configs/uniref50.py[:variant] [flags]`.

  python -m sedd_jax.train --config=configs/uniref50.py:tiny --workdir runs/tiny
  python -m sedd_jax.train --config=configs/uniref50.py:small --workdir runs/small \
      --config.training.batch_size=128 --config.optim.lr=1e-4
  python -m sedd_jax.train --config=configs/protein_ligand.py:tiny --workdir runs/pl_tiny

The config's `task` (default "sedd") picks the model and loss (`sedd_jax.training.task`): the
protein-only SEDD of configs/uniref50.py, or the protein-ligand model of
configs/protein_ligand.py (`task = "protein_ligand"`; its ligand vocabulary is filled into the
saved config).

Flags: `--config=FILE[:VARIANT]` (variant default: the file's `get_config()` default, `tiny` for
uniref50.py), `--config.KEY=VALUE` overrides (unknown keys and bad values fail before anything is
compiled, naming the key), `--workdir DIR` (default `runs/<variant>`), `--fresh`.

Workdir: `checkpoints/<step>/` (see `sedd_jax.training.checkpoint`), `metrics.jsonl`,
`config.json` (the config of the latest start), `samples/step_<n>.fasta` (protein-ligand:
`samples/step_<n>.smi`, ligands for validation proteins, with their SMILES validity logged as a
`sample` row), `loss_curve.png`, `wandb/`, `.lock`. One job per workdir: a second job started
on a workdir in use exits at once with one error line naming the workdir and the running
job's pid and host, writing nothing there (`.lock` is an flock that the kernel releases when
the job ends or dies). Starting resumes from the newest loadable checkpoint; if it is already
at `training.steps` the job says so and exits 0. A config that changes the model's shape stops
before the model is built (finished run or not), naming the keys that differ from the
checkpoint's. `--fresh` starts from step 0 WITHOUT deleting anything: the workdir's current
content is moved into `<workdir>/old-<YYYYmmdd-HHMMSS>/`. Bad data inputs (`data.fasta`
missing, a store of another source) and an unusable workdir (a file, not writable, a data store
or inside one, holding `data.fasta`, a `data.prepared` inside its `checkpoints/` or, with
`--fresh`, anywhere in it) stop the job before the workdir is written. Exit codes: 0 (finished,
stopped by a signal, or --help), 2 (bad config, data, checkpoint or workdir, or a workdir in
use: one error line), 3 (non-finite steps), 130 (a second Ctrl-C).

Stopping: SIGTERM or Ctrl-C (SIGINT) sets a flag; the loop finishes the current step, writes a
checkpoint and exits 0. A second Ctrl-C aborts at once, even mid-step or mid-save: one line
naming the newest complete checkpoint, exit code 130, no final checkpoint (the complete ones are
kept). `training.max_bad_steps` consecutive non-finite steps stop the run with a checkpoint and
exit code 3.

The library form is `sedd_jax.training.loop.train` (re-exported here as `train`): set-up in
`training/run.py`, periodic actions in `training/hooks.py`, the workdir's checks, lock and
`--fresh` in `training/workdir.py`, signals and prefetching in `training/runtime.py`.

Devices: all devices of all processes form one data-parallel mesh (`sedd_jax.training.sharding`).
Multi-process: when `JAX_COORDINATOR_ADDRESS` is set (with `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`), or under SLURM with more than one task (`SLURM_NTASKS` > 1),
`jax.distributed.initialize()` is called first. Every process then draws the same global batches
from the data (its iterator state is the same everywhere) and hands only its devices' rows to
them (`sharding.put_batch`), so the losses, the checkpointed data state and resuming do not depend
on the number of processes or devices (a run saved on 2 GPUs resumes on 1 and the reverse).
Every process checks the workdir and (the first one to get there prepares) the data store
before anything is written; process 0 alone takes the workdir's lock and moves its content
aside (`--fresh`), then every process learns whether that worked (a failure stops all of them);
process 0 writes metrics, samples and `config.json`; every process writes its shards of each
checkpoint (orbax). A signal to any process stops all of them after the same step: the flags are
gathered from every process every 10 steps (`StopFlag.agreed`).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from sedd_jax import config as config_lib

logger = logging.getLogger("sedd_jax.train")

EXIT_OK = 0
EXIT_CONFIG = 2

# The library lives in `sedd_jax.training` (loop, run, hooks, runtime); these names are re-exported
# from there on first use, so that `--help` and config errors do not wait for jax to import.
_LIBRARY = {"train": "loop", "Result": "loop", "EXIT_NONFINITE": "loop",
            "maybe_initialize_distributed": "runtime", "StopFlag": "runtime",
            "Prefetcher": "runtime", "EXIT_ABORTED": "runtime"}


def __getattr__(name: str) -> Any:
  if name in _LIBRARY:
    return getattr(importlib.import_module(f"sedd_jax.training.{_LIBRARY[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS
_FLAGS: dict[str, Any] = {}


def define_flags() -> None:
  """Defines --config, --workdir, --fresh (once; at CLI start, not at import)."""
  if _FLAGS:
    return
  _FLAGS["config"] = config_flags.DEFINE_config_file(
    "config", None, "Config file, FILE.py[:VARIANT] (e.g. configs/uniref50.py:tiny).",
    lock_config=True)
  _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "Run folder (default runs/<variant>).")
  _FLAGS["fresh"] = flags.DEFINE_bool(
    "fresh", False, "Start over; the workdir's content is moved to <workdir>/old-<timestamp>/ "
    "(nothing is deleted).")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; a missing config file, an unknown variant or an unknown `--config.KEY`
  is reported in one line, and a help flag exits 0 (absl's exits 1)."""
  try:
    config_lib.check_override_args(argv[1:])
  except (config_lib.ConfigError, FileNotFoundError, ValueError) as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(EXIT_CONFIG)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    sys.stderr.write(f"error: {lines[-1] if lines else e}\n")  # not a config file's traceback
    sys.exit(EXIT_CONFIG)
  except SystemExit as e:
    if e.code == 1 and config_lib.asked_for_help(argv[1:]):
      sys.exit(EXIT_OK)
    raise


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("absl", "jax._src.xla_bridge"):  # orbax's per-save and jax's backend chatter
    logging.getLogger(name).setLevel(logging.WARNING)
  cfg = _FLAGS["config"].value
  if cfg is None:
    raise app.UsageError("--config=FILE.py[:VARIANT] is required")
  from sedd_jax.training import runtime  # noqa: PLC0415

  runtime.maybe_initialize_distributed()
  import jax  # noqa: PLC0415

  try:
    config_lib.validate(cfg, n_devices=jax.device_count())
  except config_lib.ConfigError as e:
    sys.stderr.write(f"error: {e}\n")
    return EXIT_CONFIG
  workdir = _FLAGS["workdir"].value or os.path.join("runs", str(cfg.variant))
  from sedd_jax.data import fasta as fasta_lib  # noqa: PLC0415
  from sedd_jax.data import store as store_lib  # noqa: PLC0415
  from sedd_jax.training import checkpoint as ckpt_lib  # noqa: PLC0415
  from sedd_jax.training import loop  # noqa: PLC0415
  from sedd_jax.training import workdir as workdir_lib  # noqa: PLC0415

  try:
    return loop.train(cfg, workdir, fresh=_FLAGS["fresh"].value).code
  except (fasta_lib.DataError, store_lib.StoreError, ckpt_lib.CheckpointError,
          workdir_lib.WorkdirError) as e:
    sys.stderr.write(f"error: {e}\n")  # bad data, checkpoints or workdir: one line
    return EXIT_CONFIG
  except KeyboardInterrupt:  # during set-up, before the signal watcher is installed
    sys.stderr.write("interrupted during set-up: nothing was trained in this call; the "
                     "workdir's complete checkpoints are unchanged\n")
    return runtime.EXIT_ABORTED


def run() -> None:
  """Entry point of `python -m sedd_jax.train`."""
  define_flags()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
