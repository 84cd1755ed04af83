"""README's promises about runs, data and the scripts, round two: each test written for a breakage that once passed
the whole suite, against an independent reference (files read back with PIL, NumPy and SciPy, numbers by hand,
scikit-image's SSIM, hashes computed here).

- the run folder: reconstructions.png holds the originals above their reconstructions; the interval flags
  (--log-every, --eval-every, --checkpoint-every), --seed, --batch-size, --amp and the learning-rate flags do what
  the table says;
- a resume with any field that must stay as it was stops with one line naming the flag, and leaves the run as it was;
- --val-fraction and --data-root reach the data; every file type README names is found, in any letter case; a
  changed photo prepares its split again, whatever else stays the same;
- evaluate.py's MSE is over reconstructions clamped to [0, 1]; the bits/dim decoder term fits sigma on the training
  images and scores the validation images.
"""
import hashlib
import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.optimize import minimize_scalar
from scipy.special import log_ndtr
from skimage.metrics import structural_similarity

import evaluate
import evaluate_prior
import extract_codes
import models
import train
import train_prior
from checkpoint import Config, learning_rate, load_checkpoint
from image_data import build_data, find_images
from test_prepared import expected_images, images_of
from test_promises_runs import TINY, TINY_FLAGS, call_main, make_folder, one_error_line, pixels_of, save_array


@pytest.fixture
def plain_warnings(monkeypatch):
    """The scripts' main() swaps warnings.formatwarning for a one-line format; restore it after the test."""
    import warnings

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)

# ---------------------------------------------------------------------------------------------------------------
# One folder and one run shared by most tests: train/ with 6 full-range noise images, val/ with 3 in a narrow band,
# a 2-step run of the plain quantizer (so --rotation-trick is a field a resume can change too)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("round2") / "photos", seed=1)


RUN_FLAGS = [*TINY_FLAGS, "--quantizer", "vq", "--steps", "2", "--eval-every", "2"]


@pytest.fixture(scope="module")
def run(folder) -> Path:
    out = folder.parent / "run"
    assert train.main([*RUN_FLAGS, "--data", str(folder), "--data-root", str(folder.parent / "root"),
                       "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------------------------------------------
# "reconstructions.png (validation originals above their reconstructions)"


def test_reconstructions_png_holds_the_originals_above_their_reconstructions(run, folder):
    """Top row: the validation images exactly as saved (read with PIL, in file order); bottom row: each one through
    the checkpoint's model, clamped to [0, 1] and written as 8 bits (within one level)."""
    grid = np.asarray(Image.open(run / "reconstructions.png").convert("RGB")).astype(int)
    originals = (pixels_of((folder / "val").iterdir()) * 255).round().astype(int)          # (3, 16, 16, 3)
    assert grid.shape == (2 + 2 * 18, 2 + 3 * 18, 3)
    model, _, _ = load_checkpoint(run / "checkpoint.pt")
    with torch.no_grad():
        y = model(torch.from_numpy(originals).permute(0, 3, 1, 2).float() / 255 - 0.5).reconstruction
    expected = ((y + 0.5).clamp(0, 1) * 255 + 0.5).floor().permute(0, 2, 3, 1).numpy()
    assert np.abs(expected - originals).max() > 40                       # the two rows tell apart
    for i in range(3):
        top = grid[2:18, 2 + 18 * i:18 + 18 * i]
        bottom = grid[20:36, 2 + 18 * i:18 + 18 * i]
        np.testing.assert_array_equal(top, originals[i])
        assert np.abs(bottom - expected[i]).max() <= 1, i


# ---------------------------------------------------------------------------------------------------------------
# "evaluate.py ... mse (over all pixels of the whole set, images in [0, 1])": a decoder whose output leaves [0, 1]


def test_evaluate_scores_reconstructions_clamped_to_0_1(run, folder, tmp_path, capsys, plain_warnings):
    """The checkpoint's last layer set to a constant output of (1.3, -0.4, 0.7) per channel in [0, 1] units, so the
    clamped reconstruction is (1, 0, 0.7) whatever the codes: the MSE, PSNR and SSIM by hand (NumPy, scikit-image)
    over the validation images. Unclamped, the MSE would be about twice as large."""
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["model"]["decoder.deconv2.weight"].zero_()
    ckpt["model"]["decoder.deconv2.bias"].copy_(torch.tensor([0.8, -0.9, 0.2]))
    torch.save(ckpt, tmp_path / "bright.pt")
    rc, out, err = call_main(evaluate.main, ["--checkpoint", tmp_path / "bright.pt", "--device", "cpu"], capsys)
    assert rc == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    x = pixels_of((folder / "val").iterdir())                                            # (3, 16, 16, 3)
    clamped = np.broadcast_to(np.array([1.0, 0.0, 0.7]), x.shape).copy()
    mse = float(((clamped - x) ** 2).mean())
    unclamped = float(((np.array([1.3, -0.4, 0.7]) - x) ** 2).mean())
    assert unclamped > 1.5 * mse
    ssim = np.mean([structural_similarity(c, image, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=1.0)
                    for c, image in zip(clamped, x)])
    assert report["num_images"] == 3
    assert report["mse"] == pytest.approx(mse, rel=1e-5)
    assert report["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    assert report["ssim"] == pytest.approx(ssim, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# bits/dim: "sigma is fitted by maximum likelihood on the TRAINING images ... and evaluated on the VALIDATION images"


def gaussian_nll(x: np.ndarray, mean: np.ndarray, sigma: float) -> float:
    """-sum log P(x) of a Gaussian N(mean, sigma^2) discretised to the 256 levels (level 0 takes the tail below 0.5,
    level 255 the tail above 254.5), with SciPy's log of the normal CDF."""
    upper = np.where(x >= 255, np.inf, (x + 0.5 - mean) / sigma)
    lower = np.where(x <= 0, -np.inf, (x - 0.5 - mean) / sigma)
    flip = lower > 0                                   # both in the right tail: use the mirror image
    upper, lower = np.where(flip, -lower, upper), np.where(flip, -upper, lower)
    log_upper, log_lower = log_ndtr(upper), log_ndtr(lower)
    return -float((log_upper + np.log1p(-np.exp(log_lower - log_upper))).sum())


def decoder_means(model, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(levels 0..255, decoder means in pixel units) of images (N, 16, 16, 3) in [0, 1], float64."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        mean = (model.decode(model.encode(x - 0.5)).double() + 0.5) * 255
    return (x.double() * 255).round().numpy(), mean.numpy()


def best_sigma(x: np.ndarray, mean: np.ndarray) -> float:
    fit = minimize_scalar(lambda s: gaussian_nll(x, mean, math.exp(s)), bounds=(math.log(0.05), math.log(255)),
                          method="bounded", options={"xatol": 1e-9})
    return math.exp(fit.x)


def test_the_decoder_term_fits_sigma_on_the_training_images_and_scores_the_validation_images(run, folder, tmp_path,
                                                                                           capsys, plain_warnings):
    """A codes file and a 1-step prior of the shared run; the report's sigma against SciPy's maximum-likelihood fit
    on the training images through the VQ-VAE, and its decoder NLL per image against NumPy on the validation images
    with that sigma. The validation images (a narrow band) give a sigma far from the training images' (noise)."""
    extract_codes.extract_codes(run / "checkpoint.pt", tmp_path / "codes.pt", passes=1, device="cpu", progress=False)
    config = train_prior.PriorConfig(codes=str(tmp_path / "codes.pt"), out=str(tmp_path / "prior"), channels=4,
                                     num_layers=1, kernel_size=3, steps=1, batch_size=4, eval_every=1, log_every=1,
                                     progress=False, device="cpu", amp="off")
    train_prior.train_prior(config)
    rc, out, err = call_main(evaluate_prior.main, ["--checkpoint", tmp_path / "prior" / "checkpoint.pt",
                                                   "--device", "cpu"], capsys)
    assert rc == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    model, _, _ = load_checkpoint(run / "checkpoint.pt")
    train_x, train_mean = decoder_means(model, pixels_of((folder / "train").iterdir()))
    val_x, val_mean = decoder_means(model, pixels_of((folder / "val").iterdir()))
    sigma = best_sigma(train_x, train_mean)
    assert abs(math.log(best_sigma(val_x, val_mean) / sigma)) > 0.2                    # the two fits differ
    assert abs(math.log(best_sigma(np.concatenate([train_x, val_x]), np.concatenate([train_mean, val_mean]))
                        / sigma)) > 0.05                                              # and so does a fit on both
    assert report["sigma_fit_images"] == 6
    assert report["decoder_sigma"] == pytest.approx(sigma, rel=1e-4)
    nats = gaussian_nll(val_x, val_mean, report["decoder_sigma"]) / 3
    assert report["decoder_nats_per_image"] == pytest.approx(nats, rel=1e-6)


def test_the_sigma_fit_takes_evenly_spaced_training_images_holding_at_most_its_pixel_values(run, tmp_path):
    """Six training images of growing noise (each alone fits another sigma) and room for four: the fit is SciPy's
    on images 0, 1, 3 and 4 of the training split, not on the first four or on all six."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(5)
    for i in range(6):
        save_array(root / "train" / f"t{i}.png", np.clip(128 + rng.normal(0, 6 * (i + 1), (16, 16, 3)), 0, 255))
    save_array(root / "val" / "v0.png", rng.integers(100, 141, (16, 16, 3)))
    model, config, _ = load_checkpoint(run / "checkpoint.pt")
    config.data_root, config.prepared_dir = str(tmp_path / "root"), ""
    splits = build_data(str(root), 16, config.data_root, download=False, prepared_dir="")
    pixels = np.stack([splits.train[i][0].permute(1, 2, 0).double().numpy() / 255 for i in range(6)])  # uint8 in
    assert len(splits.val) == 1
    with torch.no_grad():
        val_maps = [model.encode(splits.val[0][0][None].float() / 255 - 0.5)]
    dec = evaluate_prior.decoder_term(model, config, str(root), val_maps, torch.device("cpu"),
                                      max_fit_values=4 * 3 * 16 * 16 + 100)
    assert dec["fit_images"] == 4
    x, mean = decoder_means(model, pixels[[0, 1, 3, 4]])
    assert dec["sigma"] == pytest.approx(best_sigma(x, mean), rel=1e-4)
    for other in ([0, 1, 2, 3], list(range(6))):
        assert abs(math.log(best_sigma(*decoder_means(model, pixels[other])) / dec["sigma"])) > 0.01
    assert evaluate_prior.fit_subset(range(6), 3 * 16 * 16) == list(range(6))           # room for all: all
    chosen = evaluate_prior.fit_subset(range(3999), 1, 2000)                             # room for 2000 of 3999
    gaps = np.diff(chosen)
    assert len(chosen) == 2000 and chosen[0] == 0 and chosen[-1] >= 3996 and gaps.min() >= 1 and gaps.max() <= 2


# ---------------------------------------------------------------------------------------------------------------
# "The model's own flags (--hidden-channels, --num-embeddings, ...), the data, --image-size, --batch-size and --seed
# must stay as they were; a change stops with one error: line that names the flag"

CHANGED = [("--data", "sample"), ("--image-size", "32"), ("--batch-size", "2"), ("--seed", "3"),
           ("--levels", "2"), ("--hidden-channels", "16"), ("--residual-channels", "8"),
           ("--num-residual-blocks", "2"), ("--block", "modern"), ("--attention", None), ("--downsample", "8"),
           ("--embedding-dim", "8"), ("--num-embeddings", "16"), ("--beta", "0.5"), ("--quantizer", "ema"),
           ("--decay", "0.9"), ("--no-kmeans-init", None), ("--restart-threshold", "2"), ("--no-cosine", None),
           ("--lookup-dim", "0"), ("--rotation-trick", None), ("--fsq-levels", "8,5")]


def test_a_resume_that_changes_a_field_that_must_stay_stops_naming_it(run, folder, tmp_path, capsys,
                                                                       plain_warnings):
    """Every field README says must stay as it was, one at a time: one error line naming the flag, the run folder
    untouched; the same flags with only --steps raised resume."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    base = [*RUN_FLAGS, "--data", str(folder), "--data-root", str(folder.parent / "root"), "--out", str(copy),
            "--resume"]
    for flag, value in CHANGED:
        rc, _, err = call_main(train.main, [*base, flag, *([value] if value else [])], capsys)
        one_error_line(rc, err, "--" + flag.removeprefix("--").removeprefix("no-"), "resume")
        assert {p.name: p.read_bytes() for p in copy.iterdir()} == before, flag
    rc, _, err = call_main(train.main, [*base, "--steps", "3"], capsys)
    assert rc == 0, err
    assert torch.load(copy / "checkpoint.pt", weights_only=True)["step"] == 3


# ---------------------------------------------------------------------------------------------------------------
# "--val-fraction" ("10% of the images (--val-fraction) go to validation, chosen by a hash of each file's path")
# and "--data-root" (where data/prepared goes), through train.py and evaluate.py


def test_val_fraction_and_data_root_reach_the_data(tmp_path, capsys, plain_warnings):
    """40 images in one folder, --val-fraction 0.3: validation holds exactly the files whose SHA-1 of the relative
    path, read as a fraction of 2^64, is below 0.3 (computed here): the file list of the prepared validation split's
    key under --data-root's prepared/, and the image count of training's validation and of evaluate.py."""
    data = tmp_path / "many"
    rng = np.random.default_rng(2)
    names = [f"img{i:02d}.png" for i in range(40)]
    for name in names:
        save_array(data / name, rng.integers(0, 256, (16, 16, 3)))

    def held_out(fraction: float) -> set[str]:
        return {n for n in names if int.from_bytes(hashlib.sha1(n.encode()).digest()[:8], "big") / 2**64 < fraction}

    assert len(held_out(0.3)) not in (len(held_out(0.1)), 0, 40)
    out, root = tmp_path / "run", tmp_path / "root"
    flags = [*TINY_FLAGS, "--steps", "1", "--eval-every", "1", "--data", str(data), "--val-fraction", "0.3",
             "--data-root", str(root), "--out", str(out)]
    rc, said, err = call_main(train.main, flags, capsys)
    assert rc == 0, err
    assert f"| {len(held_out(0.3))} validation images" in said
    (key,) = (root / "prepared").glob("*/val.json")
    assert {f[0] for f in json.loads(key.read_text())["files"]} == held_out(0.3)
    rc, said, err = call_main(evaluate.main, ["--checkpoint", out / "checkpoint.pt", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert json.loads(said.strip().splitlines()[-1])["num_images"] == len(held_out(0.3))


# ---------------------------------------------------------------------------------------------------------------
# "searched recursively for jpg, png, bmp, gif, webp and tiff files in any letter case"

FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP",
           ".tif": "TIFF", ".tiff": "TIFF"}


def test_every_file_type_readme_names_is_found_in_any_letter_case(tmp_path):
    """A real file of each format under each of its extensions in lower, upper and mixed case (24 files, one solid
    colour each), some in sub-folders: every one is found, and every one decodes to its colour."""
    folder, colours = tmp_path / "types", {}
    for i, (ext, fmt) in enumerate(FORMATS.items()):
        for j, suffix in enumerate((ext, ext.upper(), ext[:2].upper() + ext[2:])):
            colour = (30 * i + 10, 80 * j + 20, 200 - 20 * i)
            path = folder / ("sub" if j == 2 else "") / f"c{i}{j}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), colour).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
            colours[path] = colour
    assert len(colours) == 24
    assert find_images(folder) == sorted(colours)
    data = build_data(str(folder), 16, root=str(tmp_path / "root"), num_workers=0)
    decoded = [x[:, 8, 8].tolist() for x in images_of(data.train)] + [x[:, 8, 8].tolist() for x in images_of(data.val)]
    assert len(decoded) == 24
    for path, colour in colours.items():
        assert any(max(abs(a - b) for a, b in zip(got, colour)) <= 3 for got in decoded), path.name


# ---------------------------------------------------------------------------------------------------------------
# "Each split keeps a key (the file list with sizes and modification times ...), so a photo ... changed prepares
# the split again": a change that keeps the number of files, and keeps either the size or the time


def test_a_changed_photo_prepares_its_split_again_whatever_else_stays_the_same(tmp_path):
    data = tmp_path / "photos"
    rng = np.random.default_rng(3)
    for i in range(4):
        save_array(data / "train" / f"p{i}.bmp", rng.integers(0, 256, (16, 16, 3)))
    save_array(data / "val" / "v0.png", rng.integers(0, 256, (16, 16, 3)))
    root = str(tmp_path / "root")
    build_data(str(data), 16, root=root, num_workers=0)
    train_paths = sorted((data / "train").iterdir())
    # the same size (a BMP of the same dimensions) and the same number of files, another modification time
    before = os.stat(train_paths[1])
    save_array(train_paths[1], np.zeros((16, 16, 3)))
    os.utime(train_paths[1], ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert os.stat(train_paths[1]).st_size == before.st_size
    with pytest.warns(UserWarning, match="changed since"):
        data_now = build_data(str(data), 16, root=root, num_workers=0)
    assert torch.equal(images_of(data_now.train), expected_images(train_paths))
    # another size, the same modification time
    before = os.stat(train_paths[2])
    Image.fromarray(np.full((16, 16, 3), 255, dtype=np.uint8)).save(train_paths[2], format="PNG")
    os.utime(train_paths[2], ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(train_paths[2]).st_size != before.st_size
    with pytest.warns(UserWarning, match="changed since"):
        data_now = build_data(str(data), 16, root=root, num_workers=0)
    assert torch.equal(images_of(data_now.train), expected_images(train_paths))


# ---------------------------------------------------------------------------------------------------------------
# The flags of a run: --log-every, --eval-every, --checkpoint-every ("0: at each validation"), --seed, --batch-size,
# --amp, --lr, --lr-schedule and --warmup-steps


def tiny_run(folder: Path, out: Path, **kw) -> Config:
    return replace(Config(data=str(folder), data_root=str(folder.parent / "root"), out=str(out), **TINY), **kw)


@pytest.mark.parametrize("checkpoint_every, on_disk", [(2, [None, 2, 2, 4]), (0, [None, None, 3, 3])])
def test_the_interval_flags_set_when_records_validations_and_checkpoints_happen(folder, tmp_path, checkpoint_every,
                                                                                 on_disk):
    """6 steps, --log-every 2, --eval-every 3: records at steps 2, 3, 4 and 6 (a validation is always logged), the
    validation fields at 3 and 6. The checkpoint on disk when each record is written is the last one saved before
    that step's own: every 2 steps with --checkpoint-every 2, at each validation with 0; the last step saves too."""
    out = tmp_path / "run"
    seen = []

    def callback(record: dict) -> None:
        path = out / "checkpoint.pt"
        seen.append(torch.load(path, weights_only=True)["step"] if path.exists() else None)

    result = train.train(tiny_run(folder, out, steps=6, log_every=2, eval_every=3,
                                  checkpoint_every=checkpoint_every), callback)
    assert [r["step"] for r in result.history] == [2, 3, 4, 6]
    assert [r["step"] for r in result.history if "val_psnr" in r] == [3, 6]
    assert seen == on_disk
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6


def test_seed_batch_size_and_amp_reach_the_step(folder, tmp_path, monkeypatch):
    """--seed 0 and 1 start from other weights and draw other batches; every training batch holds --batch-size
    images; under --amp bf16 the quantizer receives the encoder's bf16 output, with --amp off float32."""
    seen = []
    real = models.VectorQuantizerEMA.forward

    def forward(quantizer, z):
        seen.append(z.dtype)
        return real(quantizer, z)

    monkeypatch.setattr(models.VectorQuantizerEMA, "forward", forward)
    batches, initial = {}, {}
    real_vqvae = models.VQVAE.forward

    def vqvae_forward(model, x):
        if model.training and torch.is_grad_enabled():
            batches.setdefault(run, []).append(x.detach().float().clone())
            initial.setdefault(run, model.encoder.conv1.weight.detach().clone())
        return real_vqvae(model, x)

    monkeypatch.setattr(models.VQVAE, "forward", vqvae_forward)
    dtypes = {}
    for run, amp in ((0, "off"), (1, "bf16")):
        seen.clear()
        train.train(tiny_run(folder, tmp_path / f"s{run}", steps=2, batch_size=3, seed=run, amp=amp, eval_every=2))
        dtypes[amp] = set(seen)
    assert dtypes == {"off": {torch.float32}, "bf16": {torch.bfloat16}}
    assert [x.shape[0] for x in batches[0] + batches[1]] == [3, 3, 3, 3]
    assert not torch.allclose(initial[0], initial[1], atol=1e-3)             # other starting weights
    assert not torch.allclose(batches[0][0], batches[1][0], atol=0.05)       # another first batch


def test_the_warm_up_applies_to_the_constant_schedule_too(folder, tmp_path, optimizer_lrs):
    """--lr-schedule constant --warmup-steps 3 --lr 0.02: 0.02/3, 0.04/3, then 0.02 at every step, by hand, both
    from the schedule and as the learning rate of each optimizer step."""
    c = tiny_run(folder, tmp_path / "run", steps=5, eval_every=5, lr=0.02, lr_schedule="constant", warmup_steps=3)
    by_hand = [0.02 / 3, 0.04 / 3, 0.02, 0.02, 0.02]
    assert [learning_rate(c, s) for s in range(5)] == pytest.approx(by_hand)
    seen = optimizer_lrs
    train.train(c)
    assert seen == pytest.approx(by_hand)
