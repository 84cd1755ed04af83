"""image_data.py on real files: every image mode and format, broken files, deterministic splits, labels, the
step-indexed batch sampler, the built-in sample, and on-disk fixtures of torchvision's Food101 and CIFAR-10."""
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import image_data
import train as train_module
from checkpoint import Config
from image_data import (CachedImages, DataError, DecodedImages, ImageSkippedWarning, StepBatchSampler, build_data,
                        find_images, split_folder)

# ---------------------------------------------------------------------------------------------------------------
# fixture helpers


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def solid(path: Path, color=(255, 0, 0), size=(8, 8), **kwargs) -> Path:
    """A one-colour RGB image (lossless formats keep the colour exactly)."""
    return save(Image.new("RGB", size, color), path, **kwargs)


def noise_jpeg(path: Path, size=(64, 48), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    return save(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)), path, quality=95)


def all_items(dataset) -> list[tuple[torch.Tensor, int]]:
    return [dataset[i] for i in range(len(dataset))]


def tiny_train_config(folder: Path, out: Path) -> Config:
    return Config(data=str(folder), image_size=16, steps=3, batch_size=4, hidden_channels=8,
                               residual_channels=4, num_residual_blocks=1, embedding_dim=4, num_embeddings=8,
                               eval_every=3, log_every=1, out=str(out), progress=False, device="cpu",
                               num_workers=0)


# ---------------------------------------------------------------------------------------------------------------
# a folder of every mode and format


@pytest.fixture
def mixed_folder(tmp_path):
    """Nested folders of images in many modes, formats and letter cases, plus files that must be ignored.
    Returns (folder, {name: path of each image})."""
    root = tmp_path / "mixed"
    imgs = {}
    imgs["red_jpg"] = solid(root / "a" / "red.JPG", (255, 0, 0), (50, 30), quality=100)
    imgs["gray_png"] = save(Image.new("L", (17, 90), 77), root / "a" / "b" / "gray.png")
    pal = Image.new("P", (64, 64), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)   # index 1 = green
    imgs["palette_gif"] = save(pal, root / "a" / "pal.gif")
    transparent_pal = Image.new("P", (30, 20), 0)
    transparent_pal.putpalette([255, 0, 0] * 256)           # every index red, index 0 fully transparent
    imgs["palette_trns_png"] = save(transparent_pal, root / "c" / "trans.Png", transparency=0)
    imgs["rgba_png"] = save(Image.new("RGBA", (40, 20), (10, 20, 30, 0)), root / "c" / "rgba.png")
    imgs["la_png"] = save(Image.new("LA", (20, 40), (0, 0)), root / "c" / "deep" / "er" / "la.png")
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)   # 0 .. 65520
    imgs["i16_png"] = save(Image.fromarray(ramp), root / "d16.png")
    imgs["red_bmp"] = solid(root / "red.bmp", (255, 0, 0), (31, 31))
    imgs["webp"] = solid(root / "w" / "blue.webp", (0, 0, 255), (33, 21), lossless=True)
    imgs["tiff"] = solid(root / "scan.TIFF", (0, 128, 255), (25, 60))
    imgs["red_png"] = solid(root / "red_rgb.png", (255, 0, 0), (64, 64))
    imgs["jpeg_ext"] = solid(root / "x" / "photo.Jpeg", (200, 100, 50), (12, 40))
    (root / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (root / "a" / "._red.JPG").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")   # macOS metadata
    hidden = root / ".thumbnails"
    solid(hidden / "thumb.png")                            # a hidden folder is ignored too
    return root, imgs


def test_find_images_recursive_case_insensitive_ignores_other_files(mixed_folder):
    root, imgs = mixed_folder
    found = find_images(root)
    assert found == sorted(imgs.values())
    assert not any(p.name in ("notes.txt", ".DS_Store", "._red.JPG", "thumb.png") for p in found)


def test_build_data_mixed_modes_gives_uint8_rgb_squares(mixed_folder):
    root, imgs = mixed_folder
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageSkippedWarning)   # every file here is decodable
        data = build_data(str(root), image_size=16, cache_limit_mb=1024, num_workers=0)
    assert len(data.train) + len(data.val) == len(imgs)
    assert len(data.val) >= 1 and len(data.train) >= 1
    items = all_items(data.train) + all_items(data.val)
    for x, _ in items:
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    # the decoded items are exactly the images (one each), decoded as square_image does
    expected = [image_data.square_image(p, 16) for p in imgs.values()]
    remaining = list(expected)
    for x, _ in items:
        match = next(i for i, e in enumerate(remaining) if torch.equal(e, x))
        remaining.pop(match)
    assert remaining == []
    assert 0.0 < data.variance < 0.25


def test_modes_are_converted_to_rgb_correctly(mixed_folder):
    _, imgs = mixed_folder

    def pixels(name):
        x = image_data.square_image(imgs[name], 16)
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
        return x

    def is_color(x, rgb):
        return torch.equal(x, torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16))

    assert is_color(pixels("rgba_png"), (255, 255, 255))          # fully transparent -> white, not (10, 20, 30)
    assert is_color(pixels("la_png"), (255, 255, 255))
    assert is_color(pixels("palette_trns_png"), (255, 255, 255))  # transparent palette index -> white
    assert is_color(pixels("red_png"), (255, 0, 0))
    assert is_color(pixels("red_bmp"), (255, 0, 0))
    assert is_color(pixels("gray_png"), (77, 77, 77))
    assert is_color(pixels("palette_gif"), (0, 255, 0))
    assert is_color(pixels("webp"), (0, 0, 255))
    assert is_color(pixels("tiff"), (0, 128, 255))
    red_jpeg = pixels("red_jpg").int()
    assert (red_jpeg[0] >= 250).all() and (red_jpeg[1:] <= 5).all()   # JPEG is lossy: nearly pure red
    ramp = pixels("i16_png")
    assert torch.equal(ramp[0], ramp[1]) and torch.equal(ramp[1], ramp[2])   # grayscale stays gray
    assert ramp.min() < 40 and ramp.max() > 215                        # the 16-bit range maps onto 0..255


def test_16bit_png_brightness_is_kept(tmp_path):
    """A uniform 16-bit gray of value v*257 is the 8-bit gray v: scaling 16 bits to 8 must divide by 257, not
    stretch each image's own min..max (which turns any uniform 16-bit image black)."""
    path = save(Image.fromarray(np.full((20, 30), 200 * 257, np.uint16)), tmp_path / "bright16.png")
    assert Image.open(path).mode.startswith("I")
    x = image_data.square_image(path, 16)
    assert x.unique().tolist() == [200], f"uniform 16-bit gray 200*257 decoded as {x.unique().tolist()}"


def test_cmyk_and_bilevel(tmp_path):
    cmyk = save(Image.new("CMYK", (20, 12), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=100)
    x = image_data.square_image(cmyk, 8).int()
    assert (x[0] >= 250).all() and (x[1:] <= 5).all()          # C=0 M=Y=255 K=0 is red
    bilevel = save(Image.new("1", (9, 13), 1), tmp_path / "bw.png")
    assert image_data.square_image(bilevel, 8).unique().tolist() == [255]


@pytest.mark.parametrize("mode, key", [("L", 0), ("RGB", (0, 0, 0))])
def test_png_transparency_key_is_composited_on_white(tmp_path, mode, key):
    """A gray or RGB PNG can mark one colour transparent (a tRNS chunk) instead of carrying an alpha channel;
    its pixels are transparent like those of an RGBA image and must come out white, as the palette case does."""
    path = save(Image.new(mode, (10, 10), key), tmp_path / f"{mode}_trns.png", transparency=key)
    assert Image.open(path).convert("RGBA").getextrema()[3] == (0, 0)   # PIL itself reads them as transparent
    x = image_data.square_image(path, 8)
    assert x.unique().tolist() == [255], f"transparent {mode} pixels decoded as {x.unique().tolist()}"


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))                  # left half red, right half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6                                       # orientation: rotate 90 degrees clockwise to display
    path = save(img, tmp_path / "rotated.jpg", exif=exif, quality=100)
    x = image_data.load_image(path, 20).int()
    assert x.shape == (3, 40, 20)                           # displayed upright: portrait
    assert x[0, :15].float().mean() > 200 and x[2, :15].float().mean() < 50    # red on top after rotation
    assert x[2, -15:].float().mean() > 200 and x[0, -15:].float().mean() < 50  # blue at the bottom


# ---------------------------------------------------------------------------------------------------------------
# broken files


@pytest.fixture
def folder_with_broken(tmp_path):
    root = tmp_path / "photos"
    good = [solid(root / f"good{i}.png", (30 * i, 255 - 30 * i, 100), (20 + i, 16)) for i in range(7)]
    good.append(noise_jpeg(root / "sub" / "noise.jpg"))
    broken = [root / "broken.jpg", root / "empty.png", root / "sub" / "truncated.jpg"]
    broken[0].write_bytes(b"this is not a jpeg at all \x00\xff\x13" * 20)
    broken[1].write_bytes(b"")
    real = noise_jpeg(tmp_path / "whole.jpg", size=(96, 96), seed=1).read_bytes()
    broken[2].write_bytes(real[: len(real) // 2])
    return root, good, broken


def skipped_paths(records) -> str:
    return "\n".join(str(w.message) for w in records if issubclass(w.category, ImageSkippedWarning))


def test_broken_files_are_skipped_with_a_warning_naming_each(folder_with_broken):
    root, good, broken = folder_with_broken
    with pytest.warns(ImageSkippedWarning) as records:
        data = build_data(str(root), image_size=16, cache_limit_mb=1024, num_workers=0)
    messages = skipped_paths(records)
    for path in broken:
        assert str(path) in messages
    assert not any(str(p) in messages for p in good)
    assert len(data.train) + len(data.val) == len(good)
    assert isinstance(data.train, CachedImages) and isinstance(data.val, CachedImages)
    expected = [image_data.square_image(p, 16) for p in good]
    for x, _ in all_items(data.train) + all_items(data.val):
        assert any(torch.equal(x, e) for e in expected)


def test_training_survives_broken_files(folder_with_broken, tmp_path):
    root, _, _ = folder_with_broken
    with pytest.warns(ImageSkippedWarning):
        result = train_module.train(tiny_train_config(root, tmp_path / "run"))
    assert [r["step"] for r in result.history] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert result.final["num_images"] >= 1
    assert np.isfinite(result.history[-1]["loss"])


def test_a_large_split_is_memory_mapped_and_holds_only_the_images_that_decode(folder_with_broken):
    """Past the cache limit a prepared split is read through a memory map (by DataLoader workers); the files that
    could not be decoded were skipped, each named once, when the split was prepared."""
    root, good, broken = folder_with_broken
    with pytest.warns(ImageSkippedWarning) as records:
        data = build_data(str(root), image_size=16, cache_limit_mb=0, num_workers=0)
    assert sorted(str(p) for p in broken) == sorted(str(w.message).split()[1].rstrip(":") for w in records
                                                    if issubclass(w.category, ImageSkippedWarning))
    assert isinstance(data.train, image_data.MappedImages) and isinstance(data.val, image_data.MappedImages)
    assert len(data.train) + len(data.val) == len(good)
    expected = [image_data.square_image(p, 16) for p in good]
    items = all_items(data.train) + all_items(data.val)
    for x, label in items:
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and label == 0
        assert sum(torch.equal(x, e) for e in expected) >= 1
    # two worker processes, each with its own map, read the same images in the same order
    with_workers = torch.cat([x for x, _ in image_data.eval_loader(data.train, 2, num_workers=2)])
    assert torch.equal(with_workers, torch.stack([x for x, _ in all_items(data.train)]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # a second build reads the prepared arrays: no warning again
        again = build_data(str(root), image_size=16, cache_limit_mb=0, num_workers=0)
    assert len(again.train) == len(data.train)


def test_an_image_decoded_on_access_that_fails_is_none_and_collate_drops_it(folder_with_broken):
    root, good, broken = folder_with_broken
    paths = good[:2] + broken[:1]
    ds = DecodedImages(lambda i: image_data.square_image(paths[i], 16), [0] * 3, [str(p) for p in paths], False)
    with pytest.warns(ImageSkippedWarning, match="skipping") as records:
        assert ds[2] is None and ds[(2, 12345)] is None
    assert str(paths[2]) in skipped_paths(records)
    images, labels = image_data.collate([ds[0], None, ds[1]])
    assert images.shape == (2, 3, 16, 16) and labels.shape == (2,)
    assert torch.equal(images[0], ds[0][0])
    empty_images, empty_labels = image_data.collate([None, None])
    assert len(empty_images) == 0 and len(empty_labels) == 0


class LoggedDecode:
    """A picklable decode(i) that appends i to a file, so decodes in DataLoader worker processes are counted."""

    def __init__(self, log: Path):
        self.log = log

    def __call__(self, i: int) -> np.ndarray:
        with open(self.log, "a") as f:
            f.write(f"{i}\n")
        return np.full((4, 4, 3), i, dtype=np.uint8)


@pytest.mark.parametrize("workers", [0, 1])
def test_preparing_decodes_each_image_once_and_a_second_run_not_at_all(tmp_path, workers):
    """Preparing decodes every file exactly once, with or without DataLoader workers; the next run reads the
    prepared array and decodes nothing."""
    import prepared

    log = tmp_path / "decodes.txt"
    stamps = [[f"f{i}", 1, 1] for i in range(5)]
    args = (tmp_path / "prepared", "train", 4, stamps, [7] * 5, LoggedDecode(log), [f"f{i}" for i in range(5)],
            workers, "test")
    images, labels = prepared.load_or_prepare(*args)
    assert images.shape == (5, 4, 4, 3) and list(images[:, 0, 0, 0]) == list(range(5)) and list(labels) == [7] * 5
    assert sorted(int(line) for line in log.read_text().split()) == list(range(5))
    images, _ = prepared.load_or_prepare(*args)
    assert list(images[:, 0, 0, 0]) == list(range(5))
    assert len(log.read_text().split()) == 5


def test_folder_where_nothing_decodes_raises_data_error(tmp_path):
    for name in ("a.jpg", "b.png", "c.gif"):
        (tmp_path / name).write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageSkippedWarning)
        with pytest.raises(DataError, match="could be decoded"):
            build_data(str(tmp_path), image_size=16, num_workers=0)


# ---------------------------------------------------------------------------------------------------------------
# deterministic split


def make_flat_folder(root: Path, n: int, start: int = 0) -> list[Path]:
    return [solid(root / f"d{i % 3}" / f"img_{i:03d}.png", (i % 256, (7 * i) % 256, 50), (8, 8))
            for i in range(start, start + n)]


def test_split_is_deterministic_and_stable_when_files_are_added(tmp_path):
    root = tmp_path / "f"
    make_flat_folder(root, 40)
    train1, val1, _, _ = split_folder(root, 0.1)
    train2, val2, _, _ = split_folder(root, 0.1)
    assert (train1, val1) == (train2, val2)
    assert set(train1).isdisjoint(val1) and len(train1) + len(val1) == 40
    # precondition: the hash (not the tiny-folder fallback) chose validation, so adding files may not move any
    assert val1 and all(image_data.is_validation(p.relative_to(root).as_posix(), 0.1) for p in val1)

    a = build_data(str(root), 16, num_workers=0)
    b = build_data(str(root), 16, num_workers=0)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.images, b.val.images)
    assert torch.equal(a.train.labels, b.train.labels)

    added = make_flat_folder(root, 25, start=40)
    train3, val3, _, _ = split_folder(root, 0.1)
    assert set(train1) <= set(train3) and set(val1) <= set(val3)
    assert set(train3) | set(val3) == set(train1) | set(val1) | set(added)


def test_train_and_val_subfolders_are_used_as_given(tmp_path):
    root = tmp_path / "given"
    tr = [solid(root / "train" / "cats" / f"c{i}.png", (255, 0, 0)) for i in range(3)]
    tr += [solid(root / "train" / "dogs" / f"d{i}.png", (0, 0, 255)) for i in range(2)]
    va = [solid(root / "Validation" / "dogs" / "d9.png", (0, 0, 255)),
          solid(root / "Validation" / "cats" / "c9.png", (255, 0, 0))]
    train_paths, val_paths, train_base, val_base = split_folder(root, 0.5)
    assert train_paths == sorted(tr) and val_paths == sorted(va)
    assert train_base == root / "train" and val_base == root / "Validation"
    data = build_data(str(root), 16, val_fraction=0.5, num_workers=0)
    assert len(data.train) == 5 and len(data.val) == 2
    assert data.classes == ["cats", "dogs"]
    for ds in (data.train, data.val):
        for x, label in all_items(ds):
            assert x[0, 0, 0].item() == (255 if label == 0 else 0)   # cats red, dogs blue


@pytest.mark.parametrize("val_name", ["val", "valid", "test"])
def test_other_validation_folder_names(tmp_path, val_name):
    tr = [solid(tmp_path / "train" / f"{i}.png") for i in range(2)]
    va = [solid(tmp_path / val_name / "v.png")]
    train_paths, val_paths, _, _ = split_folder(tmp_path, 0.1)
    assert train_paths == tr and val_paths == va


def test_two_images_put_one_in_validation(tmp_path):
    paths = [solid(tmp_path / "one.png", (1, 2, 3)), solid(tmp_path / "two.png", (4, 5, 6))]
    train_paths, val_paths, _, _ = split_folder(tmp_path, 0.1)
    assert len(train_paths) == 1 and len(val_paths) == 1 and set(train_paths + val_paths) == set(paths)
    data = build_data(str(tmp_path), 16, num_workers=0)
    assert len(data.train) == 1 and len(data.val) == 1


def test_single_image_is_a_data_error(tmp_path):
    solid(tmp_path / "only.png")
    with pytest.raises(DataError, match="at least 2"):
        build_data(str(tmp_path), 16, num_workers=0)


@pytest.mark.parametrize("size", [0, 30, -4, 2])
def test_bad_image_size_is_a_data_error(tmp_path, size):
    with pytest.raises(DataError, match="multiple of 4"):
        build_data(str(tmp_path), size)


def test_missing_empty_and_file_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_data(str(tmp_path / "nope"), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        build_data(str(tmp_path / "empty"), 16)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file"):
        build_data(str(tmp_path / "file.png"), 16)


# ---------------------------------------------------------------------------------------------------------------
# labels


def test_labels_from_class_subfolders(tmp_path):
    for i in range(5):
        solid(tmp_path / "cats" / f"cat{i}.png", (255, 0, 0))
        solid(tmp_path / "dogs" / "inner" / f"dog{i}.jpg", (0, 0, 255), quality=100)
    data = build_data(str(tmp_path), 16, num_workers=0)
    assert data.classes == ["cats", "dogs"]
    labels = []
    for ds in (data.train, data.val):
        for x, label in all_items(ds):
            labels.append(label)
            if label == 0:
                assert x[0].min() >= 250 and x[2].max() <= 5
            else:
                assert x[2].min() >= 250 and x[0].max() <= 5
    assert sorted(labels) == [0] * 5 + [1] * 5


# ---------------------------------------------------------------------------------------------------------------
# StepBatchSampler


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_batches_depend_on_seed_and_step_only():
    a, b = StepBatchSampler(40, 8, seed=3), StepBatchSampler(40, 8, seed=3)
    for s in (0, 1, 4, 5, 17, 1000):
        assert a.batch_for_step(s) == b.batch_for_step(s)
    other = StepBatchSampler(40, 8, seed=4)
    assert all(a.batch_for_step(s) != other.batch_for_step(s) for s in range(10))
    assert take(a, 12) == [a.batch_for_step(s) for s in range(12)]


def test_sampler_resumed_at_step_k_continues_the_same_stream():
    full = take(StepBatchSampler(30, 4, seed=7), 25)
    for k in (1, 7, 8, 13):
        assert take(StepBatchSampler(30, 4, seed=7, start_step=k), 25 - k) == full[k:]


def test_one_epoch_covers_every_index_once():
    sampler = StepBatchSampler(48, 8, seed=1)
    assert sampler.steps_per_epoch == 6
    for epoch in range(2):
        batches = [sampler.batch_for_step(epoch * 6 + j) for j in range(6)]
        indices = [i for batch in batches for i, _ in batch]
        assert sorted(indices) == list(range(48))
        seeds = [seed for batch in batches for _, seed in batch]
        assert len(set(seeds)) == len(seeds)
    epoch0 = [i for j in range(6) for i, _ in sampler.batch_for_step(j)]
    epoch1 = [i for j in range(6, 12) for i, _ in sampler.batch_for_step(j)]
    assert epoch0 != epoch1                                  # a new permutation each epoch


def test_dataset_smaller_than_batch_still_gives_full_batches():
    sampler = StepBatchSampler(3, 8, seed=0)
    for batch in take(sampler, 5):
        assert len(batch) == 8
        assert {i for i, _ in batch} == {0, 1, 2}


def test_incomplete_last_batch_is_dropped():
    sampler = StepBatchSampler(10, 4, seed=0)
    assert sampler.steps_per_epoch == 2
    assert all(len(b) == 4 for b in take(sampler, 7))


def test_training_batches_are_reproducible_from_any_step(tmp_path):
    images = torch.arange(12 * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(12, 3, 4, 4)
    ds = CachedImages(images, torch.arange(12), augment=True)
    it = image_data.batches(ds, 4, seed=5)
    full = [next(it) for _ in range(6)]
    resumed = image_data.batches(ds, 4, seed=5, start_step=3)
    for step in range(3, 6):
        x, y = next(resumed)
        assert torch.equal(x, full[step][0]) and torch.equal(y, full[step][1])
    flipped = [torch.equal(x, images[l].flip(-1)) for x, l in zip(full[0][0], full[0][1])]
    same = [torch.equal(x, images[l]) for x, l in zip(full[0][0], full[0][1])]
    assert all(f or s for f, s in zip(flipped, same))


# ---------------------------------------------------------------------------------------------------------------
# the built-in sample


@pytest.fixture(scope="module")
def sample32():
    return build_data("sample", 32)


def test_sample_splits_by_photo(sample32):
    assert len(sample32.train) > 0 and len(sample32.val) > 0
    assert set(image_data.SAMPLE_TRAIN).isdisjoint(image_data.SAMPLE_VAL)
    pair = {"motorcycle_left.png", "motorcycle_right.png"}
    assert pair <= set(image_data.SAMPLE_TRAIN) or pair <= set(image_data.SAMPLE_VAL)
    train_paths, val_paths = image_data.sample_photo_paths()
    assert all(p.is_file() for p in train_paths + val_paths)      # bundled with scikit-image: works offline
    assert len(sample32.train.photos) == len(train_paths)
    unseen = image_data.sample_unseen_photos(sample32.val).photos
    assert len(unseen) == len(val_paths)
    for v in unseen:
        assert not any(t.shape == v.shape and torch.equal(t, v) for t in sample32.train.photos)


def test_sample_holds_out_the_bottom_strip_of_each_tall_enough_training_photo(sample32):
    """Reference: each training photo loaded whole, straight from its file."""
    train_paths, val_paths = image_data.sample_photo_paths()
    strips = sample32.val.photos[len(val_paths):]
    used = 0
    for path, top in zip(train_paths, sample32.train.photos):
        with Image.open(path) as img:
            short = max(32, min(min(img.size), image_data.SAMPLE_SCALE * 32))
        whole = image_data.load_image(path, short)
        if whole.shape[1] >= 3 * 32:
            strip = strips[used]
            used += 1
            assert strip.shape == (3, 32, whole.shape[2]) and top.shape[1] == whole.shape[1] - 32
            assert torch.equal(torch.cat([top, strip], dim=1), whole)   # disjoint, and together the whole photo
        else:
            assert torch.equal(top, whole)
    assert used == len(strips) > 10
    # training crops stay inside the tops: every random crop of the first photo matches some window of its top
    top = sample32.train.photos[0]
    for seed in range(20):
        i = next(j for j, (p, _, _) in enumerate(sample32.train.items) if p == 0)
        crop = sample32.train[(i, seed)][0]
        assert crop.shape[1] == 32
        windows = top.unfold(1, 32, 1).unfold(2, 32, 1)                       # (3, rows, cols, 32, 32)
        hits = (windows == crop[:, None, None]).flatten(3).all(-1).all(0)
        hits |= (windows == crop.flip(-1)[:, None, None]).flatten(3).all(-1).all(0)
        assert hits.any()


def test_sample_items_and_crops(sample32):
    for ds in (sample32.train, sample32.val):
        for i in (0, len(ds) // 2, len(ds) - 1):
            x, label = ds[i]
            assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and label == 0
    train = sample32.train
    assert torch.equal(train[(5, 111)][0], train[(5, 111)][0])
    assert not torch.equal(train[(5, 111)][0], train[(5, 222)][0])
    assert torch.equal(sample32.val[3][0], sample32.val[(3, 999)][0])   # validation ignores augmentation seeds
    assert 0.0 < sample32.variance < 0.25


# ---------------------------------------------------------------------------------------------------------------
# Food101, on disk exactly as torchvision.datasets.Food101 reads it


def make_food101(root: Path) -> dict:
    base = root / "food-101"
    colors = {"tacos": (0, 0, 255), "apple_pie": (255, 0, 0)}
    train_ids = {"tacos": ["tacos/101", "tacos/102"], "apple_pie": ["apple_pie/1", "apple_pie/2"]}
    test_ids = {"tacos": ["tacos/103"], "apple_pie": ["apple_pie/3"]}
    for ids in (train_ids, test_ids):
        for cls, rels in ids.items():
            for rel in rels:
                solid(base / "images" / f"{rel}.jpg", colors[cls], (24, 20), quality=100)
    (base / "meta").mkdir(parents=True)
    (base / "meta" / "train.json").write_text(json.dumps(train_ids))   # tacos first: not in sorted order
    (base / "meta" / "test.json").write_text(json.dumps(test_ids))
    (base / "meta" / "classes.txt").write_text("apple_pie\ntacos\n")
    return colors


def test_food101_fixture(tmp_path):
    make_food101(tmp_path)
    data = build_data("food101", 16, root=str(tmp_path), num_workers=0)
    assert data.classes == ["apple_pie", "tacos"]
    assert len(data.train) == 4 and len(data.val) == 2
    for ds, n in ((data.train, 4), (data.val, 2)):
        labels = []
        for x, label in all_items(ds):
            assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
            labels.append(label)
            red, blue = x[0].float().mean(), x[2].float().mean()
            assert (red > 240 and blue < 15) if label == 0 else (blue > 240 and red < 15)
        assert sorted(labels) == [0] * (n // 2) + [1] * (n // 2)


def test_food101_missing_says_download(tmp_path):
    with pytest.raises(DataError, match="--download") as info:
        build_data("food101", 16, root=str(tmp_path), download=False)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10, on disk exactly as torchvision.datasets.CIFAR10 reads it


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar10(root: Path) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """Five training batches of 2 images and a test batch of 3, pickled as torchvision unpickles them: a dict
    with 'data' uint8 (N, 3072) (the red, green, blue 32 x 32 planes in turn) and 'labels'. The real files are
    Python 2 pickles whose str keys load as str under encoding='latin1', so the keys here are str too."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
    train_x[3, 1, 5, 7] = 201                        # a known pixel: image 3, green, row 5, column 7
    train_x[4] = 123                                 # a uniform image survives resizing unchanged
    train_y = [i % 10 for i in range(10)]
    test_x = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    test_y = [9, 0, 4]
    for b in range(5):
        entry = {"batch_label": f"training batch {b + 1} of 5", "labels": train_y[2 * b:2 * b + 2],
                 "data": train_x[2 * b:2 * b + 2].reshape(2, 3072), "filenames": ["x.png", "y.png"]}
        (base / f"data_batch_{b + 1}").write_bytes(pickle.dumps(entry))
    entry = {"batch_label": "testing batch 1 of 1", "labels": test_y, "data": test_x.reshape(3, 3072),
             "filenames": ["a.png", "b.png", "c.png"]}
    (base / "test_batch").write_bytes(pickle.dumps(entry))
    meta = {"num_cases_per_batch": 10000, "label_names": CIFAR_CLASSES, "num_vis": 3072}
    (base / "batches.meta").write_bytes(pickle.dumps(meta))
    return train_x, train_y, test_x, test_y


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    # torchvision checks the md5 of every batch file (in CIFAR10._check_integrity) and of batches.meta (in
    # _load_meta), and a fixture cannot reproduce the real files' sums. Both call cifar.check_integrity, so
    # accept any file that exists: missing files are still reported as missing.
    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())
    return tmp_path, make_cifar10(tmp_path)


def test_cifar10_fixture_round_trips(cifar_root):
    root, (train_x, train_y, test_x, test_y) = cifar_root
    data = build_data("cifar10", 32, root=str(root), num_workers=0)
    assert data.classes == CIFAR_CLASSES
    assert len(data.train) == 10 and len(data.val) == 3
    assert isinstance(data.train, CachedImages)
    assert torch.equal(data.train.images, torch.from_numpy(train_x))
    assert torch.equal(data.val.images, torch.from_numpy(test_x))
    x, label = data.train[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and x[1, 5, 7].item() == 201 and label == 3
    assert [data.train[i][1] for i in range(10)] == train_y
    assert [data.val[i][1] for i in range(3)] == test_y
    assert torch.equal(data.val[1][0], torch.from_numpy(test_x[1]))


def test_cifar10_resized(cifar_root):
    root, _ = cifar_root
    data = build_data("cifar10", 16, root=str(root), num_workers=0)
    assert data.train.images.shape == (10, 3, 16, 16) and data.val.images.shape == (3, 3, 16, 16)
    assert data.train.images.dtype == torch.uint8
    assert data.train[0][0].shape == (3, 16, 16)
    assert torch.equal(data.train.images[4], torch.full((3, 16, 16), 123, dtype=torch.uint8))


def test_cifar10_missing_says_download(tmp_path):
    with pytest.raises(DataError, match="--download") as info:
        build_data("cifar10", 32, root=str(tmp_path), download=False)
    assert "\n" not in str(info.value)
