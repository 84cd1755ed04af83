"""Benchmark the prepared-data path on a Food101-layout copy made from the built-in sample photos.

    python benchmarks/bench_data.py               # 10,000 JPEGs of ~512 px, 64x64: prints a table and a summary line
    python benchmarks/bench_data.py --write       # also writes the results into BENCHMARKS.md
    python benchmarks/bench_data.py --images 300  # a smoke test

The copy (`make_food101_copy`) is N JPEGs (quality 90, long side 448-512 px, as Food101's own images are at most
512 px) of random crops and flips of the 19 scikit-image sample photos, in torchvision's Food101 layout
(food-101/images/<class>/<id>.jpg, meta/train.json and meta/test.json 75% / 25%, meta/classes.txt); it is kept
under --copy-dir and reused while its marker matches. Every measurement reads files already in the OS page cache
(each file is read once first), so none of them pays for the disk. Measured:
- preparing: images/s of `build_data("food101", S)` preparing train + val into a fresh folder with W worker
  processes, against torchvision's ImageFolder (Resize(S), CenterCrop(S), PILToTensor) read through a DataLoader
  with the same W workers, batch 64, over the same files; medians of interleaved repeats;
- first vs second run: wall time of the whole `train.py` process (10 steps, one validation) run twice on the
  copy, the first preparing into a fresh folder, the second (--overwrite) reusing it; medians of repeated pairs;
- train.py end to end: images/s from train()'s own metrics (data loading included, validation excluded, the first
  logged block skipped) against the model-only images/s of the same model and settings on a fixed batch, timed
  between train()'s logged blocks (medians; on CUDA also 128x128 at batch 128);
- reading the prepared training split with image_data.batches, no model: in memory, and memory-mapped
  (cache_limit_mb=0) with W workers.

With --memory it measures only host memory, into its own section of BENCHMARKS.md: the peak resident memory of
train.py (20 steps of batch 16, and its validation) and of evaluate.py (batch 64) on the copy, the splits prepared
beforehand, at each of --memory-sizes; with --before DIR also those of the checkout in DIR (e.g. an older commit's
`git worktree`), side by side.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import tqdm.auto  # noqa: F401  prepared.py imports it (and build_data torchvision) on first use: not in a timing
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root: run from anywhere

from bench import SAME_MATH, Trainer, sync
from bench_report import machine, publish, write_section
from checkpoint import Config
from image_data import batches, build_data, default_workers, sample_photo_paths
from models import VQVAE
from runs import amp_dtype_for, pick_device, use_channels_last

ROOT = Path(__file__).resolve().parents[1]   # the repository root
COPY_FORMAT = 1


# ---------------------------------------------------------------------------------------------------------------
# The Food101-layout copy

_PHOTOS: list[Image.Image] = []   # the sample photos, loaded once in each process that writes images


def _load_photos() -> None:
    train, val = sample_photo_paths()
    _PHOTOS[:] = [Image.open(p).convert("RGB") for p in train + val]


def _write_image(job: tuple[Path, int, int, int]) -> None:
    """Image i of the copy: a random crop of a random photo, long side 448-512 px, aspect 3:4 to 1:1, random flip."""
    path, i, seed, size = job
    rng = np.random.default_rng([seed, i])
    photo = _PHOTOS[int(rng.integers(len(_PHOTOS)))]
    long = int(rng.integers(size - size // 8, size + 1))
    short = round(long * rng.uniform(0.75, 1.0))
    w, h = (long, short) if rng.random() < 0.5 else (short, long)
    pw, ph = photo.size
    bw = min(pw, ph * w / h) * rng.uniform(0.5, 1.0)                     # the crop keeps the output's aspect
    bh = bw * h / w
    left, top = rng.uniform(0, pw - bw), rng.uniform(0, ph - bh)
    img = photo.resize((w, h), Image.BICUBIC, box=(left, top, left + bw, top + bh), reducing_gap=2.0)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img.save(path, "JPEG", quality=90)


def copy_layout(n: int, classes: int) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """(class names, train ids, test ids): image i is in class (i // 4) % classes, and in test when i % 4 == 3, so
    every class is 3:1 train:test; every class is a key of both files (as in Food101)."""
    names = [f"class_{k:02d}" for k in range(classes)]
    train, test = {c: [] for c in names}, {c: [] for c in names}
    for i in range(n):
        c = names[(i // 4) % classes]
        (test if i % 4 == 3 else train)[c].append(f"{c}/{i}")
    return names, train, test


def make_food101_copy(root: str | Path, n: int, size: int = 512, seed: int = 0, classes: int = 10) -> Path:
    """A Food101-layout copy of `n` JPEGs under `root` (read by torchvision.datasets.Food101(root) and
    build_data("food101", root=root)); an existing copy made with the same arguments is reused."""
    root = Path(root).expanduser().resolve()
    marker = {"format": COPY_FORMAT, "images": n, "size": size, "seed": seed, "classes": classes}
    final = root / "food-101"
    with contextlib.suppress(OSError, ValueError):
        if json.loads((final / "copy.json").read_text()) == marker:
            return root
    build = root / f".food-101-building-{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    names, train, test = copy_layout(n, classes)
    for c in names:
        (build / "images" / c).mkdir(parents=True)
    (build / "meta").mkdir()
    jobs = [(build / "images" / f"{rel}.jpg", int(rel.split("/")[1]), seed, size)
            for ids in (train, test) for rels in ids.values() for rel in rels]
    start = time.perf_counter()
    with multiprocessing.Pool(min(len(jobs), os.cpu_count() or 1) or 1, initializer=_load_photos) as pool:
        list(pool.imap_unordered(_write_image, jobs, chunksize=32))
    for split, ids in (("train", train), ("test", test)):
        (build / "meta" / f"{split}.json").write_text(json.dumps(ids))
        (build / "meta" / f"{split}.txt").write_text("".join(f"{r}\n" for rels in ids.values() for r in rels))
    (build / "meta" / "classes.txt").write_text("".join(f"{c}\n" for c in names))
    (build / "copy.json").write_text(json.dumps(marker))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(build, final)
    if n >= 200:
        print(f"made {n} JPEGs in {final} in {time.perf_counter() - start:.1f} s", flush=True)
    return root


def warm_cache(root: Path) -> dict:
    """Read every file of the copy once, so later measurements find it in the OS page cache."""
    files = [p for p in (root / "food-101").rglob("*") if p.is_file()]
    return {"files": len(files), "megabytes": sum(len(p.read_bytes()) for p in files) / 2**20}


@contextlib.contextmanager
def quiet():
    """Swallow the progress bars and the 'prepared ...' lines of the code being timed."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


# ---------------------------------------------------------------------------------------------------------------
# The measurements


def time_ours(root: Path, size: int, workers: int) -> tuple[float, int]:
    """Seconds of build_data preparing both splits into a fresh folder, and the number of images prepared."""
    with tempfile.TemporaryDirectory(dir=root, prefix=".prepared-") as where, quiet():
        start = time.perf_counter()
        data = build_data("food101", size, root=str(root), prepared_dir=where, num_workers=workers)
        return time.perf_counter() - start, len(data.train) + len(data.val)


def time_torchvision(root: Path, size: int, workers: int) -> tuple[float, int]:
    """Seconds of reading every image of the copy through ImageFolder + DataLoader at size S, and the count."""
    start = time.perf_counter()
    transform = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])
    dataset = datasets.ImageFolder(str(root / "food-101" / "images"), transform=transform, allow_empty=True)
    count = sum(len(x) for x, _ in DataLoader(dataset, batch_size=64, num_workers=workers))
    return time.perf_counter() - start, count


def bench_preparing(root: Path, size: int, workers: int, repeats: int) -> dict:
    times: dict[str, list[float]] = {"ours": [], "torchvision": []}
    counts = {}
    for _ in range(repeats):   # the two take turns, so a slow moment of the machine hits both
        for name, fn in (("ours", time_ours), ("torchvision", time_torchvision)):
            seconds, counts[name] = fn(root, size, workers)
            times[name].append(seconds)
    assert counts["ours"] == counts["torchvision"], counts
    result = {"images": counts["ours"], "size": size, "workers": workers, "repeats": repeats}
    for name, t in times.items():
        result[f"{name}_seconds"] = statistics.median(t)
        result[f"{name}_images_per_s"] = counts[name] / statistics.median(t)
        result[f"{name}_images_per_s_per_worker"] = result[f"{name}_images_per_s"] / max(1, workers)
    result["ratio"] = result["ours_images_per_s"] / result["torchvision_images_per_s"]
    return result


def train_py_seconds(root: Path, size: int, workers: int, device: torch.device, where: str, extra: list) -> float:
    """Wall time of one whole train.py process on the copy (10 steps, one validation) preparing into `where`."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(ROOT / "train.py"), "--data", "food101", "--data-root", str(root),
                   "--prepared-dir", where, "--steps", "10", "--eval-every", "10", "--image-size", str(size),
                   "--no-progress", "--out", out, "--device", str(device), "--num-workers", str(workers)]
        start = time.perf_counter()
        run = subprocess.run(command + extra, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if run.returncode:
        raise RuntimeError(f"train.py failed: {run.stderr.strip()[-800:]}")
    return seconds


def bench_first_second(root: Path, size: int, workers: int, device: torch.device, repeats: int) -> dict:
    """train.py preparing into a fresh folder (first) and reusing a prepared one (second, --overwrite), in the order
    first, second | second, first | ... so that a machine growing busier or quieter hits both; medians."""
    first, second = [], []
    with tempfile.TemporaryDirectory(dir=root, prefix=".prepared-") as folder:
        for k in range(repeats):
            fresh, done = str(Path(folder) / str(k)), str(Path(folder) / str(k - k % 2))
            runs = [(first, fresh, []), (second, done, ["--overwrite"])]
            for times, where, extra in runs if k % 2 == 0 else runs[::-1]:
                times.append(train_py_seconds(root, size, workers, device, where, extra))
    f, s = statistics.median(first), statistics.median(second)
    return {"first_seconds": f, "second_seconds": s, "ratio": s / f, "repeats": repeats}


def model_only(device: torch.device, size: int, batch: int, steps: int) -> Callable[[], float]:
    """A function timing `steps` training steps of the default model (SAME_MATH, as bench.py) on a fixed batch."""
    amp_dtype = amp_dtype_for("auto", device)
    torch.manual_seed(0)
    x = torch.rand(batch, 3, size, size, device=device) - 0.5
    trainer = Trainer(VQVAE(**SAME_MATH).to(device), x, amp_dtype, use_channels_last(device, amp_dtype), False)
    trainer.step(2)   # warm-up

    def seconds() -> float:
        sync(device)
        start = time.perf_counter()
        trainer.step(steps)
        sync(device)
        return time.perf_counter() - start
    return seconds


def bench_end_to_end(root: Path, size: int, batch: int, steps: int, workers: int, device: torch.device) -> dict:
    """train()'s images/s on the copy against the model-only rate, the two interleaved: after each of train()'s
    logged blocks (its callback runs outside the block's timing) the model alone trains as many steps."""
    from train import train

    block, model_seconds = max(1, steps // 5), []
    timed = model_only(device, size, batch, block)
    with tempfile.TemporaryDirectory() as out, quiet():
        config = Config(data="food101", data_root=str(root), image_size=size, batch_size=batch, steps=steps,
                        out=out, eval_every=10**9, log_every=block, progress=False, device=str(device),
                        num_workers=workers, **SAME_MATH)
        history = train(config, lambda record: model_seconds.append(timed())).history
    e2e = statistics.median(r["images_per_s"] for r in history[1:])   # the first block includes warm-up
    model = statistics.median(batch * block / t for t in model_seconds[1:])
    return {"size": size, "batch": batch, "steps": steps, "end_to_end_images_per_s": e2e,
            "model_only_images_per_s": model, "ratio": e2e / model}


def read_rate(dataset, batch: int, workers: int, pin: bool, count: int) -> float:
    """Images/s of `count` training batches from image_data.batches (after a first one that starts the workers)."""
    it = batches(dataset, batch, seed=0, num_workers=workers, pin_memory=pin)
    next(it)
    start = time.perf_counter()
    for _ in range(count):
        next(it)
    seconds = time.perf_counter() - start
    del it   # shuts the workers down
    return batch * count / seconds


def bench_reading(root: Path, size: int, batch: int, workers: int, device: torch.device) -> dict:
    """The prepared training split read without a model: in memory, and memory-mapped with `workers` workers."""
    with quiet():
        memory = build_data("food101", size, root=str(root), num_workers=workers).train
        mapped = build_data("food101", size, root=str(root), num_workers=workers, cache_limit_mb=0).train
    count = max(20, len(memory) // batch)
    pin = device.type == "cuda"
    return {"images": len(memory), "batch": batch, "batches": count, "workers": workers,
            "memory_kind": type(memory).__name__, "mapped_kind": type(mapped).__name__,
            "in_memory_images_per_s": read_rate(memory, batch, 0, False, count),
            "memory_mapped_images_per_s": read_rate(mapped, batch, workers, pin, count)}



_PEAK_RSS = ("import resource, subprocess, sys\n"
             "run = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
             "sys.stderr.write(run.stderr[-800:] if run.returncode else '')\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if run.returncode == 0 else -1)")


def peak_rss_mb(command: list[str], cwd: Path) -> float:
    """Peak resident memory (MiB) of the largest process `command` starts (itself or a DataLoader worker): the
    children's ru_maxrss seen by a fresh wrapper process, so no earlier measurement counts."""
    run = subprocess.run([sys.executable, "-c", _PEAK_RSS, *command], cwd=cwd, capture_output=True, text=True)
    kb = int(run.stdout.strip().splitlines()[-1]) if run.stdout.strip() else -1
    if run.returncode or kb < 0:
        raise RuntimeError(f"{command[1]} failed in {cwd}: {run.stderr.strip()[-800:]}")
    return kb / 1024


def bench_memory(root: Path, sizes: list[int], code: Path, steps: int = 20, batch: int = 16,
                 eval_batch: int = 64) -> list[dict]:
    """Peak RSS of `train.py` (`steps` steps of `batch`, the validation at the end included) and of `evaluate.py`
    (its checkpoint, `eval_batch`) on the copy at each size, with the scripts of the checkout `code`; the splits
    are prepared before (a run of build_data), so neither process pays for preparing."""
    rows = []
    for size in sizes:
        with quiet():
            build_data("food101", size, root=str(root))
        with tempfile.TemporaryDirectory() as out:
            train = peak_rss_mb([sys.executable, "train.py", "--data", "food101", "--data-root", str(root),
                                 "--image-size", str(size), "--batch-size", str(batch), "--steps", str(steps),
                                 "--no-progress", "--out", out], code)
            evaluate = peak_rss_mb([sys.executable, "evaluate.py", "--checkpoint", str(Path(out) / "checkpoint.pt"),
                                    "--batch-size", str(eval_batch)], code)
        rows.append({"size": size, "train_mb": train, "evaluate_mb": evaluate})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Report


def ratios(results: dict) -> list[tuple[str, str]]:
    """(what, measured) of each ratio the results hold: preparing against torchvision, the second train.py run
    against the first, train.py end to end against the model alone."""
    rows = []
    if results.get("preparing"):
        rows.append(("preparing: ours vs torchvision", f"{results['preparing']['ratio']:.2f}x"))
    if results.get("first_second"):
        rows.append(("train.py second run vs first", f"{results['first_second']['ratio']:.2f}"))
    for e in results.get("end_to_end", []):
        rows.append((f"end to end vs model-only, {e['size']}x{e['size']} batch {e['batch']}", f"{e['ratio']:.1%}"))
    return rows


def report(results: dict) -> str:
    c = results["copy"]
    lines = [f"Machine: {results['machine']}; device {results['device']}; {results['threads']} threads; "
             f"{results['workers']} worker(s).",
             f"Data: a Food101-layout copy of {c['images']} JPEGs ({c['megabytes']:.0f} MB, long side 448-512 px) "
             f"made from the sample photos; every file in the page cache; {results['image_size']}x"
             f"{results['image_size']}.", ""]
    p = results.get("preparing")
    if p:
        lines += [f"| preparing {p['images']} images at {p['size']}x{p['size']} ({p['workers']} workers, median of "
                  f"{p['repeats']}) | seconds | images/s | images/s per worker |", "| --- | --- | --- | --- |"]
        for name, what in (("ours", "ours: build_data, into a fresh folder"),
                           ("torchvision", "torchvision ImageFolder + DataLoader, batch 64")):
            lines.append(f"| {what} | {p[name + '_seconds']:.2f} | {p[name + '_images_per_s']:.0f} | "
                         f"{p[name + '_images_per_s_per_worker']:.0f} |")
        lines.append("")
    f = results.get("first_second")
    if f:
        lines += [f"train.py (10 steps, one validation), whole process, median of {f['repeats']}: first run "
                  f"{f['first_seconds']:.1f} s (preparing included), second run {f['second_seconds']:.1f} s "
                  f"(prepared data reused): {f['ratio']:.2f} of the first.", ""]
    if results.get("end_to_end"):
        lines += ["| train.py end to end (size, batch, steps) | end-to-end images/s | model-only images/s | ratio |",
                  "| --- | --- | --- | --- |"]
        for e in results["end_to_end"]:
            lines.append(f"| {e['size']}x{e['size']}, {e['batch']}, {e['steps']} | {e['end_to_end_images_per_s']:.0f}"
                         f" | {e['model_only_images_per_s']:.0f} | {e['ratio']:.1%} |")
        lines.append("")
    r = results.get("reading")
    if r:
        lines += [f"Reading the prepared training split ({r['images']} images, batch {r['batch']}, {r['batches']} "
                  f"batches, no model): in memory ({r['memory_kind']}) {r['in_memory_images_per_s']:.0f} images/s; "
                  f"memory-mapped ({r['mapped_kind']}, {r['workers']} workers) "
                  f"{r['memory_mapped_images_per_s']:.0f} images/s.", ""]
    lines += ["| ratio | measured |", "| --- | --- |"]
    lines += [f"| {name} | {got} |" for name, got in ratios(results)]
    return "\n".join(lines)


def memory_report(results: dict) -> str:
    """The --memory section: a table of peak RSS per size, before and after where both were measured."""
    c, before = results["copy"], {r["size"]: r for r in results.get("before", [])}
    lines = [f"Machine: {results['machine']}; device {results['device']}.",
             f"Data: a Food101-layout copy of {c['images']} JPEGs ({c['images'] * 3 // 4} training, "
             f"{c['images'] // 4} validation), prepared beforehand. Peak resident memory (MiB, the largest process: "
             f"the script or one of its DataLoader workers) of `train.py --batch-size 16 --steps 20` (its "
             f"validation included) and of `evaluate.py --batch-size 64` on its checkpoint.", ""]
    if before:
        lines += [f"Before: the code of {results['before_label']}.", "",
                  "| size | train.py before | train.py | evaluate.py before | evaluate.py |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['size']}x{r['size']} | {before[r['size']]['train_mb']:.0f} | {r['train_mb']:.0f} | "
                  f"{before[r['size']]['evaluate_mb']:.0f} | {r['evaluate_mb']:.0f} |"
                  for r in results["memory"] if r["size"] in before]
    else:
        lines += ["| size | train.py | evaluate.py |", "| --- | --- | --- |"]
        lines += [f"| {r['size']}x{r['size']} | {r['train_mb']:.0f} | {r['evaluate_mb']:.0f} |"
                  for r in results["memory"]]
    largest = max(results["memory"], key=lambda r: r["size"])
    lines += ["", f"At {largest['size']}x{largest['size']}: train.py {largest['train_mb']:.0f} MiB, evaluate.py "
              f"{largest['evaluate_mb']:.0f} MiB."]
    return "\n".join(lines)


def summary(results: dict) -> str:
    return "summary: " + "; ".join(f"{name} {got}" for name, got in ratios(results))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10_000, help="JPEGs in the Food101-layout copy")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=default_workers(), help="worker processes (both paths)")
    p.add_argument("--steps", type=int, default=300, help="train.py steps of each end-to-end figure")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the preparing and first/second timings (median)")
    p.add_argument("--device", default="auto")
    p.add_argument("--copy-dir", default=None, help="where the copy is kept (default data/food101-copy-<images>)")
    p.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    p.add_argument("--json", default=None, help="also save the raw results to this file")
    p.add_argument("--memory", action="store_true", help="measure only the peak memory of train.py and evaluate.py")
    p.add_argument("--memory-sizes", default="64,128,256", help="image sizes of --memory")
    p.add_argument("--before", default=None, help="with --memory: a checkout of older code to measure as well")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    root = make_food101_copy(args.copy_dir or f"data/food101-copy-{args.images}", args.images)
    if args.memory:
        sizes = [int(v) for v in args.memory_sizes.split(",")]
        results = {"machine": machine(), "device": str(device), "copy": {"images": args.images},
                   "memory": bench_memory(root, sizes, ROOT)}
        if args.before:
            label = subprocess.run(["git", "log", "-1", "--format=%h (%cs)"], cwd=args.before, capture_output=True,
                                   text=True).stdout.strip() or args.before
            results.update(before=bench_memory(root, sizes, Path(args.before)), before_label=f"commit {label}")
        text = memory_report(results)
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        if args.write:
            command = " ".join(["python", "benchmarks/bench_data.py", *(sys.argv[1:] if argv is None else argv)])
            write_section("bench_data.py memory", "Host memory: `bench_data.py --memory`", command, text)
        return 0
    S, W = args.image_size, args.workers
    results: dict = {"machine": machine(), "device": str(device), "threads": torch.get_num_threads(), "workers": W,
                     "image_size": S, "copy": {"images": args.images, **warm_cache(root)}}
    results["preparing"] = bench_preparing(root, S, W, args.repeats)
    results["first_second"] = bench_first_second(root, S, W, device, args.repeats)
    settings = [(S, 32)] + ([(128, 128)] if device.type == "cuda" else [])   # (size, batch)
    results["end_to_end"] = [bench_end_to_end(root, size, batch, args.steps, W, device) for size, batch in settings]
    results["reading"] = bench_reading(root, S, 32, W, device)
    text = report(results)
    print(text)
    print(summary(results))
    publish("bench_data.py", "Data: `bench_data.py`", argv, text + "\n\n" + summary(results), args.write,
            args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
