"""The nearest-code search alone, and what the codebook size K costs a training step.

    python benchmarks/bench_search.py                  # the search at four shapes, train.py's step at K = 512, 2048
    python benchmarks/bench_search.py --step-before    # also the step with the reference search in place
    python benchmarks/bench_search.py --write          # also writes the results into BENCHMARKS.md

Search: codebook.nearest_code, unfused (a matrix product per chunk of rows, then a two-stage argmax) and fused
(`fused=True`, as the training step calls it: the compiled search that never writes the scores, used on a CPU for
codes of at most 8 dimensions), against `reference_nearest_code` (the search as it was before: 64 MiB chunks of
||e||^2 - 2 z.e written by addmm, which first copies ||e||^2 into every row, then argmin over each row) at
N x K x D = 8192 x 2048 x 4 (a 64 px batch of 32 in the default 4-d cosine lookup), 32768 x 2048 x 4 (128 px),
8192 x 2048 x 64 (the paper's search in D = 64) and 131072 x 8192 x 4. The 4-d inputs are unit vectors, as the
cosine lookup searches them; the 64-d ones are Gaussian. Time is the median of interleaved repeats; the peak extra
memory on a CPU is the growth of the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs
just before the call) over its resident memory then, each case in a fresh process; on CUDA it is
torch.cuda.max_memory_allocated over the memory allocated before the call; the fused search is compiled (by a
first call) before either is measured. The searches must return the same indices but for ties; the number of rows
where each differs from the old one is reported. The compile itself is timed apart: the first fused call in a fresh
process, with an empty compile cache and with the cache the first one left.

Quantizer: the default quantizer (EMA, cosine, the 4-d lookup, restarts; D = 64) in training mode at N = 8192 and
32768 (batches of 32 at 64 and 128 px), K = 512 and 2048: its forward and backward, the same with the search
replaced by fixed indices (what else grows with K), and the EMA update, the restarts and the code counts alone.

Step: train.py's `train()` with every default (the 4-d cosine EMA quantizer, k-means start, restarts) on the
built-in sample, batch 32, at 64 and 128 px (on a GPU also 128 px batch 128), K = 512 against K = 2048. Each
configuration runs for two lengths, and its steps/s is the difference in steps over the difference in wall time,
so the start (data, model, k-means) and the final validation and checkpoint cancel out; the runs take turns
within each repeat (the median of the repeats is reported), after one untimed run of each configuration (which
compiles the fused search, once per process and K). With --step-before the same runs are also made with
`reference_nearest_code` patched in.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import subprocess
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root: run from anywhere

import codebook
import models
from bench_report import machine, peak_extra_bytes, publish
from checkpoint import Config
from runs import pick_device

SEARCH_CASES = [(8192, 2048, 4), (32768, 2048, 4), (8192, 2048, 64), (131072, 8192, 4)]


def reference_nearest_code(flat: Tensor, codebook: Tensor, max_chunk_elements: int | None = 1 << 24,
                           fused: bool = False) -> Tensor:
    """The search as it was: argmin over ||e||^2 - 2 z.e in chunks of at most 2^24 scores (64 MiB); `fused` is
    accepted and ignored, so it can stand in for codebook.nearest_code."""
    flat, codebook = flat.float(), codebook.float()
    num_codes = codebook.shape[0]
    chunk = max(1, (max_chunk_elements or 1 << 24) // num_codes)
    code_sq = codebook.pow(2).sum(1)                                   # (K,)
    indices = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for start in range(0, flat.shape[0], chunk):
        rows = flat[start:start + chunk]                               # (n, D)
        scores = torch.addmm(code_sq, rows, codebook.t(), alpha=-2.0)  # (n, K): ||e||^2 - 2 z.e
        indices[start:start + chunk] = scores.argmin(1)
    return indices


SEARCHES = {"before": reference_nearest_code, "unfused": codebook.nearest_code,
            "fused": functools.partial(codebook.nearest_code, fused=True)}
STEP_SEARCHES = {"before": reference_nearest_code, "after": codebook.nearest_code}   # as the quantizers call it


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def search_inputs(n: int, k: int, d: int, device: torch.device) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    flat, codes = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    if d <= 8:   # the low-dimensional lookup searches unit vectors
        flat, codes = F.normalize(flat, dim=1), F.normalize(codes, dim=1)
    return flat.to(device), codes.to(device)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_child(kind: str, n: int, k: int, d: int) -> int:
    """In a fresh process: reset the kernel's peak-RSS mark (VmHWM), search once, read the peak's growth."""
    flat, codes = search_inputs(n, k, d, torch.device("cpu"))
    SEARCHES[kind](flat, codes)                        # the fused search's compile is not the search's memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                   # Linux: reset VmHWM to the current resident size
    before = _status_kb("VmRSS")
    SEARCHES[kind](flat, codes)
    return (_status_kb("VmHWM") - before) * 1024


def search_peak_bytes(kind: str, case: tuple[int, int, int], device: torch.device) -> int:
    """Peak extra bytes of one search (bench_report.peak_extra_bytes: a fresh process on the CPU)."""
    def make_call():
        flat, codes = search_inputs(*case, device)
        SEARCHES[kind](flat, codes)
        return lambda: SEARCHES[kind](flat, codes)

    return peak_extra_bytes(device, make_call, f"import bench_search; "
                            f"print(bench_search._peak_child({kind!r}, {', '.join(map(str, case))}))")


def bench_search(case: tuple[int, int, int], device: torch.device, repeats: int) -> dict:
    flat, codes = search_inputs(*case, device)
    indices = {kind: fn(flat, codes) for kind, fn in SEARCHES.items()}   # also the warm-up
    times: dict[str, list[float]] = {kind: [] for kind in SEARCHES}
    for _ in range(repeats):
        for kind, fn in SEARCHES.items():
            sync(device)
            start = time.perf_counter()
            fn(flat, codes)
            sync(device)
            times[kind].append(time.perf_counter() - start)
    ms = {kind: 1000 * statistics.median(t) for kind, t in times.items()}
    peak = {kind: search_peak_bytes(kind, case, device) / 2**20 for kind in SEARCHES}
    row = {"N": case[0], "K": case[1], "D": case[2],
           "fused_applies": codebook.fused_search_applies(flat, codes)}
    for kind in SEARCHES:
        row[f"{kind}_ms"], row[f"{kind}_peak_mib"] = ms[kind], peak[kind]
        row[f"{kind}_rows_differing"] = int((indices["before"] != indices[kind]).sum())
        row[f"{kind}_time_ratio"] = ms[kind] / ms["before"]
    return row


def bench_quantizer(repeats: int) -> list[dict]:
    """ms of the default quantizer's training forward + backward, with and without its search, and of its parts."""
    from checkpoint import build_model

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    rows = []
    for batch, side in [(32, 16), (32, 32)]:
        for k in (512, 2048):
            torch.manual_seed(0)
            vq = build_model(Config(num_embeddings=k, kmeans_init=False)).quantizer.train()
            z = torch.randn(batch, vq.embedding_dim, side, side, requires_grad=True)
            fixed = torch.randint(k, (batch * side * side,))

            def step():
                out = vq(z)
                (out.quantized.sum() + out.loss).backward()

            with_search = median_ms(step)
            with search_in_place(lambda flat, codes, fused=False: fixed):
                without = median_ms(step)
            with torch.no_grad():
                flat = vq._flat(z)
            rows.append({"N": len(fixed), "K": k, "step_ms": with_search, "without_search_ms": without,
                         "ema_ms": median_ms(lambda: vq._ema_update(flat, fixed)),
                         "restart_ms": median_ms(lambda: vq._restart_dead_codes(flat, vq.cluster_size)),
                         "counts_ms": median_ms(lambda: codebook.code_counts(fixed, k))})
    return rows


def compile_seconds() -> dict:
    """Seconds of the first fused search (8192 x 2048 x 4) in a fresh process, with an empty compile cache and
    again with the cache that run left; the same search's own time is well under 0.1 s."""
    code = ("import time, bench_search, codebook; flat, codes = bench_search.search_inputs(8192, 2048, 4, "
            "bench_search.torch.device('cpu')); start = time.perf_counter(); "
            "codebook.nearest_code(flat, codes, fused=True); print(time.perf_counter() - start)")
    seconds = {}
    with tempfile.TemporaryDirectory() as cache:
        for name in ("empty cache", "warm cache"):
            out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True,
                                 text=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
            if out.returncode:
                raise RuntimeError(f"compile-time subprocess failed: {out.stderr.strip()[-500:]}")
            seconds[name] = float(out.stdout.strip().splitlines()[-1])
    return seconds


@contextlib.contextmanager
def search_in_place(fn):
    """Every caller of the search (the quantizers, k-means) calls `fn` instead while inside."""
    saved = models.nearest_code, codebook.nearest_code
    models.nearest_code = codebook.nearest_code = fn
    try:
        yield
    finally:
        models.nearest_code, codebook.nearest_code = saved


def train_seconds(size: int, batch: int, k: int, steps: int, device: torch.device) -> float:
    """Wall time of one whole train() run of `steps` steps with every default but the size, batch and K."""
    from train import train
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        config = Config(image_size=size, batch_size=batch, num_embeddings=k, steps=steps, out=out,
                        progress=False, device=str(device))
        start = time.perf_counter()
        train(config)
        return time.perf_counter() - start


def bench_step(size: int, batch: int, device: torch.device, repeats: int, lengths: tuple[int, int],
               searches: list[str]) -> dict:
    """steps/s of train() at K = 512 and K = 2048 (for each search in `searches`), from two run lengths."""
    runs = [(search, k) for search in searches for k in (512, 2048)]
    rates: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    for search, k in runs:   # untimed: compiles what the timed runs use
        with search_in_place(STEP_SEARCHES[search]):
            train_seconds(size, batch, k, lengths[0], device)
    for _ in range(repeats):
        for search, k in runs:
            with search_in_place(STEP_SEARCHES[search]):
                short, long = (train_seconds(size, batch, k, steps, device) for steps in lengths)
            rates[(search, k)].append((lengths[1] - lengths[0]) / max(long - short, 1e-9))
    row = {"size": size, "batch": batch, "lengths": list(lengths)}
    for search in searches:
        fast, slow = (statistics.median(rates[(search, k)]) for k in (512, 2048))
        row[search] = {"steps_per_s_512": fast, "steps_per_s_2048": slow, "step_time_ratio": fast / slow}
    return row


def report(results: dict) -> str:
    lines = [f"Machine: {results['machine']}; device {results['device']}, {results['threads']} threads.", "",
             "| N x K x D | before ms | unfused ms | fused ms | fused / before | peak MiB before, unfused, fused | "
             "rows differing from before: unfused, fused |",
             "|---|---|---|---|---|---|---|"]
    for r in results["search"]:
        fused = f"{r['fused_ms']:.1f}" if r["fused_applies"] else f"({r['fused_ms']:.1f}: not used)"
        lines.append(f"| {r['N']} x {r['K']} x {r['D']} | {r['before_ms']:.1f} | {r['unfused_ms']:.1f} | {fused} | "
                     f"{r['fused_time_ratio']:.3f} | {r['before_peak_mib']:.1f}, {r['unfused_peak_mib']:.1f}, "
                     f"{r['fused_peak_mib']:.1f} | {r['unfused_rows_differing']}, {r['fused_rows_differing']} |")
    if results.get("compile"):
        c = results["compile"]
        lines += ["", f"The fused search's compile: the first call in a fresh process takes {c['empty cache']:.1f} s "
                      f"with an empty compile cache, {c['warm cache']:.1f} s with a warm one."]
    if results.get("quantizer"):
        lines += ["", "| quantizer, training | forward + backward ms | without the search ms | EMA update ms | "
                      "restarts ms | code counts ms |", "|---|---|---|---|---|---|"]
        for r in results["quantizer"]:
            lines.append(f"| N = {r['N']}, K = {r['K']} | {r['step_ms']:.2f} | {r['without_search_ms']:.2f} | "
                         f"{r['ema_ms']:.2f} | {r['restart_ms']:.2f} | {r['counts_ms']:.3f} |")
    lines += ["", "| train.py step | search | steps/s K = 512 | steps/s K = 2048 | step time K = 2048 / K = 512 |",
              "|---|---|---|---|---|"]
    for r in results["step"]:
        for search in ("before", "after"):
            if search in r:
                s = r[search]
                lines.append(f"| {r['size']} px, batch {r['batch']} | {search} | {s['steps_per_s_512']:.2f} | "
                             f"{s['steps_per_s_2048']:.2f} | {s['step_time_ratio']:.3f} |")
    return "\n".join(lines)


def headline(results: dict) -> list[str]:
    """The search's time and memory against the old search's, and what K = 2048 costs a step over K = 512."""
    lines = []
    for r in results["search"]:
        if (r["N"], r["K"], r["D"]) == (8192, 2048, 4):
            lines.append(f"search time at 8192 x 2048 x 4 / before: fused {r['fused_time_ratio']:.3f}, "
                         f"unfused {r['unfused_time_ratio']:.3f}")
        if (r["N"], r["K"], r["D"]) == (131072, 8192, 4):
            lines.append(f"search peak extra memory at 131072 x 8192 x 4: fused {r['fused_peak_mib']:.1f} MiB, "
                         f"unfused {r['unfused_peak_mib']:.1f} MiB")
    for r in results["step"]:
        lines.append(f"train.py step time at {r['size']} px batch {r['batch']}, K = 2048 / K = 512: "
                     f"{r['after']['step_time_ratio']:.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats of each search timing (median)")
    p.add_argument("--step-repeats", type=int, default=3, help="interleaved repeats of the train.py runs (median)")
    p.add_argument("--lengths", default="5,25", help="the two run lengths in steps at 64 px (and on a GPU at 128 px "
                                                      "batch 128)")
    p.add_argument("--lengths-128", default="2,10", help="the two run lengths in steps at 128 px batch 32")
    p.add_argument("--steps-at", default=None, help="the step's sizes and batches, e.g. 128x128 (default: 64x32 and "
                                                      "128x32, and on a GPU also 128x128)")
    p.add_argument("--step-before", action="store_true", help="also time the step with the reference search")
    p.add_argument("--no-step", action="store_true", help="time the search only")
    p.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    p.add_argument("--json", default=None, help="also save the raw results to this file")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    results: dict = {"machine": machine(), "device": str(device), "threads": torch.get_num_threads(),
                     "search": [], "step": []}
    if device.type == "cpu":
        results["compile"] = compile_seconds()
        print(json.dumps({"compile": results["compile"]}), flush=True)
    for case in SEARCH_CASES:
        repeats = args.repeats if case[0] * case[1] <= 1 << 26 else max(1, args.repeats // 2)
        results["search"].append(bench_search(case, device, repeats))
        print(json.dumps({"search": results["search"][-1]}), flush=True)
    if device.type == "cpu":
        results["quantizer"] = bench_quantizer(3 * args.repeats)
        print(json.dumps({"quantizer": results["quantizer"]}), flush=True)
    if not args.no_step:
        short, long = (int(s) for s in args.lengths.split(","))
        short128, long128 = (int(s) for s in args.lengths_128.split(","))
        configs = [(64, 32, (short, long)), (128, 32, (short128, long128))]
        if device.type == "cuda":
            configs.append((128, 128, (short, long)))
        if args.steps_at:
            wanted = [tuple(int(v) for v in item.split("x")) for item in args.steps_at.split(",")]
            configs = [(size, batch, (short128, long128) if (size, batch) == (128, 32) else (short, long))
                       for size, batch in wanted]
        searches = ["after", "before"] if args.step_before else ["after"]
        for size, batch, lengths in configs:
            results["step"].append(bench_step(size, batch, device, args.step_repeats, lengths, searches))
            print(json.dumps({"step": results["step"][-1]}), flush=True)
    text = report(results)
    print(text)
    print("\n".join(headline(results)))
    publish("bench_search.py", "The nearest-code search: `bench_search.py`", argv,
            text + "\n\n" + "\n".join(f"- {line}" for line in headline(results)), args.write, args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
