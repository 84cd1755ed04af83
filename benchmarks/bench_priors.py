"""The gated PixelCNN prior against the transformer prior on the same codes file, each trained for the same wall-clock
budget on this machine at two sizes: held-out NLL per code, the bits/dim bound, parameters, the training steps the
budget reached, and the time to draw 16 maps (the transformer with its KV cache and by recomputing the prefix).

    python train.py && python extract_codes.py --checkpoint runs/sample/checkpoint.pt --passes 20
    python benchmarks/bench_priors.py --codes runs/sample/codes.pt --write      # the table and figure
    python benchmarks/bench_priors.py --codes runs/sample/codes.pt --budget-s 20 --seeds 0 --no-bits-per-dim
    python benchmarks/bench_priors.py --codes runs/sample/codes.pt --codes2 runs/levels2-128/codes.pt --write

Each run is train_prior.py's `train_prior` with the PriorConfig defaults except the arch and size (SIZES), the seed,
--device and --batch-size; it stops once its training time (`elapsed_s` of metrics.jsonl, which leaves validation
out) reaches --budget-s, by the SIGTERM path every run has (a checkpoint at the step reached). Nothing is validated
during training, so the whole budget is spent on steps. Then evaluate_prior.py's `evaluate_prior` gives the NLL of
the codes file's validation maps (nats per code; for 2-level codes each level's and per image) and, with the decoder
term of the VQ-VAE the codes came from (fitted once, the same for every prior), the bits/dim bound. The NLL is the
mean over --seeds (each seed's weights and batch order), with the spread of the seeds. Sampling time: 16 maps of the
codes' map size, median of --time-runs runs after one warm-up, on one thread (as sample() runs on a CPU), for the
first seed; the transformer also by recomputing the whole prefix at every position (`cache=False`, one run).

With --codes2 a 2-level codes file is compared the same way: the top prior is the PixelCNN (with --attention, as the
VQ-VAE-2 paper's top prior) or the transformer, and the bottom prior is the same conditioned PixelCNN for both.

With --write the table goes into BENCHMARKS.md (bench_report.publish) and model_visualisation/priors.png shows 16
samples of each arch's default size side by side, decoded by the VQ-VAE of the codes file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root: run from anywhere

from bench_report import ROOT, machine, publish
from evaluate_prior import evaluate_prior
from prior_checkpoint import PriorConfig, load_prior
from runs import Interrupted

FIGURE = ROOT / "model_visualisation" / "priors.png"
# (arch, size name) -> the PriorConfig fields of that size; "default" is PriorConfig's own
SIZES = {
    ("pixelcnn", "default"): {},
    ("pixelcnn", "large"): dict(channels=64, num_layers=12),
    ("transformer", "small"): dict(width=64, depth=2, heads=4),
    ("transformer", "default"): {},
}


def train_for(budget_s: float, c: PriorConfig) -> Path:
    """Train `c` until its training time reaches `budget_s` seconds (see the module docstring); its checkpoint."""
    def stop_when_spent(record: dict) -> None:
        if record["elapsed_s"] >= budget_s:
            os.kill(os.getpid(), signal.SIGTERM)    # runs.StopOnSignal: a checkpoint at this step, then Interrupted

    from train_prior import train_prior

    try:
        train_prior(c, stop_when_spent)
    except Interrupted:
        pass
    return Path(c.out) / "checkpoint.pt"


def sampling_seconds(prior, shape: tuple[int, int], runs: int, labels: torch.Tensor | None, **kw) -> float:
    """Median seconds of prior.sample(16, shape) over `runs` runs, after one warm-up run when runs > 1."""
    def once(seed: int) -> float:
        start = time.perf_counter()
        prior.sample(16, shape, labels=labels, generator=torch.Generator().manual_seed(seed), **kw)
        return time.perf_counter() - start

    if runs > 1:
        once(0)
    return statistics.median(once(seed) for seed in range(1, runs + 1))


def run_row(codes: str, arch: str, size: str, seed: int, args: argparse.Namespace, decoder: dict | None) -> dict:
    """Train one prior for the budget and measure it; `decoder`: the decoder fields of an earlier report (None:
    compute them, when --bits-per-dim)."""
    levels2 = codes == args.codes2
    folder = Path(args.out) / f"{Path(codes).stem}-{arch}-{size}-seed{seed}"
    c = replace(PriorConfig(), codes=codes, out=str(folder), arch=arch, seed=seed, steps=10 ** 9, eval_every=10 ** 9,
                log_every=1, batch_size=args.batch_size, device=args.device, overwrite=True, progress=False,
                attention=levels2 and arch == "pixelcnn", **SIZES[arch, size])
    ckpt_path = train_for(args.budget_s, c)
    prior, _, ckpt = load_prior(ckpt_path, args.device)
    bpd = args.bits_per_dim and decoder is None
    r = evaluate_prior(str(ckpt_path), torch.device(args.device), bits_per_dim=bpd)
    row = {"codes": codes, "levels": 2 if levels2 else 1, "arch": arch, "size": size, "seed": seed,
           "params": sum(p.numel() for p in prior.parameters()), "steps": ckpt["step"],
           "train_s": round(ckpt["elapsed"], 1), "map_shape": r["map_shape"]}
    if levels2:
        row.update(nats_per_code={lv: r[lv]["prior_nats_per_code"] for lv in ("top", "bottom")},
                   nats_per_image=r["prior_nats_per_image"], unigram_nats_per_image=r["unigram_nats_per_image"])
    else:
        h, w = r["map_shape"]
        row.update(nats_per_code=r["prior_nats_per_code"], nats_per_image=r["prior_nats_per_code"] * h * w,
                   unigram_nats_per_code=r["unigram_nats_per_code"])
    if bpd:
        decoder = {k: r[k] for k in ("decoder_bits_per_dim", "dims_per_image")}
    if decoder:
        row["bits_per_dim"] = row["nats_per_image"] / (decoder["dims_per_image"] * math.log(2)) \
            + decoder["decoder_bits_per_dim"]
        row["decoder"] = decoder
    if seed == args.seed_list[0]:
        labels = torch.arange(16) % prior.num_classes if prior.num_classes else None
        shape = tuple(ckpt["map_shape"])
        row["sample16_s"] = sampling_seconds(prior, shape, args.time_runs, labels)
        if arch == "transformer" and not levels2:
            row["sample16_nocache_s"] = sampling_seconds(prior, shape, 1, labels, cache=False)
        row["checkpoint"] = str(ckpt_path)
    print(json.dumps(row), flush=True)
    return row


def cache_timing(num_embeddings: int, shape: tuple[int, int] = (16, 16), runs: int = 3) -> dict:
    """Seconds to draw 16 maps of `shape` with a transformer of PriorConfig's default size over K = num_embeddings
    codes (untrained: the time does not depend on the weights), with its KV cache and by recomputing the prefix, on
    one thread."""
    from transformer_prior import TransformerPrior

    torch.manual_seed(0)
    d = PriorConfig()
    model = TransformerPrior(num_embeddings, shape=shape, width=d.width, num_layers=d.depth, heads=d.heads).eval()
    cached = sampling_seconds(model, shape, runs, None, cache=True)
    full = sampling_seconds(model, shape, 1, None, cache=False)
    return {"shape": list(shape), "num_embeddings": num_embeddings, "cache_s": cached, "recompute_s": full,
            "speedup": full / cached}


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (codes, arch, size): the means over seeds, the NLL's spread (max - min over seeds)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["codes"], r["arch"], r["size"]), []).append(r)
    out = []
    for (codes, arch, size), rs in groups.items():
        per_image = [r["nats_per_image"] for r in rs]
        s = {"codes": codes, "levels": rs[0]["levels"], "arch": arch, "size": size, "seeds": len(rs),
             "params": rs[0]["params"], "steps": statistics.mean(r["steps"] for r in rs),
             "nats_per_image": statistics.mean(per_image), "spread_per_image": max(per_image) - min(per_image),
             **{k: rs[0][k] for k in ("sample16_s", "sample16_nocache_s", "map_shape") if k in rs[0]}}
        if rs[0]["levels"] == 1:
            n = rs[0]["map_shape"][0] * rs[0]["map_shape"][1]
            s.update(nats_per_code=s["nats_per_image"] / n, spread_per_code=s["spread_per_image"] / n)
        else:
            s.update({f"{lv}_nats_per_code": statistics.mean(r["nats_per_code"][lv] for r in rs)
                      for lv in ("top", "bottom")})
        if all("bits_per_dim" in r for r in rs):
            s["bits_per_dim"] = statistics.mean(r["bits_per_dim"] for r in rs)
        out.append(s)
    return out


def table(summary: list[dict], args: argparse.Namespace, timing: dict) -> str:
    """The markdown of BENCHMARKS.md's section (also printed)."""
    lines = [f"Machine: {machine()}. Each prior trained for {args.budget_s:g} s of training time (validation not "
             f"counted), batch {args.batch_size}, PriorConfig's defaults otherwise; held-out NLL on the codes file's "
             f"validation maps, mean over seeds {args.seeds} (spread: max - min over the seeds). Sampling: 16 maps, "
             f"one thread, median of {args.time_runs} runs (without the cache: one run).", ""]
    for levels in (1, 2):
        rows = [s for s in summary if s["levels"] == levels]
        if not rows:
            continue
        h, w = rows[0]["map_shape"]
        lines.append(f"{'1-level' if levels == 1 else '2-level'} codes {rows[0]['codes']} ({h}x{w} "
                     f"{'maps' if levels == 1 else 'bottom maps'}):")
        lines.append("")
        if levels == 1:
            lines += ["| prior | size | parameters | steps reached | NLL nats/code | bits/code | bits/dim bound "
                      "| sample 16 maps | without cache |", "|---|---|---|---|---|---|---|---|---|"]
        else:
            lines += ["| top prior | size | parameters | steps reached | top nats/code | bottom nats/code | "
                      "nats/image | bits/dim bound | sample 16 |", "|---|---|---|---|---|---|---|---|---|"]
        for s in rows:
            bpd = f"{s['bits_per_dim']:.4f}" if "bits_per_dim" in s else "-"
            nocache = f"{s['sample16_nocache_s']:.2f} s" if "sample16_nocache_s" in s else "-"
            head = f"| {s['arch']} | {s['size']} | {s['params']:,} | {s['steps']:.0f} |"
            if levels == 1:
                lines.append(f"{head} {s['nats_per_code']:.4f} ± {s['spread_per_code'] / 2:.4f} | "
                             f"{s['nats_per_code'] / math.log(2):.4f} | {bpd} | {s['sample16_s']:.2f} s | {nocache} |")
            else:
                lines.append(f"{head} {s['top_nats_per_code']:.4f} | {s['bottom_nats_per_code']:.4f} | "
                             f"{s['nats_per_image']:.2f} ± {s['spread_per_image'] / 2:.2f} | {bpd} | "
                             f"{s['sample16_s']:.2f} s |")
        defaults = {s["arch"]: s for s in rows if s["size"] == "default"}
        if len(defaults) == 2:
            key, unit = ("nats_per_code", "nats/code") if levels == 1 else ("nats_per_image", "nats/image")
            gap = defaults["transformer"][key] - defaults["pixelcnn"][key]
            lines += ["", f"Held-out NLL, transformer (default) minus PixelCNN (default): {gap:+.4f} {unit} (mean "
                          f"of {defaults['pixelcnn']['seeds']} seeds)."]
        lines.append("")
    lines.append(f"Transformer of the default size (untrained), 16 maps of {timing['shape'][0]}x{timing['shape'][1]}, "
                 f"K = {timing['num_embeddings']}, one thread: {timing['cache_s']:.2f} s with the KV cache, "
                 f"{timing['recompute_s']:.2f} s recomputing the prefix ({timing['speedup']:.1f}x).")
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], path: Path, device: str) -> None:
    """16 samples of each arch's default size (first seed, 1-level codes), decoded, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torchvision

    from checkpoint import load_vqvae_for
    from sample import generate

    chosen = [r for r in rows if r["levels"] == 1 and r["size"] == "default" and "checkpoint" in r]
    fig, axes = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 5.4))
    for ax, r in zip([axes] if len(chosen) == 1 else axes, chosen):
        prior, _, ckpt = load_prior(r["checkpoint"], device)
        labels = torch.arange(16) % prior.num_classes if prior.num_classes else None
        _, images = generate(prior, load_vqvae_for(ckpt, torch.device(device)), 16, tuple(ckpt["map_shape"]),
                             labels=labels, seed=0)
        grid = torchvision.utils.make_grid(images, nrow=4, padding=2, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy())                            # (3, H, W) -> (H, W, 3)
        ax.set_title(f"{'gated PixelCNN' if r['arch'] == 'pixelcnn' else 'transformer'} ({r['params']:,} "
                     f"parameters, {r['steps']} steps)")
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codes", required=True, help="a 1-level codes file (extract_codes.py)")
    p.add_argument("--codes2", default=None, help="also compare on this 2-level codes file")
    p.add_argument("--budget-s", type=float, default=90.0, help="training seconds of every run")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds; the NLL is their mean")
    p.add_argument("--sizes", default=",".join(f"{a}:{s}" for a, s in SIZES),
                   help="comma-separated arch:size of SIZES to run")
    p.add_argument("--batch-size", type=int, default=PriorConfig.batch_size)
    p.add_argument("--device", default="cpu")
    p.add_argument("--time-runs", type=int, default=3, help="timed sampling runs (median reported)")
    p.add_argument("--no-bits-per-dim", dest="bits_per_dim", action="store_false",
                   help="skip the decoder term (needs the VQ-VAE and the images of the codes file)")
    p.add_argument("--out", default="runs/bench_priors", help="folder for the run folders")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md and the figure")
    args = p.parse_args(argv)
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    sizes = [tuple(s.split(":")) for s in args.sizes.split(",")]
    unknown = [f"{a}:{s}" for a, s in sizes if (a, s) not in SIZES]
    if unknown:
        p.error(f"--sizes: unknown {', '.join(unknown)} (known: {', '.join(f'{a}:{s}' for a, s in SIZES)})")
    from extract_codes import read_codes

    timing = cache_timing(read_codes(args.codes)["num_embeddings"])
    print(json.dumps({"cache_timing": timing}), flush=True)
    rows = []
    for codes in [args.codes] + ([args.codes2] if args.codes2 else []):
        decoder = None
        for arch, size in sizes:
            for seed in args.seed_list:
                rows.append(run_row(codes, arch, size, seed, args, decoder))
                decoder = decoder or rows[-1].get("decoder")
    summary = summarise(rows)
    text = table(summary, args, timing)
    print(text)
    publish("bench_priors.py", "Priors: gated PixelCNN and transformer at equal training time", argv, text,
            args.write, args.json, {"rows": rows, "summary": summary, "cache_timing": timing})
    if args.write:
        figure(rows, FIGURE, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
