"""Every notebook in ``notebooks/`` executes without error and is committed with its outputs."""

import copy
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
TIMEOUT = 600  # seconds per cell; each notebook runs in about a minute on 2 CPU cores


@pytest.fixture(params=NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def notebook(request):
    return nbformat.read(request.param, as_version=4)


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOKS_DIR}"


def test_committed_with_outputs(notebook):
    """Each code cell of the committed notebook has been executed and has an output."""
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for index, cell in enumerate(code):
        assert cell.outputs, f"code cell {index} has no outputs: execute the notebook and save it"
        errors = [output for output in cell.outputs if output.output_type == "error"]
        assert not errors, f"code cell {index} was saved with an error: {errors[0].get('ename')}"


def test_executes(notebook, monkeypatch):
    """A copy of the notebook runs top to bottom in a fresh kernel (outputs not written back)."""
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the kernel inherits the environment: no display needed
    # small matrices on shared CPUs: one thread per kernel avoids oversubscription stalls
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = nbclient.NotebookClient(
        copy.deepcopy(notebook),
        timeout=TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error
