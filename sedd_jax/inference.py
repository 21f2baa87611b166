"""Loading a trained model (through `sedd_jax.load`) for the sampling and evaluation command lines.

- `load_model(path, weights, config_spec)`: `sedd_jax.load(path, weights=)` (a run folder, a
  checkpoint folder or an exported bundle: `SeddModel` / `ProteinLigandModel`), checked against
  an expected config (`check_same_shape`).
- `provenance(loaded)`: what every output records of the checkpoint used (weights, folder,
  step, run; the bundle's folder for a bundle).
- `read_config(path)`: the checkpoint's config without building the model (to check flags
  before the slow load).
- `protected_paths(path, flag, cfg)`: the files and folders of a run (or bundle) that no output
  may replace or land in (for `cli.check_outputs`).
- `is_protein_ligand(cfg)`: whether a config is of the protein-ligand task.
Errors are `sedd_jax.cli.CliError` (one line, exit code 2).
"""

from __future__ import annotations

import pathlib

from sedd_jax.cli import CliError
from sedd_jax.cli import load_config

MODEL_SHAPE_KEYS = ("hidden_size", "n_heads", "n_blocks", "cond_dim")


def load_model(path: str, weights: str = "ema", config_spec: str | None = None):
  """`sedd_jax.load(path, weights=weights)` (a run folder's newest loadable checkpoint, a
  checkpoint folder or an exported bundle), checked against `config_spec`'s shape; the API's
  errors as CliError."""
  from sedd_jax import api  # noqa: PLC0415

  try:
    loaded = api.load(path, weights=weights)
  except (FileNotFoundError, ValueError) as e:
    raise CliError(str(e)) from None
  if config_spec:
    check_same_shape(loaded.cfg, load_config(config_spec), path, config_spec)
  return loaded


def provenance(loaded) -> dict:
  """{weights, checkpoint (the folder the weights come from), step, run (its run folder or
  None)} of the `sedd_jax.load` model `loaded`, plus bundle (its folder) when it is one: what
  the outputs of sample and evaluate record."""
  src = loaded.source
  out = {"weights": src["weights"], "checkpoint": src["checkpoint"], "step": src["step"],
         "run": src["run"]}
  if src.get("kind") == "bundle":
    out["bundle"] = src["path"]
  return out


def read_config(path: str):
  """The config of the checkpoint that `load_model(path)` loads (the newest of a run folder),
  read without building the model, so that the flags are checked before the slow load; None
  when it cannot be read (`load_model` then says why)."""
  from sedd_jax import bundle  # noqa: PLC0415
  from sedd_jax.training import checkpoint as ckpt_lib  # noqa: PLC0415
  try:
    if bundle.is_bundle(path):
      return bundle.read_config(path)
    return ckpt_lib.read_config(ckpt_lib.resolve_checkpoint_dirs(path)[0])
  except Exception:  # noqa: BLE001 -- only a look ahead; load_model reports the real problem
    return None


def protected_paths(path: str, flag: str, cfg=None
                    ) -> tuple[list[tuple[str, pathlib.Path]], dict[str, pathlib.Path]]:
  """What the command reads of the run at `path` (given by `flag`) besides the weights, as
  `cli.check_outputs` takes it: ([(label, a config.json that `read_config` may read)], {label:
  folder}); the folders are the checkpoints (the folder holding the step folders, or the step
  folder given) and, with `cfg`, its prepared data store (`cfg.data.prepared`, read for
  lengths, reports, splits and reference pairs). Nothing of the run's when `path` holds no
  checkpoint (`load_model` says why). For a bundle: its config, weights and data statistics
  files."""
  from sedd_jax import bundle  # noqa: PLC0415
  from sedd_jax.data import pipeline  # noqa: PLC0415
  from sedd_jax.data import store as store_lib  # noqa: PLC0415
  from sedd_jax.training import checkpoint as ckpt_lib  # noqa: PLC0415

  folders = {}
  prepared = cfg.data.get("prepared") if cfg is not None else None
  if prepared and store_lib.is_prepared(pipeline.resolve_path(prepared)):
    folders["the data store (data.prepared) of the checkpoint"] = pipeline.resolve_path(prepared)
  if bundle.is_bundle(path):  # its files are inputs; an output may go beside them
    folder = pathlib.Path(path).absolute()
    return [(f"the {f.name} of the bundle {flag}", f) for f in sorted(folder.iterdir())
            if f.is_file() and f.name != "README.md"], folders
  try:
    dirs = ckpt_lib.resolve_checkpoint_dirs(path)
  except FileNotFoundError:
    return [], folders
  given = pathlib.Path(path).absolute()
  holder = dirs[0].parent
  if dirs == [given] and holder.name != ckpt_lib.CHECKPOINTS:
    folders[f"the checkpoint of {flag}"] = given  # a step folder outside a run
  else:
    folders[f"the checkpoints of {flag}"] = holder
  configs = {folder / "config.json" for d in dirs for folder in (d, *d.parents[:3])
             if (folder / "config.json").is_file()}
  return [(f"the config.json of {flag}", f) for f in sorted(configs)], folders


def check_same_shape(ckpt_cfg, want_cfg, path, spec) -> None:
  """CliError naming every model-shape key where the checkpoint's config and `want_cfg` differ."""
  diffs = []
  for key in MODEL_SHAPE_KEYS + ("length",):
    a, b = ckpt_cfg.model.get(key), want_cfg.model.get(key)
    if a != b:
      diffs.append(f"model.{key}: checkpoint {a}, config {b}")
  for key in ("type", "tokens"):
    a, b = ckpt_cfg.graph.get(key), want_cfg.graph.get(key)
    if a != b:
      diffs.append(f"graph.{key}: checkpoint {a}, config {b}")
  if diffs:
    raise CliError(f"the checkpoint {path} is of another model shape than --config {spec}: "
                   + "; ".join(diffs))


def is_protein_ligand(cfg) -> bool:
  """Whether `cfg` is of the protein-ligand task (`cfg.task`)."""
  return cfg.get("task", "sedd") == "protein_ligand"
