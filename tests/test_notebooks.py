"""Executes the four notebooks with small settings (SAM_OPTAX_NOTEBOOK_SMALL=1); fails on any
error."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ALL = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("0*.ipynb"))
# 05_claims imports the benchmarks package: tests/test_claims.py runs it with the repository
# on PYTHONPATH
NOTEBOOKS = [p for p in ALL if p.stem != "05_claims"]


def test_all_notebooks_exist():
  assert [p.stem for p in ALL] == ["01_quickstart", "02_flax_training", "03_sharpness",
                                   "04_efficient_variants", "05_claims"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_clean(path, monkeypatch, tmp_path):
  monkeypatch.setenv("SAM_OPTAX_NOTEBOOK_SMALL", "1")
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # the kernel needs no simulated devices
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
  assert any(o.get("output_type") == "display_data" for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", []))  # at least one plot
