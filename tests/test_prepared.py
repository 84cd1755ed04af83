"""Prepared data (prepared.py): decoded once, reused while the files are unchanged, rebuilt when they change or the
array is damaged, never trusted half-written; batches drawn on the device equal the host's; bad input ends in one
line."""
import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import device_data
import image_data
import prepared
import train
from image_data import build_data
from test_cli_errors import TINY, assert_clean_error, call_main

ROOT = Path(__file__).resolve().parents[1]


def photos(folder: Path, n: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def images_of(split) -> torch.Tensor:
    return torch.stack([split[i][0] for i in range(len(split))])


def expected_images(paths) -> torch.Tensor:
    return torch.stack([image_data.square_image(p, 16) for p in paths])


def prepared_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "prepared").iterdir() if p.is_dir())


def test_prepared_arrays_hold_every_image_and_a_key(tmp_path):
    data_dir = photos(tmp_path / "photos")
    data = build_data(str(data_dir), 16, root=str(tmp_path / "root"), num_workers=0)
    (where,) = prepared_dirs(tmp_path / "root")
    assert where.name.startswith("photos-16px-")
    key = json.loads((where / "train.json").read_text())
    names = sorted(f[0] for f in key["files"]) + sorted(f[0] for f in json.loads((where / "val.json").read_text())
                                                         ["files"])
    assert sorted(names) == [f"p{i}.png" for i in range(6)]
    assert key["format"] == prepared.FORMAT and key["image_size"] == 16 and key["split"] == "train"
    for f in key["files"]:
        st = (data_dir / f[0]).stat()
        assert f[1:] == [st.st_size, st.st_mtime_ns]
    array = np.load(where / "train.npy", mmap_mode="r")
    assert array.shape == (key["count"], 16, 16, 3) and array.dtype == np.uint8
    train_paths = [data_dir / f[0] for f in key["files"]]
    assert torch.equal(images_of(data.train), expected_images(train_paths))
    assert not list(data_dir.glob("**/*.npy"))          # nothing written into the dataset folder


def test_an_added_removed_or_changed_photo_or_another_size_prepares_again(tmp_path):
    data_dir = photos(tmp_path / "photos", 8)
    root = str(tmp_path / "root")
    build_data(str(data_dir), 16, root=root, num_workers=0)
    photos(tmp_path / "extra", 1, seed=5)
    os.replace(tmp_path / "extra" / "p0.png", data_dir / "new.png")
    with pytest.warns(UserWarning, match="1 added, 0 removed, 0 changed"):
        data = build_data(str(data_dir), 16, root=root, num_workers=0)
    assert len(data.train) + len(data.val) == 9
    (data_dir / "p3.png").unlink()
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(data_dir / "p4.png")
    with pytest.warns(UserWarning, match="changed since"):
        data = build_data(str(data_dir), 16, root=root, num_workers=0)
    everything = torch.cat([images_of(data.train), images_of(data.val)])
    assert len(everything) == 8 and any(bool((x == 0).all()) for x in everything)   # the new p4 is in it
    build_data(str(data_dir), 32, root=root, num_workers=0)
    assert {p.name.split("-")[1] for p in prepared_dirs(tmp_path / "root")} == {"16px", "32px"}


@pytest.mark.parametrize("damage", ["truncate", "zero", "garbage key"])
def test_a_damaged_prepared_split_is_named_and_rebuilt(tmp_path, damage):
    data_dir = photos(tmp_path / "photos", 8)
    root = str(tmp_path / "root")
    first = build_data(str(data_dir), 16, root=root, num_workers=0)
    (where,) = prepared_dirs(tmp_path / "root")
    array = where / "train.npy"
    if damage == "truncate":
        array.write_bytes(array.read_bytes()[:-100])
    elif damage == "zero":
        raw = bytearray(array.read_bytes())
        raw[128:] = bytes(len(raw) - 128)                          # the header kept, every pixel zeroed
        array.write_bytes(bytes(raw))
    else:
        (where / "train.json").write_text("{not json")
    with pytest.warns(UserWarning, match="train") as records:
        again = build_data(str(data_dir), 16, root=root, num_workers=0)
    said = " ".join(str(w.message) for w in records)
    assert ("unreadable" in said) if damage == "garbage key" else ("truncated or corrupt" in said and
                                                                   str(array) in said)
    assert torch.equal(images_of(again.train), images_of(first.train))


class DiesAt:
    """decode(i) that stops the run at item `at` (as Ctrl-C would) after decoding the items before it."""

    def __init__(self, paths, at):
        self.paths, self.at = paths, at

    def __call__(self, i):
        if i == self.at:
            raise KeyboardInterrupt
        return image_data.square_array(self.paths[i], 16)


def test_a_run_killed_while_preparing_leaves_nothing_a_later_run_trusts(tmp_path):
    paths = sorted(photos(tmp_path / "photos", 6).glob("*.png"))
    stamps = prepared.file_stamps(paths, tmp_path / "photos")
    where = tmp_path / "prepared" / "photos"
    args = (where, "train", 16, stamps, [0] * 6)
    with pytest.raises(KeyboardInterrupt):
        prepared.load_or_prepare(*args, DiesAt(paths, 4), [str(p) for p in paths], 0, "photos")
    assert sorted(p.name for p in where.iterdir()) == []            # no array, no key, no temporary file
    images, _ = prepared.load_or_prepare(*args, image_data.SquareArrays(paths, 16), [str(p) for p in paths], 0,
                                         "photos")
    assert torch.equal(prepared.as_tensor_images(np.array(images)), expected_images(paths))


def test_a_full_disk_ends_in_one_clear_error_and_leaves_no_file(tmp_path, monkeypatch):
    data_dir = photos(tmp_path / "photos")

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(image_data.DataError, match="no space left .* pass --prepared-dir on another disk"):
        build_data(str(data_dir), 16, root=str(tmp_path / "root"), num_workers=0)
    leftovers = [p for p in (tmp_path / "root").rglob("*") if p.is_file()]
    assert leftovers == []


def test_an_unwritable_prepared_dir_ends_in_one_line(tmp_path, capsys):
    data_dir = photos(tmp_path / "photos")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc, _, err = call_main(train.main, [*TINY, "--data", str(data_dir), "--prepared-dir", str(blocker / "prepared"),
                                        "--out", str(tmp_path / "run")], capsys)
    assert_clean_error(rc, err, "cannot write the prepared data", "--prepared-dir")


def test_a_read_only_dataset_folder_is_prepared_elsewhere(tmp_path):
    data_dir = photos(tmp_path / "photos")
    before = sorted(p.name for p in data_dir.iterdir())
    data_dir.chmod(0o555)
    try:
        data = build_data(str(data_dir), 16, root=str(tmp_path / "root"), num_workers=0)
    finally:
        data_dir.chmod(0o755)
    assert len(data.train) + len(data.val) == 6 and sorted(p.name for p in data_dir.iterdir()) == before


@pytest.mark.parametrize("cache_limit_mb", [1024, 0])
@pytest.mark.parametrize("world, rank", [(1, 0), (2, 1)])
def test_batches_drawn_on_the_device_equal_the_hosts(tmp_path, cache_limit_mb, world, rank):
    """device_batches (the GPU path, here on the CPU) gives the same images, flips and labels as batches(),
    step by step, for a resumed start and for another rank's shard; in memory and memory-mapped."""
    data = build_data(str(photos(tmp_path / "photos", 12)), 16, root=str(tmp_path / "root"),
                      cache_limit_mb=cache_limit_mb, num_workers=0)
    for start in (0, 5):
        host = image_data.batches(data.train, 4, 3, start, num_workers=0, num_replicas=world, rank=rank)
        device = device_data.device_batches(data.train, torch.device("cpu"), 4, 3, start, world, rank)
        flipped = 0
        for _ in range(6):
            (x, y), (dx, dy) = next(host), next(device)
            assert torch.equal(x, dx) and torch.equal(y, dy)
            flipped += int(sum(not any(torch.equal(img, data.train[i][0]) for i in range(len(data.train)))
                               for img in x))
        assert flipped > 0                                          # augmentation did happen


def test_prepare_data_prepares_without_training_and_train_then_reuses_it(tmp_path):
    data_dir = photos(tmp_path / "photos")
    root = tmp_path / "root"
    r = subprocess.run([sys.executable, "prepare_data.py", "--data", str(data_dir), "--image-size", "16",
                        "--data-root", str(root), "--num-workers", "0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ready in") and "5 training and 1 validation images" in r.stdout
    (where,) = prepared_dirs(root)
    stamp = (where / "train.npy").stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = train.train(train.Config(data=str(data_dir), data_root=str(root), image_size=16, steps=2,
                                          batch_size=4, hidden_channels=8, residual_channels=4,
                                          num_residual_blocks=1, embedding_dim=4, num_embeddings=8, eval_every=2,
                                          out=str(tmp_path / "run"), progress=False, device="cpu",
                                          num_workers=0))
    assert (where / "train.npy").stat().st_mtime_ns == stamp and result.final["num_images"] == 1


def test_prepare_data_bad_input_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "prepare_data.py", "--data", str(tmp_path / "nowhere")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert_clean_error(r.returncode, r.stderr, "does not exist")


def test_preparing_draws_nothing_from_the_global_random_stream(tmp_path):
    """A run that prepares its data starts from the same weights as the same run reading prepared data."""
    data_dir = photos(tmp_path / "photos")
    draws = []
    for _ in range(2):                       # the first call prepares, the second reads
        torch.manual_seed(0)
        build_data(str(data_dir), 16, root=str(tmp_path / "root"), num_workers=0)
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])
