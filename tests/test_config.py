"""Config loading, overrides and validation: errors name the key, before anything compiles."""

import copy
import math
import subprocess
import sys

import pytest

from helpers import ROOT, UNIREF50, config_module, subprocess_env
from sedd_jax import config as config_lib

PROTEIN_LIGAND = ROOT / "configs" / "protein_ligand.py"
# Every variant of both config files, unvalidated: {"file.py:variant": its to_dict()}.
CONFIG_DICTS = {f"{name}.py:{variant}": config_module(name).get_config(variant).to_dict()
                for name in ("uniref50", "protein_ligand")
                for variant in config_module(name).VARIANTS}
# Keys that no shipped config sets (the code has a default for each), with an allowed value.
ABSENT_KEYS = {"data.on_error": "skip", "data.protein_column": "sequence",
               "data.smiles_column": "smiles", "curriculum.sigma_scale_mode": "corruption_only"}


def _leaves(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _set(d: dict, key: str, value) -> dict:
  node = d
  *parents, leaf = key.split(".")
  for part in parents:
    node = node.setdefault(part, {})
  node[leaf] = value
  return d


def _config_with(key: str, value):
  """The first variant that has `key` (else protein_ligand.py:tiny with ABSENT_KEYS), with
  `key` set to `value` (no ml_collections type check: as a hand-written config file could)."""
  spec = next((s for s, d in CONFIG_DICTS.items() if key in _leaves(d)), None)
  d = copy.deepcopy(CONFIG_DICTS[spec or "protein_ligand.py:tiny"])
  if spec is None:
    for k, v in ABSENT_KEYS.items():
      _set(d, k, v)
  return config_lib.from_dict(_set(d, key, value))


ALL_KEYS = sorted({k for d in CONFIG_DICTS.values() for k in _leaves(d)} | set(ABSENT_KEYS))


def _bad_values(key: str) -> list:
  """Values the check of `key` must refuse, generated from its kind and bounds."""
  if key in config_lib.FREE_FORM:
    return [3, None, ("a",)]
  c = config_lib.checks()[key]
  below = [] if c.lo is None else [c.lo if c.lo_open else c.lo - 1]
  above = [] if c.hi is None else [c.hi if c.hi_open else c.hi + 1]
  return {
      "int": [1.5, True, "3", None, *below, *above],
      "number": [math.nan, math.inf, -math.inf, "0.1", True, None, *below, *above],
      "bool": [1, "true", None],
      "choice": ["nope", 3, None],
      "ints": [3, (1.5,), (32, 16), (16, 16), (True,), *[(b,) for b in below]],
      "numbers": [3, (math.nan,) * 5, (math.inf,) * 5, ("1",) * 5, *[(b,) * 5 for b in below]],
  }[c.kind]


def test_every_key_of_every_config_has_a_check():
  """Issue 30 item 8: each leaf key of every variant of both configs (and each key a config may
  add) is checked by value or listed as free-form, and the table has no other key."""
  table = config_lib.checks()
  assert not set(table) & config_lib.FREE_FORM
  assert set(ALL_KEYS) == set(table) | config_lib.FREE_FORM
  assert all(_bad_values(key) for key in ALL_KEYS)


def test_default_configs_validate():
  for spec, d in CONFIG_DICTS.items():
    config_lib.validate(config_lib.from_dict(d))
    assert config_lib.load_config(str(ROOT / "configs" / spec)).variant == d["variant"]
  config_lib.validate(_config_with("data.on_error", "raise"))  # with every ABSENT_KEYS key


@pytest.mark.parametrize("key", ALL_KEYS)
def test_bad_values_are_refused_naming_the_key(key):
  """Every key: each generated bad value -> one line naming the key, what is allowed (the
  choices, the bounds; numbers must be finite) and the value."""
  c = None if key in config_lib.FREE_FORM else config_lib.checks()[key]
  for value in _bad_values(key):
    with pytest.raises(config_lib.ConfigError) as e:
      config_lib.validate(_config_with(key, value))
    msg = str(e.value)
    assert e.value.key == key, msg
    assert msg.startswith(f"config key {key!r}: must be ") and msg.endswith(f", got {value!r}")
    assert "\n" not in msg
    if c is None:
      assert "must be a string" in msg
    elif c.kind == "choice":
      assert f"one of {c.choices}" in msg
    else:
      assert all(str(b) in msg for b in (c.lo, c.hi) if b is not None), msg
      assert c.kind not in ("number", "numbers") or "finite" in msg


@pytest.mark.parametrize("spec, overrides, message", [
  ("uniref50.py:tiny", ["data.pad_to=ful"],
   "config key 'data.pad_to': must be one of ('full', 'bucket', 'pack'), got 'ful'"),
  ("uniref50.py:tiny", ["seed=-1"],
   "config key 'seed': must be an integer in [0, 4294967295], got -1"),
  ("uniref50.py:tiny", ["seed=4294967296"],
   "config key 'seed': must be an integer in [0, 4294967295], got 4294967296"),
  ("uniref50.py:tiny", ["optim.lr=inf"], "config key 'optim.lr': must be a finite number > 0, "
   "got inf"),
  ("uniref50.py:tiny", ["optim.clip=nan"], "config key 'optim.clip': must be a finite number "
   ">= 0, got nan"),
  ("uniref50.py:tiny", ["noise.sigma_max=inf", "noise.type=geometric"],
   "config key 'noise.sigma_max': must be a finite number > 0, got inf"),
  ("uniref50.py:tiny", ["data.pack_bins=0"],
   "config key 'data.pack_bins': must be an integer >= 1, got 0"),
  ("uniref50.py:tiny", ["data.bucket_boundaries=(64, 32)"],
   "config key 'data.bucket_boundaries': must be a strictly increasing tuple of integers >= 1, "
   "got (64, 32)"),
  ("uniref50.py:tiny", ["data.bucket_boundaries=(0, 32)"],
   "config key 'data.bucket_boundaries': must be a strictly increasing tuple of integers >= 1, "
   "got (0, 32)"),
  ("uniref50.py:tiny", ["data.bucket_boundaries=(64, 256)"],
   "config key 'data.bucket_boundaries': must not exceed model.length = 128, got (64, 256)"),
  ("uniref50.py:tiny", ["data.valid_fraction=0.5", "data.test_fraction=0.5"],
   "config key 'data.test_fraction': data.valid_fraction + data.test_fraction must be < 1 (the "
   "rest is the training split), got 0.5 + 0.5"),
  ("protein_ligand.py:tiny", ["data.pad_to=pack"],
   "config key 'data.pad_to': must be one of ('full', 'bucket') with task 'protein_ligand' (one "
   "ligand per protein: rows are not packed), got 'pack'"),
  ("protein_ligand.py:tiny", {"mode_weights": (1, 1, math.inf, 1, 1)},
   "config key 'mode_weights': must be a tuple of finite numbers >= 0, got (1, 1, inf, 1, 1)"),
])
def test_issue_30_values_fail_at_once(spec, overrides, message):
  """Values that validate() let through and the pipeline or the optimizer refused later."""
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load_config(str(ROOT / "configs" / spec), overrides)
  assert str(e.value) == message


def test_unknown_missing_and_foreign_keys_fail():
  """A key no module reads (a typo in a config file), a missing key, and a protein-ligand key in
  a protein-only config each fail naming the key."""
  tiny = CONFIG_DICTS["uniref50.py:tiny"]
  for key, value, words in (("data.pad_too", "bucket", "did you mean 'data.pad_to'?"),
                            ("mode", "joint", "applies to task 'protein_ligand' only"),
                            ("ligand.length", 64, "applies to task 'protein_ligand' only")):
    with pytest.raises(config_lib.ConfigError) as e:
      config_lib.validate(config_lib.from_dict(_set(copy.deepcopy(tiny), key, value)))
    assert e.value.key == key and words in str(e.value), str(e.value)
  missing = copy.deepcopy(tiny)
  del missing["data"]["pad_to"]
  with pytest.raises(config_lib.ConfigError, match=r"'data.pad_to': no such key under 'data'"):
    config_lib.validate(config_lib.from_dict(missing))


def test_choices_reuse_the_modules_constants():
  from sedd_jax import sample_protein_ligand
  from sedd_jax.data import fasta, pipeline
  from sedd_jax.diffusion import curriculum
  from sedd_jax.sampling import sampler

  table = config_lib.checks()
  assert table["data.pad_to"].choices is pipeline.PAD_TO
  assert table["data.on_error"].choices is fasta.ON_ERROR
  assert table["curriculum.sigma_scale_mode"].choices is curriculum.SIGMA_SCALE_MODES
  assert table["sampling.predictor"].choices is sampler.PREDICTOR_NAMES
  assert table["sampling.task"].choices is sample_protein_ligand.PL_TASKS
  for key, choices in {**config_lib.CHOICES, **config_lib.PROTEIN_LIGAND_CHOICES}.items():
    assert table[key].choices is choices, key



def test_variants_load_and_validate():
  for variant in ("tiny", "small", "medium", "protlig_stable"):
    cfg = config_lib.load_config(f"{UNIREF50}:{variant}")
    assert cfg.variant == variant
  assert config_lib.load_config(str(UNIREF50)).variant == "tiny"  # get_config() default
  assert config_lib.load_config(str(PROTEIN_LIGAND)).variant == "tiny"


def test_overrides_are_typed():
  cfg = config_lib.load_config(f"{UNIREF50}:tiny", ["optim.lr=1e-4", "training.batch_size=16",
                                                  "training.fsdp=true", "model.attention=xla",
                                                  "data.bucket_boundaries=(16, 32)"])
  assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
  assert cfg.training.batch_size == 16 and isinstance(cfg.training.batch_size, int)
  assert cfg.training.fsdp is True
  assert cfg.model.attention == "xla"
  assert cfg.data.bucket_boundaries == (16, 32)
  cfg = config_lib.load_config(f"{UNIREF50}:tiny", {"model.dropout": 0.2})
  assert cfg.model.dropout == 0.2


@pytest.mark.parametrize("overrides, key, words", [
  (["model.atention=xla"], "model.atention", "did you mean 'model.attention'"),
  (["trainin.steps=3"], "trainin.steps", "did you mean 'training"),
  (["model.attention=flash"], "model.attention", "must be one of"),
  (["graph.type=foo"], "graph.type", "must be one of"),
  (["noise.type=linear"], "noise.type", "must be one of"),
  (["graph.type=uniform"], "model.scale_by_sigma", "uniform"),
  (["model.hidden_size=100", "model.n_heads=3"], "model.hidden_size", "not divisible"),
  (["training.batch_size=30", "training.accum=4"], "training.batch_size", "accum"),
  (["training.batch_size=abc"], "training.batch_size", "cannot parse"),
  (["optim.lr=-1"], "optim.lr", "must be a finite number > 0, got -1.0"),
  (["training.ema=1.0"], "training.ema", "must be a finite number in [0, 1), got 1.0"),
  (["model.dtype=float8"], "model.dtype", "must be one of"),
  (["model.remat=all"], "model.remat", "must be one of"),
  (["optim.schedule=linear"], "optim.schedule", "must be one of"),
  (["wandb.mode=cloud"], "wandb.mode", "must be one of"),
  (["training.steps=0"], "training.steps", "must be an integer >= 1, got 0"),
  (["sampling.predictor=leapfrog"], "sampling.predictor",
   "must be one of ('analytic', 'euler', 'first_hitting'), got 'leapfrog'"),
  # first_hitting reveals masked tokens: the uniform graph has none (sampler.check_options).
  (["sampling.predictor=first_hitting", "graph.type=uniform", "model.scale_by_sigma=false"],
   "sampling.predictor", "needs the absorbing graph"),
])
def test_errors_name_the_key(overrides, key, words):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load_config(f"{UNIREF50}:tiny", overrides)
  assert e.value.key == key
  assert repr(key) in str(e.value) and words in str(e.value)


def test_protein_ligand_sampling_task_joint_is_accepted():
  """`sample` generates sampling.task = joint (protein + ligand from noise), as the config's
  comment says; validation refused it."""
  cfg = config_lib.load_config(str(PROTEIN_LIGAND), ["sampling.task=joint"])
  assert cfg.sampling.task == "joint"


def test_sampling_predictor_first_hitting_is_accepted():
  """Issue 19: the in-training samples (sedd_task, protein_ligand.task) may use it."""
  for spec in (f"{UNIREF50}:tiny", str(ROOT / "configs" / "protein_ligand.py:tiny")):
    cfg = config_lib.load_config(spec, ["sampling.predictor=first_hitting"])
    assert cfg.sampling.predictor == "first_hitting"
  with pytest.raises(config_lib.ConfigError, match="graph.type = 'uniform'"):
    config_lib.load_config(str(ROOT / "configs" / "protein_ligand.py:tiny"), [
        "sampling.predictor=first_hitting", "graph.type=uniform", "ligand.graph.type=uniform",
        "model.scale_by_sigma=false"])


def test_batch_must_divide_by_devices():
  cfg = config_lib.load_config(f"{UNIREF50}:tiny", {"training.batch_size": 12})
  config_lib.validate(cfg, n_devices=4)
  with pytest.raises(config_lib.ConfigError, match="training.batch_size.*8 devices"):
    config_lib.validate(cfg, n_devices=8)
  cfg.training.accum = 3
  with pytest.raises(config_lib.ConfigError, match="micro-batch 4"):
    config_lib.validate(cfg, n_devices=8)


def test_unknown_variant_and_file():
  with pytest.raises(ValueError, match="huge"):
    config_lib.load_config(f"{UNIREF50}:huge")
  with pytest.raises(FileNotFoundError):
    config_lib.load_config("configs/nope.py")


def test_json_roundtrip_and_diff():
  cfg = config_lib.load_config(f"{UNIREF50}:tiny")
  back = config_lib.from_dict(__import__("json").loads(config_lib.to_json(cfg)))
  assert config_lib.diff(cfg, back) == []
  back.optim.lr = 1.0
  assert config_lib.diff(cfg, back) == ["optim.lr"]


def test_cli_errors_name_the_key(tmp_path):
  """The CLI exits 2 with a one-line error naming the key, before importing the model and
  before anything is written (no workdir, no prepared store)."""
  env = subprocess_env()
  for extra, key in (("--config.model.atention=xla", "model.atention"),
                     ("--config.graph.type=foo", "graph.type"),
                     ("--config.data.pad_to=ful", "data.pad_to")):
    p = subprocess.run([sys.executable, "-m", "sedd_jax.train", f"--config={UNIREF50}:tiny",
                        f"--workdir={tmp_path / 'run'}",
                        f"--config.data.prepared={tmp_path / 'store'}", extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: config key '{key}'"), p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "store").exists()


def test_cli_config_file_errors_are_one_line_and_help_exits_0(tmp_path):
  """A missing config file and an unknown variant: exit 2 with one line saying so (no
  traceback, no workdir); --help prints the usage and exits 0."""
  env = subprocess_env()
  run = lambda *args: subprocess.run([sys.executable, "-m", "sedd_jax.train", *args], cwd=ROOT,
                                     env=env, capture_output=True, text=True, timeout=120)
  for spec, line in ((str(ROOT / "configs/nope.py"),
                      f"error: config file '{ROOT / 'configs/nope.py'}' does not exist"),
                     (f"{UNIREF50}:huge", "error: unknown variant 'huge' of configs/uniref50.py; "
                      "choose one of ('tiny', 'small', 'medium', 'protlig_stable')")):
    p = run(f"--config={spec}", f"--workdir={tmp_path / 'run'}")
    assert (p.returncode, p.stderr.splitlines()) == (2, [line]), p.stderr[-2000:]
  assert not (tmp_path / "run").exists()
  for flag in ("--help", "--helpfull"):
    p = run(flag)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("Training CLI") and "--workdir" in p.stdout
