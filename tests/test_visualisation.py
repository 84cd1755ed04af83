"""The architecture picture script (model_visualisation/draw_architecture.py) writes a sensible PNG."""
import importlib.util
from pathlib import Path

from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "model_visualisation" / "draw_architecture.py"


def test_draw_architecture_writes_a_wide_png(tmp_path):
    spec = importlib.util.spec_from_file_location("draw_architecture", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    out = tmp_path / "vqvae.png"
    assert module.main(["--out", str(out)]) == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > height and width >= 1000
