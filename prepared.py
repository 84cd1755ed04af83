"""Prepared data: every image of a split decoded once into one uint8 array, which every later run reads directly.

The first run over a folder, Food101 or CIFAR-10 at an image size S decodes each image once (in parallel over the
CPU cores, with a progress bar and an images/s figure) into a folder of `--prepared-dir` (by default
`<data-root>/prepared`, so a read-only dataset folder works), named after the data, S and a hash of where the data
is:

- `train.npy`, `val.npy`: uint8 (N, S, S, 3), channels last, one row per image that could be decoded; read with
  `np.load(mmap_mode="r")`;
- `train-labels.npy`, `val-labels.npy`: int64 (N,);
- `train.json`, `val.json`: the key of the split: a format version, the split, S, every source file with its size
  and modification time, the files that could not be decoded, the array's size in bytes and a checksum of its
  header and of 64 evenly spaced samples of its contents.

A split is used only when its key matches the files as they are now (a photo added, removed or changed, or another
S prepares it again) and its array passes the size, header and checksum checks (a truncated or corrupt array is
named in a warning and prepared again). Every file is written under a temporary name and renamed into place, the
key last, and an old key is removed before its split is rebuilt: a run killed while preparing leaves nothing that
a later run trusts. Space for the array is reserved before decoding starts, so a full disk is one clear error,
not a crash half-way.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from decode import skip_warning, square_array
from runs import DataError, atomic_write

FORMAT = 1
CHECKSUM_SAMPLES, CHECKSUM_BYTES = 64, 4096


def prepared_folder(prepared_dir: str | Path, name: str, image_size: int, origin: str) -> Path:
    """Where the prepared splits of `name` at `image_size` live; `origin` (the data's absolute path, or the
    dataset's root) keeps two folders of the same name apart."""
    digest = hashlib.sha1(origin.encode("utf-8")).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "data"
    return Path(prepared_dir).expanduser() / f"{safe}-{image_size}px-{digest}"


def file_stamps(paths: Sequence[Path], base: Path) -> list[list]:
    """[relative path, size, modification time in ns] of every file: what the key compares."""
    stamps = []
    for p in paths:
        st = p.stat()
        stamps.append([p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p), st.st_size,
                       st.st_mtime_ns])
    return stamps


def checksum(path: Path) -> str:
    """sha1 of the file's first and last CHECKSUM_BYTES and of CHECKSUM_SAMPLES evenly spaced blocks between: cheap
    for a file of any size (a few hundred KB read), and it changes when the file is truncated, zeroed or
    overwritten anywhere it samples."""
    size = path.stat().st_size
    h = hashlib.sha1(str(size).encode())
    offsets = sorted({0, max(0, size - CHECKSUM_BYTES)} |
                     {size * i // (CHECKSUM_SAMPLES + 1) for i in range(1, CHECKSUM_SAMPLES + 1)})
    with open(path, "rb") as f:
        for offset in offsets:
            f.seek(offset)
            h.update(f.read(CHECKSUM_BYTES))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# The decoders of the sources: decode(i) -> image i as (S, S, 3) uint8. Classes, not closures, so that DataLoader
# workers started by spawn can receive them.


class SquareArrays:
    """decode(i) for preparing a folder: file i decoded, resized and centre-cropped to (S, S, 3) uint8."""

    def __init__(self, paths: Sequence[str | Path], size: int):
        self.paths, self.size = list(paths), size

    def __call__(self, i: int) -> np.ndarray:
        return square_array(self.paths[i], self.size)


class ResizedArray:
    """decode(i) for preparing CIFAR-10: row i of its (N, 32, 32, 3) array, resized (bicubic, antialiased) to S."""

    def __init__(self, data: np.ndarray, size: int):
        self.data, self.size = data, size

    def __call__(self, i: int) -> np.ndarray:
        if self.data.shape[1] == self.size:
            return self.data[i]
        x = torch.from_numpy(self.data[i]).permute(2, 0, 1)[None].float()              # (1, 3, 32, 32)
        x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True,
                                            align_corners=False)
        return x.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()      # (S, S, 3)


# ---------------------------------------------------------------------------------------------------------------


def _read_key(path: Path) -> dict | None:
    try:
        key = json.loads(path.read_text())
        return key if isinstance(key, dict) else None
    except (OSError, ValueError):
        return None


def _open_checked(folder: Path, split: str, key: dict, image_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The split's array (memory-mapped) and labels, or None when anything about them is off."""
    path, labels_path = folder / f"{split}.npy", folder / f"{split}-labels.npy"
    try:
        if path.stat().st_size != key["bytes"] or checksum(path) != key["checksum"]:
            return None
        images = np.load(path, mmap_mode="r")
        labels = np.load(labels_path)
    except (OSError, ValueError, KeyError, EOFError):
        return None
    if images.dtype != np.uint8 or images.shape != (key["count"], image_size, image_size, 3) or \
            labels.shape != (key["count"],):
        return None
    return images, labels


def _change_summary(old: list, new: list) -> str:
    before, after = {f[0]: f[1:] for f in old}, {f[0]: f[1:] for f in new}
    added, removed = len(after.keys() - before.keys()), len(before.keys() - after.keys())
    changed = sum(before[k] != after[k] for k in before.keys() & after.keys())
    return f"{added} added, {removed} removed, {changed} changed"


def load_or_prepare(folder: Path, split: str, image_size: int, stamps: list[list], labels: Sequence[int],
                    decode: Callable[[int], np.ndarray], names: Sequence[str], num_workers: int,
                    source: str) -> tuple[np.ndarray, np.ndarray]:
    """The prepared split (images (N, S, S, 3) uint8, memory-mapped; labels (N,) int64), prepared now if it is
    missing, out of date, truncated or corrupt. `decode(i)` gives image i as (S, S, 3) uint8 (raising if the file
    cannot be decoded), `names[i]` names it in warnings, `stamps` is what the key records of the sources."""
    key_path = folder / f"{split}.json"
    key = _read_key(key_path)
    if key is not None and key.get("format") == FORMAT and key.get("split") == split and \
            key.get("image_size") == image_size and key.get("files") == stamps:
        opened = _open_checked(folder, split, key, image_size)
        if opened is not None:
            return opened
        warnings.warn(f"{folder / f'{split}.npy'} is truncated or corrupt: preparing the {split} split again",
                      stacklevel=2)
    elif key is not None and key.get("image_size") == image_size and isinstance(key.get("files"), list):
        warnings.warn(f"{source} changed since its {split} split was prepared "
                      f"({_change_summary(key['files'], stamps)}): preparing it again", stacklevel=2)
    elif key is None and key_path.exists():
        warnings.warn(f"{key_path} is unreadable: preparing the {split} split again", stacklevel=2)
    return prepare(folder, split, image_size, stamps, labels, decode, names, num_workers, source)


class _Decode(Dataset):
    """Item i -> (i, image (S, S, 3) uint8 or None, the error message or None), decoded in a worker."""

    def __init__(self, decode: Callable[[int], np.ndarray], count: int):
        self.decode, self.count = decode, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        try:
            return i, np.ascontiguousarray(self.decode(i)), None
        except Exception as err:   # any decoder error: PIL raises OSError, ValueError, SyntaxError, ...
            return i, None, str(err).splitlines()[0] if str(err) else type(err).__name__


def _new_array(path: Path, count: int, image_size: int) -> np.memmap:
    """A .npy file for uint8 (count, S, S, 3) with its space reserved on disk first (ENOSPC now, not SIGBUS
    later), mapped for writing."""
    shape = (count, image_size, image_size, 3)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        offset = f.tell()
        if hasattr(os, "posix_fallocate") and count:
            os.posix_fallocate(f.fileno(), 0, offset + int(np.prod(shape)))
        else:
            f.truncate(offset + int(np.prod(shape)))
    return np.memmap(path, dtype=np.uint8, mode="r+", offset=offset, shape=shape) if count else np.empty(shape,
                                                                                                           np.uint8)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def prepare(folder: Path, split: str, image_size: int, stamps: list[list], labels: Sequence[int],
            decode: Callable[[int], np.ndarray], names: Sequence[str], num_workers: int,
            source: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image of the split once into `folder` (see the module docstring); returns what
    `load_or_prepare` returns."""
    from tqdm.auto import tqdm

    count = len(names)
    need = count * image_size * image_size * 3
    tmp = folder / f".{split}.npy.tmp-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{split}.json").unlink(missing_ok=True)     # nothing trusts this split until it is rebuilt
        array = _new_array(tmp, count, image_size)
        ok = np.zeros(count, dtype=bool)
        failures: dict[int, str] = {}
        # its own generator: preparing must not draw from the global random stream (a run that prepares its
        # data would otherwise start from other weights than the same run reading prepared data)
        loader = DataLoader(_Decode(decode, count), batch_size=16, num_workers=num_workers, collate_fn=list,
                            generator=torch.Generator())
        start = time.perf_counter()
        with tqdm(total=count, desc=f"preparing {split} images", unit="img", leave=False,
                  disable=count < 200) as bar:
            for batch in loader:
                for i, image, error in batch:
                    if image is None:
                        failures[i] = error
                    elif image.shape != (image_size, image_size, 3):
                        failures[i] = f"decoded to shape {image.shape}, not {(image_size, image_size, 3)}"
                    else:
                        array[i] = image
                        ok[i] = True
                bar.update(len(batch))
        seconds = time.perf_counter() - start
        for i in sorted(failures):
            skip_warning(names[i], ValueError(failures[i]))
        kept = int(ok.sum())
        if kept == 0:
            raise DataError(f"none of the {count} images of {source} ({split}) could be decoded: check the files")
        if kept < count:   # compact: keep the rows of the images that decoded
            compact_tmp = folder / f".{split}.npy.compact-{os.getpid()}"
            compact = _new_array(compact_tmp, kept, image_size)
            compact[:] = array[ok]
            del array
            compact.flush()
            del compact
            os.replace(compact_tmp, tmp)
        else:
            array.flush()
            del array
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder / f"{split}.npy")
        kept_labels = np.asarray(labels, dtype=np.int64)[ok]
        atomic_write(folder / f"{split}-labels.npy", lambda p: _save_npy(p, kept_labels))
        path = folder / f"{split}.npy"
        key = {"format": FORMAT, "split": split, "image_size": image_size, "source": source, "files": stamps,
               "skipped": [names[i] for i in sorted(failures)], "count": kept, "bytes": path.stat().st_size,
               "checksum": checksum(path)}
        atomic_write(folder / f"{split}.json", lambda p: p.write_text(json.dumps(key)))
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DataError(f"no space left on the disk of {folder} while preparing {source} ({split}; it needs "
                            f"{need / 2**30:.2f} GiB): free some space or pass --prepared-dir on another disk"
                            ) from None
        raise DataError(f"cannot write the prepared data to {folder} ({err.strerror or err}): pass --prepared-dir "
                        f"with a folder you can write to") from None
    finally:
        for leftover in folder.glob(f".{split}.npy.*-{os.getpid()}") if folder.is_dir() else ():
            leftover.unlink(missing_ok=True)
    workers = max(1, num_workers)
    if count >= 200:
        print(f"prepared {source} ({split}): {kept} images of {image_size}x{image_size} in {seconds:.1f} s "
              f"({count / max(seconds, 1e-9):.0f} images/s with {workers} worker(s)) -> {folder}", flush=True)
    return np.load(path, mmap_mode="r"), kept_labels


def read_rows(path: str | Path, rows: np.ndarray, offset: int, row_shape: tuple[int, ...]) -> np.ndarray:
    """Rows `rows` (sorted) of the uint8 array stored from byte `offset` of `path`, as (len(rows), *row_shape),
    read with ordinary file reads, each run of consecutive rows at once. Not through a memory map: its pages would
    count toward the resident memory of the process for as long as the map is open, so a pass over a whole
    prepared split would look like a copy of it held in memory."""
    rows = np.asarray(rows, dtype=np.int64)
    row_bytes = int(np.prod(row_shape))
    out = np.empty((len(rows), *row_shape), dtype=np.uint8)
    flat = memoryview(out.reshape(-1))
    if not len(rows):
        return out
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    with open(path, "rb", buffering=0) as f:
        for start, stop in zip([0, *breaks.tolist()], [*breaks.tolist(), len(rows)]):
            f.seek(offset + int(rows[start]) * row_bytes)
            done, end = start * row_bytes, stop * row_bytes
            while done < end:   # a read may return less than asked (very large reads do)
                got = f.readinto(flat[done:end])
                if not got:
                    raise DataError(f"{path} ended early: delete it, and the run prepares it again")
                done += got
    return out


def available_memory() -> int | None:
    """Bytes of host memory this process can still take: MemAvailable, or less where a cgroup limit leaves less;
    None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        try:
            found.append(int(Path(limit).read_text()) - int(Path(usage).read_text()))
        except (OSError, ValueError):   # absent, or "max" (no limit)
            continue
    return min(found) if found else None


def fits_in_memory(nbytes: int, what: str) -> bool:
    """Whether `nbytes` can be read into memory: at most half the memory available (the rest is the run's); where
    it cannot, one line says that `what` is read from disk instead."""
    free = available_memory()
    if free is None or nbytes <= free / 2:
        return True
    print(f"{what} ({nbytes / 2**30:.2f} GiB) would take more than half the memory available "
          f"({free / 2**30:.2f} GiB): reading it from disk instead", flush=True)
    return False


def as_tensor_images(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> a (N, 3, S, S) view of it (channels-last in memory)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2)
