"""Converts a PyTorch SEDD checkpoint into a sedd_jax inference checkpoint.

  python -m sedd_jax.convert --input ref.pth --output DIR \
      [--config configs/uniref50.py:small --config.model.n_heads=12] [--use-ema]

The input is what the reference's training saves (`{'model': state_dict, 'ema': {...
'shadow_params': [...]}, 'step': n, ...}`), `{'model': ...}` alone, or a plain state_dict.
DDP's `module.` prefixes are stripped. hidden_size, cond_dim, n_blocks and the vocabulary size
(-> graph.tokens) are read from the weights and override the config (a differing config value
is logged); n_heads, graph.type, noise and length come from the config (default
configs/uniref50.py:small, the SEDD-small shape). `--use-ema` takes the EMA weights instead of
the model's.

Output: `DIR/checkpoints/<step>/` written by
`sedd_jax.training.checkpoint.save_inference_checkpoint` (items params, ema = the chosen weights,
config) and `DIR/config.json`; `sedd_jax.training.checkpoint.load_for_inference(DIR)` loads it.
Before the input is read, DIR is checked (`sedd_jax.cli.check_outputs`): a folder (or none yet)
that takes new files, whose config.json is not the input (symlinks and hard links included); an
existing `DIR/checkpoints/<step>` is refused once the step is read.

torch is imported only here (`pip install sedd_jax[torch]`).
"""

from __future__ import annotations

import logging
import pathlib
import sys
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from sedd_jax.cli import CliError
from sedd_jax.cli import check_outputs
from sedd_jax.model import torch_import

log = logging.getLogger(__name__)

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "uniref50.py"
DEFAULT_VARIANT = "small"


class ConvertError(ValueError):
  """An input checkpoint that cannot be converted (the message says why)."""


def _import_torch():
  try:
    import torch  # noqa: PLC0415 -- torch is an optional extra, needed only here
  except ImportError as e:
    raise ConvertError("converting a PyTorch checkpoint needs torch: pip install "
                       "'sedd_jax[torch]' (or pip install torch)") from e
  return torch


def check_torch_file(path: pathlib.Path) -> None:
  """ConvertError unless `path` is laid out as torch.save writes: a zip archive (the default
  since torch 1.6) or a pickle stream of protocol 2 or above (starting with byte 0x80)."""
  if not path.is_file():
    raise ConvertError(f"input {path} does not exist")
  if zipfile.is_zipfile(path):
    return
  with open(path, "rb") as f:
    head = f.read(16)
  if head.startswith(b"PK"):
    raise ConvertError(f"input {path} is a truncated or corrupt zip archive (torch.save writes "
                       "zip archives): copy the checkpoint again")
  if not head.startswith(b"\x80"):
    raise ConvertError(f"input {path} is not a PyTorch checkpoint: torch.save writes a zip "
                       f"archive or a pickle stream, this file starts with {head!r}")


def load_torch_file(path: str | pathlib.Path, allow_pickle: bool = False) -> Any:
  """torch.load on the CPU; weights_only unless `allow_pickle` (trusted files only)."""
  torch = _import_torch()
  path = pathlib.Path(path)
  check_torch_file(path)
  try:
    return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
  except Exception as e:  # noqa: BLE001 -- torch raises several types for unreadable files
    # Only a file that holds objects beyond tensors and containers loads with --allow_pickle.
    hint = (" (if the file is trusted and holds pickled objects, retry with --allow_pickle)"
            if not allow_pickle and "Weights only load failed" in str(e) else "")
    raise ConvertError(f"cannot read {path}: {type(e).__name__}: {e}{hint}") from e


def _is_state_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(
      isinstance(k, str) and hasattr(v, "shape") for k, v in obj.items())


def select_state_dict(obj: Any, use_ema: bool = False) -> dict[str, np.ndarray]:
  """The weights to convert from a loaded .pth object, as name -> float32 numpy, no prefixes.

  Args:
    obj: {'model': state_dict, 'ema': ema_state, ...} or a plain state_dict. `ema_state` is the
      reference's ExponentialMovingAverage.state_dict() (`shadow_params`, a list in the order of
      the model's parameters = the state_dict's order without buffers) or a state_dict.
    use_ema: take the EMA weights.
  """
  if _is_state_dict(obj):
    if use_ema:
      raise ConvertError("--use-ema: the input is a plain state_dict without EMA weights")
    model_sd = obj
  elif isinstance(obj, Mapping) and _is_state_dict(obj.get("model")):
    model_sd = obj["model"]
  else:
    keys = list(obj.keys()) if isinstance(obj, Mapping) else type(obj).__name__
    raise ConvertError(f"input holds neither a state_dict nor {{'model': state_dict}} "
                       f"(found {keys})")
  model_sd = torch_import.strip_prefixes(model_sd)
  if not use_ema:
    return {k: torch_import.to_numpy(v) for k, v in model_sd.items()}

  ema = obj.get("ema")
  if ema is None:
    raise ConvertError("--use-ema: the input has no 'ema' entry")
  if _is_state_dict(ema):
    return {k: torch_import.to_numpy(v) for k, v in torch_import.strip_prefixes(ema).items()}
  shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
  if shadow is None:
    raise ConvertError("--use-ema: 'ema' holds neither 'shadow_params' nor a state_dict")
  names = [k for k in model_sd if k not in torch_import.IGNORED_KEYS]
  if len(names) != len(shadow):
    raise ConvertError(f"--use-ema: 'ema.shadow_params' has {len(shadow)} tensors but the model "
                       f"state_dict has {len(names)} parameters")
  out = {}
  for name, value in zip(names, shadow):
    arr = torch_import.to_numpy(value)
    if arr.shape != tuple(model_sd[name].shape):
      raise ConvertError(f"--use-ema: shadow parameter for {name} is {arr.shape}, the model's is "
                         f"{tuple(model_sd[name].shape)} (parameter order differs?)")
    out[name] = arr
  return out


def configure(cfg: ml_collections.ConfigDict, state_dict: Mapping[str, Any]
              ) -> ml_collections.ConfigDict:
  """A copy of `cfg` with the shape settings that the weights determine."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  inferred = torch_import.infer_model_config(state_dict)
  absorb = cfg.graph.type == "absorb"
  settings = {
      "model.hidden_size": inferred["hidden_size"],
      "model.cond_dim": inferred["cond_dim"],
      "model.n_blocks": inferred["n_blocks"],
      "graph.tokens": inferred["vocab_size"] - (1 if absorb else 0),
  }
  for key, value in settings.items():
    section, name = key.split(".")
    old = cfg[section][name]
    if old != value:
      log.info("%s = %s from the weights (config had %s)", key, value, old)
    cfg[section][name] = value
  if not absorb and cfg.model.scale_by_sigma:
    log.warning("graph.type=%r: setting model.scale_by_sigma=False (the reference supports it "
                "only for absorb)", cfg.graph.type)
    cfg.model.scale_by_sigma = False
  hidden, heads = cfg.model.hidden_size, cfg.model.n_heads
  if hidden % heads or (hidden // heads) % 2:
    raise ConvertError(f"hidden_size {hidden} (from the weights) does not split into "
                       f"model.n_heads={heads} heads of even size; pass --config.model.n_heads=N")
  log.info("n_heads = %d from the config (the weights do not determine it)", heads)
  return cfg


def _step_of(obj: Any) -> int:
  step = obj.get("step", 0) if isinstance(obj, Mapping) and not _is_state_dict(obj) else 0
  try:
    return int(step)
  except (TypeError, ValueError):
    return 0


def convert(input_path: str | pathlib.Path, output_dir: str | pathlib.Path,
            cfg: ml_collections.ConfigDict, use_ema: bool = False,
            allow_pickle: bool = False) -> pathlib.Path:
  """Converts `input_path` (.pth) into `output_dir`; returns the written step folder."""
  from flax import nnx  # noqa: PLC0415 -- keep `--help` fast

  from sedd_jax import config as config_lib  # noqa: PLC0415
  from sedd_jax.model.ddit import DDiT  # noqa: PLC0415
  from sedd_jax.training import checkpoint  # noqa: PLC0415

  out = pathlib.Path(output_dir).absolute()
  try:
    check_outputs({"--output's config.json": out / "config.json"}, {"--input": input_path},
                  folders={"--output": out})
  except CliError as e:
    raise ConvertError(str(e)) from None
  obj = load_torch_file(input_path, allow_pickle=allow_pickle)
  state_dict = select_state_dict(obj, use_ema=use_ema)
  cfg = configure(cfg, state_dict)
  config_lib.validate(cfg)
  absorb = cfg.graph.type == "absorb"
  model = DDiT(cfg.model, vocab_size=cfg.graph.tokens + (1 if absorb else 0), absorb=absorb,
               rngs=nnx.Rngs(0))
  torch_import.import_state_dict(model, state_dict)
  params = nnx.state(model, nnx.Param)

  step_dir = out / checkpoint.CHECKPOINTS / str(_step_of(obj))
  if step_dir.exists():
    raise ConvertError(f"{step_dir} exists already; choose another --output")
  out.mkdir(parents=True, exist_ok=True)
  checkpoint.save_inference_checkpoint(step_dir, params, cfg)
  (out / "config.json").write_text(config_lib.to_json(cfg))
  log.info("wrote the %s weights of %s (%d scalars) to %s", "EMA" if use_ema else "model",
           input_path, sum(int(v.size) for v in state_dict.values()), step_dir)
  return step_dir


def main(argv=None) -> None:
  from absl import app, flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  from sedd_jax import config as config_lib  # noqa: PLC0415

  argv = list(sys.argv if argv is None else argv)
  flags.DEFINE_string("input", None, "PyTorch checkpoint (.pth)", required=True)
  flags.DEFINE_string("output", None, "output folder", required=True)
  flags.DEFINE_bool("use-ema", False, "convert the EMA weights instead of the model's")
  flags.DEFINE_bool("allow_pickle", False, "torch.load with weights_only=False (trusted files)")
  cfg_flag = config_flags.DEFINE_config_file(
      "config", None, "config file[:variant]; default configs/uniref50.py:small")

  def run(_):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    f = flags.FLAGS
    try:
      if cfg_flag.value is None:
        cfg = config_lib.load_config(f"{DEFAULT_CONFIG}:{DEFAULT_VARIANT}")
      else:
        cfg = cfg_flag.value
      step_dir = convert(f.input, f.output, cfg, use_ema=f["use-ema"].value,
                         allow_pickle=f.allow_pickle)
    except (ConvertError, torch_import.StateDictError, config_lib.ConfigError,
            FileNotFoundError) as e:
      log.error("%s", e)
      sys.exit(1)
    log.info("done: %s", step_dir)

  try:
    config_lib.check_override_args(argv[1:])
  except (config_lib.ConfigError, FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  try:
    app.run(run, argv=argv)
  except SystemExit as e:
    # absl exits with 1 after printing the help it was asked for: that is no error.
    if e.code == 1 and config_lib.asked_for_help(argv[1:]):
      sys.exit(0)
    raise


if __name__ == "__main__":
  main()
