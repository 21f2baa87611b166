"""Turns every parity fixture into pytest parameters: one per (fixture, output)."""

import pytest

from sedd_jax import parity


def cases(kind: str):
  """pytest.param(fixture_path, output_name) for every output of every fixture of `kind`.

  Unreadable fixtures are reported by tests/test_parity.py, not skipped here.
  """
  params = []
  for path in parity.fixture_paths():
    try:
      fx = parity.load_fixture(path)
    except parity.FixtureError:
      continue
    if fx.kind != kind:
      continue
    for out in sorted(fx.outputs):
      params.append(pytest.param(path, out, id=f"{path.parent.name}/{path.stem}:{out}"))
  return params
