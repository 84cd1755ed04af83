"""Prepare a dataset without training: decode every image once into the arrays that train.py, evaluate.py and
extract_codes.py then read (see prepared.py), for example on a cluster's login node before the GPU job starts.

    python prepare_data.py --data ~/photos --image-size 128
    python prepare_data.py --data food101 --data-root /datasets --prepared-dir /scratch/prepared --image-size 128

Use the same --data, --image-size, --data-root, --val-fraction and --prepared-dir as the training run.
"""
from __future__ import annotations

import argparse
import sys
import time

from device_data import split_bytes
from image_data import build_data, default_workers
from runs import require_at_least, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="an image folder, or food101 / cifar10")
    parser.add_argument("--image-size", type=int, default=64, help="the training run's --image-size")
    parser.add_argument("--data-root", default="data", help="where food101 and cifar10 are stored")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="the training run's --val-fraction")
    parser.add_argument("--prepared-dir", default="", help="where to keep the arrays (default: <data-root>/prepared)")
    parser.add_argument("--download", action="store_true", help="download food101 / cifar10 if they are missing")
    parser.add_argument("--num-workers", type=int, default=-1, help="decoding processes (-1: one per core, up to 8)")
    args = parser.parse_args(argv)
    return run_cli(lambda: prepare(args))


def prepare(args: argparse.Namespace) -> int:
    require_at_least("num-workers", args.num_workers, -1)
    workers = default_workers() if args.num_workers < 0 else args.num_workers
    start = time.perf_counter()
    data = build_data(args.data, args.image_size, args.data_root, args.download, args.val_fraction,
                      num_workers=workers, prepared_dir=args.prepared_dir)
    sizes = [split_bytes(split) for split in (data.train, data.val)]
    where = "" if None in sizes else f" ({sum(sizes) / 2**20:.1f} MiB of uint8 arrays)"
    print(f"ready in {time.perf_counter() - start:.1f} s: {data.description}{where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
