"""The codec against JPEG and WebP: bits per pixel and quality of compress.py's files on a folder of photos.

    python benchmarks/bench_codec.py --prior runs/sample-prior/checkpoint.pt                  # one model pair
    python benchmarks/bench_codec.py --prior A/checkpoint.pt --prior B/checkpoint.pt --write  # several rates

For each photo (by default the sample's 4 unseen photos at full size; `--photos FOLDER` for any folder) and each
prior given (with the VQ-VAE it names): the bits per pixel of our file, of the prior's NLL of the same codes (the
bound the coder approaches) and of coding each code uniformly (log2 K bits); PSNR and SSIM of the decoded photo;
compress and decompress seconds. JPEG and WebP (Pillow) are run at every quality from 5 to 95 in steps of 5, and
their bits per pixel at our PSNR is read off by linear interpolation between the two qualities that bracket it
(blank where our PSNR is outside their range). With --write, the table and a rate-distortion figure
(model_visualisation/codec.png: bits per pixel against PSNR, our models as points, JPEG and WebP as curves,
means over the photos) go into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root: run from anywhere

from bench_report import ROOT, machine, publish
from codec import compress, decompress, encode_photo, load_models, read_photo, to_tiles
from evaluate import ssim_per_image
from image_data import find_images, sample_photo_paths

FIGURE = ROOT / "model_visualisation" / "codec.png"
QUALITIES = range(5, 100, 5)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two uint8 (3, H, W) images, over all their pixels."""
    mse = torch.mean((a.double() - b.double()) ** 2).item() / 255**2
    return 10 * math.log10(1 / mse) if mse > 0 else float("inf")


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    return ssim_per_image(a[None].float() / 255, b[None].float() / 255).item()


def pillow_curve(image: torch.Tensor, fmt: str) -> list[tuple[float, float, float]]:
    """(quality, bits per pixel, PSNR) of `fmt` ("JPEG" or "WEBP") at each of QUALITIES."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())                     # (3, H, W) -> (H, W, 3)
    pixels = image.shape[1] * image.shape[2]
    rows = []
    for q in QUALITIES:
        buffer = io.BytesIO()
        pil.save(buffer, format=fmt, quality=q)
        decoded = torch.from_numpy(np.array(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
        rows.append((q, 8 * buffer.tell() / pixels, psnr(decoded.permute(2, 0, 1), image)))
    return rows


def bpp_at_psnr(curve: list[tuple[float, float, float]], target: float) -> float | None:
    """Bits per pixel at `target` PSNR, linearly interpolated between the two qualities that bracket it."""
    points = sorted((p, b) for _, b, p in curve)
    for (p0, b0), (p1, b1) in zip(points, points[1:]):
        if p0 <= target <= p1 and p1 > p0:
            return b0 + (b1 - b0) * (target - p0) / (p1 - p0)
    return None


@torch.no_grad()
def nll_bits(models, image: torch.Tensor) -> float:
    """The prior's NLL of the photo's codes, in bits, over the real positions of its tiles (the padding positions
    get the codec's fill, the most likely code, and are left out of the sum)."""
    maps, _ = encode_photo(models, image)
    total, cond, filled_levels = 0.0, None, []
    for level, (prior, tile, codes) in enumerate(zip(models.level_priors(), models.tiles(), maps)):
        known, inside = to_tiles(codes, tile)

        def fill(i, j, logits, known=known, inside=inside):
            out = logits.argmax(1)
            out[inside[:, i, j]] = known[inside[:, i, j], i, j]
            return out

        if level == 1:
            cond = models.prior.conditioning(filled_levels[0])
        filled = prior.in_raster_order(known.shape[0], tile, fill, cond=cond)
        filled_levels.append(filled)
        logits = prior(filled, None, cond).float() if cond is not None else prior(filled).float()
        nats = torch.nn.functional.cross_entropy(logits, filled, reduction="none")
        total += nats[inside].sum().item() / math.log(2)
    return total


def measure(models, name: str, path: Path) -> dict:
    image = read_photo(path)
    pixels = image.shape[1] * image.shape[2]
    start = time.perf_counter()
    data = compress(models, image)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    decoded = decompress(models, data)
    decode_s = time.perf_counter() - start
    maps, _ = encode_photo(models, image)
    uniform = sum(m.numel() * math.log2(q.num_embeddings) for m, q in zip(maps, models.vqvae.quantizers))
    ours_psnr = psnr(decoded, image)
    jpeg, webp = pillow_curve(image, "JPEG"), pillow_curve(image, "WEBP")
    return {"model": name, "photo": path.name, "size": f"{image.shape[2]}x{image.shape[1]}",
            "bpp": 8 * len(data) / pixels, "nll_bpp": nll_bits(models, image) / pixels, "uniform_bpp": uniform / pixels,
            "psnr": ours_psnr, "ssim": ssim(decoded, image), "encode_s": encode_s, "decode_s": decode_s,
            "jpeg_bpp": bpp_at_psnr(jpeg, ours_psnr), "webp_bpp": bpp_at_psnr(webp, ours_psnr),
            "jpeg_curve": jpeg, "webp_curve": webp}


def fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def table(rows: list[dict]) -> str:
    lines = ["| model | photo | size | ours bpp | NLL bpp | uniform bpp | PSNR | SSIM | JPEG bpp at our PSNR | "
             "WebP bpp at our PSNR | compress s | decompress s |", "|" + " --- |" * 12]
    for name in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == name]
        for r in group + [{"photo": "**mean**", "size": "", **{k: mean([g[k] for g in group]) for k in (
                "bpp", "nll_bpp", "uniform_bpp", "psnr", "ssim", "jpeg_bpp", "webp_bpp", "encode_s", "decode_s")}}]:
            lines.append(f"| {name} | {r['photo']} | {r['size']} | {fmt(r['bpp'])} | {fmt(r['nll_bpp'])} | "
                         f"{fmt(r['uniform_bpp'])} | {fmt(r['psnr'], '.2f')} dB | {fmt(r['ssim'])} | "
                         f"{fmt(r['jpeg_bpp'])} | {fmt(r['webp_bpp'])} | {fmt(r['encode_s'], '.1f')} | "
                         f"{fmt(r['decode_s'], '.1f')} |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = [r for r in rows if r["model"] == rows[0]["model"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("jpeg_curve", "JPEG (Pillow)"), ("webp_curve", "WebP (Pillow)")):
        curves = [r[key] for r in first]
        bpp = [np.mean([c[i][1] for c in curves]) for i in range(len(QUALITIES))]
        quality = [np.mean([c[i][2] for c in curves]) for i in range(len(QUALITIES))]
        ax.plot(bpp, quality, marker=".", label=label)
    for name in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == name]
        ax.scatter([mean([g["bpp"] for g in group])], [mean([g["psnr"] for g in group])], s=60, zorder=3,
                   label=f"VQ-VAE + prior: {name}")
    ax.set_xlabel("bits per pixel (mean over the photos)")
    ax.set_ylabel("PSNR, dB (mean over the photos)")
    ax.set_xlim(0, 1.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", action="append", required=True, help="a prior run's checkpoint.pt (repeat for more)")
    p.add_argument("--name", action="append", default=None, help="a label for each --prior (default: its folder)")
    p.add_argument("--photos", default=None, help="a folder of photos (default: the sample's 4 unseen photos)")
    p.add_argument("--device", default="cpu", help="where the VQ-VAEs run")
    p.add_argument("--write", action="store_true", help="table and figure into BENCHMARKS.md")
    p.add_argument("--json", default=None, help="also write the raw results here")
    args = p.parse_args(argv)
    photos = find_images(args.photos) if args.photos else sample_photo_paths()[1]
    names = args.name or [Path(prior).parent.name for prior in args.prior]
    rows = []
    for name, prior in zip(names, args.prior):
        models = load_models(prior, None, args.device)
        for path in photos:
            rows.append(measure(models, name, Path(path)))
            r = rows[-1]
            print(f"{name} {r['photo']}: {r['bpp']:.3f} bpp (NLL {r['nll_bpp']:.3f}, uniform {r['uniform_bpp']:.3f}), "
                  f"{r['psnr']:.2f} dB; JPEG {fmt(r['jpeg_bpp'])} bpp, WebP {fmt(r['webp_bpp'])} bpp at that PSNR; "
                  f"{r['encode_s']:.1f} s + {r['decode_s']:.1f} s", flush=True)
    text = table(rows)
    print(text)
    note = (f"Machine: {machine()}; the prior on the CPU in float32 with one thread, the VQ-VAE on {args.device}. "
            f"Photos: {args.photos or 'the 4 unseen sample photos at full size'}. JPEG and WebP: Pillow at qualities "
            f"{QUALITIES.start}-{QUALITIES.stop - 5}, their bits per pixel at our PSNR interpolated between the two "
            f"qualities that bracket it.")
    if args.write:
        figure(rows, FIGURE)
        text += f"\n\n![rate and distortion](model_visualisation/{FIGURE.name})"
    publish("bench_codec.py", "The codec against JPEG and WebP: `bench_codec.py`", argv, note + "\n\n" + text,
            args.write, args.json, [{k: v for k, v in r.items()} for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
