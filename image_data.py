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
- Small datasets are decoded once into a uint8 cache in memory; large ones are decoded by DataLoader workers.
- `StepBatchSampler` makes the batch of step s (and its augmentation) a function of (seed, s) alone, so a run
  resumed at step s sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

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


class ImageSkippedWarning(UserWarning):
    """An image file that could not be decoded was skipped."""


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def check_image_size(image_size: int) -> None:
    if image_size < 4 or image_size % 4:
        raise DataError(f"--image-size must be a positive multiple of 4 (the encoder downsamples by 4), "
                        f"got {image_size}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: EXIF rotation applied, transparency (an alpha channel, or a PNG's transparent colour)
    composited on white, 16-bit images scaled by their bit depth (65535 -> 255), float images read as [0, 1]."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            a = a * 255.0 if a.max() <= 1.0 else a
        elif img.mode != "I" or a.max() > 255:   # 16-bit data ("I" holds 8-bit values for some files)
            a = a / 257.0
        img = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), mode="L")
    if "transparency" in img.info and img.mode in ("P", "L", "LA", "RGB"):
        img = img.convert("RGBA")
    elif img.mode == "P":
        img = img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def resize_short_side(img: Image.Image, short: int) -> Image.Image:
    w, h = img.size
    scale = short / min(w, h)
    size = (max(short, round(w * scale)), max(short, round(h * scale)))
    return img.resize(size, Image.BICUBIC, reducing_gap=3.0) if size != (w, h) else img


def center_crop(x: Tensor, size: int) -> Tensor:
    """(3, H, W) -> (3, size, size) from the centre."""
    top, left = (x.shape[1] - size) // 2, (x.shape[2] - size) // 2
    return x[:, top:top + size, left:left + size]


def pil_to_tensor(img: Image.Image) -> Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()   # (H, W, 3) -> (3, H, W)


def load_image(path: str | Path, short_side: int) -> Tensor:
    """Decode an image file to uint8 (3, H, W) RGB with its short side resized to `short_side`.

    Raises OSError (or another PIL error) if the file cannot be decoded."""
    with Image.open(path) as img:
        if img.format == "JPEG":                 # let libjpeg decode at a reduced scale when it can
            w, h = img.size
            ratio = short_side / min(w, h)
            img.draft("RGB", (max(1, math.ceil(w * ratio)), max(1, math.ceil(h * ratio))))
        img.load()
        return pil_to_tensor(resize_short_side(to_rgb(img), short_side))


def square_image(path: str | Path, size: int) -> Tensor:
    """Decode, resize and centre-crop to uint8 (3, size, size)."""
    return center_crop(load_image(path, size), size)


def skip_warning(path: str | Path, err: BaseException) -> None:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    warnings.warn(f"skipping {path}: cannot decode it as an image ({reason})", ImageSkippedWarning, stacklevel=2)


# ---------------------------------------------------------------------------------------------------------------
# Datasets. Every item is (uint8 image (3, S, S), int label). A key is either an index (no augmentation) or an
# (index, augmentation seed) pair from StepBatchSampler (random flip, random crop for the sample photos).


def _split_key(key) -> tuple[int, int | None]:
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)


def flip(x: Tensor, seed: int | None) -> Tensor:
    if seed is None:
        return x
    return x.flip(-1) if torch.randint(2, (1,), generator=torch.Generator().manual_seed(seed)).item() else x


class CachedImages(Dataset):
    """Images already decoded into memory: uint8 (N, 3, S, S) and int64 labels (N,)."""

    def __init__(self, images: Tensor, labels: Tensor, augment: bool):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        i, seed = _split_key(key)
        return flip(self.images[i], seed if self.augment else None), int(self.labels[i])


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

    def batch_for_step(self, step: int) -> list[tuple[int, int]]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
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
    """train/val: datasets of (uint8 (3, S, S), label); variance: pixel variance of the training images in [0, 1]
    (the normaliser of the reconstruction loss); classes: label names (empty when there are none)."""

    train: Dataset
    val: Dataset
    classes: list[str]
    variance: float
    description: str


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


def decode_all(dataset: DecodedImages, num_workers: int, desc: str) -> CachedImages:
    """Decode every image once into memory, dropping (with a warning) the ones that cannot be decoded."""
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=64, num_workers=num_workers, collate_fn=collate)
    images, labels = [], []
    # the bar is updated by hand: tqdm.auto's asyncio class would open a second iterator (and decode twice)
    with tqdm(total=len(loader), desc=desc, leave=False, disable=len(dataset) < 2000) as bar:
        for x, y in loader:
            if len(x):
                images.append(x)
                labels.append(y)
            bar.update(1)
    if not images:
        raise DataError(f"none of the {len(dataset)} images for {desc} could be decoded: check the files")
    return CachedImages(torch.cat(images), torch.cat(labels), dataset.augment)


def pixel_variance(dataset: Dataset, max_items: int = 2000) -> float:
    """Variance of all pixel values (scaled to [0, 1]) over the dataset, or an evenly spaced subset of it."""
    if isinstance(dataset, CachedImages):
        x = dataset.images[:: max(1, len(dataset) // 20000)]
    elif isinstance(dataset, PhotoCrops):
        return float(torch.cat([p.flatten() for p in dataset.photos]).float().div(255).var())
    else:
        step = max(1, len(dataset) // max_items)
        items = [dataset[i] for i in range(0, len(dataset), step)]
        x = torch.stack([it[0] for it in items if it is not None])
    return float(x.float().div(255).var())


def _cache_or_lazy(dataset: DecodedImages, image_size: int, cache_limit_mb: int, num_workers: int,
                   desc: str) -> Dataset:
    if len(dataset) * 3 * image_size**2 <= cache_limit_mb * 2**20:
        return decode_all(dataset, num_workers, desc)
    return dataset


def build_data(data: str = "sample", image_size: int = 64, root: str = "data", download: bool = False,
               val_fraction: float = 0.1, cache_limit_mb: int = 1024, num_workers: int = 2) -> DataSplits:
    """The train and validation splits of `data` (a folder, or `sample`, `food101`, `cifar10`)."""
    check_image_size(image_size)
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    name = str(data).lower()
    if name == "sample":
        return _sample(image_size)
    if name in ("food101", "cifar10"):
        return _torchvision(name, image_size, root, download, cache_limit_mb, num_workers)
    folder = Path(data).expanduser()
    train_paths, val_paths, train_base, val_base = split_folder(folder, val_fraction)
    train_labels, classes = folder_labels(train_paths, train_base)
    val_labels, _ = folder_labels(val_paths, val_base, classes)

    def dataset(paths: list[Path], labels: list[int], augment: bool) -> DecodedImages:
        return DecodedImages(lambda i: square_image(paths[i], image_size), labels, [str(p) for p in paths], augment)

    train = _cache_or_lazy(dataset(train_paths, train_labels, True), image_size, cache_limit_mb, num_workers,
                           "decoding training images")
    val = _cache_or_lazy(dataset(val_paths, val_labels, False), image_size, cache_limit_mb, num_workers,
                         "decoding validation images")
    return DataSplits(train, val, classes, pixel_variance(train),
                      f"{folder}: {len(train)} training and {len(val)} validation images")


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
    return DataSplits(train, val, [], pixel_variance(train),
                      f"sample: {len(train_paths)} training photos ({len(train)} crops an epoch); validation: "
                      f"{len(val_paths)} unseen photos ({num_unseen} crops) and {len(strips)} held-out strips "
                      f"({len(val) - num_unseen} crops)")


def sample_unseen_photos(val: PhotoCrops) -> PhotoCrops:
    """The part of the sample's validation split that comes from the SAMPLE_VAL photos (see `_sample`)."""
    return PhotoCrops(val.photos[:len(SAMPLE_VAL)], val.size, False)


def _torchvision(name: str, image_size: int, root: str, download: bool, cache_limit_mb: int,
                 num_workers: int) -> DataSplits:
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

    splits = []
    for train in (True, False):
        ds = make(train)
        if name == "cifar10":   # already in memory as (N, 32, 32, 3) uint8
            x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()   # (N, H, W, 3) -> (N, 3, H, W)
            if image_size != x.shape[-1]:
                x = torch.nn.functional.interpolate(x.float(), size=(image_size, image_size), mode="bicubic",
                                                    antialias=True, align_corners=False)
                x = x.round().clamp(0, 255).to(torch.uint8)
            splits.append(CachedImages(x, torch.tensor(ds.targets), augment=train))
        else:
            files, labels = [str(f) for f in ds._image_files], list(ds._labels)
            lazy = DecodedImages(lambda i, files=files: square_image(files[i], image_size), labels, files, train)
            splits.append(_cache_or_lazy(lazy, image_size, cache_limit_mb, num_workers,
                                         f"decoding {pretty} {'train' if train else 'test'}"))
    classes = list(getattr(make(False), "classes", []))
    return DataSplits(splits[0], splits[1], classes, pixel_variance(splits[0]),
                      f"{pretty}: {len(splits[0])} training and {len(splits[1])} validation images")


def batches(dataset: Dataset, batch_size: int, seed: int, start_step: int = 0, num_workers: int = 0,
            pin_memory: bool = False, num_replicas: int = 1, rank: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless training batches (uint8 (B, 3, S, S), labels (B,)), starting at `start_step`."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, num_replicas, rank)
    workers = 0 if isinstance(dataset, (CachedImages, PhotoCrops)) else num_workers
    # the loader's own generator: creating its iterator must not draw from the global RNG (exact resume)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                        pin_memory=pin_memory, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    return iter(loader)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """The whole split once, in order, without augmentation."""
    workers = 0 if isinstance(dataset, (CachedImages, PhotoCrops)) else num_workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))
