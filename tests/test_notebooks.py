"""Every notebook in notebooks/ runs top to bottom (SEDD_NOTEBOOK_FAST=1), is stored without
outputs, and matches its jupytext-paired percent-format .py file."""

import json

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")

from helpers import FAST_XLA_FLAG, ROOT  # noqa: E402
from sedd_jax import parity  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _has_model_fixture() -> bool:
  for p in parity.fixture_paths():
    try:
      if parity.load_fixture(p).kind == "model":
        return True
    except parity.FixtureError:
      continue
  return False


def test_notebooks_exist():
  names = {p.stem for p in NOTEBOOKS}
  assert {"01_quickstart", "02_parity", "03_conditional_generation",
          "04_attention_backends"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs_and_paired(path):
  text = path.read_text()
  assert "output_type" not in text, f"{path.name}: strip the outputs before committing"
  nb = json.loads(text)
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      assert cell.get("execution_count") is None, f"{path.name}: execution counts left in"
  py = path.with_suffix(".py")
  assert py.is_file(), f"{path.name} has no paired {py.name}"
  cells_ipynb = [(c.cell_type, c.source.strip()) for c in nbformat.reads(text, as_version=4).cells]
  cells_py = [(c.cell_type, c.source.strip()) for c in jupytext.read(py).cells]
  assert cells_ipynb == cells_py, (
    f"{path.name} and {py.name} differ: run `jupytext --sync notebooks/{py.name}`")


@pytest.fixture(scope="module")
def notebook_workdir(tmp_path_factory):
  """Shared by the notebooks, so 03 reuses the tiny run that 01 trained."""
  return tmp_path_factory.mktemp("notebook_runs")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, notebook_workdir, monkeypatch):
  if path.stem == "02_parity" and not _has_model_fixture():
    pytest.skip("no parity model fixture (shared/parity or $SEDD_PARITY_FIXTURES)")
  monkeypatch.setenv("SEDD_NOTEBOOK_FAST", "1")
  monkeypatch.setenv("SEDD_NOTEBOOK_WORKDIR", str(notebook_workdir))
  monkeypatch.setenv("WANDB_MODE", "disabled")
  # One CPU device in the kernel, as on a laptop (conftest simulates 8 for the mesh tests);
  # no XLA optimisation passes: 2-3x faster compiles of these small programs.
  monkeypatch.setenv("XLA_FLAGS", FAST_XLA_FLAG)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # raises CellExecutionError naming the cell on any error
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert images, f"{path.name} produced no plot"
