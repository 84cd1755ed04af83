"""The architecture picture script (model_visualisation/draw_architecture.py) writes sensible PNGs, the 2-level one
traced with the shapes VQVAE2 really produces at 128 px."""
import importlib.util
from pathlib import Path

import torch
from PIL import Image

from checkpoint import Config, build_model

SCRIPT = Path(__file__).resolve().parents[1] / "model_visualisation" / "draw_architecture.py"


def load_script():
    spec = importlib.util.spec_from_file_location("draw_architecture", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_draw_architecture_writes_a_wide_png(tmp_path):
    module = load_script()
    out = tmp_path / "vqvae.png"
    assert module.main(["--out", str(out)]) == out
    width, height = png_size(out)
    assert width > height and width >= 1000


def test_vqvae2_picture_is_traced_with_vqvae2s_real_shapes_at_128px(tmp_path):
    module = load_script()
    out = tmp_path / "vqvae2.png"
    assert module.main(["--levels", "2", "--out", str(out)]) == out
    width, height = png_size(out)
    assert width > height >= 600 and width >= 1500          # two rows of boxes

    model = build_model(Config(levels=2))
    x = module.sample_image(128)
    rec = module.trace(model, x, module.parts_of(model))
    with torch.no_grad():                                   # the reference: VQVAE2's own parts, called by hand
        output = model(x)
        top, bottom = output.levels
        h_b = model.encoder(x)
        z_top, d_top = model.top_encoder(h_b), model.top_decoder(top.quantized)
        up = model.upsample_top(top.quantized)
    (tq,), (join,), (bq,), (upsample,), (cat,) = (rec[k] for k in ("top_quantizer", "join", "bottom_quantizer",
                                                                   "upsample_top", "concat"))
    assert [r.name for r in rec["top_encoder"]] == ["down", "conv", "residual", "to_embedding"]
    assert [r.name for r in rec["top_decoder"]] == ["conv", "residual", "up"]
    assert rec["encoder"][-1].shape == tuple(h_b.shape) == (1, 128, 32, 32)
    assert rec["top_encoder"][-1].shape == tq.in_shape == tuple(z_top.shape) == (1, 64, 16, 16)
    assert (tq.shape, tq.indices) == (tuple(top.quantized.shape), tuple(top.indices.shape)) == ((1, 64, 16, 16),
                                                                                                (1, 16, 16))
    assert rec["top_decoder"][-1].shape == tuple(d_top.shape) == (1, 64, 32, 32)
    assert join.in_shape == (1, 128 + 64, 32, 32) and join.shape == bq.in_shape == (1, 64, 32, 32)
    assert (bq.shape, bq.indices) == (tuple(bottom.quantized.shape), tuple(bottom.indices.shape)) == ((1, 64, 32, 32),
                                                                                                     (1, 32, 32))
    assert upsample.shape == tuple(up.shape) == (1, 64, 32, 32)
    assert cat.in_shape == (1, 64 + 64, 32, 32)
    assert rec["decoder"][-1].shape == cat.shape == tuple(output.reconstruction.shape) == (1, 3, 128, 128)


def test_the_quantizer_box_states_the_search_the_model_runs():
    """The default codebook is searched between unit vectors of a 4-d projection, not eq. 1 in D dimensions; the
    box must say so, and say eq. 1 plainly for a quantizer that runs it."""
    from models import FSQ, VectorQuantizerEMA
    module = load_script()
    default = build_model(Config()).quantizer
    lines = module.rule_lines(default, "z_e(x)", (1, 16, 16))
    assert lines[:3] == [f"K = {Config.num_embeddings} codes", f"of dimension {Config.lookup_dim}",
                         "searched in $u = Wz_e(x)$"]
    assert r"\hat{u}-\hat{e}_j" in lines[4] and "indices 16x16" in lines
    plain = module.rule_lines(VectorQuantizerEMA(16, 8, cosine=False, lookup_dim=0), "z", (1, 4, 4))
    assert plain[:3] == ["K = 16 codes", "of dimension 8", ""] and r"\|z-e_j\|_2" in plain[4]
    assert "levels 8,5,5,5" in module.rule_lines(FSQ(1000, 8), "z", (1, 4, 4))
