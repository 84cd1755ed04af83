"""One level or two: the VQ-VAE against the 2-level VQ-VAE-2 (hierarchy.py) at 128 and 256 px, at an equal number of
training steps on the built-in sample, and the 2-level prior against the unigram baselines of its two levels.

    python benchmarks/bench_levels.py --write              # the table (and figure) into BENCHMARKS.md
    python benchmarks/bench_levels.py --sizes 128 --steps 100 --prior-steps 50   # a quick look
    python benchmarks/bench_levels.py --sizes 128 --steps 2842 --seeds 0,1,2,3 --reuse   # 128 px over four seeds

With --prior-steps N (at the first size): each model's codes are extracted (`extract_codes`, --passes passes over
the training split), a prior is trained on them for N steps (`train_prior`: one gated PixelCNN over the 1-level map;
for the 2-level model a top prior with one causal self-attention block and a bottom prior conditioned on the top
map), and `evaluate_prior` reports the validation NLL per image (both levels summed, in nats) against the unigram
baselines (per level, summed), and the wall-clock seconds to draw and decode 16 images (median of 3, after one
warm-up). The figure model_visualisation/levels.png shows unseen photos, both models' reconstructions and 8
samples of each.

For each size and seed, both models train through train.py's `train()` with train.Config's defaults, the same
steps, batch and seed; the only difference is --levels. Runs of one configuration that differ only in their seed
(their initial weights and batches) spread over about 0.3 dB on the 4 unseen photos, so with --seeds the PSNR gap
between the levels is read as its mean over the seeds, with the standard error of that mean. Both have the same
bottom grid (S/4 x S/4 codes); the 2-level model adds a top grid of S/8 x S/8 codes (of its own K,
--top-num-embeddings), so it spends more bits per image (positions x log2 K, summed over the levels), reported
beside its PSNR.
Reported: PSNR and SSIM on the sample's 4 unseen photos and on the held-out strips, codebook usage (each level's for
the 2-level model), bits per image, training seconds. The run folders are kept under --out (default
runs/bench_levels/; seed N > 0 under --out with -seedN appended) for the figure and the priors, which use the
first seed's runs.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root: run from anywhere

from bench_report import ROOT, machine, publish
from checkpoint import Config, config_from_dict, load_checkpoint, read_checkpoint, top_codebook_size
from runs import CheckpointError
from train import train

FIGURE = ROOT / "model_visualisation" / "levels.png"


def finished_run(folder: Path, c: Config) -> tuple[dict, float] | None:
    """(final metrics, training seconds) of a run folder that already holds this very run, finished; else None."""
    try:
        ckpt = read_checkpoint(folder / "checkpoint.pt")
    except (CheckpointError, OSError):
        return None
    same = config_from_dict(ckpt["config"]) == replace(c, overwrite=ckpt["config"]["overwrite"])
    return (ckpt["metrics"], ckpt["elapsed"]) if same and ckpt["step"] == c.steps and ckpt.get("metrics") else None


def seed_folder(out: Path, seed: int) -> Path:
    """The folder of one seed's run folders: `out` for seed 0, `out`-seedN for seed N."""
    return out if seed == 0 else out.with_name(f"{out.name}-seed{seed}")


def train_pair(size: int, steps: int, batch_size: int, out: Path, seed: int = 0, reuse: bool = False,
               clip_grad_norm: float = 0.0, warmup_steps: int | None = None) -> list[dict]:
    """Train the 1-level and the 2-level model at `size` px for `steps` steps (both with train.py's
    --clip-grad-norm `clip_grad_norm` and --warmup-steps `warmup_steps`, by default train.py's but at most a fifth of
    the steps); one row of figures for each. With `reuse`, a run folder that already holds
    the same finished run is read instead of trained again."""
    rows = []
    for levels in (1, 2):
        folder = out / f"{size}px-{levels}-level"
        c = Config(image_size=size, levels=levels, steps=steps, batch_size=batch_size, seed=seed, out=str(folder),
                   overwrite=True, progress=False, eval_every=steps, log_every=max(1, steps // 10),
                   warmup_steps=min(Config.warmup_steps, steps // 5) if warmup_steps is None else warmup_steps,
                   clip_grad_norm=clip_grad_norm)
        start = time.perf_counter()
        done = finished_run(folder, c) if reuse else None
        if done:
            f, train_seconds = done
            seconds = train_seconds
        else:
            result = train(c)
            f, train_seconds = result.final, result.history[-1]["elapsed_s"]
            seconds = time.perf_counter() - start
        bits = (size // 4) ** 2 * math.log2(c.num_embeddings) + \
            ((size // 8) ** 2 * math.log2(top_codebook_size(c)) if levels == 2 else 0)
        rows.append({"size": size, "levels": levels, "steps": steps, "batch_size": batch_size, "seed": seed,
                     "seconds": round(seconds, 1), "train_seconds": round(train_seconds, 2),
                     "unseen_psnr": f["unseen_psnr"], "unseen_ssim": f["unseen_ssim"],
                     "strips_psnr": f["strips_psnr"], "strips_ssim": f["strips_ssim"],
                     "codebook_usage": f["codebook_usage"],
                     "usage_by_level": [f[k] for k in ("codebook_usage_top", "codebook_usage_bottom") if k in f],
                     "bits_per_image": bits, "checkpoint": str(folder / "checkpoint.pt")})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def prior_row(row: dict, steps: int, passes: int, batch_size: int = 32) -> dict:
    """Extract the codes of `row`'s model, train its prior and evaluate it (see the module docstring)."""
    from evaluate_prior import evaluate_prior
    from extract_codes import extract_codes
    from sample import generate
    from train_prior import PriorConfig, train_prior

    folder = Path(row["checkpoint"]).parent
    start = time.perf_counter()
    extract_codes(row["checkpoint"], folder / "codes.pt", passes, progress=False, device="cpu")
    c = PriorConfig(codes=str(folder / "codes.pt"), out=str(folder / "prior"), steps=steps, overwrite=True,
                    batch_size=batch_size, log_every=max(1, steps // 10),
                    progress=False, eval_every=steps, attention=row["levels"] == 2, device="cpu")
    result = train_prior(c)
    r = evaluate_prior(str(folder / "prior" / "checkpoint.pt"), torch.device("cpu"), bits_per_dim=True)
    seconds = time.perf_counter() - start
    if row["levels"] == 1:
        n = r["map_shape"][0] * r["map_shape"][1]
        prior_nats, unigram_nats = r["prior_nats_per_code"] * n, r["unigram_nats_per_code"] * n
    else:
        prior_nats, unigram_nats = r["prior_nats_per_image"], r["unigram_nats_per_image"]
    vqvae = load_checkpoint(row["checkpoint"])[0]
    shape = tuple(r["map_shape"])
    times = []
    for seed in range(4):                      # the first is a warm-up
        t = time.perf_counter()
        _, images = generate(result.model, vqvae, 16, shape, seed=seed)
        times.append(time.perf_counter() - t)
    out = {"prior_steps": steps, "prior_batch_size": batch_size, "passes": passes, "prior_nats_per_image": prior_nats,
           "unigram_nats_per_image": unigram_nats, "reduction_vs_unigram": 1 - prior_nats / unigram_nats,
           "bits_per_dim_pixelcnn": r["bits_per_dim_bound"]["pixelcnn"], "sample16_s": statistics.median(times[1:]),
           "pipeline_s": round(seconds, 1), "sample_images": images[:8]}
    print(json.dumps({k: v for k, v in out.items() if k != "sample_images"}), flush=True)
    return out


def figure(rows: list[dict], path: Path) -> None:
    """Unseen photos, both models' reconstructions and (when there are priors) 8 samples of each, one row each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torchvision

    from image_data import build_data, sample_unseen_photos

    size = rows[0]["size"]
    unseen = sample_unseen_photos(build_data("sample", size).val)
    x = torch.stack([unseen[i][0] for i in range(0, len(unseen), max(1, len(unseen) // 8))][:8]).float() / 255
    lines = [("unseen photos", x)]
    for r in rows:
        model = load_checkpoint(r["checkpoint"])[0]
        with torch.no_grad():
            lines.append((f"{r['levels']}-level reconstructions ({r['unseen_psnr']:.2f} dB on the unseen photos)",
                          (model(x - 0.5).reconstruction + 0.5).clamp(0, 1)))
    for r in rows:
        if "sample_images" in r:
            lines.append((f"{r['levels']}-level samples (prior NLL {r['prior_nats_per_image']:.0f} nats/image)",
                          r["sample_images"]))
    fig, axes = plt.subplots(len(lines), 1, figsize=(12, 1.75 * len(lines)))
    for ax, (title, images) in zip(axes, lines):
        ax.imshow(torchvision.utils.make_grid(images, nrow=8, padding=2, pad_value=1).permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"VQ-VAE against VQ-VAE-2 at {size}x{size}, {rows[0]['steps']} training steps each", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    lines = ["| size | levels | seed | steps | batch | train s | unseen PSNR | unseen SSIM | strips PSNR | usage | "
             "bits/image |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        usage = " / ".join(f"{u:.0%}" for u in r["usage_by_level"]) + " (top / bottom)" if r["usage_by_level"] \
            else f"{r['codebook_usage']:.0%}"
        lines.append(f"| {r['size']} px | {r['levels']} | {r['seed']} | {r['steps']} | {r['batch_size']} | "
                     f"{r['train_seconds']:.0f} | {r['unseen_psnr']:.2f} dB | {r['unseen_ssim']:.3f} | "
                     f"{r['strips_psnr']:.2f} dB | {usage} | {r['bits_per_image']:.0f} |")
    return "\n".join(lines)


def prior_table(rows: list[dict]) -> str:
    lines = ["| model | prior steps | prior NLL (nats/image) | unigram baselines (nats/image) | below unigram | "
             "bits/dim bound | 16 samples drawn and decoded |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "prior_steps" in r:
            lines.append(f"| {r['size']} px, {r['levels']} level(s) | {r['prior_steps']} of batch "
                         f"{r['prior_batch_size']} | "
                         f"{r['prior_nats_per_image']:.0f} | {r['unigram_nats_per_image']:.0f} | "
                         f"{r['reduction_vs_unigram']:.1%} | {r['bits_per_dim_pixelcnn']:.3f} | "
                         f"{r['sample16_s']:.1f} s |")
    return "\n".join(lines)


def gaps(rows: list[dict], size: int, key: str = "unseen_psnr") -> dict[int, float]:
    """{seed: the 2-level model's `key` minus the 1-level model's} at `size`, for each seed that has both."""
    by_seed: dict[int, dict[int, float]] = {}
    for r in rows:
        if r["size"] == size:
            by_seed.setdefault(r["seed"], {})[r["levels"]] = r[key]
    return {seed: pair[2] - pair[1] for seed, pair in sorted(by_seed.items()) if len(pair) == 2}


def mean_and_error(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error (sample standard deviation / sqrt(n); None for one value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for size in sorted({r["size"] for r in rows}):
        unseen, strips = gaps(rows, size), gaps(rows, size, "strips_psnr")
        if not unseen:
            continue
        one = next(r for r in rows if r["size"] == size and r["levels"] == 1)
        two = next(r for r in rows if r["size"] == size and r["levels"] == 2)
        bits = f"for {two['bits_per_image'] / one['bits_per_image'] - 1:+.0%} bits per image"
        grid = f"the 1-level model's with the same {size // 4}x{size // 4} bottom grid"
        if len(unseen) == 1:
            out.append(f"{size} px, {one['steps']} steps each: the 2-level model's unseen-photo PSNR is "
                       f"{next(iter(unseen.values())):+.2f} dB against {grid}, {bits}.")
            continue
        (mean, error), (strip_mean, strip_error) = mean_and_error(list(unseen.values())), \
            mean_and_error(list(strips.values()))
        each = ", ".join(f"{g:+.2f}" for g in unseen.values())
        out.append(f"{size} px, {one['steps']} steps each, seeds {', '.join(map(str, unseen))}: the 2-level model's "
                   f"unseen-photo PSNR is {mean:+.2f} dB (standard error {error:.2f}; per seed {each}) against "
                   f"{grid}, {bits}; on the held-out strips {strip_mean:+.2f} dB (standard error "
                   f"{strip_error:.2f}).")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="128,256", help="comma-separated image sizes (multiples of 8)")
    p.add_argument("--steps", default="600,250", help="training steps per size (one value, or one per size)")
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each trains both models at every size")
    p.add_argument("--prior-steps", type=int, default=0, help="train and evaluate priors at the first size")
    p.add_argument("--passes", type=int, default=20, help="extract_codes passes for the priors")
    p.add_argument("--out", default="runs/bench_levels", help="folder for the run folders")
    p.add_argument("--clip-grad-norm", type=float, default=Config.clip_grad_norm,
                   help="train.py's --clip-grad-norm for every run (0: off)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="train.py's --warmup-steps for every run (default: train.py's, at most a fifth of the steps)")
    p.add_argument("--reuse", action="store_true", help="read run folders that already hold the same finished run")
    p.add_argument("--prior-batch-size", type=int, default=32, help="code maps per prior step")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    steps = steps * len(sizes) if len(steps) == 1 else steps
    if len(steps) != len(sizes):
        raise SystemExit("--steps takes one value, or one per --sizes entry")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [r for size, n in zip(sizes, steps) for seed in seeds
            for r in train_pair(size, n, args.batch_size, seed_folder(Path(args.out), seed), seed, args.reuse,
                                args.clip_grad_norm, args.warmup_steps)]
    first = [r for r in rows if r["size"] == sizes[0] and r["seed"] == seeds[0]]
    if args.prior_steps:
        for r in first:
            r.update(prior_row(r, args.prior_steps, args.passes, args.prior_batch_size))
    text = table(rows) + "\n\n" + "\n".join(f"- {v}" for v in verdicts(rows))
    if args.prior_steps:
        text += "\n\n" + prior_table(rows)
        two = next(r for r in first if r["levels"] == 2)
        text += (f"\n\n- The 2-level prior's NLL is {two['reduction_vs_unigram']:.1%} below the sum of its two "
                 f"levels' unigram baselines; 16 samples at {sizes[0]}x{sizes[0]} are drawn and decoded in "
                 f"{two['sample16_s']:.1f} s.")
    if args.write:
        figure(first, FIGURE)
        text += f"\n\n![one level or two](model_visualisation/{FIGURE.name})"
    print(text)
    for r in rows:
        r.pop("sample_images", None)
    flags = f", --clip-grad-norm {args.clip_grad_norm:g}" if args.clip_grad_norm else ""
    flags += "" if args.warmup_steps is None else f", --warmup-steps {args.warmup_steps}"
    note = (f"Machine: {machine()}, bf16 autocast where the CPU has it. train.Config's defaults (batch "
            f"{args.batch_size}, seeds {', '.join(map(str, seeds))}{flags}), the built-in sample at each size; "
            f"PSNR/SSIM on the 4 unseen photos and the held-out strips.")
    publish("bench_levels.py", "One level or two: `bench_levels.py`", argv, note + "\n\n" + text, args.write,
            args.json, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
