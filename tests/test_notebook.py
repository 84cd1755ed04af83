"""vqvae.ipynb runs top to bottom in a real Jupyter kernel and shows its plots.

The test shortens training by adding one cell after the cell tagged "parameters" (STEPS = 30, PRIOR_STEPS = 20);
every other cell runs as committed. The full notebook's run time is measured separately and reported in README.md."""
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    # a kernel spec for this very interpreter, first on the Jupyter path, so no other "python3" spec is used
    spec = tmp_path / "jupyter" / "kernels" / "vqvae-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "vqvae test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = nbformat.read(ROOT / "vqvae.ipynb", as_version=4)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for name in ("Encoder", "VectorQuantizer", "VectorQuantizerEMA", "Decoder"):
        assert f"{name}" in source and "from models import" in source
    override = nbformat.v4.new_code_cell(f"STEPS = 30\nPRIOR_STEPS = 20\nOUT = {str(tmp_path / 'run')!r}")
    nb.cells.insert(params[0] + 1, override)
    NotebookClient(nb, timeout=600, kernel_name="vqvae-test", resources={"metadata": {"path": str(ROOT)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4, "expected the preview, loss curves, reconstructions and usage histogram"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert (tmp_path / "run" / "reconstructions.png").is_file()
