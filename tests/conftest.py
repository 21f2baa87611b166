"""Shared pytest set-up: CPU by default, 8 simulated devices for mesh tests, GPU marker."""

import os

# Simulated devices for the data-parallel tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("WANDB_MODE", "disabled")

import jax  # noqa: E402
import pytest  # noqa: E402


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
