"""The notebooks in notebooks/, each executed top to bottom on a fresh kernel, as a reader runs them.
They are stored without outputs; every cell tagged `plot` must produce an image."""

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_four_notebooks_stored_without_outputs():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"]
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: stored with outputs"


# What each notebook calls that differs between the stacks, and the tests that call it on both:
# notebooks 02-04 then run on the newest stack only (CI's time); 01, the sharding pictures, on both.
COVERED_ON_BOTH = {
    "02_what_the_compiler_did": "tests/test_plan.py: compiled steps' collectives against the minimum",
    "03_planning_the_trillion": "tests/test_plan.py: the trillion's plans, compiled",
    "04_checkpoint_to_text": "tests/test_checkpoint.py and tests/test_sampling.py: train, save, restore, sample",
}


@pytest.mark.slow
@pytest.mark.parametrize("path", [pytest.param(p, marks=[pytest.mark.newest_only] if p.stem in COVERED_ON_BOTH else [])
                                  for p in NOTEBOOKS], ids=lambda p: p.stem)
def test_the_notebook_runs_on_a_fresh_kernel_and_draws_its_pictures(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    # The kernel inherits this environment: no accelerator, agx's test cache; the notebooks set
    # their own simulated device counts, and XLA's thread pools with them.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "PJRT_NPROC")}
    started = time.monotonic()
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute(env=env)  # raises on any error
    took = time.monotonic() - started
    errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
    plots = [cell for cell in notebook.cells if "plot" in cell.metadata.get("tags", [])]
    assert plots, "no plotting cell"
    for cell in plots:
        images = [o for o in cell.outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
        assert images, f"the plotting cell produced no image:\n{cell.source[:300]}"
    assert took < 180, f"{path.name} took {took:.0f}s"
