"""Codebook-health ablation: train each quantizer variant at an equal budget and compare codebook use.

    python benchmarks/ablation.py --write          # all variants, 1500 steps each, table into BENCHMARKS.md
    python benchmarks/ablation.py --steps 100      # a quick look

Every variant trains through train.py's `train()` on the built-in sample (64x64, batch 32, K=512 unless the
variant fixes K, seed 0) and is validated over the whole validation split: PSNR, codebook usage (fraction of the
K codes used at least once), perplexity of the code distribution, restarts, and the wall-clock seconds of the run.
The usage on the validation split's 4 unseen photos alone is a column of its own: it measures how far codes
learned on the training photos transfer to different content, not only whether codes are dead.

The best variant, printed last, is the one with the highest validation PSNR among those that use at least 95% of
their codes on the validation split; train.Config's defaults are that variant.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root: run from anywhere

from bench_report import machine, publish
from checkpoint import Config
from evaluate import evaluate
from image_data import build_data, collate, sample_unseen_photos
from train import train

# every switch is set in every variant, so the table does not change when train.Config's defaults do
PAPER = dict(kmeans_init=False, restart_threshold=0.0, cosine=False, lookup_dim=0, rotation_trick=False)
HEALTHY = dict(PAPER, kmeans_init=True, restart_threshold=1.0)   # k-means init + dead-code restarts
VARIANTS: dict[str, dict] = {
    "plain VQ (paper: eq. 3, random init)": dict(PAPER, quantizer="vq"),
    "EMA (paper: appendix A.1, random init)": dict(PAPER, quantizer="ema"),
    "EMA + k-means init": dict(PAPER, quantizer="ema", kmeans_init=True),
    "EMA + restart": dict(PAPER, quantizer="ema", restart_threshold=1.0),
    "EMA + k-means + restart": dict(HEALTHY, quantizer="ema"),
    "EMA + k-means + restart + cosine codes": dict(HEALTHY, quantizer="ema", cosine=True),
    "EMA + k-means + restart + 8-d lookup": dict(HEALTHY, quantizer="ema", lookup_dim=8),
    "EMA + k-means + restart + cosine + 4-d lookup": dict(HEALTHY, quantizer="ema", cosine=True, lookup_dim=4),
    "FSQ (levels 8,5,5,5: 1000 codes)": dict(PAPER, quantizer="fsq"),
    "plain VQ + rotation trick": dict(PAPER, quantizer="vq", rotation_trick=True),
}


def run(name: str, overrides: dict, base: Config, unseen: DataLoader) -> dict:
    with tempfile.TemporaryDirectory() as out:
        config = replace(base, out=out, **overrides)
        start = time.perf_counter()
        result = train(config)
        seconds = time.perf_counter() - start
    restarts = result.history[-1].get("restarts", 0) if result.history else 0
    on_unseen = evaluate(result.model.cpu(), unseen, torch.device("cpu"))
    return {"variant": name, **{k: result.final[k] for k in ("psnr", "codebook_usage", "perplexity")},
            "unseen_photos_usage": on_unseen["codebook_usage"], "unseen_photos_psnr": on_unseen["psnr"],
            "num_codes": result.model.quantizer.num_embeddings, "restarts": restarts, "seconds": seconds}


def best(rows: list[dict], min_usage: float = 0.95) -> dict | None:
    """The row with the highest validation PSNR among those using at least `min_usage` of their codes."""
    healthy = [r for r in rows if r["codebook_usage"] >= min_usage]
    return max(healthy, key=lambda r: r["psnr"]) if healthy else None


def table(rows: list[dict]) -> str:
    lines = ["| variant | K | val PSNR (dB) | codebook usage | perplexity | usage on the 4 unseen photos | restarts "
             "| seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['num_codes']} | {r['psnr']:.2f} | {r['codebook_usage']:.1%} | "
                     f"{r['perplexity']:.1f} | {r['unseen_photos_usage']:.1%} | {r['restarts']} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--only", default="", help="comma-separated substrings: run the variants whose name has one")
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    p.add_argument("--json", default=None, help="append each result as a JSON line to this file; variants "
                                                "already in it are not run again (so an interrupted run resumes)")
    args = p.parse_args(argv)
    # the recipe the table was made with (the paper's constant 2e-4), whatever train.Config's defaults are now
    base = Config(data="sample", image_size=64, batch_size=32, num_embeddings=512, steps=args.steps, seed=0,
                  lr=2e-4, lr_schedule="constant", warmup_steps=0,
                  eval_every=args.steps, log_every=max(1, args.steps // 10), progress=False)
    data = build_data("sample", base.image_size)
    unseen = DataLoader(sample_unseen_photos(data.val), batch_size=64, collate_fn=collate)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    done = {}
    if args.json and Path(args.json).exists():
        done = {r["variant"]: r for r in map(json.loads, Path(args.json).read_text().splitlines()) if r}
    rows = []
    for name, overrides in VARIANTS.items():
        if wanted and not any(w in name for w in wanted):
            continue
        if name in done:
            rows.append(done[name])
            continue
        rows.append(run(name, overrides, base, unseen))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    text = table(rows)
    top = best(rows)
    text += "\n\n" + (f"Best (highest val PSNR with at least 95% codebook usage): {top['variant']}." if top else
                       "No variant used 95% of its codes on the validation split.")
    print(text)
    num_unseen = len(unseen.dataset)
    note = (f"Each variant: {args.steps} steps, batch 32, 64x64, seed 0, on the built-in sample; metrics over "
            f"the whole validation split ({num_unseen} crops of 4 unseen photos and {len(data.val) - num_unseen} "
            f"of held-out strips: {len(data.val) * (base.image_size // 4) ** 2:,} code positions). "
            f"Machine: {machine()}.")
    publish("ablation.py", "Codebook health: `ablation.py`", argv, note + "\n\n" + text, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
