"""Quality per second of training: which encoder, decoder, codebook and recipe reconstruct photos the model never
saw best, when every variant gets the same wall-clock budget on this machine.

    python benchmarks/study.py --plan                        # measure each variant's step time, fix its steps (study_plan.json)
    python benchmarks/study.py --json rows.jsonl --write     # train every planned variant; table and plot into BENCHMARKS.md

Every variant trains through train.py's `train()` on the built-in sample (64x64, seed 0, every switch set, so the
table does not change when train.Config's defaults do) for the number of steps that fits the budget at its own
measured step time. The steps are written to study_plan.json once (`--plan`), so a later run of the study trains
the same steps and reproduces the table. Reported, on the 4 unseen photos (the content a new user's photos are
like) and on the held-out strips of the training photos separately: PSNR and SSIM; codebook usage over the whole
validation split; bits per image (code positions x log2 K); training seconds. The leading rows and today's default
run with a second seed, and their mean decides.

The best variant, printed last, is the one with the highest unseen-photo PSNR (mean over its seeds) among those that
use at least 90% of their codes on the validation split.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root: run from anywhere

from bench_report import ROOT, machine, publish
from checkpoint import Config
from train import train

PLAN = ROOT / "benchmarks" / "study_plan.json"
PLOT = ROOT / "model_visualisation" / "study.png"
BUDGET_S = 120          # the quick start's training time on the 2-core development CPU, about 2 minutes
MIN_USAGE = 0.90

# today's default, every switch spelled out
BASE = dict(data="sample", image_size=64, batch_size=32, hidden_channels=128, residual_channels=32,
            num_residual_blocks=2, block="paper", attention=False, downsample=4, embedding_dim=64, num_embeddings=512,
            quantizer="ema", kmeans_init=True, restart_threshold=1.0, cosine=True, lookup_dim=4, lr=2e-4,
            lr_schedule="constant", warmup_steps=0, progress=False)
RECIPE = dict(lr=1e-3, warmup_steps=100, lr_schedule="cosine")
VARIANTS: dict[str, dict] = {
    "today's default": {},
    "lr 1e-3, warm-up, cosine decay": RECIPE,
    "paper width 256": dict(hidden_channels=256),
    "4 residual blocks": dict(num_residual_blocks=4),
    "residual width 128": dict(residual_channels=128),
    "modern block (GN + SiLU)": dict(block="modern"),
    "modern block + attention": dict(block="modern", attention=True),
    "K = 2048": dict(num_embeddings=2048),
    "D-dimensional search (no cosine, no lookup)": dict(cosine=False, lookup_dim=0),
    "batch 16": dict(batch_size=16),
    "recipe + modern block": dict(RECIPE, block="modern"),
    "recipe + K = 2048": dict(RECIPE, num_embeddings=2048),
    "recipe + modern block + K = 2048": dict(RECIPE, block="modern", num_embeddings=2048),
    "lr 2e-3, warm-up, cosine decay": dict(RECIPE, lr=2e-3),
    "recipe + batch 16": dict(RECIPE, batch_size=16),
    "recipe + batch 8": dict(RECIPE, batch_size=8),
    "recipe + batch 16 + width 64": dict(RECIPE, batch_size=16, hidden_channels=64),
    "recipe + batch 16 + K = 2048": dict(RECIPE, batch_size=16, num_embeddings=2048),
    "recipe + batch 16 + lr 2e-3": dict(RECIPE, batch_size=16, lr=2e-3),
    "recipe + batch 16 + residual width 64": dict(RECIPE, batch_size=16, residual_channels=64),
    "recipe + batch 16 + EMA decay 0.95": dict(RECIPE, batch_size=16, decay=0.95),
    "recipe + batch 8 + K = 2048": dict(RECIPE, batch_size=8, num_embeddings=2048),
    "recipe + batch 16 + width 64 + K = 2048": dict(RECIPE, batch_size=16, hidden_channels=64, num_embeddings=2048),
    "recipe + batch 8 + width 64 + K = 2048": dict(RECIPE, batch_size=8, hidden_channels=64, num_embeddings=2048),
    "recipe + batch 16 + K = 4096": dict(RECIPE, batch_size=16, num_embeddings=4096),
}


def config_for(name: str, seed: int = 0, steps: int = 100) -> Config:
    over = VARIANTS[name]
    c = Config(**{**BASE, **over}, seed=seed, steps=steps)
    return replace(c, eval_every=max(1, steps // 4), log_every=max(1, steps // 20),
                   warmup_steps=min(c.warmup_steps, steps // 5))


def measure_rate(name: str, steps: int = 40) -> float:
    """Training steps per second of the variant, from train()'s own records after its first quarter (warm-up)."""
    with tempfile.TemporaryDirectory() as out:
        c = replace(config_for(name, steps=steps), out=out, eval_every=10**9, log_every=steps // 4)
        history = train(c).history
    later = history[1:]
    seconds = later[-1]["elapsed_s"] - history[0]["elapsed_s"]
    return (later[-1]["step"] - history[0]["step"]) / max(seconds, 1e-9)


def run(name: str, steps: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        c = replace(config_for(name, seed, steps), out=out)
        start = time.perf_counter()
        result = train(c)
        seconds = time.perf_counter() - start
    f = result.final
    positions = (c.image_size // c.downsample) ** 2
    curve = [(r["elapsed_s"], r["val_unseen_psnr"]) for r in result.history if "val_unseen_psnr" in r]
    return {"variant": name, "seed": seed, "steps": steps, "seconds": seconds,
            "train_seconds": result.history[-1]["elapsed_s"], "unseen_psnr": f["unseen_psnr"],
            "unseen_ssim": f["unseen_ssim"], "strips_psnr": f["strips_psnr"], "strips_ssim": f["strips_ssim"],
            "psnr": f["psnr"], "ssim": f["ssim"], "codebook_usage": f["codebook_usage"],
            "bits_per_image": positions * math.log2(c.num_embeddings), "curve": curve}


def summarise(rows: list[dict]) -> list[dict]:
    """One row per variant: the mean over its seeds of every figure."""
    out = []
    for name in VARIANTS:
        mine = [r for r in rows if r["variant"] == name]
        if mine:
            keys = ("unseen_psnr", "unseen_ssim", "strips_psnr", "strips_ssim", "codebook_usage", "train_seconds")
            out.append({"variant": name, "seeds": len(mine), "steps": mine[0]["steps"],
                        "bits_per_image": mine[0]["bits_per_image"],
                        **{k: statistics.mean(r[k] for r in mine) for k in keys}})
    return out


def best(summary: list[dict]) -> dict | None:
    healthy = [r for r in summary if r["codebook_usage"] >= MIN_USAGE]
    return max(healthy, key=lambda r: r["unseen_psnr"]) if healthy else None


def table(summary: list[dict]) -> str:
    lines = ["| variant | seeds | steps | train s | unseen PSNR | unseen SSIM | strips PSNR | strips SSIM | usage | "
             "bits/image |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(summary, key=lambda r: -r["unseen_psnr"]):
        lines.append(f"| {r['variant']} | {r['seeds']} | {r['steps']} | {r['train_seconds']:.0f} | "
                     f"{r['unseen_psnr']:.2f} dB | {r['unseen_ssim']:.3f} | {r['strips_psnr']:.2f} dB | "
                     f"{r['strips_ssim']:.3f} | {r['codebook_usage']:.1%} | {r['bits_per_image']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, name in enumerate(VARIANTS):
        # the seed whose run took the fewest seconds: a run that shared the CPU with other jobs stretches its curve
        runs = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["train_seconds"])
        if runs:
            seconds, psnr = zip(*runs[0]["curve"])
            slow = " (beside other jobs)" if runs[0]["train_seconds"] > 1.25 * BUDGET_S else ""
            ax.plot(seconds, psnr, marker="os^"[i // 10], linestyle="-" if i < 10 else "--", label=name + slow)
    ax.set_xlabel("training seconds (2-core CPU)")
    ax.set_ylabel("PSNR on the 4 unseen photos (dB)")
    ax.set_title("VQ-VAE variants at an equal wall-clock budget (of each variant's seeds, the fastest run)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", action="store_true", help="measure step times and write study_plan.json")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="training seconds per variant (with --plan)")
    p.add_argument("--plan-steps", type=int, default=40, help="steps timed per variant (with --plan)")
    p.add_argument("--only", default="", help="comma-separated substrings: run the variants whose name has one")
    p.add_argument("--leaders", type=int, default=3, help="variants besides today's default that get seed 1")
    p.add_argument("--json", default=None, help="append each run as a JSON line; runs already there are skipped")
    p.add_argument("--write", action="store_true", help="write the table and plot into BENCHMARKS.md")
    args = p.parse_args(argv)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    names = [n for n in VARIANTS if not wanted or any(w in n for w in wanted)]
    if args.plan:
        plan = json.loads(PLAN.read_text()) if PLAN.exists() else {}
        for name in names:
            rate = measure_rate(name, args.plan_steps)
            plan[name] = {"steps": int(args.budget * rate), "steps_per_s": round(rate, 3), "budget_s": args.budget}
            print(f"{name}: {rate:.2f} steps/s -> {plan[name]['steps']} steps", flush=True)
            PLAN.write_text(json.dumps(plan, indent=2) + "\n")
        return 0
    plan = json.loads(PLAN.read_text())
    rows = [json.loads(line) for line in Path(args.json).read_text().splitlines()] \
        if args.json and Path(args.json).exists() else []
    # a row trained for other steps than the plan's (the variant was planned anew since) is run again
    rows = [r for r in rows if r["variant"] in plan and r["steps"] == plan[r["variant"]]["steps"]]

    def ensure(name: str, seed: int) -> None:
        if any(r["variant"] == name and r["seed"] == seed for r in rows):
            return
        rows.append(run(name, plan[name]["steps"], seed))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")

    for name in names:
        ensure(name, 0)
    ranked = [r["variant"] for r in sorted(summarise(rows), key=lambda r: -r["unseen_psnr"])
              if r["codebook_usage"] >= MIN_USAGE and r["variant"] != "today's default"]
    for name in ["today's default", *ranked[:args.leaders]]:
        if name in names:
            ensure(name, 1)
    summary = summarise(rows)
    text = table(summary)
    top, today = best(summary), next((r for r in summary if r["variant"] == "today's default"), None)
    if top:
        text += (f"\n\nBest (highest unseen-photo PSNR, mean over seeds, with at least {MIN_USAGE:.0%} codebook "
                 f"usage): {top['variant']}.")
        if today:
            text += (f" Against today's default: unseen PSNR {top['unseen_psnr'] - today['unseen_psnr']:+.2f} dB, "
                     f"unseen SSIM {top['unseen_ssim'] - today['unseen_ssim']:+.3f}, usage "
                     f"{top['codebook_usage']:.1%}.")
    print(text)
    if args.write:
        plot(rows, PLOT)
        budget = next(iter(plan.values()))["budget_s"]
        note = (f"Each variant trains for {budget:.0f} s of its own measured step time on this machine ({machine()}, "
                f"bf16 autocast where the CPU has it), 64x64 crops of the built-in sample, batch 32 unless the "
                f"variant says otherwise; steps fixed in study_plan.json. PSNR and SSIM (11-pixel Gaussian window, "
                f"sigma 1.5, data range 1) on the 4 unseen photos and on the held-out strips of the training "
                f"photos; usage over the whole validation split. The steps come from `--plan` timings: of 40 steps for "
                f"the first 15 variants (an earlier session, which ran today's default at 925 steps), of 300 steps "
                f"with every other job paused for today's default and the `recipe + batch` variants (`--plan "
                f"--plan-steps 300`); a row trained for other steps than the plan's is dropped and run again. Train "
                f"seconds over the budget come from 40-step timings that were optimistic (by up to 15%) and from "
                f"runs that shared the 2 cores with other jobs (seed 0 of today's default, 192 s, and of batch 8 + K "
                f"= 2048, 151 s; recipe + batch 16, 396 s; EMA decay 0.95, 171 s); neither changes the steps, so "
                f"neither changes a PSNR. Unseen-photo PSNR against training seconds: "
                f"![study](model_visualisation/study.png)")
        publish("study.py", "Quality per second: `study.py`", argv, note + "\n\n" + text, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
