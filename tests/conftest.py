"""Shared pytest set-up: CPU by default, 8 simulated devices for mesh tests, GPU marker, and
the fixtures that several test files use."""

import os

# Simulated devices for the data-parallel tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("WANDB_MODE", "disabled")

import helpers  # noqa: E402  (tests/ is on sys.path)
import jax  # noqa: E402
import pytest  # noqa: E402

# The trainer turns on jax's persistent compilation cache (training.compile_cache); the tests
# neither read nor write one (hermetic, and compiling as CI always has), except where a test
# turns it on for itself (tests/test_run.py).
jax.config.update("jax_enable_compilation_cache", False)


def has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  if has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


# ---- fixtures shared by several test files (constants and builders: tests/helpers.py) ----

@pytest.fixture(scope="session")
def faa_store(tmp_path_factory):
  """The bundled FASTA (helpers.FAA) prepared with 10% valid and 10% test; read-only."""
  from sedd_jax.data import prepare

  out = tmp_path_factory.mktemp("faa_store") / "faa"
  prepare.prepare(helpers.FAA, out, valid_fraction=0.1, test_fraction=0.1)
  return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """The store of the micro training config (helpers.train_config)."""
  from sedd_jax.data import pipeline

  path = tmp_path_factory.mktemp("store") / "pyhmmer"
  pipeline.ensure_prepared(helpers.train_config(path))
  return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run folder with the checkpoint of a fresh helpers.sample_config model (random output
  weights), its training data prepared: what the sample CLI tests read."""
  from sedd_jax.data import pipeline

  tmp = tmp_path_factory.mktemp("sample_cli")
  cfg = helpers.sample_config(tmp)
  pipeline.ensure_prepared(cfg)
  return helpers.save_checkpoint(tmp / "run", cfg)


@pytest.fixture(scope="module")
def micro_state():
  """(helpers.checkpoint_config(), a fresh training state of its model): what the checkpoint
  tests save and restore."""
  from sedd_jax import diffusion
  from sedd_jax.training import state as state_lib

  cfg = helpers.checkpoint_config()
  model = state_lib.build_model(cfg, diffusion.get_graph(cfg.graph))
  _, params, _ = state_lib.split_model(model)
  return cfg, state_lib.init_state(cfg, params)
