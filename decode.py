"""Decoding one image file: any format and mode PIL reads -> RGB, short side resized, centre-cropped to a square.

- Grayscale, palette and alpha images become RGB (alpha composited on white); 16-bit images are scaled by their
  bit depth; EXIF rotation is applied.
- JPEGs are decoded at a reduced scale by libjpeg when the target is much smaller (PIL's `draft`), so a 512 px
  photo prepared at 64 px costs a fraction of a full decode.
- A file that cannot be decoded is reported once, by name, with `skip_warning` (an ImageSkippedWarning).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor


class ImageSkippedWarning(UserWarning):
    """An image file that could not be decoded was skipped."""


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


def square_array(path: str | Path, size: int) -> np.ndarray:
    """Decode, resize and centre-crop to uint8 (size, size, 3), channels last: the rows of a prepared array. The
    same pixels as `square_image` (which returns them channels first)."""
    x = load_image(path, size)                                             # (3, H, W)
    return center_crop(x, size).permute(1, 2, 0).numpy()                   # (3, S, S) -> (S, S, 3)
