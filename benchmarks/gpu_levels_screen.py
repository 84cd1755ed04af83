"""The table of gpu_levels_screen.sh: per setting, the 2-level minus the 1-level unseen-photo PSNR over the seeds
whose two runs both finished (mean and standard error), with each level's mean PSNR. A setting with no 1-level runs
(a change to the 2-level model alone) is compared with the reference setting's 1-level run of each seed.

    python3 benchmarks/gpu_levels_screen.py OUT_FOLDER [--json FILE] [--reference clip1]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from statistics import fmean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root: run from anywhere

from bench_levels import mean_and_error
from checkpoint import read_checkpoint
from runs import CheckpointError

REFERENCE = "clip1"   # the setting whose 1-level runs a 2-level-only setting is compared with


def finished(folder: Path) -> dict:
    """{(setting, seed, levels): final metrics} of every finished run folder under `folder`."""
    found = {}
    for run in sorted(p for p in folder.iterdir() if p.is_dir()):
        m = re.fullmatch(r"(.+)-seed(\d+)-([12])", run.name)
        if not m:
            continue
        try:
            ckpt = read_checkpoint(run / "checkpoint.pt")
        except (CheckpointError, OSError):
            continue
        if ckpt["step"] == ckpt["config"]["steps"] and ckpt.get("metrics"):
            found[(m[1], int(m[2]), int(m[3]))] = dict(ckpt["metrics"], elapsed=ckpt["elapsed"])
    return found


def table(found: dict, reference: str = REFERENCE) -> list[str]:
    runs = defaultdict(dict)                    # setting -> seed -> {levels: final metrics}
    for (setting, seed, levels), metrics in found.items():
        runs[setting].setdefault(seed, {})[levels] = metrics
    lines = ["| setting | seeds | 1-level unseen PSNR | 2-level unseen PSNR | gap (2 - 1) | per seed | train s (1, 2) |",
             "|---|---|---|---|---|---|---|"]
    for setting, seeds in runs.items():
        own = any(1 in m for m in seeds.values())
        ones = seeds if own else runs.get(reference, {})       # a 2-level-only setting: the reference's 1-level runs
        pairs = {s: (ones[s][1], m[2]) for s, m in sorted(seeds.items()) if 2 in m and 1 in ones.get(s, {})}
        if not pairs:
            continue
        gaps = [two["unseen_psnr"] - one["unseen_psnr"] for one, two in pairs.values()]
        mean, error = mean_and_error(gaps)
        psnr = [fmean(p[k]["unseen_psnr"] for p in pairs.values()) for k in (0, 1)]
        secs = [fmean(p[k]["elapsed"] for p in pairs.values()) for k in (0, 1)]
        label = setting if own else f"{setting} (1 level: {reference})"
        lines.append(f"| {label} | {','.join(map(str, pairs))} | {psnr[0]:.2f} dB | {psnr[1]:.2f} dB | {mean:+.2f} dB"
                     f"{'' if error is None else f' (SE {error:.2f})'} | {', '.join(f'{g:+.2f}' for g in gaps)} | "
                     f"{secs[0]:.0f}, {secs[1]:.0f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--json", default=None, help="also write every finished run's final metrics as JSON")
    p.add_argument("--reference", default=REFERENCE, help="whose 1-level runs a 2-level-only setting is compared with")
    a = p.parse_args()
    found = finished(Path(a.folder))
    print("\n".join(table(found, a.reference)))
    if a.json:
        Path(a.json).write_text(json.dumps({f"{k[0]}-seed{k[1]}-{k[2]}": v for k, v in found.items()}, indent=1))


if __name__ == "__main__":
    main()
