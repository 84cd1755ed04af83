"""README's promises about the data ("Your own images"), each against an independent reference: fixture images whose
every pixel is known, NumPy, PIL's own decoder, and a second Python process."""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import image_data
from image_data import build_data, split_folder

ROOT = Path(__file__).resolve().parents[1]


def save_array(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def contrast_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """train/: 6 images of 16x16 with pixels over the whole range; val/: 3 images in a narrow band, so the variance
    of the training pixels differs from the validation pixels' (and from that of both) by a large factor. 16x16
    PNGs are used as they are (no resize, no crop). Returns (train pixels, val pixels) as saved."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (6, 16, 16, 3))
    val = rng.integers(100, 141, (3, 16, 16, 3))
    for i, a in enumerate(train):
        save_array(root / "train" / f"t{i}.png", a)
    for i, a in enumerate(val):
        save_array(root / "val" / f"v{i}.png", a)
    return train, val


# ---------------------------------------------------------------------------------------------------------------
# "MSE(x_hat, x) / Var(training pixels)": the variance itself (test_promises_runs.py checks the loss uses it)


@pytest.mark.parametrize("cache_limit_mb", [1024, 0])   # decoded into memory, and decoded on access
def test_the_variance_is_that_of_the_training_pixels(tmp_path, cache_limit_mb):
    train, val = contrast_folder(tmp_path)
    data = build_data(str(tmp_path), 16, cache_limit_mb=cache_limit_mb, num_workers=0)
    expected = np.var(train / 255.0)       # population variance; the code's unbiased estimate differs by 2e-4
    assert np.var(val / 255.0) < expected / 10                       # the precondition that makes this bite
    assert data.variance == pytest.approx(expected, rel=1e-3)


def test_the_sample_variance_is_that_of_its_training_photos():
    """The sample trains on the photos above their held-out strips; its variance is over those pixels only."""
    data = build_data("sample", 16)
    pixels = np.concatenate([p.numpy().ravel() for p in data.train.photos]) / 255.0
    held_out = np.concatenate([p.numpy().ravel() for p in data.val.photos]) / 255.0
    assert abs(np.var(held_out) - np.var(pixels)) > 0.01 * np.var(pixels)
    assert data.variance == pytest.approx(np.var(pixels), rel=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# "Datasets that fit in 1 GiB at the chosen size are decoded once into memory; larger ones are decoded by DataLoader
# workers"


def test_what_fits_the_cache_limit_is_decoded_into_memory(tmp_path):
    """At 512x512 an image takes 3 * 512 * 512 bytes = 0.75 MiB: with a limit of 1 MiB a split of one image is
    decoded into memory, a split of two is not. The default limit is 1 GiB (1024 MiB)."""
    rng = np.random.default_rng(1)
    for name in ("train/a.png", "train/b.png", "val/c.png"):
        save_array(tmp_path / name, rng.integers(0, 256, (512, 512, 3)))
    data = build_data(str(tmp_path), 512, cache_limit_mb=1, num_workers=0)
    assert isinstance(data.train, image_data.MappedImages) and len(data.train) == 2
    assert isinstance(data.val, image_data.CachedImages) and len(data.val) == 1
    assert inspect.signature(build_data).parameters["cache_limit_mb"].default == 1024


# ---------------------------------------------------------------------------------------------------------------
# "every image is resized (short side to --image-size) and centre-cropped"


def coordinate_image(width: int, height: int) -> np.ndarray:
    """Red = 10 x column, green = 10 x row: every pixel says where it came from."""
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))
    return np.stack([10 * cols, 10 * rows, np.full_like(cols, 7)], -1)


def test_centre_crop_of_a_wide_and_a_tall_image(tmp_path):
    wide = save_array(tmp_path / "wide.png", coordinate_image(24, 16))     # short side 16: crop columns 4..19
    tall = save_array(tmp_path / "tall.png", coordinate_image(16, 28))     # rows 6..21
    x = image_data.square_image(wide, 16).numpy()
    assert x.shape == (3, 16, 16)
    np.testing.assert_array_equal(x[0], np.tile(10 * np.arange(4, 20), (16, 1)))
    np.testing.assert_array_equal(x[1], np.tile(10 * np.arange(16)[:, None], (1, 16)))
    y = image_data.square_image(tall, 16).numpy()
    np.testing.assert_array_equal(y[0], np.tile(10 * np.arange(16), (16, 1)))
    np.testing.assert_array_equal(y[1], np.tile(10 * np.arange(6, 22)[:, None], (1, 16)))
    data = build_data(str(tmp_path), 16, num_workers=0)                     # the same through the dataset
    items = [ds[i][0].numpy() for ds in (data.train, data.val) for i in range(len(ds))]
    assert len(items) == 2 and any(np.array_equal(t, x) for t in items) and any(np.array_equal(t, y) for t in items)


def test_resize_then_centre_crop(tmp_path):
    """64x32 with 8 red columns, 48 green, 8 blue -> resized to 32x16 (red 0..3, green 4..27, blue 28..31) ->
    the centre 16 columns (8..23) are all green, at least 4 columns from either edge of the band."""
    a = np.zeros((32, 64, 3))
    a[:, :8] = (255, 0, 0)
    a[:, 8:56] = (0, 255, 0)
    a[:, 56:] = (0, 0, 255)
    x = image_data.square_image(save_array(tmp_path / "bands.png", a), 16).int()
    assert x.shape == (3, 16, 16)
    assert (x[1] >= 250).all() and (x[0] <= 5).all() and (x[2] <= 5).all()


# ---------------------------------------------------------------------------------------------------------------
# Large JPEGs: load_image "lets libjpeg decode at a reduced scale when it can"


@pytest.mark.parametrize("short, decoded_size, shape", [(16, (256, 192), (3, 16, 21)),
                                                      (200, (512, 384), (3, 200, 267))])
def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path, monkeypatch, short, decoded_size, shape):
    """PIL reports the size it decoded at. For 2048x1536 and a short side of 16, libjpeg's largest reduction (1/8)
    gives 256x192 instead of all 3 megapixels; for 200, 1/8 would be too small (192), so 1/4: 512x384."""
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2048, 1536), (200, 100, 50)).save(path, quality=90)
    decoded = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        result = real_load(self)
        if self.format == "JPEG":
            decoded.append(self.size)
        return result

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    x = image_data.load_image(path, short)
    assert decoded and set(decoded) == {decoded_size}, decoded
    assert x.shape == shape                                        # 2048 * short / 1536, rounded
    assert (x.int() - torch.tensor([200, 100, 50]).view(3, 1, 1)).abs().max() <= 3


# ---------------------------------------------------------------------------------------------------------------
# "The split into training and validation is deterministic ... chosen by a hash of each file's path"


def named_files(root: Path, n: int) -> None:
    """Empty files with image names: the split looks at paths only."""
    for i in range(n):
        path = root / f"d{i % 3}" / f"img_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


SPLIT_IN_ANOTHER_PROCESS = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from image_data import split_folder
root = Path(sys.argv[2])
train, val, _, _ = split_folder(root, float(sys.argv[3]))
print(json.dumps([[p.relative_to(root).as_posix() for p in s] for s in (train, val)]))
"""


def test_the_split_is_the_same_in_other_processes(tmp_path):
    """evaluate.py and a resumed run rebuild the split in a new process: with any hash seed it must come out the
    same (Python's own hash() of a string changes from process to process)."""
    named_files(tmp_path, 60)
    train, val, _, _ = split_folder(tmp_path, 0.1)
    here = [[p.relative_to(tmp_path).as_posix() for p in s] for s in (train, val)]
    procs = [subprocess.Popen([sys.executable, "-c", SPLIT_IN_ANOTHER_PROCESS, str(ROOT), str(tmp_path), "0.1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2")]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1]) == here
    assert 1 <= len(val) < 60


@pytest.mark.parametrize("fraction, low, high", [(0.1, 15, 45), (0.3, 65, 115)])
def test_the_validation_fraction_is_about_what_was_asked(tmp_path, fraction, low, high):
    """300 paths: the number sent to validation is Binomial(300, fraction), far inside these bounds."""
    named_files(tmp_path, 300)
    _, val, _, _ = split_folder(tmp_path, fraction)
    assert low <= len(val) <= high, len(val)
