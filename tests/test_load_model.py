"""A trained model in one line: `load_model(path)` for 1 and 2 levels, `encode_images` / `decode_images` in [0, 1],
every bad input a one-line error naming what was expected; and every ```python block of README.md runs as written
after the quick start's first line (a short training run stands in for it)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import Config, load_checkpoint, load_model
from runs import CheckpointError
from train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_channels=8, residual_channels=4, num_residual_blocks=1, embedding_dim=4, num_embeddings=16,
            batch_size=4, progress=False, device="cpu", num_workers=0, log_every=1)


@pytest.fixture(scope="module")
def runs_made(tmp_path_factory):
    """A 1-level run at 16 px and a 2-level run at 32 px, a few steps each."""
    base = tmp_path_factory.mktemp("load_model")
    one = Config(**TINY, image_size=16, steps=6, eval_every=6, out=str(base / "one"))
    two = Config(**TINY, image_size=32, steps=6, eval_every=6, levels=2, out=str(base / "two"))
    train(one)
    train(two)
    return {1: base / "one" / "checkpoint.pt", 2: base / "two" / "checkpoint.pt"}


@pytest.mark.parametrize("levels", [1, 2])
def test_load_model_gives_the_trained_model_in_eval_mode_with_its_config(runs_made, levels):
    model = load_model(runs_made[levels], device="cpu")
    assert not model.training and model.levels == levels and model.config.levels == levels
    reference, config, ckpt = load_checkpoint(runs_made[levels])
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("levels", [1, 2])
def test_encode_images_takes_0_1_images_and_decode_images_returns_them_clamped(runs_made, levels):
    model = load_model(runs_made[levels], device="cpu")
    size = model.config.image_size
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    codes = model.encode_images(x)
    # the reference: the model's own [-0.5, 0.5] scale, shifted by hand
    expected = model.encode(x - 0.5)
    maps = codes if levels == 2 else (codes,)
    for got, want in zip(maps, expected if levels == 2 else (expected,)):
        assert torch.equal(got, want)
    assert [m.shape[-1] for m in maps] == ([size // 8, size // 4] if levels == 2 else [size // 4])
    # a decoder that overshoots [0, 1] on both sides: a ramp from -1 to 1 across the columns added to its output
    model.decoder.register_forward_hook(lambda module, inputs, out: out + torch.linspace(-1, 1, out.shape[-1]))
    images = model.decode_images(codes)
    raw = model.decode(codes).float() + 0.5
    assert images.shape == x.shape and images.dtype == torch.float32
    assert torch.equal(images, raw.clamp(0, 1))
    assert images.min() >= 0 and images.max() <= 1
    assert (raw < 0).any() and (raw > 1).any(), "the output never left [0, 1]: the clamp went unchecked"


def test_encode_images_rejects_what_it_cannot_take(runs_made):
    model = load_model(runs_made[1], device="cpu")
    with pytest.raises(ValueError, match=r"in \[0, 1\].*-0\.5"):
        model.encode_images(torch.full((1, 3, 16, 16), -0.5))
    with pytest.raises(ValueError, match=r"in \[0, 1\].*1\.5"):
        model.encode_images(torch.full((1, 3, 16, 16), 1.5))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(1, 1, 16, 16\)"):
        model.encode_images(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(3, 16, 16\)"):
        model.encode_images(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="multiples of 4.*18x16"):
        model.encode_images(torch.rand(1, 3, 18, 16))
    with pytest.raises(ValueError, match="divide 8-bit images by 255"):
        model.encode_images(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    two = load_model(runs_made[2], device="cpu")
    with pytest.raises(ValueError, match="multiples of 8.*20x20"):
        two.encode_images(torch.rand(1, 3, 20, 20))       # a multiple of 4 is not enough for the top map
    model.encode_images(torch.rand(1, 3, 20, 24))         # any multiple of 4, not only the training size


def test_load_model_names_the_file_and_what_it_is(runs_made, tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt does not exist"):
        load_model(tmp_path / "nope.pt")
    codes = tmp_path / "codes.pt"
    torch.save({"format": "vqvae-codes-v1"}, codes)
    with pytest.raises(CheckpointError, match=r"codes.pt is a codes file \(extract_codes.py\), not a checkpoint"):
        load_model(codes)
    prior = tmp_path / "prior.pt"
    torch.save({"format": "pixelcnn-prior-v1"}, prior)
    with pytest.raises(CheckpointError, match=r"prior.pt is a prior checkpoint \(train_prior.py\), not a checkpoint"):
        load_model(prior)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(runs_made[1].read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="cannot load checkpoint .*truncated.pt") as err:
        load_model(truncated)
    assert "\n" not in str(err.value)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="other.pt is not a checkpoint written by this repo's train.py"):
        load_model(other)


def readme_python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


def test_readme_has_python_blocks_that_use_load_model():
    blocks = readme_python_blocks()
    assert blocks and any("load_model(" in b and "encode_images(" in b and "decode_images(" in b for b in blocks)


def test_every_python_block_of_the_readme_runs_after_the_quick_start(tmp_path):
    """The quick start's first line trains runs/sample/ with every default; here a short run of the same data and
    image size writes that folder, in a copy of the repository's Python files, and each block runs there as a
    fresh `python -c` (as a user would paste it), in README order."""
    for f in ROOT.glob("*.py"):
        shutil.copy(f, tmp_path / f.name)
    c = Config(data="sample", image_size=64, steps=3, eval_every=3, batch_size=4, hidden_channels=16,
               residual_channels=8, num_residual_blocks=1, embedding_dim=8, num_embeddings=32, progress=False,
               device="cpu", num_workers=0, out=str(tmp_path / "runs" / "sample"))
    train(c)
    env = {**os.environ, "PYTHONPATH": "", "CUDA_VISIBLE_DEVICES": ""}
    for i, block in enumerate(readme_python_blocks()):
        r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, f"README python block {i + 1} failed:\n{block}\n{r.stderr[-2000:]}"
