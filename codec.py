"""An image codec from a trained VQ-VAE and its prior: a photo's code maps entropy-coded with the prior's
probabilities, the paper's point (section 3.2; its ImageNet experiment reports 42.6x fewer bits) made into a file.

The bits: each code z_ij costs -log2 p(z_ij | z_<ij) under the prior, so a map costs its NLL in bits plus the
range coder's small overhead (constriction's `RangeEncoder`, arXiv 2201.01741, with `Categorical(perfect=False)`
models: the probabilities are quantized to integers of 24 bits with every code at least 1, so any code can be
coded). The picture: the VQ-VAE's reconstruction of the photo, exactly what decoding its codes gives.

How a photo of any size is coded:
- the photo (any mode PIL reads, EXIF rotation applied) is padded on the right and bottom by reflection to a
  multiple of the VQ-VAE's downsampling, encoded to its code map(s), and after decoding cropped back;
- the code map is cut into tiles of the size the prior was trained on (the prior has only seen maps of that size,
  with their edges where the tiles' are), and all tiles are coded together as one batch, position by position,
  which is what keeps a 640x480 photo within seconds; a code map of 120 x 160 coded whole would take one network
  step per code, 19,200 in a row;
- positions of edge tiles beyond the map are filled with the prior's most likely code and not coded;
- with two levels the top map's tiles come first, then the bottom map's tiles (twice the size), each given the
  matching top tile, as the 2-level prior models them;
- the prior is unconditional: a PixelCNN trained with --no-conditional, or a transformer (either level's kind of
  prior, `in_raster_order` with its KV cache) trained without classes or with --class-dropout, given its "no class"
  token.

Exactness: the decoder must rebuild the probabilities the encoder used, bit for bit, although it computes them
position by position. So the encoder computes them the same way (the prior's `in_raster_order`, both sides), on
the CPU, in float32, with one thread, whatever device and precision the VQ-VAE runs in; the probabilities are
the float64 softmax of those logits. The file keeps a CRC-32 of the code maps, so a decoder whose arithmetic
differs (another CPU's vector unit, another torch or constriction version) stops with an error instead of
returning a wrong picture.

The file (little-endian): magic b"VQZ" and a version byte; 8-byte fingerprints (SHA-256 of the weights) of the
VQ-VAE and of the prior; width and height; the code-map size of each level; the payload's length and
CRC-32; the code maps' CRC-32; then the payload, the range coder's 32-bit words.
"""
from __future__ import annotations

import argparse
import hashlib
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from decode import pil_to_tensor, to_rgb
from runs import USER_ERRORS, ConfigError, atomic_write, pick_device, quiet_warnings

MAGIC, VERSION = b"VQZ", 1
HEADER = struct.Struct("<3sB8s8sIIB")          # magic, version, VQ-VAE and prior fingerprints, width, height, levels
LEVEL = struct.Struct("<HH")                   # a level's code-map height and width
TAIL = struct.Struct("<III")                   # payload bytes, payload CRC-32, code maps' CRC-32


class CodecError(ValueError):
    """A file or image the codec cannot take; the message is one line that names the problem."""


def fingerprint(model: torch.nn.Module) -> bytes:
    """8 bytes of SHA-256 over the model's state dict (names, dtypes, shapes and values, in name order)."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()[:8]


def read_photo(path: str | Path) -> Tensor:
    """A photo file -> uint8 (3, H, W) RGB at its own size (EXIF rotation applied, any mode made RGB)."""
    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_tensor(to_rgb(img))
    except FileNotFoundError:
        raise CodecError(f"{path} does not exist") from None
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CodecError(f"{path}: cannot decode it as an image ({reason})") from None


@dataclass
class Models:
    """A VQ-VAE and the prior of its codes, with what the codec needs to know of them."""

    vqvae: torch.nn.Module
    prior: torch.nn.Module
    tile: tuple[int, int]          # the bottom map's tile (h, w): the map size the prior was trained on

    def __post_init__(self) -> None:
        self.prior = self.prior.cpu().float().eval()
        self.ids = fingerprint(self.vqvae), fingerprint(self.prior)

    @property
    def levels(self) -> int:
        return self.vqvae.levels

    def tiles(self) -> list[tuple[int, int]]:
        """Each level's tile, top first."""
        h, w = self.tile
        return [(h // 2, w // 2), (h, w)] if self.levels == 2 else [(h, w)]

    def level_priors(self) -> list:
        return [self.prior.top, self.prior.bottom] if self.levels == 2 else [self.prior]


def to_tiles(codes: Tensor, tile: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(h, w) map -> ((T, th, tw) tiles in raster order of tiles, (T, th, tw) bool: inside the map). The map is
    padded with zeros to whole tiles; the mask marks the real positions."""
    th, tw = tile
    h, w = codes.shape
    rows, cols = -(-h // th), -(-w // tw)
    padded = F.pad(codes, (0, cols * tw - w, 0, rows * th - h))
    inside = F.pad(torch.ones(h, w, dtype=torch.bool), (0, cols * tw - w, 0, rows * th - h))

    def cut(x: Tensor) -> Tensor:
        return x.view(rows, th, cols, tw).permute(0, 2, 1, 3).reshape(rows * cols, th, tw)   # (R*th, C*tw) -> tiles

    return cut(padded), cut(inside)


def from_tiles(tiles: Tensor, size: tuple[int, int]) -> Tensor:
    """The inverse of `to_tiles`: (T, th, tw) tiles of an (h, w) map -> the map, the padding dropped."""
    th, tw = tiles.shape[1:]
    rows, cols = -(-size[0] // th), -(-size[1] // tw)
    full = tiles.reshape(rows, cols, th, tw).permute(0, 2, 1, 3).reshape(rows * th, cols * tw)
    return full[:size[0], :size[1]]


def probabilities(logits: Tensor) -> np.ndarray:
    """(n, K) float32 logits -> (n, K) float64 probabilities, the same numbers on both sides of the codec."""
    return torch.softmax(logits.double(), dim=1).numpy()


def _code_level(prior, num: int, tile: tuple[int, int], inside: Tensor, codes: Tensor | None, coder,
                cond: Tensor | None) -> Tensor:
    """Run the prior over `num` tiles position by position; where `codes` is given, put its codes into `coder` (a
    RangeEncoder), else read them from `coder` (a RangeDecoder). Positions outside the map get the most likely
    code, uncoded. Returns the (num, th, tw) tiles."""
    import constriction

    family = constriction.stream.model.Categorical(perfect=False)

    def choose(i: int, j: int, logits: Tensor) -> Tensor:
        real = inside[:, i, j]
        out = logits.argmax(1)
        if real.any():
            p = probabilities(logits[real])
            if codes is not None:
                coder.encode(codes[real, i, j].numpy().astype(np.int32), family, p)
                out[real] = codes[real, i, j]
            else:
                out[real] = torch.from_numpy(np.asarray(coder.decode(family, p), dtype=np.int64))
        return out

    return prior.in_raster_order(num, tile, choose, cond=cond)


def _run_levels(models: Models, sizes: list[tuple[int, int]], maps: list[Tensor] | None, coder) -> list[Tensor]:
    """Code (maps given) or decode (maps None) each level's map of `sizes`, top first; returns the tiles."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiles, cond = [], None
        for level, (prior, tile, size) in enumerate(zip(models.level_priors(), models.tiles(), sizes)):
            base = torch.zeros(size, dtype=torch.long) if maps is None else maps[level]
            known, inside = to_tiles(base, tile)
            if level == 1:
                cond = models.prior.conditioning(tiles[0])               # (T, C, th, tw) from the top tiles
            tiles.append(_code_level(prior, known.shape[0], tile, inside, None if maps is None else known, coder,
                                     cond))
        return tiles
    finally:
        torch.set_num_threads(threads)


def codes_crc(maps: list[Tensor]) -> int:
    crc = 0
    for m in maps:
        crc = zlib.crc32(m.to(torch.int32).contiguous().numpy().tobytes(), crc)
    return crc


@torch.no_grad()
def encode_photo(models: Models, image: Tensor) -> tuple[list[Tensor], tuple[int, int]]:
    """uint8 (3, H, W) -> the code maps of the photo padded to the VQ-VAE's multiple (top first), and (H, W)."""
    f = models.vqvae.downsampling
    _, height, width = image.shape
    x = image.float().div(255)[None]                                       # (1, 3, H, W) in [0, 1]
    pad_h, pad_w = -height % f, -width % f
    if pad_h or pad_w:
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    codes = models.vqvae.encode_images(x)
    maps = [c[0].cpu() for c in (codes if models.levels == 2 else (codes,))]
    return maps, (height, width)


@torch.no_grad()
def decode_maps(models: Models, maps: list[Tensor], size: tuple[int, int]) -> Tensor:
    """The code maps of `encode_photo` -> uint8 (3, H, W), the reconstruction cropped to the photo's size."""
    device = next(models.vqvae.parameters()).device
    batch = [m[None].to(device) for m in maps]
    images = models.vqvae.decode_images(tuple(batch) if models.levels == 2 else batch[0])
    return images[0, :, :size[0], :size[1]].mul(255).round().to(torch.uint8).cpu()


def compress(models: Models, image: Tensor) -> bytes:
    """uint8 (3, H, W) -> the bytes of a .vqz file."""
    import constriction

    maps, (height, width) = encode_photo(models, image)
    encoder = constriction.stream.queue.RangeEncoder()
    _run_levels(models, [tuple(m.shape) for m in maps], maps, encoder)
    payload = encoder.get_compressed().astype("<u4").tobytes()
    head = HEADER.pack(MAGIC, VERSION, *models.ids, width, height, models.levels)
    sizes = b"".join(LEVEL.pack(*m.shape) for m in maps)
    return head + sizes + TAIL.pack(len(payload), zlib.crc32(payload), codes_crc(maps)) + payload


@dataclass
class Parsed:
    width: int
    height: int
    maps: list[tuple[int, int]]
    code_crc: int
    payload: np.ndarray


def parse(data: bytes, models: Models, name: str = "the file") -> Parsed:
    """Check a .vqz file's header against `models`; every problem is a one-line CodecError naming `name`."""
    if data[:3] != MAGIC:
        raise CodecError(f"{name} is not a compressed image of this repo (no VQZ header)")
    if len(data) < HEADER.size:
        raise CodecError(f"{name} is truncated or corrupted (its header is incomplete)")
    magic, version, vqvae_id, prior_id, width, height, levels = HEADER.unpack_from(data)
    if version != VERSION:
        raise CodecError(f"{name} is a version {version} file; this code reads version {VERSION}")
    if (vqvae_id, prior_id) != models.ids:
        raise CodecError(f"{name} was made with other models (VQ-VAE {vqvae_id.hex()}, prior {prior_id.hex()}) than "
                         f"the ones given (VQ-VAE {models.ids[0].hex()}, prior {models.ids[1].hex()})")
    offset = HEADER.size
    if levels != models.levels or len(data) < offset + levels * LEVEL.size + TAIL.size:
        raise CodecError(f"{name} is truncated or corrupted (its header is incomplete)")
    maps = [LEVEL.unpack_from(data, offset + i * LEVEL.size) for i in range(levels)]
    offset += levels * LEVEL.size
    length, payload_crc, code_crc = TAIL.unpack_from(data, offset)
    payload = data[offset + TAIL.size:]
    if len(payload) != length or length % 4:
        raise CodecError(f"{name} is truncated or corrupted ({len(payload)} payload bytes, the header says {length})")
    if zlib.crc32(payload) != payload_crc:
        raise CodecError(f"{name} is corrupted (its payload does not match its checksum)")
    return Parsed(width, height, maps, code_crc, np.frombuffer(payload, dtype="<u4").astype(np.uint32))


def decompress(models: Models, data: bytes, name: str = "the file") -> Tensor:
    """The bytes of a .vqz file -> uint8 (3, H, W), the VQ-VAE's reconstruction at the photo's size."""
    import constriction

    parsed = parse(data, models, name)
    decoder = constriction.stream.queue.RangeDecoder(parsed.payload)
    tiles = _run_levels(models, parsed.maps, None, decoder)
    maps = [from_tiles(t, size) for t, size in zip(tiles, parsed.maps)]
    if codes_crc(maps) != parsed.code_crc:
        raise CodecError(f"{name}: the decoded codes do not match the ones coded (the prior's arithmetic differs on "
                         f"this machine or software version from where the file was made)")
    return decode_maps(models, maps, (parsed.height, parsed.width))


def load_models(prior_path: str | Path, vqvae_path: str | Path | None = None,
                device: torch.device | str = "cpu") -> Models:
    """The prior of a prior run and the VQ-VAE it names (or `vqvae_path`), ready for `compress` / `decompress`; the
    VQ-VAE on `device`, the prior on the CPU. Any problem is a one-line CheckpointError."""
    from checkpoint import load_vqvae_for
    from prior_checkpoint import load_prior

    prior, _, ckpt = load_prior(prior_path, "cpu")
    levels = [prior.top, prior.bottom] if prior.levels == 2 else [prior]
    # a transformer trained with class dropout is also the unconditional prior: given no class, its "no class" token
    if any(level.num_classes and not getattr(level, "class_dropout", 0) for level in levels):
        raise ConfigError(f"{prior_path} is a class-conditional prior; the codec codes with an unconditional one "
                          f"(train_prior.py --no-conditional, or a transformer trained with --class-dropout above 0)")
    vqvae = load_vqvae_for(ckpt, torch.device(device), None if vqvae_path is None else str(vqvae_path))
    return Models(vqvae, prior, tuple(ckpt["map_shape"]))


# ---------------------------------------------------------------------------------------------------------------
# What compress.py and decompress.py share


def codec_parser(doc: str, inputs: str) -> argparse.ArgumentParser:
    """What compress.py and decompress.py share: --prior, --vqvae, --device, the input files and --out."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--prior", required=True, help="checkpoint.pt of a prior run (train_prior.py)")
    parser.add_argument("--vqvae", default=None, help="the VQ-VAE checkpoint (default: the one the prior names)")
    parser.add_argument("--device", default="auto", help="where the VQ-VAE runs: auto, cpu, cuda, cuda:1, mps (the "
                                                         "prior always runs on the CPU, so files match)")
    parser.add_argument("files", nargs="+", help=inputs)
    parser.add_argument("--out", required=True, help="folder for the output files (made if missing)")
    return parser


def models_and_out(args: argparse.Namespace) -> tuple[Models, Path]:
    """The models and the output folder, or one-line errors (exit 2 before any file is touched)."""
    models = load_models(args.prior, args.vqvae, pick_device(args.device))
    out = Path(args.out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot write --out {out}: {err.strerror or err}") from None
    return models, out


def write_output(target: Path, write) -> None:
    """`write(tmp)` under a temporary name, renamed to `target` (runs.atomic_write); failing is a CodecError."""
    try:
        atomic_write(target, write)
    except OSError as err:
        raise CodecError(f"cannot write {target}: {err.strerror or err}") from None


def run_on_files(doc: str, inputs: str, argv: list[str] | None, work) -> int:
    """The body of compress.py and decompress.py: parse the command line, load the models and make --out (a
    problem there is one `error:` line and exit status 2 before any file is touched), then print
    `work(models, out, path)` for every file; a user error on one file is one `error:` line and the rest go on.
    Returns 2 if any file failed, else 0."""
    args = codec_parser(doc, inputs).parse_args(argv)
    quiet_warnings()
    try:
        models, out = models_and_out(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = 0
    for name in args.files:
        path = Path(name).expanduser()
        try:
            print(work(models, out, path))
        except (CodecError, *USER_ERRORS) as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
        except OSError as err:
            print(f"error: {name}: {err.strerror or err}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0
