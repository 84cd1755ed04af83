"""Evaluate a trained VQ-VAE: reconstruction error and codebook health over a whole dataset.

    python evaluate.py --checkpoint runs/sample/checkpoint.pt [--data FOLDER_OR_NAME] [--split val|train|all]

The model is rebuilt from the checkpoint alone (its saved config). Without --data it runs over the checkpoint's
own validation split; with a folder it runs over every image in it (with a built-in name, over that dataset's
validation split). The last line printed is one JSON object:

- mse: mean squared error over all pixels of all images, with images and (clamped) reconstructions in [0, 1];
- psnr: 10 * log10(1 / mse) from that pooled mse (not a mean of per-image PSNRs);
- ssim: the mean over images of each image's SSIM against its reconstruction (an 11-pixel Gaussian window with
  sigma 1.5, data range 1, averaged over the three channels; `ssim_per_image`);
- codebook_usage: the fraction of the K codes chosen at least once over the whole set;
- perplexity: exp(entropy) of the code-usage distribution over the whole set (1 = one code, K = all equally);
- for a 2-level VQ-VAE (--levels 2): codebook_usage_top / _bottom and perplexity_top / _bottom, each level's own;
  codebook_usage is then the lower of the two and perplexity the bottom level's;
- num_images.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from checkpoint import load_checkpoint
from codebook import perplexity_from_counts
from image_data import CachedImages, DecodedImages, build_data, eval_loader, find_images, square_image
from models import VQVAE
from pixels import to_image_scale, to_model_scale
from runs import (DataError, amp_dtype_for, autocast, pick_device, require_at_least, run_cli, script_parser,
                  use_channels_last)


SSIM_WINDOW, SSIM_SIGMA = 11, 1.5   # a Gaussian window of 11 pixels with sigma 1.5 (Wang et al. 2004)
MODEL_PIXELS = 2**20   # image pixels the model sees at once in `evaluate` (16 images of 256 x 256, 256 of 64 x 64)


def model_sized(images: Tensor) -> tuple[Tensor, ...]:
    """A batch (B, 3, S, S) split into parts of at most MODEL_PIXELS pixels (at least one image each): the
    activations, and the float copies the metrics make, do not grow with the batch size."""
    return images.split(max(1, MODEL_PIXELS // (images.shape[-1] * images.shape[-2])))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """(size,) normalised Gaussian weights, the 1-d factor of SSIM's separable window."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-x**2 / (2 * sigma**2))
    return w / w.sum()


def ssim_per_image(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """SSIM (Wang, Bovik, Sheikh, Simoncelli 2004, eq. 13) of each image pair: (B, C, H, W) in [0, data_range]
    -> (B,). Local means, variances and covariance are Gaussian-weighted (SSIM_WINDOW pixels, sigma SSIM_SIGMA)
    over the positions where the whole window fits, with population (not sample) covariances, K1 = 0.01,
    K2 = 0.03; the map is averaged over positions and channels. This is skimage's structural_similarity with
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis set."""
    c = x.shape[1]
    w = gaussian_window().to(x.device, torch.float32)
    kernel_h = w.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    kernel_v = w.view(1, 1, -1, 1).expand(c, 1, -1, 1)

    def blur(t: Tensor) -> Tensor:   # (B, C, H, W) -> (B, C, H - 10, W - 10), the separable valid convolution
        return F.conv2d(F.conv2d(t, kernel_h, groups=c), kernel_v, groups=c)

    x, y = x.float(), y.float()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


@torch.no_grad()
def evaluate(model: VQVAE, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False) -> dict:
    """Pooled metrics over every image `loader` yields (uint8 batches, each run through the model in parts of at
    most MODEL_PIXELS pixels); the model is left in its previous mode.

    Under torch.distributed the sums are added over processes, so every process returns the same numbers."""
    was_training = model.training
    model.eval()
    squared_error = torch.zeros((), dtype=torch.float64, device=device)
    # code counts per level (top first), each (K,) of its own codebook
    counts = [torch.zeros(q.num_embeddings, dtype=torch.float64, device=device) for q in model.quantizers]
    num = torch.zeros(2, dtype=torch.float64, device=device)   # images, pixel values
    ssim_sum = torch.zeros((), dtype=torch.float64, device=device)
    ctx = autocast(device, amp_dtype)
    for batch, _ in loader:
        for images in model_sized(batch) if len(batch) else ():
            x = images.to(device, non_blocking=True).float().div_(255)                 # (B, 3, H, W) in [0, 1]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with ctx:
                out = model(to_model_scale(x))
            reconstruction = to_image_scale(out.reconstruction)
            squared_error += (reconstruction - x).double().pow(2).sum()
            ssim_sum += ssim_per_image(reconstruction, x).double().sum()
            for count, vq in zip(counts, out.levels):
                count += torch.bincount(vq.indices.flatten(), minlength=len(count)).double()
            num += torch.tensor([x.shape[0], x.numel()], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        for t in (squared_error, *counts, num, ssim_sum):
            dist.all_reduce(t)
    model.train(was_training)
    mse = (squared_error / num[1].clamp_min(1)).item()
    usage = [(c > 0).double().mean().item() for c in counts]
    perplexity = [perplexity_from_counts(c).item() for c in counts]
    result = {
        "mse": mse,
        "psnr": 10 * math.log10(1 / mse) if mse > 0 else float("inf"),
        "ssim": (ssim_sum / num[0].clamp_min(1)).item(),
        # a 2-level model: the lower usage of its two codebooks, the bottom level's perplexity, and each level's
        "codebook_usage": min(usage),
        "perplexity": perplexity[-1],
        "num_images": int(num[0].item()),
    }
    if model.levels == 2:
        for name, u, p in zip(("top", "bottom"), usage, perplexity):
            result.update({f"codebook_usage_{name}": u, f"perplexity_{name}": p})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, "checkpoint.pt written by train.py")
    parser.add_argument("--data", default=None, help="image folder or sample/food101/cifar10 "
                                                     "(default: the checkpoint's own data)")
    parser.add_argument("--split", choices=("val", "train", "all"), default=None,
                        help="which images (default: val; all of them for a folder given with --data)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    return run_cli(lambda: report(args))


def report(args: argparse.Namespace) -> int:
    """evaluate.py's body: the metrics of the checkpoint on the chosen images, as the last line of output."""
    require_at_least("batch-size", args.batch_size)
    device = pick_device(args.device)
    model, config, _ = load_checkpoint(args.checkpoint, device)
    data = args.data or config.data
    is_folder = data.lower() not in ("sample", "food101", "cifar10")
    split = args.split or ("all" if args.data and is_folder else "val")
    if split == "all" and is_folder:
        paths = find_images(data)
        dataset = DecodedImages(lambda i: square_image(paths[i], config.image_size), [0] * len(paths),
                                [str(p) for p in paths], augment=False)
    else:
        splits = build_data(data, config.image_size, config.data_root, download=False,
                            val_fraction=config.val_fraction, prepared_dir=config.prepared_dir)
        dataset = {"val": [splits.val], "train": [splits.train], "all": [splits.train, splits.val]}[split]
        # plain integer keys carry no augmentation seed, so training images come unflipped and uncropped
        dataset = torch.utils.data.ConcatDataset(dataset) if len(dataset) > 1 else dataset[0]
    loader = eval_loader(dataset, args.batch_size, num_workers=2 if not isinstance(dataset, CachedImages) else 0)
    amp_dtype = amp_dtype_for(config.amp, device)
    channels_last = use_channels_last(device, amp_dtype)
    if channels_last:   # the model in the memory format of its inputs, as in training
        model = model.to(memory_format=torch.channels_last)
    metrics = evaluate(model, loader, device, amp_dtype, channels_last)
    if metrics["num_images"] == 0:
        raise DataError("none of the images could be decoded")
    print(json.dumps({"checkpoint": args.checkpoint, "data": data, "split": split, **metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
