"""Config loading and validation: a misspelt key or a bad value fails early, naming the key.

Configs are `ml_collections` files with a `get_config(variant)` function (see
`configs/uniref50.py`). A config is named as `path/to/file.py[:variant]`.

* `load_config(spec, overrides)` loads a file, applies `key=value` overrides (dotted keys,
  values parsed by the type of the existing field), then `validate`s the result.
* `check_keys(cfg, keys)` raises `ConfigError` for the first dotted key that does not exist,
  with a spelling suggestion ("did you mean ...").
* `validate(cfg, n_devices=None)` checks values (choices, ranges, divisibility) and raises
  `ConfigError` naming the key; the `sampling.*` options go through the sampler's own checks
  (`sampler.check_options`, imported when a config is validated). Nothing here compiles.

The command line (`sedd_jax.train`) uses `ml_collections.config_flags` for the same syntax
(`--config=file.py:variant --config.optim.lr=1e-4`); it calls `check_override_args` first so that
an unknown key gives a one-line error instead of a traceback.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib.util
import json
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import ml_collections

# Allowed values of the string options; shared with the modules that interpret them.
CHOICES: dict[str, tuple[str, ...]] = {
  "graph.type": ("absorb", "uniform"),
  "noise.type": ("loglinear", "geometric", "cosine"),
  "curriculum.kind": ("none", "time_bias", "sigma_scale"),
  "curriculum.ramp": ("linear", "exponential", "cosine"),
  "model.attention": ("auto", "xla", "cudnn", "chunked"),
  "model.dtype": ("bfloat16", "float32"),
  "model.remat": ("none", "mlp", "block", "block_save_dots"),
  "model.dropout_rng": ("threefry", "rbg", "hash"),
  "model.residual_dtype": ("auto", "float32", "bfloat16"),
  "model.matmul": ("default", "fp8"),
  "model.norm_impl": ("auto", "reference", "xla", "pallas"),
  "model.gelu_impl": ("reference", "saved_input"),
  "model.gate_grad": ("xla", "blocked"),
  "optim.schedule": ("constant", "cosine"),
  "wandb.mode": ("offline", "online", "disabled"),
}


# `task` (default "sedd") -> the keys that task adds (sedd_jax.training.task.TASKS has the
# implementations). Protein-ligand training modes, as sedd_jax.protein_ligand.modes.MODES + all.
TASKS = ("sedd", "protein_ligand")
PROTEIN_LIGAND_CHOICES: dict[str, tuple[str, ...]] = {
  "mode": ("protein_only", "ligand_only", "ligand_given_protein", "protein_given_ligand", "joint",
           "all"),
  "ligand.graph.type": ("absorb", "uniform"),
  "sampling.task": ("ligand_given_protein", "protein_given_ligand"),
}


class ConfigError(ValueError):
  """A config key that does not exist or a value that is not allowed; the message names it."""

  def __init__(self, key: str, message: str):
    super().__init__(f"config key {key!r}: {message}")
    self.key = key


def split_spec(spec: str) -> tuple[str, str | None]:
  """'configs/uniref50.py:tiny' -> ('configs/uniref50.py', 'tiny'); no variant -> None."""
  path, sep, variant = spec.rpartition(":")
  if not sep or not path.endswith(".py"):
    return spec, None
  return path, variant or None


def _load_module(path: str):
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_sedd_config_{p.stem}", p)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError("get_config", f"{path} defines no get_config()")
  return module


def get(cfg: ml_collections.ConfigDict, key: str) -> Any:
  """The value at dotted `key`; ConfigError naming the key (and a close match) if absent."""
  node = cfg
  parts = key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      prefix = ".".join(parts[:i])
      options = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
      close = difflib.get_close_matches(part, options, n=1)
      hint = f"; did you mean {'.'.join(parts[:i] + [close[0]])!r}?" if close else ""
      where = f"under {prefix!r}" if prefix else "at the top level"
      raise ConfigError(key, f"no such key {where}{hint}")
    node = node[part]
  return node


def check_keys(cfg: ml_collections.ConfigDict, keys: Iterable[str]) -> None:
  """Raises ConfigError for the first of the dotted `keys` missing from `cfg`."""
  for key in keys:
    get(cfg, key)


def _parse_value(key: str, text: str, current: Any) -> Any:
  """Parses override text by the type of the current value."""
  try:
    if isinstance(current, bool):
      low = text.strip().lower()
      if low in ("true", "1", "yes"):
        return True
      if low in ("false", "0", "no"):
        return False
      raise ValueError(f"not a boolean: {text!r}")
    if isinstance(current, int):
      value = ast.literal_eval(text)
      if isinstance(value, float) and value.is_integer():
        value = int(value)
      if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"not an integer: {text!r}")
      return value
    if isinstance(current, float):
      return float(text)
    if isinstance(current, (tuple, list)):
      value = ast.literal_eval(text)
      if not isinstance(value, (tuple, list)):
        value = (value,)
      return tuple(value)
    if isinstance(current, str):
      return text
    return ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise ConfigError(key, f"cannot parse {text!r} as {type(current).__name__} ({e})") from None


def apply_overrides(cfg: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any] | Sequence[str]) -> ml_collections.ConfigDict:
  """Sets dotted keys in place. `overrides` is {key: value} or ['key=value', ...] (text parsed).

  Unknown keys raise ConfigError naming them; new keys are never created.
  """
  items = []
  if isinstance(overrides, Mapping):
    items = list(overrides.items())
  else:
    for text in overrides:
      key, sep, value = text.partition("=")
      if not sep:
        raise ConfigError(key, f"override {text!r} is not of the form key=value")
      items.append((key.strip().removeprefix("--").removeprefix("config."), value))
  for key, value in items:
    current = get(cfg, key)
    if isinstance(value, str) and not isinstance(current, str):
      value = _parse_value(key, value, current)
    parent_key, _, leaf = key.rpartition(".")
    parent = get(cfg, parent_key) if parent_key else cfg
    with parent.unlocked() if hasattr(parent, "unlocked") else contextlib.nullcontext():
      parent[leaf] = value
  return cfg


def load_config(spec: str, overrides: Mapping[str, Any] | Sequence[str] = (),
                n_devices: int | None = None) -> ml_collections.ConfigDict:
  """Loads `file.py[:variant]`, applies `overrides` and validates; returns the ConfigDict."""
  path, variant = split_spec(spec)
  module = _load_module(path)
  cfg = module.get_config(variant) if variant is not None else module.get_config()
  apply_overrides(cfg, overrides)
  validate(cfg, n_devices=n_devices)
  return cfg


def override_keys_from_argv(argv: Sequence[str],
                            flag: str = "config") -> tuple[str | None, list[str]]:
  """Finds `--config=SPEC` and the dotted keys of `--config.a.b[=v]` in a command line."""
  spec, keys = None, []
  args = list(argv)
  for i, arg in enumerate(args):
    if arg.startswith(f"--{flag}="):
      spec = arg.split("=", 1)[1]
    elif arg == f"--{flag}" and i + 1 < len(args):
      spec = args[i + 1]
    elif arg.startswith(f"--{flag}."):
      keys.append(arg[len(flag) + 3:].split("=", 1)[0])
    elif arg.startswith(f"--no{flag}."):  # absl's boolean negation
      keys.append(arg[len(flag) + 5:])
  return spec, keys


# absl's help flags; absl exits 1 after printing the help, which the CLIs turn into exit 0.
HELP_FLAGS = ("-?", "-h", "-help", "--help", "--helpshort", "--helpfull", "--helpxml")


def asked_for_help(argv: Sequence[str]) -> bool:
  """Whether the command line `argv` (without the program name) asks for absl's help."""
  return any(a.split("=")[0] in HELP_FLAGS for a in argv)


def check_override_args(argv: Sequence[str], flag: str = "config") -> None:
  """Loads the `--config=FILE[:VARIANT]` of a command line before absl does, so that its errors
  are one line: FileNotFoundError for a missing file, the file's own error (its ValueError) for
  an unknown variant, ConfigError for a `--config.KEY` that names no key of the config."""
  spec, keys = override_keys_from_argv(argv, flag)
  if spec is None:
    return
  path, variant = split_spec(spec)
  module = _load_module(path)
  cfg = module.get_config(variant) if variant is not None else module.get_config()
  check_keys(cfg, keys)


def _need(cond: bool, key: str, message: str) -> None:
  if not cond:
    raise ConfigError(key, message)


def _positive_int(cfg, key, allow_zero=False):
  v = get(cfg, key)
  ok = isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if allow_zero else v > 0)
  _need(ok, key, f"must be a {'non-negative' if allow_zero else 'positive'} integer, got {v!r}")
  return v


def _number(cfg, key, lo=None, hi=None, lo_open=False, hi_open=False):
  v = get(cfg, key)
  _need(isinstance(v, (int, float)) and not isinstance(v, bool), key,
        f"must be a number, got {v!r}")
  if lo is not None:
    _need(v > lo if lo_open else v >= lo, key,
          f"must be {'>' if lo_open else '>='} {lo}, got {v!r}")
  if hi is not None:
    _need(v < hi if hi_open else v <= hi, key,
          f"must be {'<' if hi_open else '<='} {hi}, got {v!r}")
  return v


def validate(cfg: ml_collections.ConfigDict, n_devices: int | None = None) -> None:
  """Checks the values the training job reads; raises ConfigError naming the first bad key.

  Args:
    cfg: the config (every key of `configs/uniref50.py:base_config` must exist).
    n_devices: when given, the per-step micro-batch (batch_size / accum) must divide by it.
  """
  for key, choices in CHOICES.items():
    v = get(cfg, key)
    _need(v in choices, key, f"must be one of {choices}, got {v!r}")

  _positive_int(cfg, "graph.tokens")
  _number(cfg, "noise.eps", 0.0, 1.0, lo_open=True, hi_open=True)
  smin = _number(cfg, "noise.sigma_min", 0.0, lo_open=True)
  smax = _number(cfg, "noise.sigma_max", 0.0, lo_open=True)
  if cfg.noise.type != "loglinear":
    _need(smin < smax, "noise.sigma_max", f"must exceed noise.sigma_min ({smin}), got {smax}")
  _positive_int(cfg, "curriculum.preschool_time")

  hidden = _positive_int(cfg, "model.hidden_size")
  heads = _positive_int(cfg, "model.n_heads")
  _need(hidden % heads == 0, "model.hidden_size",
        f"{hidden} is not divisible by model.n_heads={heads}")
  _need((hidden // heads) % 2 == 0, "model.n_heads",
        f"head dim {hidden // heads} must be even (rotary embedding)")
  _positive_int(cfg, "model.n_blocks")
  _positive_int(cfg, "model.cond_dim")
  _positive_int(cfg, "model.length")
  _positive_int(cfg, "model.attention_chunk", allow_zero=True)
  _number(cfg, "model.dropout", 0.0, 1.0, hi_open=True)
  _need(isinstance(cfg.model.scale_by_sigma, bool), "model.scale_by_sigma", "must be a bool")
  _need(isinstance(cfg.model.scan_blocks, bool), "model.scan_blocks", "must be a bool")
  _need(not (cfg.model.scale_by_sigma and cfg.graph.type == "uniform"), "model.scale_by_sigma",
        "must be false with graph.type='uniform' (the reference scales absorbing scores only)")

  _positive_int(cfg, "data.min_length")
  _positive_int(cfg, "data.max_length")
  _need(cfg.data.min_length <= cfg.data.max_length, "data.min_length",
        f"{cfg.data.min_length} exceeds data.max_length={cfg.data.max_length}")
  _number(cfg, "data.min_standard_fraction", 0.0, 1.0)
  _number(cfg, "data.valid_fraction", 0.0, 1.0, hi_open=True)
  _number(cfg, "data.test_fraction", 0.0, 1.0, hi_open=True)

  batch = _positive_int(cfg, "training.batch_size")
  accum = _positive_int(cfg, "training.accum")
  _need(batch % accum == 0, "training.batch_size",
        f"{batch} is not divisible by training.accum={accum}")
  if n_devices is not None:
    micro = batch // accum
    _need(micro % n_devices == 0, "training.batch_size",
          f"micro-batch {micro} (= batch_size {batch} / accum {accum}) is not divisible by the "
          f"{n_devices} devices")
  _positive_int(cfg, "training.steps")
  _number(cfg, "training.ema", 0.0, 1.0, hi_open=True)
  for key in ("log_every", "eval_every", "eval_batches", "sample_every", "num_samples",
              "ckpt_every", "keep", "max_bad_steps"):
    _positive_int(cfg, f"training.{key}", allow_zero=key in ("eval_every", "sample_every",
                                                             "eval_batches", "num_samples"))
  _positive_int(cfg, "training.milestone_every", allow_zero=True)
  _need(isinstance(cfg.training.fsdp, bool), "training.fsdp", "must be a bool")
  _need(isinstance(cfg.training.compile_cache, str), "training.compile_cache",
        "must be a folder path, or '' for no persistent compilation cache")
  _number(cfg, "training.time_eps", 0.0, 0.5, lo_open=True, hi_open=True)

  _number(cfg, "optim.lr", 0.0, lo_open=True)
  _number(cfg, "optim.beta1", 0.0, 1.0, hi_open=True)
  _number(cfg, "optim.beta2", 0.0, 1.0, hi_open=True)
  _number(cfg, "optim.eps", 0.0)
  _number(cfg, "optim.weight_decay", 0.0)
  _positive_int(cfg, "optim.warmup", allow_zero=True)
  _number(cfg, "optim.clip", 0.0)

  _positive_int(cfg, "sampling.steps")
  _number(cfg, "sampling.eps", 0.0, 1.0, lo_open=True, hi_open=True)
  _check_sampler(cfg)

  task = cfg.get("task", "sedd")
  _need(task in TASKS, "task", f"must be one of {TASKS}, got {task!r}")
  if task == "protein_ligand":
    _validate_protein_ligand(cfg)


def _check_sampler(cfg: ml_collections.ConfigDict) -> None:
  """`sampling.*` (predictor, steps, eps) through the sampler's own checks
  (`sedd_jax.sampling.sampler.check_options`, whose messages start with the option's name): a
  ConfigError naming `sampling.<option>`, e.g. predictor first_hitting with a uniform graph."""
  from sedd_jax.diffusion.graph import get_graph  # here: jax only once a config is validated
  from sedd_jax.sampling import sampler

  graph = get_graph(cfg.graph)
  try:
    sampler.resolve_options(graph, cfg.sampling)
  except ValueError as e:
    where = "" if graph.absorb else f" (graph.type = {cfg.graph.type!r})"
    raise ConfigError(f"sampling.{str(e).split()[0]}", f"{e}{where}") from None


def _validate_protein_ligand(cfg: ml_collections.ConfigDict) -> None:
  """The keys configs/protein_ligand.py adds (mode, mode_weights, ligand.*, sampling.task)."""
  for key, choices in PROTEIN_LIGAND_CHOICES.items():
    v = get(cfg, key)
    _need(v in choices, key, f"must be one of {choices}, got {v!r}")
  weights = tuple(get(cfg, "mode_weights") or ())
  n_modes = len(PROTEIN_LIGAND_CHOICES["mode"]) - 1
  _need(not weights or (len(weights) == n_modes and min(weights) >= 0 and sum(weights) > 0),
        "mode_weights", f"must be () or {n_modes} non-negative numbers with a positive sum, one "
        f"per mode of {PROTEIN_LIGAND_CHOICES['mode'][:-1]}; got {weights}")
  _need(cfg.ligand.graph.type == cfg.graph.type, "ligand.graph.type",
        f"must equal graph.type ({cfg.graph.type!r}), got {cfg.ligand.graph.type!r}")
  _positive_int(cfg, "ligand.graph.tokens", allow_zero=True)  # 0 = from the prepared data
  length = _positive_int(cfg, "ligand.length")
  width = _positive_int(cfg, "data.ligand_length")
  _need(width <= length, "data.ligand_length",
        f"{width} exceeds ligand.length={length} (the model's ligand length)")
  _positive_int(cfg, "data.max_ligand_length")


def to_json(cfg: ml_collections.ConfigDict) -> str:
  """The config as JSON (tuples become lists)."""
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_dict(d: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Rebuilds a ConfigDict from `to_json`/`to_dict` output (lists back to tuples)."""

  def fix(x):
    if isinstance(x, Mapping):
      return {k: fix(v) for k, v in x.items()}
    if isinstance(x, list):
      return tuple(fix(v) for v in x)
    return x

  return ml_collections.ConfigDict(fix(dict(d)))


class _Missing:
  def __repr__(self) -> str:
    return "<absent>"


MISSING = _Missing()  # the value of a key that one of two compared configs lacks


def diff_values(old: ml_collections.ConfigDict,
                new: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old value, new value)} for the keys whose values differ between two configs;
  a key present in only one of them has `MISSING` on the other side."""

  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      key = f"{prefix}{k}"
      if isinstance(v, Mapping):
        out.update(flat(v, key + "."))
      else:
        out[key] = tuple(v) if isinstance(v, list) else v
    return out

  a, b = flat(old.to_dict()), flat(new.to_dict())
  return {k: (a.get(k, MISSING), b.get(k, MISSING)) for k in sorted(set(a) | set(b))
          if a.get(k, MISSING) != b.get(k, MISSING)}


def diff(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> list[str]:
  """Dotted keys whose values differ between two configs (added/removed keys included)."""
  return list(diff_values(old, new))

