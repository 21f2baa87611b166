"""Config loading and validation: a misspelt key or a bad value fails early, naming the key.

Configs are `ml_collections` files with a `get_config(variant)` function (see
`configs/uniref50.py`). A config is named as `path/to/file.py[:variant]`.

* `load_config(spec, overrides)` loads a file, applies `key=value` overrides (dotted keys,
  values parsed by the type of the existing field), then `validate`s the result.
* `check_keys(cfg, keys)` raises `ConfigError` for the first dotted key that does not exist,
  with a spelling suggestion ("did you mean ...").
* `validate(cfg, n_devices=None)` checks every key and raises `ConfigError` naming the first
  bad one: each value against its `Check` in `checks()` (type, range, choices; numbers must be
  finite) or, for the `FREE_FORM` keys (paths, names), its type; a key in neither fails (with
  a close match), as does a missing one (except `OPTIONAL_KEYS`) or a `PROTEIN_LIGAND_KEYS`
  key in a config of another task; then the rules between keys, and the `sampling.*` options
  through the sampler's own checks (`sampler.check_options`, imported when a config is
  validated). Nothing here compiles or writes.
* `checks()` -> {dotted key: `Check`}: the table `validate` uses (`Check.allowed()` says
  what a key allows, `Check.accepts(value)` tests a value).

The command line (`sedd_jax.train`) uses `ml_collections.config_flags` for the same syntax
(`--config=file.py:variant --config.optim.lr=1e-4`); it calls `check_override_args` first so that
an unknown key gives a one-line error instead of a traceback.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import importlib.util
import json
import math
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
  "data.format": ("auto", "fasta", "csv", "peers"),  # sedd_jax.data.prepare's --format
}


# `task` (default "sedd") -> the keys that task adds (sedd_jax.training.task.TASKS has the
# implementations). Protein-ligand training modes, as sedd_jax.protein_ligand.modes.MODES + all.
TASKS = ("sedd", "protein_ligand")
PROTEIN_LIGAND_CHOICES: dict[str, tuple[str, ...]] = {
  "mode": ("protein_only", "ligand_only", "ligand_given_protein", "protein_given_ligand", "joint",
           "all"),
  "ligand.graph.type": ("absorb", "uniform"),
  # what the protein-ligand samplers draw (`sample --task`): one track given the other, or both
  "sampling.task": ("ligand_given_protein", "protein_given_ligand", "joint"),
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


def _leaves(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{dotted key: value} of the leaves of a nested mapping (lists as tuples)."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_leaves(v, key + "."))
    else:
      out[key] = tuple(v) if isinstance(v, list) else v
  return out


@dataclasses.dataclass(frozen=True)
class Check:
  """The allowed values of one config key (an entry of `checks()`).

  `kind`: "int" (an int, not a bool), "number" (an int or float, finite: NaN and inf are
  refused), "bool", "choice" (one of `choices`), "ints" (a strictly increasing tuple of ints,
  () included) or "numbers" (a tuple of finite numbers). `lo` / `hi` bound an int or a number,
  or each element of a tuple: inclusive, or exclusive with `lo_open` / `hi_open`.
  """

  kind: str
  lo: int | float | None = None
  hi: int | float | None = None
  lo_open: bool = False
  hi_open: bool = False
  choices: tuple[str, ...] = ()

  def allowed(self) -> str:
    """The allowed values in words, e.g. "a finite number in (0, 1)", "one of ('a', 'b')"."""
    lo, hi = self.lo is not None, self.hi is not None
    if lo and hi:
      bounds = (f" in {'(' if self.lo_open else '['}{self.lo}, {self.hi}"
                f"{')' if self.hi_open else ']'}")
    elif lo:
      bounds = f" {'>' if self.lo_open else '>='} {self.lo}"
    else:
      bounds = f" {'<' if self.hi_open else '<='} {self.hi}" if hi else ""
    return {"int": f"an integer{bounds}", "number": f"a finite number{bounds}",
            "bool": "true or false", "choice": f"one of {self.choices}",
            "ints": f"a strictly increasing tuple of integers{bounds}",
            "numbers": f"a tuple of finite numbers{bounds}"}[self.kind]

  def _scalar(self, v: Any, integer: bool) -> bool:
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
      return False
    return ((isinstance(v, int) or math.isfinite(v))
            and (self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
            and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

  def accepts(self, value: Any) -> bool:
    """Whether `value` is allowed."""
    if self.kind == "bool":
      return isinstance(value, bool)
    if self.kind == "choice":
      return isinstance(value, str) and value in self.choices
    if self.kind in ("int", "number"):
      return self._scalar(value, integer=self.kind == "int")
    if not isinstance(value, (tuple, list)):
      return False
    integer = self.kind == "ints"
    return (all(self._scalar(v, integer) for v in value)
            and (not integer or all(a < b for a, b in zip(value, value[1:]))))


# Keys whose value is any string, unchecked beyond its type: paths (data.fasta, data.prepared
# and training.compile_cache are resolved or created when used; data.ligand_corpus is read
# when the data pipeline starts), the CSV column names prepare looks for, and labels.
FREE_FORM = frozenset({
    "variant", "data.fasta", "data.prepared", "data.ligand_corpus", "data.protein_column",
    "data.smiles_column", "training.compile_cache", "wandb.project", "wandb.name"})
# Keys a config may leave out (their readers have a default): `task` ("sedd"), the prepare
# options data.format ("auto"), data.on_error ("raise") and the CSV column names (detected),
# and curriculum.sigma_scale_mode ("consistent").
OPTIONAL_KEYS = frozenset({"task", "data.format", "data.on_error", "data.protein_column",
                           "data.smiles_column", "curriculum.sigma_scale_mode"})
# Keys of the protein_ligand task (configs/protein_ligand.py): required by it, refused elsewhere.
PROTEIN_LIGAND_KEYS = frozenset({
    "mode", "mode_weights", "model.cross_attention", "ligand.length", "ligand.graph.type",
    "ligand.graph.tokens", "data.max_ligand_length", "data.ligand_length", "data.ligand_corpus",
    "data.ligand_corpus_fraction", "sampling.task"})


@functools.cache
def checks() -> dict[str, Check]:
  """{dotted key: Check} for every key but the FREE_FORM ones (treat as read-only). The
  choices defined by the modules that read a key are theirs (imported here, so jax is
  imported on first use, as validation does)."""
  from sedd_jax.data import fasta
  from sedd_jax.data import pipeline
  from sedd_jax.diffusion import curriculum
  from sedd_jax.sampling import sampler

  def number(lo=None, hi=None, lo_open=False, hi_open=False) -> Check:
    return Check("number", lo, hi, lo_open, hi_open)

  positive, count, flag = Check("int", 1), Check("int", 0), Check("bool")
  fraction, below_one = number(0, 1), number(0, 1, hi_open=True)
  open_unit = number(0, 1, lo_open=True, hi_open=True)
  choice = {key: Check("choice", choices=c)
            for key, c in {**CHOICES, **PROTEIN_LIGAND_CHOICES, "task": TASKS,
                           "data.pad_to": pipeline.PAD_TO, "data.on_error": fasta.ON_ERROR,
                           "curriculum.sigma_scale_mode": curriculum.SIGMA_SCALE_MODES,
                           "sampling.predictor": sampler.PREDICTOR_NAMES}.items()}
  return {
      **choice,
      "seed": Check("int", 0, 2**32 - 1),  # grain's shuffle seeds are 32-bit
      "graph.tokens": positive,
      "noise.eps": open_unit,
      "noise.sigma_min": number(0, lo_open=True),
      "noise.sigma_max": number(0, lo_open=True),
      "curriculum.preschool_time": positive,
      **{f"model.{k}": positive for k in ("hidden_size", "n_heads", "n_blocks", "cond_dim",
                                          "length")},
      "model.attention_chunk": count,  # 0 = chosen from the length
      "model.dropout": below_one,
      "model.scale_by_sigma": flag,
      "model.scan_blocks": flag,
      "model.cross_attention": flag,
      "data.min_length": positive,
      "data.max_length": positive,
      "data.min_standard_fraction": fraction,
      "data.valid_fraction": below_one,
      "data.test_fraction": below_one,
      "data.bucket_boundaries": Check("ints", 1),  # () = chosen from the model length
      "data.pack_bins": positive,
      "data.max_ligand_length": positive,
      "data.ligand_length": positive,
      "data.ligand_corpus_fraction": fraction,
      **{f"training.{k}": positive for k in ("batch_size", "accum", "steps", "log_every",
                                             "ckpt_every", "keep", "max_bad_steps")},
      # 0 = never / none
      **{f"training.{k}": count for k in ("eval_every", "eval_batches", "sample_every",
                                          "num_samples", "milestone_every")},
      "training.ema": below_one,
      "training.fsdp": flag,
      "training.time_eps": number(0, 0.5, lo_open=True, hi_open=True),
      "optim.lr": number(0, lo_open=True),
      "optim.beta1": below_one,
      "optim.beta2": below_one,
      "optim.eps": number(0),
      "optim.weight_decay": number(0),
      "optim.warmup": count,
      "optim.clip": number(0),  # 0 = no clipping
      "sampling.steps": positive,
      "sampling.eps": open_unit,
      "mode_weights": Check("numbers", 0),  # () = uniform
      "ligand.length": positive,
      "ligand.graph.tokens": count,  # 0 = from the prepared data
  }


def validate(cfg: ml_collections.ConfigDict, n_devices: int | None = None) -> None:
  """Checks every key of `cfg`; raises ConfigError naming the first bad one.

  Each leaf key must be one of `checks()` (its value checked) or FREE_FORM (a string); a key
  that is neither (a misspelt key in a config file) fails with a close match. Every key but
  OPTIONAL_KEYS must exist; PROTEIN_LIGAND_KEYS exactly when `task` is protein_ligand. Then the
  rules between keys (divisibility, orders, the sampler's options).

  Args:
    cfg: the config (every key of `configs/uniref50.py:base_config` must exist).
    n_devices: when given, the per-step micro-batch (batch_size / accum) must divide by it.
  """
  table = checks()
  task = cfg.get("task", "sedd")
  _check_value(table["task"], "task", task)
  foreign = frozenset() if task == "protein_ligand" else PROTEIN_LIGAND_KEYS
  for key in (*table, *sorted(FREE_FORM)):
    if key not in OPTIONAL_KEYS and key not in foreign:
      get(cfg, key)
  for key, value in _leaves(cfg.to_dict()).items():
    if key in foreign:
      raise ConfigError(key, f"applies to task 'protein_ligand' only (this config's task is "
                             f"{task!r})")
    if key in FREE_FORM:
      _need(isinstance(value, str), key, f"must be a string, got {value!r}")
    elif key in table:
      _check_value(table[key], key, value)
    else:
      close = difflib.get_close_matches(key, [*table, *FREE_FORM], n=1)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      raise ConfigError(key, f"is not a key that sedd_jax reads{hint}")
  _check_relations(cfg, task, n_devices)


def _check_value(check: Check, key: str, value: Any) -> None:
  _need(check.accepts(value), key, f"must be {check.allowed()}, got {value!r}")


def _check_relations(cfg: ml_collections.ConfigDict, task: str, n_devices: int | None) -> None:
  """The rules between keys whose values `validate` has checked one by one."""
  if cfg.noise.type != "loglinear":
    smin, smax = cfg.noise.sigma_min, cfg.noise.sigma_max
    _need(smin < smax, "noise.sigma_max", f"must exceed noise.sigma_min ({smin}), got {smax}")
  hidden, heads = cfg.model.hidden_size, cfg.model.n_heads
  _need(hidden % heads == 0, "model.hidden_size",
        f"{hidden} is not divisible by model.n_heads={heads}")
  _need((hidden // heads) % 2 == 0, "model.n_heads",
        f"head dim {hidden // heads} must be even (rotary embedding)")
  _need(not (cfg.model.scale_by_sigma and cfg.graph.type == "uniform"), "model.scale_by_sigma",
        "must be false with graph.type='uniform' (the reference scales absorbing scores only)")

  d = cfg.data
  _need(d.min_length <= d.max_length, "data.min_length",
        f"{d.min_length} exceeds data.max_length={d.max_length}")
  _need(d.valid_fraction + d.test_fraction < 1, "data.test_fraction",
        f"data.valid_fraction + data.test_fraction must be < 1 (the rest is the training split), "
        f"got {d.valid_fraction} + {d.test_fraction}")
  bounds = tuple(d.bucket_boundaries)
  _need(not bounds or bounds[-1] <= cfg.model.length, "data.bucket_boundaries",
        f"must not exceed model.length = {cfg.model.length}, got {bounds}")

  batch, accum = cfg.training.batch_size, cfg.training.accum
  _need(batch % accum == 0, "training.batch_size",
        f"{batch} is not divisible by training.accum={accum}")
  if n_devices is not None:
    micro = batch // accum
    _need(micro % n_devices == 0, "training.batch_size",
          f"micro-batch {micro} (= batch_size {batch} / accum {accum}) is not divisible by the "
          f"{n_devices} devices")
  _check_sampler(cfg)
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
  """The rules between the keys configs/protein_ligand.py adds (mode_weights, ligand.*) and the
  others."""
  unpacked = tuple(p for p in checks()["data.pad_to"].choices if p != "pack")
  _need(cfg.data.pad_to in unpacked, "data.pad_to",
        f"must be one of {unpacked} with task 'protein_ligand' (one ligand per protein: rows "
        f"are not packed), got {cfg.data.pad_to!r}")
  weights = tuple(cfg.mode_weights)
  n_modes = len(PROTEIN_LIGAND_CHOICES["mode"]) - 1
  _need(not weights or (len(weights) == n_modes and sum(weights) > 0),
        "mode_weights", f"must be () or {n_modes} non-negative numbers with a positive sum, one "
        f"per mode of {PROTEIN_LIGAND_CHOICES['mode'][:-1]}; got {weights}")
  _need(cfg.ligand.graph.type == cfg.graph.type, "ligand.graph.type",
        f"must equal graph.type ({cfg.graph.type!r}), got {cfg.ligand.graph.type!r}")
  length, width = cfg.ligand.length, cfg.data.ligand_length
  _need(width <= length, "data.ligand_length",
        f"{width} exceeds ligand.length={length} (the model's ligand length)")


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

  a, b = _leaves(old.to_dict()), _leaves(new.to_dict())
  return {k: (a.get(k, MISSING), b.get(k, MISSING)) for k in sorted(set(a) | set(b))
          if a.get(k, MISSING) != b.get(k, MISSING)}


def diff(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> list[str]:
  """Dotted keys whose values differ between two configs (added/removed keys included)."""
  return list(diff_values(old, new))

