"""Loading a trained model for the sampling and evaluation command lines.

- `load_model(path, use_ema, config_spec)`: (model, cfg, graph, noise) of a run folder or a
  checkpoint folder, checked against an expected config (`check_same_shape`).
- `read_config(path)`: the checkpoint's config without building the model (to check flags
  before the slow load).
- `is_protein_ligand(cfg)`: whether a config is of the protein-ligand task.
Errors are `sedd_jax.cli.CliError` (one line, exit code 2).
"""

from __future__ import annotations

import pathlib

from sedd_jax.cli import CliError
from sedd_jax.cli import load_config

MODEL_SHAPE_KEYS = ("hidden_size", "n_heads", "n_blocks", "cond_dim")


def load_model(path: str, use_ema: bool = True, config_spec: str | None = None):
  """(model, cfg, graph, noise) from a run folder (newest loadable checkpoint) or a checkpoint
  folder, with the EMA weights (or the raw params), checked against `config_spec`'s shape."""
  from sedd_jax.training import checkpoint as ckpt_lib  # noqa: PLC0415

  if not pathlib.Path(path).exists():
    raise CliError(f"{path} does not exist")
  try:
    loaded = ckpt_lib.load_for_inference(path, use_ema=use_ema)
  except FileNotFoundError as e:
    raise CliError(str(e)) from None
  except ckpt_lib.CheckpointError as e:
    raise CliError(f"cannot load a model from {path}: the checkpoint's weights do not fit the "
                   f"model its config describes (another model shape?): {e}") from None
  model, cfg, graph, noise = loaded
  if config_spec:
    check_same_shape(cfg, load_config(config_spec), path, config_spec)
  return model, cfg, graph, noise


def read_config(path: str):
  """The config of the checkpoint that `load_model(path)` loads (the newest of a run folder),
  read without building the model, so that the flags are checked before the slow load; None
  when it cannot be read (`load_model` then says why)."""
  from sedd_jax.training import checkpoint as ckpt_lib  # noqa: PLC0415
  try:
    return ckpt_lib.read_config(ckpt_lib.resolve_checkpoint_dirs(path)[0])
  except Exception:  # noqa: BLE001 -- only a look ahead; load_model reports the real problem
    return None


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
