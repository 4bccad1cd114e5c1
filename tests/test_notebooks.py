"""Every notebook in notebooks/ runs top to bottom without error, offline, in a fresh kernel.

The kernel is this interpreter (a kernel spec written to a temp dir that points at ``sys.executable``), so the
notebooks see the same installed ``resnet_jax`` as the tests rather than whatever ``python3`` Jupyter finds
first. Each notebook runs in its own empty working directory, under one deadline for the whole notebook.
"""

import json
import sys
import time
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

pytestmark = pytest.mark.long  # each notebook runs top to bottom, training included

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
DEADLINE_S = 240  # per notebook; each takes about a minute on a busy 2-core CPU
KERNEL = "resnet-jax-tests"


def _kernel_manager(tmp: Path) -> KernelManager:
    spec_dir = tmp / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "resnet-jax tests", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp / "kernels")])
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def test_notebooks_found():
    assert len(NOTEBOOKS) >= 6, NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    workdir = tmp_path / "work"
    workdir.mkdir()
    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(workdir)}}, allow_errors=False)
    deadline = time.monotonic() + DEADLINE_S
    with client.setup_kernel(cleanup_kc=True):  # nbclient leaves a kernel it did not create running
        for index, cell in enumerate(nb.cells):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"{path.name} passed its {DEADLINE_S} s deadline before cell {index}")
            client.timeout = int(remaining) + 1  # what is left of the notebook's deadline bounds this cell
            client.execute_cell(cell, index)  # raises CellExecutionError (with the traceback) on an error


def test_notebooks_are_stored_without_outputs():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"
