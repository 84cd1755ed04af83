"""Sample new images: draw code maps from a trained prior (PixelCNN or transformer) and decode them with the VQ-VAE
it models.

    python sample.py --checkpoint runs/sample-prior/checkpoint.pt --num 16 --out samples.png
    python sample.py --checkpoint runs/food-prior/checkpoint.pt --class pizza --temperature 0.9 --seed 3
    python sample.py --checkpoint runs/food-transformer/checkpoint.pt --class pizza --cfg 3 --top-p 0.9

The prior is rebuilt from its checkpoint alone (`prior_checkpoint.load_prior`), and the VQ-VAE from the checkpoint
the prior names (`checkpoint.load_vqvae_for`; `--vqvae` points elsewhere if it has moved). Codes are drawn position
by position in raster order from softmax(logits / temperature), optionally kept to the --top-k most likely codes
and then to the fewest most likely codes whose probability reaches --top-p (nucleus sampling; both for either kind
of prior, transformer_prior.filtered_probs); the same --seed on the same device gives the same images. A transformer
prior samples with its KV cache. For a class-conditional prior, --class picks the class (its name or index;
`prior_checkpoint.class_labels`); without it the samples go through the classes in turn. The images are written as
one PNG grid, `--nrow` per row.

--cfg S samples a class-conditional transformer prior trained with class dropout (train_prior.py --arch transformer,
--class-dropout above 0) with classifier-free guidance (arXiv 2207.12598): each step's logits are
l_none + S (l_class - l_none), so S = 1 is the conditional prior, S = 0 the unconditional one, and S > 1 leans
further towards the class.

A 2-level prior (train_prior.py on the codes of a `--levels 2` VQ-VAE; arXiv 1906.00446) draws the top map first,
then the bottom map given it, both at --temperature, --top-k, --top-p and for the same --class (--cfg guides a
transformer top prior; the bottom PixelCNN draws given the top map and the class), and the VQ-VAE-2 decodes the pair,
decode((top, bottom)). The VQ-VAE must have the prior's number of levels.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from checkpoint import load_vqvae_for
from hierarchy import VQVAE2
from models import VQVAE
from pixels import to_image_scale
from prior_checkpoint import Prior, class_labels, load_prior
from runs import ConfigError, atomic_write, pick_device, require_at_least, require_positive, run_cli, script_parser
from transformer_prior import TransformerPrior


@torch.no_grad()
def generate(prior: Prior, vqvae: VQVAE | VQVAE2, num: int, shape: tuple[int, int], temperature: float = 1.0,
             labels: torch.Tensor | None = None, seed: int = 0, top_k: int = 0, top_p: float = 1.0,
             guidance: float | None = None) -> tuple[torch.Tensor | tuple, torch.Tensor]:
    """Draw `num` code maps from the prior and decode them: (codes (num, h, w), images (num, 3, 4h, 4w) in [0, 1]),
    both on the CPU. For a 2-level prior `shape` is the bottom map's and codes is the pair (top (num, h/2, w/2),
    bottom (num, h, w)), decoded together. top_k, top_p: as the module docstring says (0 and 1: off); guidance: the
    classifier-free guidance scale of a transformer prior (None: the plain prior)."""
    device = next(prior.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    guided = {} if guidance is None else {"guidance": guidance}
    codes = prior.sample(num, shape, temperature, labels, generator, top_k=top_k, top_p=top_p,
                         **guided)                                                   # (num, h, w), or (top, bottom)
    on_vqvae = next(vqvae.parameters()).device
    if prior.levels == 2:
        images = vqvae.decode(tuple(c.to(on_vqvae) for c in codes))
        codes = tuple(c.cpu() for c in codes)
    else:
        images = vqvae.decode(codes.to(on_vqvae))
        codes = codes.cpu()
    return codes, to_image_scale(images).cpu()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> None:
    """The images as one PNG grid, written under a temporary name and renamed, so no half-written file is left."""
    import torchvision

    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    atomic_write(path, lambda tmp: torchvision.utils.save_image(grid, tmp))


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, "checkpoint.pt of a prior run (train_prior.py)")
    parser.add_argument("--num", type=int, default=16, help="number of images")
    parser.add_argument("--temperature", type=float, default=1.0, help="divides the logits (below 1: sharper)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely codes at each step (1 to K)")
    parser.add_argument("--top-p", type=float, default=1.0, help="keep the fewest most likely codes whose probability "
                                                                 "reaches p, in (0, 1] (1: all)")
    parser.add_argument("--class", dest="class_", metavar="CLASS", default=None,
                        help="class name or index (conditional priors)")
    parser.add_argument("--cfg", type=float, default=None, metavar="SCALE",
                        help="classifier-free guidance scale (transformer priors trained with --class-dropout)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    parser.add_argument("--out", default="samples.png", help="PNG grid to write")
    parser.add_argument("--nrow", type=int, default=0, help="images per row (default: about a square grid)")
    parser.add_argument("--vqvae", default=None, help="the VQ-VAE checkpoint to decode with (default: the one the "
                                                      "prior names)")
    args = parser.parse_args(argv)
    return run_cli(lambda: draw(args))


def draw(args: argparse.Namespace) -> int:
    """sample.py's body: draw, decode and write the grid, then say what was written."""
    require_at_least("num", args.num)
    require_positive("temperature", args.temperature)
    if args.nrow < 0:
        raise ConfigError(f"--nrow must be at least 1 (or 0 for a square grid), got {args.nrow}")
    out = Path(args.out).expanduser()
    if out.is_dir() or out.suffix.lower() != ".png":
        raise ConfigError(f"--out must be the name of a .png file, got {args.out}")
    device = pick_device(args.device)
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1] (1 keeps every code), got {args.top_p}")
    prior, _, ckpt = load_prior(args.checkpoint, device)
    levels = [prior.top, prior.bottom] if prior.levels == 2 else [prior]
    k = min(level.num_embeddings for level in levels)
    if args.top_k is not None and not 1 <= args.top_k <= k:
        raise ConfigError(f"--top-k must be from 1 to the prior's number of codes K = {k}, got {args.top_k}")
    if args.cfg is not None:
        check_guidance(levels[0], args.cfg)
    labels = class_labels(args.class_, ckpt["classes"], args.num, prior.num_classes > 0)
    vqvae = load_vqvae_for(ckpt, device, args.vqvae)
    start = time.perf_counter()
    codes, images = generate(prior, vqvae, args.num, tuple(ckpt["map_shape"]), args.temperature, labels,
                             args.seed, args.top_k or 0, args.top_p, args.cfg)
    seconds = time.perf_counter() - start
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, out, args.nrow or math.ceil(math.sqrt(args.num)))
    except OSError as err:
        raise ConfigError(f"cannot write --out {out}: {err.strerror or err}") from None
    maps = " and ".join(str(tuple(c.shape[1:])) for c in (codes if prior.levels == 2 else [codes]))
    shaping = "".join(f", {name} {value}" for name, value in
                      (("top-k", args.top_k), ("top-p", args.top_p if args.top_p < 1 else None), ("cfg", args.cfg))
                      if value is not None)
    print(f"wrote {out}: {args.num} images of {images.shape[-1]}x{images.shape[-2]} from {maps} "
          f"code maps (seed {args.seed}, temperature {args.temperature}{shaping}) in {seconds:.1f} s")
    return 0


def check_guidance(prior: Prior, scale: float) -> None:
    """--cfg needs a class-conditional transformer prior trained with class dropout (for 2 levels: its top prior),
    which alone knows p(z) beside p(z | y); else a one-line ConfigError saying what to do."""
    if not math.isfinite(scale):
        raise ConfigError(f"--cfg must be a finite number, got {scale}")
    if not isinstance(prior, TransformerPrior):
        raise ConfigError("--cfg needs a transformer prior trained with class dropout (train_prior.py --arch "
                          "transformer); this is a PixelCNN prior: leave --cfg out")
    if prior.num_classes == 0:
        raise ConfigError("--cfg guides towards a class, but this prior has no classes (its codes file has none, or "
                          "it was trained with --no-conditional): leave --cfg out")
    if prior.class_dropout <= 0:
        raise ConfigError("--cfg needs a prior trained with class dropout, and this one was trained with "
                          "--class-dropout 0: leave --cfg out, or train with --class-dropout 0.1")


if __name__ == "__main__":
    sys.exit(main())
