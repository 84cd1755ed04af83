"""Host memory that does not grow with the data: the training pixels' variance counted a chunk at a time (against
NumPy), read from the checkpoint by a resumed run, evaluate.py and extract_codes.py (never computed again), prepared
splits read without a memory map, evaluation in parts of bounded size, and the one-line fallbacks when a split
does not fit in memory or on the GPU."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import device_data
import evaluate
import extract_codes
import image_data
import prepared
import train
from checkpoint import Config, read_checkpoint
from image_data import CachedImages, DecodedImages, MappedImages, PhotoCrops, build_data, pixel_variance

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=16, steps=2, batch_size=4, hidden_channels=8, residual_channels=4, num_residual_blocks=1,
            embedding_dim=4, num_embeddings=8, eval_every=2, log_every=1, lr=1e-3, progress=False, device="cpu",
            amp="off", num_workers=0)


def numpy_variance(pixels: np.ndarray) -> float:
    """The reference: unbiased variance of uint8 values scaled to [0, 1], in float64."""
    return float(np.var(pixels.astype(np.float64) / 255, ddof=1))


def make_folder(root: Path, n_train: int = 7, n_val: int = 3, size: int = 16) -> np.ndarray:
    """train/ and val/ of random PNGs of size x size; returns the training pixels (N, S, S, 3) in file order."""
    rng = np.random.default_rng(1)
    train_pixels = rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8)
    for split, pixels in (("train", train_pixels), ("val", rng.integers(90, 160, (n_val, size, size, 3)))):
        (root / split).mkdir(parents=True)
        for i, a in enumerate(pixels):
            Image.fromarray(a.astype(np.uint8)).save(root / split / f"{i:02d}.png")
    return train_pixels


# ---------------------------------------------------------------------------------------------------------------
# The variance, counted a chunk at a time


@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (7, 3, 8, 8), (33, 3, 16, 12), (5, 3, 64, 64)])
def test_the_variance_of_images_in_memory_is_numpys(shape, monkeypatch):
    """Chunks of 1000 bytes: several chunks, the last one partial, and chunks smaller than one image."""
    monkeypatch.setattr(image_data, "VARIANCE_CHUNK_BYTES", 1000)
    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    pixels[0, 0, 0, 0] = rng.integers(0, 50)                             # values of a skewed distribution too
    dataset = CachedImages(torch.from_numpy(pixels), torch.zeros(shape[0], dtype=torch.long), False)
    assert pixel_variance(dataset) == pytest.approx(numpy_variance(pixels), rel=1e-9)


def test_a_split_of_40000_images_or_more_counts_every_kth():
    """From 40,000 images every k-th (k = N // 20,000) is counted, as before the variance was streamed."""
    pixels = np.zeros((40_001, 3, 1, 1), dtype=np.uint8)
    pixels[1::2] = 255                                                   # every odd image white
    pixels[4] = 7
    dataset = CachedImages(torch.from_numpy(pixels), torch.zeros(len(pixels), dtype=torch.long), False)
    assert pixel_variance(dataset) == pytest.approx(numpy_variance(pixels[::2]), rel=1e-9)   # k = 2: no white one


def test_the_variance_of_photos_and_of_decoded_images_is_numpys():
    rng = np.random.default_rng(2)
    photos = [rng.integers(0, 256, (3, h, w), dtype=np.uint8) for h, w in ((20, 30), (17, 16), (40, 9))]
    crops = PhotoCrops([torch.from_numpy(p) for p in photos], 8, True)
    assert pixel_variance(crops) == pytest.approx(numpy_variance(np.concatenate([p.ravel() for p in photos])),
                                                  rel=1e-9)
    images = rng.integers(0, 256, (10, 3, 6, 6), dtype=np.uint8)
    decoded = DecodedImages(lambda i: torch.from_numpy(images[i]), [0] * 10, [str(i) for i in range(10)], False)
    assert pixel_variance(decoded, max_items=3) == pytest.approx(numpy_variance(images[::3]), rel=1e-9)


@pytest.mark.parametrize("cache_limit_mb", [1024, 0])   # read into memory, and left on disk
def test_the_variance_of_a_prepared_split_is_numpys(tmp_path, cache_limit_mb):
    train_pixels = make_folder(tmp_path / "photos")
    data = build_data(str(tmp_path / "photos"), 16, cache_limit_mb=cache_limit_mb, num_workers=0)
    assert isinstance(data.train, CachedImages if cache_limit_mb else MappedImages)
    assert data.variance == pytest.approx(numpy_variance(train_pixels), rel=1e-9)
    # max_items: a split in memory is counted whole, one on disk every k-th image (k = 7 // 3)
    subset = train_pixels if cache_limit_mb else train_pixels[::2]
    assert pixel_variance(data.train, max_items=3) == pytest.approx(numpy_variance(subset), rel=1e-9)


def test_counting_the_variance_holds_no_copy_of_the_split(tmp_path):
    """A 168 MB prepared split on disk, every image counted: the peak resident memory of the process that counts
    grows by far less than the split (a second process, so that its ru_maxrss is this alone; the file is written
    here, with file writes, so that no page of it was ever mapped there)."""
    path = tmp_path / "train.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (640, 256, 256, 4)})
        for i in range(640):
            f.write(bytes([200 if i % 2 == 0 else 0]) * (256 * 256 * 4))
    script = f"""
import resource, sys
import torch
sys.path.insert(0, {str(ROOT)!r})
from image_data import MappedImages, pixel_variance
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
variance = pixel_variance(MappedImages({str(path)!r}, torch.zeros(640, dtype=torch.long), False), max_items=10**6)
print(variance, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    variance, grown_mb = map(float, run.stdout.split())
    n = 640 * 256 * 256 * 4                                               # half 200, half 0
    assert variance == pytest.approx((200 / 255 / 2) ** 2 * n / (n - 1), rel=1e-9)
    assert grown_mb < 100


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint's variance: a resumed run, evaluate.py and extract_codes.py never compute it


def test_resume_evaluate_and_extract_codes_take_the_checkpoints_variance(tmp_path, monkeypatch):
    train_pixels = make_folder(tmp_path / "photos")
    out = tmp_path / "run"
    train.train(Config(data=str(tmp_path / "photos"), out=str(out), **TINY))
    saved = read_checkpoint(out / "checkpoint.pt")["data_variance"]
    assert saved == pytest.approx(numpy_variance(train_pixels), rel=1e-6)

    def refuse(*args, **kwargs):
        raise AssertionError("the variance was computed again")

    monkeypatch.setattr(image_data, "pixel_variance", refuse)
    result = train.train(Config(data=str(tmp_path / "photos"), out=str(out), resume=True, **{**TINY, "steps": 4}))
    assert result.history[-1]["step"] == 4
    assert read_checkpoint(out / "checkpoint.pt")["data_variance"] == saved
    assert evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu"]) == 0
    codes = extract_codes.extract_codes(out / "checkpoint.pt", tmp_path / "codes.pt", device="cpu", progress=False)
    assert len(codes["train_codes"]) == len(train_pixels)


# ---------------------------------------------------------------------------------------------------------------
# Reading prepared splits, evaluating in parts


def test_rows_read_from_the_file_are_the_arrays(tmp_path):
    rng = np.random.default_rng(3)
    array = rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", array)
    offset = np.load(tmp_path / "a.npy", mmap_mode="r").offset
    for rows in ([0], [19], [2, 3, 4, 9, 10, 15], [5, 5, 6], list(range(20)), []):
        got = prepared.read_rows(tmp_path / "a.npy", np.array(rows, dtype=np.int64), offset, (4, 4, 3))
        assert np.array_equal(got, array[rows])


def test_the_model_sees_a_bounded_number_of_pixels_and_the_metrics_do_not_change(tmp_path, monkeypatch):
    """Batches of 8 images of 16 x 16 with MODEL_PIXELS = 3 images: the model sees parts of at most 3 images, and
    the pooled metrics are those of the same images one at a time."""
    make_folder(tmp_path / "photos", n_val=8)
    out = tmp_path / "run"
    model = train.train(Config(data=str(tmp_path / "photos"), out=str(out), **TINY)).model
    val = build_data(str(tmp_path / "photos"), 16, num_workers=0).val
    one_by_one = evaluate.evaluate(model, image_data.eval_loader(val, 1), torch.device("cpu"))
    monkeypatch.setattr(evaluate, "MODEL_PIXELS", 3 * 16 * 16)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    parts = evaluate.evaluate(model, image_data.eval_loader(val, 8), torch.device("cpu"))
    assert seen == [3, 3, 2]
    for key in ("mse", "ssim", "codebook_usage", "perplexity", "num_images"):
        assert parts[key] == pytest.approx(one_by_one[key], rel=1e-5), key


# ---------------------------------------------------------------------------------------------------------------
# A split too large for the memory it would need: the memory-mapped path, and one line that says so


def test_a_split_larger_than_half_the_available_memory_stays_on_disk(tmp_path, monkeypatch, capsys):
    train_pixels = make_folder(tmp_path / "photos")
    build_data(str(tmp_path / "photos"), 16, num_workers=0)   # prepared first (a split of 7 x 768 bytes)
    capsys.readouterr()
    monkeypatch.setattr(prepared, "available_memory", lambda: 2 * 7 * 16 * 16 * 3 - 2)
    data = build_data(str(tmp_path / "photos"), 16, num_workers=0)
    lines = capsys.readouterr().out.splitlines()
    assert isinstance(data.train, MappedImages) and isinstance(data.val, CachedImages)   # val: 3 images fit
    assert len(lines) == 1 and "the train split" in lines[0] and "reading it from disk instead" in lines[0]
    assert data.variance == pytest.approx(numpy_variance(train_pixels), rel=1e-9)


def test_a_split_larger_than_its_share_of_the_gpu_is_read_from_the_host(tmp_path, monkeypatch, capsys):
    make_folder(tmp_path / "photos")
    split = build_data(str(tmp_path / "photos"), 16, num_workers=0).train     # 5376 bytes
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 5376, 10**9))
    assert device_data.fits_on_device(split, cuda, 0.25) and not capsys.readouterr().out
    assert not device_data.fits_on_device(split, cuda, 0.2)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "--device-data 0.2" in lines[0] and "from the host instead" in lines[0]
    assert not device_data.fits_on_device(split, torch.device("cpu"), 1.0) and not capsys.readouterr().out


def test_the_gpu_copy_of_a_split_on_disk_is_the_split(tmp_path):
    """on_device reads the file a chunk at a time (here 2 images' bytes): the same images, in order."""
    train_pixels = make_folder(tmp_path / "photos")
    split = build_data(str(tmp_path / "photos"), 16, cache_limit_mb=0, num_workers=0).train
    images, labels = device_data.on_device(split, torch.device("cpu"), chunk_bytes=2 * 16 * 16 * 3)
    assert torch.equal(images, torch.from_numpy(train_pixels).permute(0, 3, 1, 2)) and len(labels) == 7
