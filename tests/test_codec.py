"""The image codec (codec.py, compress.py, decompress.py): a photo round-trips to exactly the VQ-VAE's decoding of
its own codes, for 1 and 2 levels and any size and mode; the payload costs what the prior's NLL says (computed
here by one full forward pass of the prior, not by the codec's position-by-position pass); a file decodes the same
in a fresh process with another thread count; every bad input is one line, exit status 2, no partial file, and the
other files of the same call go on.

Everything is tiny (freshly initialised VQ-VAEs, priors trained for two steps) and on the CPU."""
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import codec
import compress
import decompress
import extract_codes
from prior_checkpoint import PriorConfig
from test_cli_errors import assert_clean_error, call_main
from test_prior import make_class_folder
from train_prior import train_prior

ROOT = Path(__file__).resolve().parents[1]
TINY_VQ = dict(hidden_channels=8, residual_channels=4, num_residual_blocks=1, embedding_dim=4, num_embeddings=16,
               device="cpu", amp="off", num_workers=0)


def save_vqvae(path: Path, config: checkpoint.Config, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = checkpoint.build_model(config)
    checkpoint.save_checkpoint(path, model, torch.optim.Adam(model.parameters()), 0, config, 1.0, 0.0)
    return path


def make_models(root: Path, data: Path, levels: int, seed: int = 0) -> dict:
    size = 16 if levels == 1 else 32
    config = checkpoint.Config(data=str(data), image_size=size, levels=levels, prepared_dir=str(root / "prepared"),
                               **TINY_VQ)
    vq = save_vqvae(root / f"vq{levels}.pt", config, seed)
    extract_codes.extract_codes(vq, root / f"codes{levels}.pt", passes=1, device="cpu", progress=False)
    extra = dict(attention=True, heads=2, cond_channels=4, cond_blocks=1) if levels == 2 else {}
    prior = PriorConfig(codes=str(root / f"codes{levels}.pt"), out=str(root / f"prior{levels}-{seed}"), channels=8,
                        num_layers=2, kernel_size=3, dropout=0.0, steps=2, batch_size=8, lr=3e-3, eval_every=2,
                        log_every=1, progress=False, device="cpu", amp="off", conditional=False, seed=seed, **extra)
    train_prior(prior)
    return {"vqvae": vq, "prior": Path(prior.out) / "checkpoint.pt"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("codec")
    data = make_class_folder(root / "photos")
    return {"root": root, 1: make_models(root, data, 1), 2: make_models(root, data, 2)}


def photo(path: Path, width: int, height: int, mode: str = "RGB", exif_rotate: bool = False) -> Path:
    """A crop of a real photo (scikit-image's astronaut) of the given size and mode."""
    import skimage

    pixels = skimage.data.astronaut()[100:100 + height, 150:150 + width]
    img = Image.fromarray(pixels).convert(mode)
    if exif_rotate:                      # stored sideways, with the EXIF tag that turns it upright
        exif = Image.Exif()
        exif[0x0112] = 6
        img.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    else:
        img.save(path)
    return path


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("size", [(70, 45), (64, 32)])
def test_a_photo_decodes_to_exactly_the_decoding_of_its_own_codes(trained, tmp_path, levels, size):
    models = codec.load_models(trained[levels]["prior"])
    image = codec.read_photo(photo(tmp_path / "p.png", *size))
    data = codec.compress(models, image)
    decoded = codec.decompress(models, data)
    # the reference: the VQ-VAE's own encode and decode of the padded photo, with no entropy coding in between
    x = image.float().div(255)[None]
    f = models.vqvae.downsampling
    padded = torch.nn.functional.pad(x, (0, -x.shape[3] % f, 0, -x.shape[2] % f), mode="reflect")
    reference = models.vqvae.decode_images(models.vqvae.encode_images(padded))
    expected = reference[0, :, :size[1], :size[0]].mul(255).round().to(torch.uint8)
    assert decoded.shape == (3, size[1], size[0])
    assert torch.equal(decoded, expected)


def test_the_payload_costs_the_priors_nll(trained, tmp_path):
    """A 64x32 photo at 16 px training: a 16x8 code map, two whole 4x4... tiles of the prior's 4x4 maps, so no
    position is padding and the NLL is one plain forward pass over the tiles."""
    models = codec.load_models(trained[1]["prior"])
    image = codec.read_photo(photo(tmp_path / "p.png", 64, 32))
    data = codec.compress(models, image)
    (codes,), _ = codec.encode_photo(models, image)
    th, tw = models.tile
    assert codes.shape[0] % th == 0 and codes.shape[1] % tw == 0
    tiles = codes.view(codes.shape[0] // th, th, codes.shape[1] // tw, tw).permute(0, 2, 1, 3).reshape(-1, th, tw)
    with torch.no_grad():
        nll_bits = models.prior.nll(tiles).sum().item() / math.log(2)
    header = codec.HEADER.size + codec.LEVEL.size + codec.TAIL.size
    payload_bits = 8 * (len(data) - header)
    assert payload_bits <= 1.01 * nll_bits + 64, (payload_bits, nll_bits)
    assert payload_bits >= nll_bits - 1                    # no code can cost less than its information


def test_modes_and_exif_rotation_are_read_as_train_py_reads_them(trained, tmp_path):
    models = codec.load_models(trained[1]["prior"])
    upright = codec.read_photo(photo(tmp_path / "up.png", 40, 24))
    sideways = codec.read_photo(photo(tmp_path / "side.jpg", 40, 24, exif_rotate=True))
    assert sideways.shape == upright.shape == (3, 24, 40)
    gray = codec.read_photo(photo(tmp_path / "gray.png", 40, 24, mode="L"))
    assert gray.shape == (3, 24, 40) and torch.equal(gray[0], gray[1])
    for image in (sideways, gray, codec.read_photo(photo(tmp_path / "rgba.png", 40, 24, mode="RGBA"))):
        assert codec.decompress(models, codec.compress(models, image)).shape == image.shape


def run_script(script: str, *args, threads: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-c", f"import sys, torch; torch.set_num_threads({threads}); "
                           f"import {script}; sys.exit({script}.main(sys.argv[1:]))", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("levels", [1, 2])
def test_a_file_decodes_the_same_in_a_fresh_process_with_another_thread_count(trained, tmp_path, levels):
    prior = trained[levels]["prior"]
    source = photo(tmp_path / "photo.png", 70, 45)
    torch.set_num_threads(2)
    models = codec.load_models(prior)
    here = codec.compress(models, codec.read_photo(source))
    r = run_script("compress", "--prior", prior, "--device", "cpu", source, "--out", tmp_path / "c", threads=1)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c" / "photo.vqz").read_bytes() == here       # the same bytes from the other process
    (tmp_path / "here.vqz").write_bytes(here)
    r = run_script("decompress", "--prior", prior, "--device", "cpu", tmp_path / "here.vqz", "--out", tmp_path / "d",
                   threads=1)
    assert r.returncode == 0, r.stderr
    there = np.asarray(Image.open(tmp_path / "d" / "here.png"))
    assert np.array_equal(there, codec.decompress(models, here).permute(1, 2, 0).numpy())
    assert "here.png" in r.stdout and not r.stderr


def test_bad_files_are_one_line_each_and_the_others_go_on(trained, tmp_path, capsys):
    prior = trained[1]["prior"]
    models = codec.load_models(prior)
    good = codec.compress(models, codec.read_photo(photo(tmp_path / "p.png", 40, 24)))
    files = {"good.vqz": good, "truncated.vqz": good[:-5], "short.vqz": good[:10],
             "corrupted.vqz": good[:-3] + bytes([good[-3] ^ 0xFF]) + good[-2:], "notours.vqz": b"GIF89a" + bytes(40)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "decoded"
    rc, stdout, err = call_main(decompress.main, ["--prior", prior, "--device", "cpu", *[tmp_path / n for n in files],
                                                  "--out", out], capsys)
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    assert "truncated.vqz is truncated or corrupted" in err and "short.vqz is truncated or corrupted" in err
    assert "corrupted.vqz is corrupted" in err and "notours.vqz is not a compressed image" in err
    assert sorted(p.name for p in out.iterdir()) == ["good.png"]          # nothing half-written, no temporary file


def test_a_file_made_with_other_models_names_both(trained, tmp_path, capsys):
    other = make_models(tmp_path, make_class_folder(tmp_path / "photos"), 1, seed=1)
    theirs = codec.load_models(other["prior"])
    ours = codec.load_models(trained[1]["prior"])
    data = codec.compress(theirs, codec.read_photo(photo(tmp_path / "p.png", 40, 24)))
    with pytest.raises(codec.CodecError, match="other models") as err:
        codec.decompress(ours, data, "p.vqz")
    for fingerprint in (*theirs.ids, *ours.ids):
        assert fingerprint.hex() in str(err.value)


def test_bad_photos_and_outputs_are_one_line_each(trained, tmp_path, capsys):
    prior = trained[1]["prior"]
    (tmp_path / "text.jpg").write_text("not an image")
    good = photo(tmp_path / "good.png", 40, 24)
    out = tmp_path / "c"
    rc, _, err = call_main(compress.main, ["--prior", prior, "--device", "cpu", tmp_path / "text.jpg",
                                           tmp_path / "missing.png", good, "--out", out], capsys)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert "text.jpg: cannot decode it as an image" in err and "missing.png does not exist" in err
    assert sorted(p.name for p in out.iterdir()) == ["good.vqz"]
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    rc, _, err = call_main(compress.main, ["--prior", prior, "--device", "cpu", good, "--out", blocked / "c"], capsys)
    assert_clean_error(rc, err, "cannot write --out")
    rc, _, err = call_main(compress.main, ["--prior", trained[1]["vqvae"], good, "--out", out], capsys)
    assert_clean_error(rc, err, "vq1.pt", "train_prior.py")
