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

from codec import CodecError, codec_parser, compress, each_file, models_and_out, read_photo
from runs import USER_ERRORS, atomic_write, quiet_warnings


def main(argv: list[str] | None = None) -> int:
    args = codec_parser(__doc__, "photos to compress").parse_args(argv)
    quiet_warnings()
    try:
        models, out = models_and_out(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def one(path: Path) -> str:
        image = read_photo(path)
        start = time.perf_counter()
        data = compress(models, image)
        seconds = time.perf_counter() - start
        target = out / (path.stem + ".vqz")
        try:
            atomic_write(target, lambda tmp: tmp.write_bytes(data))
        except OSError as err:
            raise CodecError(f"cannot write {target}: {err.strerror or err}") from None
        pixels = image.shape[1] * image.shape[2]
        return (f"{path} -> {target}: {len(data)} bytes, {8 * len(data) / pixels:.3f} bits per pixel "
                f"({image.shape[2]}x{image.shape[1]}, {seconds:.1f} s)")

    return each_file(args.files, one)


if __name__ == "__main__":
    sys.exit(main())
