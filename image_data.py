"""Image data for the VQ-VAE: a folder of your own photos, the built-in sample, Food101 or CIFAR-10.

`build_data(data, image_size, ...)` returns the train and validation splits as datasets of
(uint8 image (3, S, S), label) items. `data` is a folder (searched recursively), or one of the names
`sample` (real photos bundled with scikit-image, so it works offline), `food101`, `cifar10` (torchvision's
classes, stored under `root`, downloaded only when asked).

- Every split is deterministic: a folder with `train/` and `val/` (or `valid/`, `validation/`, `test/`)
  sub-folders uses them; any other folder sends an image to validation when a hash of its relative path says
  so, so the split does not depend on the order files are listed in, nor move when files are added. Food101
  and CIFAR-10 use their official train/test splits; the sample holds out 4 whole photos and a strip of every
  training photo.
- Grayscale, palette and alpha images become RGB (alpha composited on white); EXIF rotation is applied; every
  image is resized (short side to S) and centre-cropped to S x S. Training adds random horizontal flips.
- A file that cannot be decoded is skipped with a warning that names it. A missing or empty folder, a missing
  dataset, or an image size the model cannot downsample by 4 raises `DataError`, whose message is one line that
  says what to do.
- Folders, Food101 and CIFAR-10 are decoded once into a prepared uint8 array per split (prepared.py). A split that
  fits `cache_limit_mb` (and half the memory available) is read into memory; a larger one stays on disk and is
  read a batch at a time by DataLoader workers. The sample's few photos are held in memory.
- `DataSplits.variance`, the training pixels' variance, is computed on first use, in bounded memory: a resumed
  run, evaluate.py and extract_codes.py never compute it (the checkpoint holds the run's).
- `StepBatchSampler` makes the batch of step s (and its augmentation) a function of (seed, s) alone, so a run
  resumed at step s sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from decode import ImageSkippedWarning, load_image, skip_warning, square_image  # noqa: F401
from prepared import (ResizedArray, SquareArrays, as_tensor_images, file_stamps, fits_in_memory, load_or_prepare,
                      prepared_folder, read_rows)
from runs import DataError   # raised here for every problem with the user's data (a one-line message)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BUILTIN = ("sample", "food101", "cifar10")
VAL_DIRS = ("val", "valid", "validation", "test")

# Real photographs shipped inside scikit-image (skimage/data). The stereo pair motorcycle_left/right stays on
# one side of the split so that validation never sees a near-copy of a training photo.
SAMPLE_TRAIN = ("brick.png", "cell.png", "clock_motion.png", "coins.png", "grass.png", "gravel.png",
                "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "motorcycle_right.png",
                "page.png", "retina.jpg", "rocket.jpg", "text.png")
SAMPLE_VAL = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png")
SAMPLE_SCALE = 4   # sample photos are kept with their short side at (at most) 4 x image_size; crops are S x S


def check_image_size(image_size: int) -> None:
    if image_size < 4 or image_size % 4:
        raise DataError(f"--image-size must be a positive multiple of 4 (the encoder downsamples by 4), "
                        f"got {image_size}")


# ---------------------------------------------------------------------------------------------------------------
# Datasets. Every item is (uint8 image (3, S, S), int label). A key is either an index (no augmentation) or an
# (index, augmentation seed) pair from StepBatchSampler (random flip, random crop for the sample photos).


def _split_key(key) -> tuple[int, int | None]:
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)


def mirrored(seed: int) -> bool:
    """Whether the item with this augmentation seed is flipped left-right (a fair coin drawn from the seed)."""
    return bool(torch.randint(2, (1,), generator=torch.Generator().manual_seed(seed)).item())


def flip(x: Tensor, seed: int | None) -> Tensor:
    return x.flip(-1) if seed is not None and mirrored(seed) else x


class CachedImages(Dataset):
    """Images already decoded into memory: uint8 (N, 3, S, S) and int64 labels (N,)."""

    def __init__(self, images: Tensor, labels: Tensor, augment: bool):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        i, seed = _split_key(key)
        return flip(self.images[i], seed if self.augment else None), int(self.labels[i])


class MappedImages(Dataset):
    """A prepared split too large for memory: uint8 (N, S, S, 3) rows of a .npy file, a whole batch read at once
    (`__getitems__`) with file reads (`prepared.read_rows`) by each process (each DataLoader worker) for itself;
    `images` is its memory map (for the shape and where the rows start; nothing is read through it)."""

    def __init__(self, path: str | Path, labels: Tensor, augment: bool):
        self.path, self.labels, self.augment = str(path), labels, augment
        self._images: np.ndarray | None = None

    def __getstate__(self):   # a worker gets the path, not the parent's map
        return {**self.__dict__, "_images": None}

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        return self._images

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list:
        split = [_split_key(k) for k in keys]
        index = np.array([i for i, _ in split], dtype=np.int64)
        order = np.argsort(index, kind="stable")
        rows = torch.from_numpy(read_rows(self.path, index[order], self.images.offset, self.images.shape[1:]))
        # (B, S, S, 3), read in file order -> back in the keys' order, (B, 3, S, S)
        rows = rows[torch.from_numpy(np.argsort(order))].permute(0, 3, 1, 2)
        return [(flip(rows[j], seed if self.augment else None), int(self.labels[i]))
                for j, (i, seed) in enumerate(split)]


class DecodedImages(Dataset):
    """Images decoded on access by `load(i) -> uint8 (3, S, S)`; a failure gives None and a warning."""

    def __init__(self, load: Callable[[int], Tensor], labels: Sequence[int], names: Sequence[str], augment: bool):
        self.load, self.labels, self.names, self.augment = load, list(labels), list(names), augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        i, seed = _split_key(key)
        try:
            x = self.load(i)
        except Exception as err:   # any decoder error: PIL raises OSError, ValueError, SyntaxError, ...
            skip_warning(self.names[i], err)
            return None
        return flip(x, seed if self.augment else None), self.labels[i]


class PhotoCrops(Dataset):
    """S x S crops of a few large photos (the built-in sample).

    Validation: a fixed grid of non-overlapping crops. Training: as many items per epoch as the grid has, each a
    random crop (and flip) of a photo, photos drawn in proportion to their area.
    """

    def __init__(self, photos: list[Tensor], size: int, augment: bool):
        self.photos, self.size, self.augment = photos, size, augment
        self.items: list[tuple[int, int, int]] = []   # (photo, top, left) of the grid crops
        for p, x in enumerate(photos):
            rows, cols = x.shape[1] // size, x.shape[2] // size
            top0, left0 = (x.shape[1] - rows * size) // 2, (x.shape[2] - cols * size) // 2
            self.items += [(p, top0 + r * size, left0 + c * size) for r in range(rows) for c in range(cols)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        i, seed = _split_key(key)
        p, top, left = self.items[i]
        photo = self.photos[p]
        if self.augment and seed is not None:
            g = torch.Generator().manual_seed(seed)
            top = int(torch.randint(photo.shape[1] - self.size + 1, (1,), generator=g))
            left = int(torch.randint(photo.shape[2] - self.size + 1, (1,), generator=g))
        crop = photo[:, top:top + self.size, left:left + self.size]
        return flip(crop, seed if self.augment else None), 0


def collate(batch: list) -> tuple[Tensor, Tensor]:
    """Stack (image, label) items, dropping the None of images that could not be decoded."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.long)


class StepBatchSampler(Sampler):
    """Yields the batches of steps start_step, start_step+1, ...: each a list of (index, augmentation seed).

    Epoch e is a permutation of the dataset drawn from (seed, e); batches are consecutive slices of it, dropping
    the last incomplete one (unless the dataset is smaller than a batch). The augmentation seed of the j-th item
    of step s is drawn from (seed, s), so batch and augmentation depend on (seed, step) alone.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        self.n, self.batch_size, self.seed, self.start_step = num_items, batch_size, seed, start_step
        self.num_replicas, self.rank = num_replicas, rank
        global_batch = batch_size * num_replicas
        self.steps_per_epoch = max(1, num_items // global_batch)

    def permutation(self, epoch: int) -> Tensor:
        """The order of epoch `epoch`, drawn from (seed, epoch); kept for the epoch in progress, so a step costs
        O(batch) rather than a permutation of the whole dataset."""
        if getattr(self, "_epoch", None) != epoch:
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            self._epoch = epoch
        return self._perm

    def batch_for_step(self, step: int) -> list[tuple[int, int]]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        global_batch = self.batch_size * self.num_replicas
        if self.n < global_batch:   # tiny dataset: repeat the permutation to fill the batch
            perm = perm.repeat(math.ceil(global_batch / self.n))
        start = pos * global_batch + self.rank * self.batch_size
        idx = perm[start:start + self.batch_size].tolist()
        g = torch.Generator().manual_seed(self.seed * 7_919 + step * 104_729 + 12_345)
        aug = torch.randint(2**62, (global_batch,), generator=g)[self.rank * self.batch_size:][:len(idx)].tolist()
        return list(zip(idx, aug))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch_for_step(step)
            step += 1


# ---------------------------------------------------------------------------------------------------------------
# Building the splits


@dataclass
class DataSplits:
    """train/val: datasets of (uint8 (3, S, S), label); classes: label names (empty when there are none);
    variance: pixel variance of the training images in [0, 1] (the normaliser of the reconstruction loss),
    computed on first use (`pixel_variance`)."""

    train: Dataset
    val: Dataset
    classes: list[str]
    description: str

    @functools.cached_property
    def variance(self) -> float:
        return pixel_variance(self.train)


def find_images(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (recursively, any letter case of the extension), sorted."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise DataError(f"data folder {folder} does not exist: pass --data with an image folder, "
                        f"or one of {', '.join(BUILTIN)}")
    if not folder.is_dir():
        raise DataError(f"--data {folder} is a file, not a folder: pass the folder that holds your images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not paths:
        raise DataError(f"no images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)} in all "
                        f"sub-folders): put some images there or pass another --data")
    return paths


def is_validation(relative_path: str, val_fraction: float) -> bool:
    """Deterministic, order-independent split: a hash of the relative path decides."""
    h = int.from_bytes(hashlib.sha1(relative_path.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def split_folder(folder: Path, val_fraction: float) -> tuple[list[Path], list[Path], Path, Path]:
    """(train paths, val paths, the folders their labels are relative to)."""
    if not folder.is_dir():
        find_images(folder)   # raises the right message for a missing folder or a file
    subdirs = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    val_dir = next((subdirs[name] for name in VAL_DIRS if name in subdirs), None)
    if "train" in subdirs and val_dir is not None:
        return find_images(subdirs["train"]), find_images(val_dir), subdirs["train"], val_dir
    paths = find_images(folder)
    if len(paths) < 2:
        raise DataError(f"{folder} holds only {len(paths)} image; need at least 2 (one for validation)")
    rel = [p.relative_to(folder).as_posix() for p in paths]
    val = {p for p, r in zip(paths, rel) if is_validation(r, val_fraction)}
    if not val or len(val) == len(paths):   # a tiny folder: send the image with the lowest hash to validation
        val = {min(zip(rel, paths), key=lambda t: hashlib.sha1(t[0].encode("utf-8")).digest())[1]}
    return [p for p in paths if p not in val], [p for p in paths if p in val], folder, folder


def folder_labels(paths: list[Path], base: Path, classes: list[str] | None = None) -> tuple[list[int], list[str]]:
    """Label = the first sub-folder below `base` (sorted); images directly in `base` get label 0, no classes."""
    tops = [p.relative_to(base).parts[0] if len(p.relative_to(base).parts) > 1 else "" for p in paths]
    if classes is None:
        classes = sorted({t for t in tops if t})
    index = {c: i for i, c in enumerate(classes)}
    return [index.get(t, 0) for t in tops], classes


VARIANCE_CHUNK_BYTES = 16 * 2**20   # pixel values `pixel_variance` counts at once (or one image, if larger)


def pixel_variance(dataset: Dataset, max_items: int = 2000) -> float:
    """Unbiased variance of the pixel values (scaled to [0, 1]) of every image of a split in memory (every k-th,
    k = N // 20,000, from 40,000 images), of all the sample's training photos, or of `max_items` evenly spaced
    images of any other split (every k-th, k = N // max_items). They are counted into a histogram of the 256
    values a chunk at a time, so memory does not grow with the split; the variance follows exactly from it."""
    counts = torch.zeros(256, dtype=torch.int64)
    if isinstance(dataset, (CachedImages, MappedImages)):
        rows = np.arange(0, len(dataset), max(1, len(dataset) // (20000 if isinstance(dataset, CachedImages)
                                                                   else max_items)))
        whole = dataset.images   # (N, 3, S, S) in memory, or the file's (N, S, S, 3) map (for its shape and offset)
        per_chunk = max(1, VARIANCE_CHUNK_BYTES // int(np.prod(whole.shape[1:])))
        chunks = (whole.permute(0, 2, 3, 1)[torch.from_numpy(rows[i:i + per_chunk])]   # its rows in memory order
                  if isinstance(dataset, CachedImages) else
                  torch.from_numpy(read_rows(dataset.path, rows[i:i + per_chunk], whole.offset, whole.shape[1:]))
                  for i in range(0, len(rows), per_chunk))
    elif isinstance(dataset, PhotoCrops):
        chunks = dataset.photos
    else:
        items = (dataset[i] for i in range(0, len(dataset), max(1, len(dataset) // max_items)))
        chunks = (item[0] for item in items if item is not None)
    for x in chunks:   # uint8
        counts += torch.bincount(x.reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * values).sum() / counts.sum()
    return float((counts * (values - mean) ** 2).sum() / (counts.sum() - 1))


def prepared_split(where: Path, split: str, image_size: int, stamps: list, labels: Sequence[int],
                   decode: Callable[[int], np.ndarray], names: Sequence[str], augment: bool, cache_limit_mb: int,
                   num_workers: int, source: str) -> Dataset:
    """A split read from its prepared array (prepared now if needed): read whole into memory when it fits in
    `cache_limit_mb` and in half the memory available, otherwise left on disk and read by DataLoader workers."""
    images, kept = load_or_prepare(where, split, image_size, stamps, labels, decode, names, num_workers, source)
    kept = torch.from_numpy(np.asarray(kept, dtype=np.int64))
    path = where / f"{split}.npy"
    if images.nbytes <= cache_limit_mb * 2**20 and fits_in_memory(images.nbytes, f"the {split} split of {source}"):
        return CachedImages(as_tensor_images(read_rows(path, np.arange(len(images)), images.offset,
                                                       images.shape[1:])), kept, augment)
    return MappedImages(path, kept, augment)


def build_data(data: str = "sample", image_size: int = 64, root: str = "data", download: bool = False,
               val_fraction: float = 0.1, cache_limit_mb: int = 1024, num_workers: int = 2,
               prepared_dir: str = "") -> DataSplits:
    """The train and validation splits of `data` (a folder, or `sample`, `food101`, `cifar10`). Folders, Food101
    and CIFAR-10 are prepared once (see prepared.py) under `prepared_dir` (empty: `<root>/prepared`)."""
    check_image_size(image_size)
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    name = str(data).lower()
    if name == "sample":
        return _sample(image_size)
    prepared_root = Path(prepared_dir).expanduser() if prepared_dir else Path(root).expanduser() / "prepared"
    if name in ("food101", "cifar10"):
        return _torchvision(name, image_size, root, download, cache_limit_mb, num_workers, prepared_root)
    folder = Path(data).expanduser()
    train_paths, val_paths, train_base, val_base = split_folder(folder, val_fraction)
    train_labels, classes = folder_labels(train_paths, train_base)
    val_labels, _ = folder_labels(val_paths, val_base, classes)
    where = prepared_folder(prepared_root, folder.resolve().name, image_size,
                            f"{folder.resolve()}|val_fraction={val_fraction}")
    splits = [prepared_split(where, split, image_size, file_stamps(paths, folder), labels,
                             SquareArrays(paths, image_size), [str(p) for p in paths], split == "train",
                             cache_limit_mb, num_workers, str(folder))
              for split, paths, labels in (("train", train_paths, train_labels), ("val", val_paths, val_labels))]
    return DataSplits(splits[0], splits[1], classes,
                      f"{folder}: {len(splits[0])} training and {len(splits[1])} validation images")


def sample_photo_paths() -> tuple[list[Path], list[Path]]:
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return [folder / f for f in SAMPLE_TRAIN], [folder / f for f in SAMPLE_VAL]


def _sample(image_size: int) -> DataSplits:
    """The built-in sample. Validation = the SAMPLE_VAL photos (unseen content) + the bottom strip, one crop high,
    of every training photo that has at least 3 crops' height (unseen pixels of the training distribution; the
    training crops never reach into it). Both matter: codebook usage on the unseen photos alone measures how well
    codes learned on textures, text and astronomy transfer to portraits, not whether codes are dead."""
    def load(paths: list[Path]) -> list[Tensor]:
        photos = []
        for p in paths:
            with Image.open(p) as img:
                short = max(image_size, min(min(img.size), SAMPLE_SCALE * image_size))
            photos.append(load_image(p, short))
        return photos

    train_paths, val_paths = sample_photo_paths()
    tops, strips = [], []
    for photo in load(train_paths):
        height = photo.shape[1]
        if height >= 3 * image_size:
            tops.append(photo[:, :height - image_size].clone())
            strips.append(photo[:, height - image_size:].clone())
        else:
            tops.append(photo)
    unseen = load(val_paths)
    train, val = PhotoCrops(tops, image_size, True), PhotoCrops(unseen + strips, image_size, False)
    num_unseen = len(sample_unseen_photos(val))
    return DataSplits(train, val, [],
                      f"sample: {len(train_paths)} training photos ({len(train)} crops an epoch); validation: "
                      f"{len(val_paths)} unseen photos ({num_unseen} crops) and {len(strips)} held-out strips "
                      f"({len(val) - num_unseen} crops)")


def sample_unseen_photos(val: PhotoCrops) -> PhotoCrops:
    """The part of the sample's validation split that comes from the SAMPLE_VAL photos (see `_sample`)."""
    return PhotoCrops(val.photos[:len(SAMPLE_VAL)], val.size, False)


def sample_validation_parts(val: Dataset) -> dict[str, PhotoCrops]:
    """The sample's validation split in its two parts, {"unseen": the 4 unseen photos, "strips": the held-out
    strips of the training photos}; empty for any other data."""
    if not isinstance(val, PhotoCrops) or len(val.photos) <= len(SAMPLE_VAL):
        return {}
    return {"unseen": sample_unseen_photos(val),
            "strips": PhotoCrops(val.photos[len(SAMPLE_VAL):], val.size, False)}


def _torchvision(name: str, image_size: int, root: str, download: bool, cache_limit_mb: int,
                 num_workers: int, prepared_root: Path) -> DataSplits:
    import torchvision

    root_path = Path(root).expanduser()
    pretty = {"food101": "Food101", "cifar10": "CIFAR-10"}[name]
    size_note = {"food101": "5 GB", "cifar10": "170 MB"}[name]

    def make(train: bool):
        try:
            if name == "food101":
                return torchvision.datasets.Food101(str(root_path), split="train" if train else "test",
                                                    download=download)
            return torchvision.datasets.CIFAR10(str(root_path), train=train, download=download)
        except RuntimeError as err:
            if "not found" in str(err).lower() or "corrupted" in str(err).lower():
                raise DataError(f"{pretty} not found (or incomplete) under {root_path}: add --download to fetch it "
                                f"({size_note}), or --data-root to point at an existing copy") from None
            raise DataError(f"could not prepare {pretty} under {root_path}: {str(err).splitlines()[0]}") from None
        except OSError as err:   # network errors while downloading, permissions
            raise DataError(f"could not download or read {pretty} under {root_path}: {err}") from None

    where = prepared_folder(prepared_root, name, image_size, str(root_path.resolve()))
    splits = []
    for train in (True, False):
        ds = make(train)
        split = "train" if train else "val"
        if name == "cifar10":   # already in memory as (N, 32, 32, 3) uint8; the key stamps its batch files
            base = root_path / ds.base_folder
            files = [base / f for f, _ in (ds.train_list if train else ds.test_list)]
            names = [f"{pretty} {split} image {i}" for i in range(len(ds.data))]
            splits.append(prepared_split(where, split, image_size, file_stamps(files, root_path), ds.targets,
                                         ResizedArray(ds.data, image_size), names, train, cache_limit_mb,
                                         num_workers, pretty))
        else:
            files = [Path(f) for f in ds._image_files]
            splits.append(prepared_split(where, split, image_size, file_stamps(files, root_path), list(ds._labels),
                                         SquareArrays(files, image_size), [str(f) for f in files], train,
                                         cache_limit_mb, num_workers, pretty))
    classes = list(getattr(ds, "classes", []))   # ds: the test split, the last one made
    return DataSplits(splits[0], splits[1], classes,
                      f"{pretty}: {len(splits[0])} training and {len(splits[1])} validation images")


PREFETCH_FACTOR = 4   # batches each DataLoader worker reads ahead


def batches(dataset: Dataset, batch_size: int, seed: int, start_step: int = 0, num_workers: int = 0,
            pin_memory: bool = False, num_replicas: int = 1, rank: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless training batches (uint8 (B, 3, S, S), labels (B,)), starting at `start_step`. Data in memory is
    batched in this process; a memory-mapped or decoded-on-access split by `num_workers` persistent workers, each
    reading PREFETCH_FACTOR batches ahead, into pinned memory when `pin_memory`."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, num_replicas, rank)
    workers = 0 if isinstance(dataset, (CachedImages, PhotoCrops)) else num_workers
    # the loader's own generator: creating its iterator must not draw from the global RNG (exact resume)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                        pin_memory=pin_memory, persistent_workers=workers > 0,
                        prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
                        generator=torch.Generator().manual_seed(seed))
    return iter(loader)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """The whole split once, in order, without augmentation."""
    workers = 0 if isinstance(dataset, (CachedImages, PhotoCrops)) else num_workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
                      generator=torch.Generator().manual_seed(0))


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))
