"""Compress photos into .vqz files: each photo's VQ-VAE codes, entropy-coded with the prior's probabilities (codec.py).

    python compress.py --prior runs/sample-prior/checkpoint.pt photo.jpg other.png --out compressed/

Each photo (any size and mode PIL reads; EXIF rotation applied) becomes OUT/<name>.vqz; one line per photo says its
size in bytes and bits per pixel. The VQ-VAE is the one the prior was trained on (or --vqvae). A photo that cannot
be read or written is named in one `error:` line and the others go on; the exit status is then 2.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from codec import Models, compress, read_photo, run_on_files, write_output


def compress_one(models: Models, out: Path, path: Path) -> str:
    """Compress one photo into out/<name>.vqz; the line that says what was written."""
    image = read_photo(path)
    start = time.perf_counter()
    data = compress(models, image)
    seconds = time.perf_counter() - start
    target = out / (path.stem + ".vqz")
    write_output(target, lambda tmp: tmp.write_bytes(data))
    pixels = image.shape[1] * image.shape[2]
    return (f"{path} -> {target}: {len(data)} bytes, {8 * len(data) / pixels:.3f} bits per pixel "
            f"({image.shape[2]}x{image.shape[1]}, {seconds:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    return run_on_files(__doc__, "photos to compress", argv, compress_one)


if __name__ == "__main__":
    sys.exit(main())
