"""Codebook-health ablation: train each quantizer variant at an equal budget and compare codebook use.

    python ablation.py --write          # all variants, 1500 steps each, table into BENCHMARKS.md
    python ablation.py --steps 100      # a quick look

Every variant trains through train.py's `train()` on the built-in sample (64x64, batch 32, K=512 unless the
variant fixes K, seed 0) and is validated over the whole validation split: PSNR, codebook usage (fraction of the
K codes used at least once), perplexity of the code distribution, restarts, and the wall-clock seconds of the run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench import machine, write_section
from train import Config, train

PAPER = dict(kmeans_init=False, restart_threshold=0.0)
VARIANTS: dict[str, dict] = {
    "plain VQ (paper: eq. 3, random init)": dict(quantizer="vq", **PAPER),
    "EMA (paper: appendix A.1, random init)": dict(quantizer="ema", **PAPER),
    "EMA + k-means init": dict(quantizer="ema", kmeans_init=True, restart_threshold=0.0),
    "EMA + restart": dict(quantizer="ema", kmeans_init=False, restart_threshold=1.0),
    "EMA + k-means + restart": dict(quantizer="ema", kmeans_init=True, restart_threshold=1.0),
    "EMA + k-means + restart + cosine codes": dict(quantizer="ema", kmeans_init=True, restart_threshold=1.0,
                                                   cosine=True),
    "EMA + k-means + restart + 8-d lookup": dict(quantizer="ema", kmeans_init=True, restart_threshold=1.0,
                                                 lookup_dim=8),
    "FSQ (levels 8,5,5,5: 1000 codes)": dict(quantizer="fsq", **PAPER),
    "plain VQ + rotation trick": dict(quantizer="vq", rotation_trick=True, **PAPER),
}


def run(name: str, overrides: dict, base: Config) -> dict:
    with tempfile.TemporaryDirectory() as out:
        config = replace(base, out=out, **overrides)
        start = time.perf_counter()
        result = train(config)
        seconds = time.perf_counter() - start
    restarts = result.history[-1].get("restarts", 0) if result.history else 0
    return {"variant": name, **{k: result.final[k] for k in ("psnr", "codebook_usage", "perplexity")},
            "num_codes": result.model.quantizer.num_embeddings, "restarts": restarts, "seconds": seconds}


def table(rows: list[dict]) -> str:
    lines = ["| variant | K | val PSNR (dB) | codebook usage | perplexity | restarts | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['num_codes']} | {r['psnr']:.2f} | {r['codebook_usage']:.1%} | "
                     f"{r['perplexity']:.1f} | {r['restarts']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--only", default="", help="comma-separated substrings: run the variants whose name has one")
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    p.add_argument("--json", default=None, help="append each result as a JSON line to this file; variants "
                                                "already in it are not run again (so an interrupted run resumes)")
    args = p.parse_args(argv)
    base = Config(data="sample", image_size=64, batch_size=32, num_embeddings=512, steps=args.steps, seed=0,
                  eval_every=args.steps, log_every=max(1, args.steps // 10), progress=False)
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
        rows.append(run(name, overrides, base))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    text = table(rows)
    print(text)
    if args.write:
        note = (f"Each variant: {args.steps} steps, batch 32, 64x64, seed 0, on the built-in sample; metrics over "
                f"the whole validation split (80 crops of 4 held-out photos, 20,480 code positions). "
                f"Machine: {machine()}.")
        write_section("ablation.py", "Codebook health: `ablation.py`", "python ablation.py " +
                      " ".join(argv if argv is not None else sys.argv[1:]), note + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
