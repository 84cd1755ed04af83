"""Decompress .vqz files (compress.py) into PNGs: the VQ-VAE's reconstruction of each photo at its own size.

    python decompress.py --prior runs/sample-prior/checkpoint.pt compressed/photo.vqz --out decoded/

Each file becomes OUT/<name>.png, pixel for pixel the VQ-VAE's decoding of the codes compress.py coded. The models
must be the ones the file was made with (their fingerprints are in the file). A file that is truncated, corrupted,
not ours or made with other models is named in one `error:` line and the others go on; the exit status is then 2.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from PIL import Image

from codec import CodecError, Models, decompress, run_on_files, write_output


def decompress_one(models: Models, out: Path, path: Path) -> str:
    """Decompress one .vqz file into out/<name>.png; the line that says what was written."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CodecError(f"cannot read {path}: {err.strerror or err}") from None
    start = time.perf_counter()
    image = decompress(models, data, str(path))
    seconds = time.perf_counter() - start
    target = out / (path.stem + ".png")
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())                     # (3, H, W) -> (H, W, 3)
    write_output(target, lambda tmp: picture.save(tmp, format="PNG"))
    return f"{path} -> {target}: {image.shape[2]}x{image.shape[1]} ({seconds:.1f} s)"


def main(argv: list[str] | None = None) -> int:
    return run_on_files(__doc__, ".vqz files to decompress", argv, decompress_one)


if __name__ == "__main__":
    sys.exit(main())
