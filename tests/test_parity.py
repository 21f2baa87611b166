"""Parity fixtures: every fixture file found loads (a broken one fails here, by name), the
format-1 round trip, each defect named with its file, the tolerance and the fixture folders."""

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


def test_round_trip_splits_inputs_and_outputs(tmp_path):
  t = np.array([0.1, 0.9], np.float32)
  np.savez(tmp_path / "ln.npz", meta=np.array('{"format": 1, "kind": "noise", "eps": 1e-3}'),
           t=t, **{"out/total_noise": t * 2})
  fx = parity.load_fixture(tmp_path / "ln.npz")
  assert fx.kind == "noise" and fx.name == "ln" and fx.meta["eps"] == 1e-3
  np.testing.assert_array_equal(fx.inputs["t"], t)
  np.testing.assert_array_equal(fx.outputs["total_noise"], t * 2)
  assert set(fx.inputs) == {"t"} and set(fx.outputs) == {"total_noise"}


@pytest.mark.parametrize("meta,outputs,match", [
    (None, True, "no 'meta' entry"), ("{not json", True, "'meta' is not JSON"),
    ('{"format": 2, "kind": "noise"}', True, "format 2, expected 1"),
    ('{"format": 1, "kind": "tokens"}', True, "kind 'tokens', expected one of"),
    ('{"format": 1, "kind": "loss"}', False, r"no expected outputs \(keys 'out/...'\)")])
def test_each_defect_is_named_with_the_file(tmp_path, meta, outputs, match):
  arrays = {"x": np.zeros(2)} | ({"out/y": np.zeros(2)} if outputs else {})
  if meta is not None:
    arrays["meta"] = np.array(meta)
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(parity.FixtureError, match=f"bad.npz: {match}"):
    parity.load_fixture(tmp_path / "bad.npz")


def test_tolerance_is_relative_to_the_largest_expected_value():
  assert parity.tolerance(np.array([-3.0, 2.0])) == pytest.approx(3e-4)
  assert parity.tolerance(np.zeros((0,))) == 0.0
