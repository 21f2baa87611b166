"""Every fixture file found must load; a broken one fails here, by name."""

import numpy as np
import pytest

from sedd_jax import parity


@pytest.mark.parametrize("path", parity.fixture_paths(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fixture_loads(path):
  fx = parity.load_fixture(path)
  assert fx.outputs
  for name, arr in fx.outputs.items():
    assert np.all(np.isfinite(arr)) or arr.dtype.kind in "iu", f"{path}: out/{name} not finite"


def test_fixtures_found():
  assert parity.fixture_paths(), f"no parity fixtures in {parity.fixture_dirs()}"


def test_corrupt_fixture_is_named(tmp_path):
  bad = tmp_path / "broken.npz"
  bad.write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(parity.FixtureError, match="broken.npz"):
    parity.load_fixture(bad)


def test_env_var_folder_is_searched(tmp_path, monkeypatch):
  np.savez(tmp_path / "extra.npz", meta=np.array('{"format": 1, "kind": "noise"}'),
           t=np.zeros(2, np.float32), **{"out/total_noise": np.zeros(2, np.float32)})
  monkeypatch.setenv(parity.ENV_VAR, str(tmp_path))
  assert tmp_path / "extra.npz" in parity.fixture_paths()
  monkeypatch.setenv(parity.ENV_VAR, str(tmp_path / "missing"))
  with pytest.raises(parity.FixtureError, match="missing"):
    parity.fixture_dirs()
