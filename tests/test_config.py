"""Config loading, overrides and validation: errors name the key, before anything compiles."""

import subprocess
import sys

import pytest

from helpers import ROOT, UNIREF50, subprocess_env
from sedd_jax import config as config_lib



def test_variants_load_and_validate():
  for variant in ("tiny", "small", "medium", "protlig_stable"):
    cfg = config_lib.load_config(f"{UNIREF50}:{variant}")
    assert cfg.variant == variant
  assert config_lib.load_config(str(UNIREF50)).variant == "tiny"  # get_config() default


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
  (["optim.lr=-1"], "optim.lr", "must be >"),
  (["training.ema=1.0"], "training.ema", "must be <"),
  (["model.dtype=float8"], "model.dtype", "must be one of"),
  (["model.remat=all"], "model.remat", "must be one of"),
  (["optim.schedule=linear"], "optim.schedule", "must be one of"),
  (["wandb.mode=cloud"], "wandb.mode", "must be one of"),
  (["training.steps=0"], "training.steps", "positive"),
  (["sampling.predictor=leapfrog"], "sampling.predictor", "is not a predictor"),
  # first_hitting reveals masked tokens: the uniform graph has none (sampler.check_options).
  (["sampling.predictor=first_hitting", "graph.type=uniform", "model.scale_by_sigma=false"],
   "sampling.predictor", "needs the absorbing graph"),
])
def test_errors_name_the_key(overrides, key, words):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load_config(f"{UNIREF50}:tiny", overrides)
  assert e.value.key == key
  assert repr(key) in str(e.value) and words in str(e.value)


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
  """The CLI exits 2 with a one-line error naming the key, before importing the model."""
  env = subprocess_env()
  for extra, key in (("--config.model.atention=xla", "model.atention"),
                     ("--config.graph.type=foo", "graph.type")):
    p = subprocess.run([sys.executable, "-m", "sedd_jax.train", f"--config={UNIREF50}:tiny",
                        f"--workdir={tmp_path / 'run'}", extra], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"config key '{key}'" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


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
