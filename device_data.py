"""Training batches drawn on the GPU: a prepared (or in-memory) training split copied to the device once, each
step's images gathered by index and flipped there.

A step's batch is the one `image_data.batches` gives for the same (seed, step, rank): the indices and flip bits come
from the same `StepBatchSampler` and augmentation seeds, computed on the host (a few hundred bytes a step); the
images never cross from the host again after the copy, which holds one chunk of the split at a time in host memory.
train.py uses it on CUDA when the split fits in `--device-data` of the GPU's free memory (`fits_on_device`; when
it does not, one line says so and the batches come from the host).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from image_data import CachedImages, MappedImages, StepBatchSampler, mirrored
from prepared import read_rows


def flip_bits(seeds: Sequence[int]) -> Tensor:
    """(B,) bool: whether `flip` mirrors the item with each augmentation seed (the same draw, without the image)."""
    return torch.tensor([mirrored(s) for s in seeds], dtype=torch.bool)


def split_bytes(dataset: Dataset) -> int | None:
    """The bytes of a split's images in memory or in its prepared array (None for other kinds of split)."""
    if isinstance(dataset, (CachedImages, MappedImages)):
        return int(np.prod(dataset.images.shape))
    return None


def fits_on_device(dataset: Dataset, device: torch.device, share: float) -> bool:
    """Whether the training split goes to the GPU once: on CUDA, when its images take at most `share` of the
    device's free memory. A split that does not fit is read from the host instead, and one line says so."""
    size = split_bytes(dataset)
    if device.type != "cuda" or share <= 0 or size is None:
        return False
    free = torch.cuda.mem_get_info(device)[0]
    if size <= share * free:
        return True
    print(f"the training split ({size / 2**30:.2f} GiB) is larger than --device-data {share} of the GPU's free "
          f"memory ({free / 2**30:.2f} GiB): reading its batches from the host instead", flush=True)
    return False


def on_device(dataset: CachedImages | MappedImages, device: torch.device,
              chunk_bytes: int = 64 * 2**20) -> tuple[Tensor, Tensor]:
    """The split's images (N, 3, S, S) uint8 and labels (N,) on `device`; a prepared array on disk is copied over
    in chunks of `chunk_bytes` read from the file (`prepared.read_rows`), so host memory holds one chunk at most."""
    if isinstance(dataset, CachedImages):
        return dataset.images.to(device), dataset.labels.to(device)
    shape, offset = dataset.images.shape, dataset.images.offset      # (N, S, S, 3), of the file's memory map
    out = torch.empty(shape, dtype=torch.uint8, device=device)       # channels last, as the file
    step = max(1, chunk_bytes // max(1, int(np.prod(shape[1:]))))
    for start in range(0, shape[0], step):
        rows = read_rows(dataset.path, np.arange(start, min(start + step, shape[0])), offset, shape[1:])
        out[start:start + len(rows)] = torch.from_numpy(rows).to(device)
    return out.permute(0, 3, 1, 2), dataset.labels.to(device)       # (N, S, S, 3) -> (N, 3, S, S) view


def device_batches(dataset: CachedImages | MappedImages, device: torch.device, batch_size: int, seed: int,
                   start_step: int = 0, num_replicas: int = 1, rank: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """The same batches as `batches(dataset, ...)`, from a copy of the split moved to `device` once: each step's
    images are gathered by index and flipped there, so no image crosses from the host after the first step.
    Only the indices and flip bits of a step (a few hundred bytes) are computed on the host, from (seed, step)."""
    images, labels = on_device(dataset, device)
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, num_replicas, rank)
    pin = device.type == "cuda"
    for batch in sampler:
        index = torch.tensor([i for i, _ in batch])
        flips = flip_bits([s for _, s in batch]) if dataset.augment else torch.zeros(len(batch), dtype=bool)
        if pin:
            index, flips = index.pin_memory(), flips.pin_memory()
        index, flips = index.to(device, non_blocking=True), flips.to(device, non_blocking=True)
        x = images[index]                                           # (B, 3, S, S)
        yield torch.where(flips[:, None, None, None], x.flip(-1), x), labels[index]
