"""Encode a dataset with a trained VQ-VAE (arXiv 1711.00937) into integer code maps for a prior to learn.

    python extract_codes.py --checkpoint runs/sample/checkpoint.pt --passes 20     # -> runs/sample/codes.pt

The VQ-VAE is rebuilt from its checkpoint (`checkpoint.load_checkpoint`), kept in eval mode and only asked for
`encode(x)`: its weights and buffers (the EMA codebook statistics included) are bit-identical afterwards. The data
is the checkpoint's own (`--data` names another) at the checkpoint's image size.

- Training split: `--passes N` passes. Pass 0 takes every image as it is (un-augmented); passes 1..N-1 take an
  augmented copy of each (a random flip, and for the `sample` photos a random crop), drawn from the seed
  (pass * 1_000_003 + index), so the same command always writes the same file. A prior needs many more code maps
  than the ~260 grid crops of the sample's training split; for datasets whose only augmentation is a flip, passes
  beyond 2 repeat maps.
- Validation split: one un-augmented pass, in order.

The output is a `.pt` file of plain tensors and values (loadable with torch.load(..., weights_only=True)):
train_codes / val_codes (N, h, w) as uint8 when K <= 256 (int16 up to 32768, else int32), train_labels /
val_labels (N,) int64 (the class index; 0 for data without classes), classes (names; empty without classes),
num_embeddings (K), the data it came from, and the VQ-VAE's checkpoint path, config and step, so the prior can find
the decoder again. `levels` is the VQ-VAE's number of levels; for a 2-level VQ-VAE (hierarchy.VQVAE2) train_codes /
val_codes hold the bottom maps (N, h, w) with num_embeddings codes and train_codes_top / val_codes_top the top maps
(N, h/2, w/2) with num_embeddings_top codes (both maps in the dtype of the larger K).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from checkpoint import load_checkpoint
from evaluate import model_sized
from image_data import CachedImages, PhotoCrops, build_data, collate, default_workers
from pixels import to_model_scale
from runs import (ConfigError, DataError, atomic_save, pick_device, read_plain_file, require_at_least, run_cli,
                  script_parser)

CODES_FORMAT = "vqvae-codes-v1"


def code_dtype(num_embeddings: int) -> torch.dtype:
    """The smallest integer type that holds every code index 0..K-1."""
    if num_embeddings <= 256:
        return torch.uint8
    return torch.int16 if num_embeddings <= 32768 else torch.int32


def read_codes(path: str | Path) -> dict:
    """Load a codes file written by `extract_codes`."""
    return read_plain_file(path, CODES_FORMAT, "the codes.pt written by extract_codes.py")


def default_codes_path(checkpoint: str | Path) -> Path:
    """codes.pt in the folder of the VQ-VAE checkpoint."""
    return Path(checkpoint).expanduser().resolve().parent / "codes.pt"


def augmentation_seed(pass_index: int, index: int) -> int:
    return pass_index * 1_000_003 + index


@torch.no_grad()
def encode_dataset(model, dataset: Dataset, keys: list, batch_size: int, device: torch.device,
                   num_workers: int = 0, dtype: torch.dtype = torch.int64
                   ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]:
    """Encode the items `keys` of `dataset` (integer or (index, seed) keys) -> (codes (N, h, w) of `dtype` on the
    CPU, labels (N,) int64); for a 2-level VQ-VAE the codes are its (top, bottom) maps, as `encode` returns them.
    Items that cannot be decoded are dropped (with image_data's warning). Each batch goes through the encoder in
    parts of at most evaluate.MODEL_PIXELS pixels and its codes are kept in `dtype` at once."""
    workers = 0 if isinstance(dataset, (CachedImages, PhotoCrops)) else num_workers
    loader = DataLoader(dataset, batch_size=batch_size, sampler=keys, num_workers=workers, collate_fn=collate)
    codes, labels = [], []
    for batch, y in loader:
        for images in model_sized(batch) if len(batch) else ():
            x = to_model_scale(images.to(device).float().div_(255))   # (B, 3, S, S) in [-0.5, 0.5]
            maps = model.encode(x)                                   # (B, S/4, S/4), or (top, bottom)
            codes.append([m.to("cpu", dtype) for m in ([maps] if isinstance(maps, torch.Tensor) else maps)])
        if len(batch):
            labels.append(y)
    if not codes:
        raise DataError("none of the images could be decoded: check the files")
    levels = [torch.cat([c[i] for c in codes]) for i in range(len(codes[0]))]
    return (levels[0] if len(levels) == 1 else tuple(levels)), torch.cat(labels)


def extract_codes(checkpoint: str | Path, out: str | Path | None = None, passes: int = 1, data: str | None = None,
                  batch_size: int = 64, device: str = "auto", progress: bool = True) -> dict:
    """Encode the training split (`passes` passes, see the module docstring) and the validation split with the
    VQ-VAE of `checkpoint`; write the codes file to `out` (default: codes.pt beside the checkpoint) and return
    its contents."""
    from tqdm.auto import tqdm

    require_at_least("passes", passes)
    require_at_least("batch-size", batch_size)
    checkpoint = Path(checkpoint).expanduser().resolve()
    out = Path(out).expanduser() if out is not None else default_codes_path(checkpoint)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: pass a file name such as {out / 'codes.pt'}")
    dev = pick_device(device)
    model, config, ckpt = load_checkpoint(checkpoint, dev)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    splits = build_data(data or config.data, config.image_size, config.data_root, download=False,
                        val_fraction=config.val_fraction, prepared_dir=config.prepared_dir)
    workers = default_workers()
    ks = [q.num_embeddings for q in model.quantizers]   # top first for 2 levels
    k, dtype = ks[-1], code_dtype(max(ks))
    n = len(splits.train)
    train_codes, train_labels = [], []
    for p in tqdm(range(passes), desc="encoding training passes", disable=not progress or passes == 1):
        keys = list(range(n)) if p == 0 else [(i, augmentation_seed(p, i)) for i in range(n)]
        codes, labels = encode_dataset(model, splits.train, keys, batch_size, dev, workers, dtype)
        train_codes.append(codes)
        train_labels.append(labels)
    val_codes, val_labels = encode_dataset(model, splits.val, list(range(len(splits.val))), batch_size, dev,
                                           workers, dtype)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "encoding changed the VQ-VAE's state"
    if model.levels == 2:   # (top, bottom) per pass
        train_top, train_codes = [t for t, _ in train_codes], [b for _, b in train_codes]
        val_top, val_codes = val_codes
    result = {
        "format": CODES_FORMAT,
        "levels": model.levels,
        "train_codes": torch.cat(train_codes).to(dtype),          # (passes * N, h, w), the bottom level's for 2
        "train_labels": torch.cat(train_labels),                  # (passes * N,)
        "val_codes": val_codes.to(dtype),                         # (N_val, h, w)
        "val_labels": val_labels,                                 # (N_val,)
        "classes": list(splits.classes),
        "num_embeddings": k,
        "vqvae_checkpoint": str(checkpoint),
        "vqvae_config": ckpt["config"],
        "vqvae_step": ckpt["step"],
        "data": data or config.data,
        "description": splits.description,
        "passes": passes,
    }
    if model.levels == 2:
        result["train_codes_top"] = torch.cat(train_top).to(dtype)   # (passes * N, h/2, w/2)
        result["val_codes_top"] = val_top.to(dtype)                  # (N_val, h/2, w/2)
        result["num_embeddings_top"] = ks[0]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(result, out)
    except OSError as err:
        raise ConfigError(f"cannot write --out {out}: {err.strerror or err}") from None
    return result


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, "checkpoint.pt of a VQ-VAE run (train.py)")
    parser.add_argument("--out", default=None, help="codes file to write (default: codes.pt beside --checkpoint)")
    parser.add_argument("--passes", type=int, default=1,
                        help="passes over the training split: the first un-augmented, the others augmented")
    parser.add_argument("--data", default=None, help="image folder or sample/food101/cifar10 "
                                                     "(default: the checkpoint's own data)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar over the passes")
    args = parser.parse_args(argv)
    return run_cli(lambda: report(args))


def report(args: argparse.Namespace) -> int:
    """extract_codes.py's body: write the codes file and say what it holds."""
    result = extract_codes(args.checkpoint, args.out, args.passes, args.data, args.batch_size, args.device,
                           args.progress)
    out = args.out or default_codes_path(args.checkpoint)
    train, val = result["train_codes"], result["val_codes"]
    used = torch.cat([train.flatten(), val.flatten()]).long().unique().numel()
    shape = f"{tuple(train.shape[1:])} codes"
    if result["levels"] == 2:
        top = torch.cat([result["train_codes_top"].flatten(), result["val_codes_top"].flatten()])
        shape = f"{tuple(result['train_codes_top'].shape[1:])} top and {shape[:-6]} bottom codes"
        used = (f"{top.long().unique().numel()} of K = {result['num_embeddings_top']} top and {used} of "
                f"K = {result['num_embeddings']} bottom")
    else:
        used = f"{used} of K = {result['num_embeddings']}"
    print(f"done: {out} | {len(train)} training maps ({args.passes} passes), {len(val)} validation maps of "
          f"{shape} | {used} codes used | {len(result['classes'])} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
