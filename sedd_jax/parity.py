"""Reading the PyTorch reference's parity fixtures (`shared/parity/*.npz`, format 1).

A fixture holds a JSON `meta`, inputs, and expected outputs under keys starting with `out/`.
Fixtures are found in the `shared/parity` folder beside the checkout and in every folder named
in the environment variable `SEDD_PARITY_FIXTURES` (`os.pathsep`-separated).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import zipfile

import numpy as np

ENV_VAR = "SEDD_PARITY_FIXTURES"
KINDS = ("noise", "graph", "loss", "sampling", "model")
DEFAULT_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "parity"


class FixtureError(ValueError):
  """A fixture file that cannot be read or does not follow format 1."""


@dataclasses.dataclass(frozen=True)
class Fixture:
  """One parity fixture: `meta` (dict), `inputs` and `outputs` (name -> numpy array)."""

  path: pathlib.Path
  meta: dict
  inputs: dict[str, np.ndarray]
  outputs: dict[str, np.ndarray]

  @property
  def kind(self) -> str:
    return self.meta["kind"]

  @property
  def name(self) -> str:
    return self.path.stem


def fixture_dirs() -> list[pathlib.Path]:
  """The default folder (if present) and those named in $SEDD_PARITY_FIXTURES."""
  dirs = [DEFAULT_DIR] if DEFAULT_DIR.is_dir() else []
  for part in os.environ.get(ENV_VAR, "").split(os.pathsep):
    if part:
      path = pathlib.Path(part)
      if not path.is_dir():
        raise FixtureError(f"{ENV_VAR} names {part!r}, which is not a folder")
      dirs.append(path)
  return dirs


def fixture_paths() -> list[pathlib.Path]:
  """Every `*.npz` in `fixture_dirs()`, sorted by folder then name."""
  return [p for d in fixture_dirs() for p in sorted(d.glob("*.npz"))]


def load_fixture(path: str | os.PathLike) -> Fixture:
  """Loads and validates one fixture; raises FixtureError naming the file on any defect."""
  path = pathlib.Path(path)
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise FixtureError(f"{path}: unreadable parity fixture ({e})") from e
  if "meta" not in arrays:
    raise FixtureError(f"{path}: no 'meta' entry")
  try:
    meta = json.loads(str(arrays.pop("meta")))
  except json.JSONDecodeError as e:
    raise FixtureError(f"{path}: 'meta' is not JSON ({e})") from e
  if meta.get("format") != 1:
    raise FixtureError(f"{path}: format {meta.get('format')!r}, expected 1")
  if meta.get("kind") not in KINDS:
    raise FixtureError(f"{path}: kind {meta.get('kind')!r}, expected one of {KINDS}")
  outputs = {k[len("out/"):]: v for k, v in arrays.items() if k.startswith("out/")}
  if not outputs:
    raise FixtureError(f"{path}: no expected outputs (keys 'out/...')")
  inputs = {k: v for k, v in arrays.items() if not k.startswith("out/")}
  return Fixture(path=path, meta=meta, inputs=inputs, outputs=outputs)


def tolerance(expected: np.ndarray) -> float:
  """The README's bound: max|got - expected| <= 1e-4 * max|expected|."""
  return 1e-4 * float(np.max(np.abs(expected))) if expected.size else 0.0
