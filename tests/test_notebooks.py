"""The notebooks in ``notebooks/`` run top to bottom without error, and are stored clean.

Each notebook is executed with nbclient on the ``python3`` kernel in a temporary working
directory (whatever it writes lands there). A notebook whose metadata sets
``cwtflow.needs_shared_data`` reads the sample data folder ``../shared/data`` next to the
repository; the kernel finds it through the ``CWTFLOW_SHARED_DATA`` environment variable, and
the test skips when the folder is absent.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
#: Notebooks the README describes; each must exist.
EXPECTED = {"tutorial", "history", "survey", "fullsky", "catalog"}
CELL_TIMEOUT = 300  # seconds per cell; the notebooks themselves take well under 2 minutes


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=nbformat.NO_CONVERT)


def _needs_shared_data(nb: nbformat.NotebookNode) -> bool:
    return bool(nb.metadata.get("cwtflow", {}).get("needs_shared_data", False))


def test_expected_notebooks_exist():
    assert EXPECTED <= {path.stem for path in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_clean(path: Path):
    """Valid nbformat, kernel python3, the data flag set, no outputs or execution counts."""
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert isinstance(nb.metadata.get("cwtflow", {}).get("needs_shared_data"), bool)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "a notebook without code"
    dirty = [i for i, cell in enumerate(code) if cell.outputs or cell.execution_count is not None]
    assert not dirty, f"code cells {dirty} carry outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Execute every cell; any cell error fails the test (nbclient raises)."""
    nb = _read(path)
    if _needs_shared_data(nb) and not SHARED_DATA.is_dir():
        pytest.skip(f"{path.name} needs the shared sample data, not found at {SHARED_DATA}")
    monkeypatch.setenv("CWTFLOW_SHARED_DATA", str(SHARED_DATA))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, as for users
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    errors = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    executed = [cell.execution_count for cell in nb.cells if cell.cell_type == "code"]
    assert all(count is not None for count in executed), "some code cells did not run"
