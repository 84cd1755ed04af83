"""README's promises about runs and scripts ("Command line", "Generation"), each against an independent reference:
the images read back with PIL and the metrics pooled in NumPy, the loss recomputed from what the model saw, a fresh
run in another folder, numbers worked by hand, the decoded images of known code maps.

Everything is tiny (16x16 images, 8 codes, a few steps) and on the CPU."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import evaluate_prior
import extract_codes
import models
import prior_checkpoint
import sample
import train
import train_prior
from checkpoint import Config, load_checkpoint
from image_data import build_data

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=16, steps=2, batch_size=4, hidden_channels=8, residual_channels=4, num_residual_blocks=1,
            embedding_dim=4, num_embeddings=8, eval_every=2, log_every=1, lr=1e-3, progress=False, device="cpu",
            amp="off", num_workers=0)
TINY_FLAGS = ["--image-size", "16", "--batch-size", "4", "--hidden-channels", "8", "--residual-channels", "4",
              "--num-residual-blocks", "1", "--embedding-dim", "4", "--num-embeddings", "8", "--lr", "0.001",
              "--log-every", "1", "--no-progress", "--device", "cpu", "--amp", "off", "--num-workers", "0"]


def save_array(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def make_folder(root: Path, seed: int = 0) -> Path:
    """train/ with 6 full-range 16x16 images, val/ with 3 in a narrow band (a much smaller variance)."""
    rng = np.random.default_rng(seed)
    for i in range(6):
        save_array(root / "train" / f"t{i}.png", rng.integers(0, 256, (16, 16, 3)))
    for i in range(3):
        save_array(root / "val" / f"v{i}.png", rng.integers(100, 141, (16, 16, 3)))
    return root


def pixels_of(paths) -> np.ndarray:
    """The images as saved, read with PIL: (N, 16, 16, 3) float64 in [0, 1]."""
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in sorted(paths)]) / 255


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("promises") / "photos")


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("promises") / "run"
    train.train(Config(data=str(folder), out=str(out), **TINY))
    return out / "checkpoint.pt"


def call_main(main, argv, capsys) -> tuple[int, str, str]:
    """main(argv) in this process: (exit status, stdout, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exit_:
        rc = exit_.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_error_line(rc, stderr: str, *words: str) -> str:
    """A non-zero exit, no traceback, exactly one line on stderr (warnings aside), starting with "error: "."""
    assert rc not in (0, None), stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


@pytest.fixture
def plain_warnings(monkeypatch):
    """The scripts' main() swaps warnings.formatwarning for a one-line format; restore it after the test."""
    import warnings

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)


class SeenByTheModel:
    """Records (input, reconstruction) of every training-mode forward pass of any VQVAE."""

    def __init__(self, monkeypatch):
        self.steps: list[tuple[np.ndarray, np.ndarray]] = []
        real = models.VQVAE.forward

        def forward(model, x):
            out = real(model, x)
            if model.training and torch.is_grad_enabled():
                self.steps.append((x.detach().double().numpy().copy(),
                                   out.reconstruction.detach().double().numpy().copy()))
            return out

        monkeypatch.setattr(models.VQVAE, "forward", forward)

    def mse(self, step: int) -> float:
        x, reconstruction = self.steps[step - 1]
        return float(((reconstruction - x) ** 2).mean())


# ---------------------------------------------------------------------------------------------------------------
# "The training loss is ... MSE(x_hat, x) / Var(training pixels) + codebook_loss + beta * commitment_loss"


def test_the_reconstruction_term_is_the_mse_over_the_training_pixels_variance(folder, tmp_path, monkeypatch):
    seen = SeenByTheModel(monkeypatch)
    result = train.train(Config(data=str(folder), out=str(tmp_path / "run"), **TINY))
    variance = np.var(pixels_of((folder / "train").iterdir()))     # population; the code's unbiased: 2e-4 more
    assert np.var(pixels_of((folder / "val").iterdir())) < variance / 10
    assert len(seen.steps) == 2 and [r["step"] for r in result.history] == [1, 2]
    for record in result.history:
        assert record["recon_loss"] == pytest.approx(seen.mse(record["step"]) / variance, rel=1e-3)
        # EMA quantizer: no codebook loss, so loss = reconstruction + beta * commitment
        assert record["loss"] == pytest.approx(record["recon_loss"] + 0.25 * record["commitment_loss"], rel=1e-5)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["data_variance"] == pytest.approx(variance, rel=1e-3)
    # "Training logs the number of restarts, and every validation reports codebook usage and perplexity over the
    # whole validation split"
    last = result.history[-1]
    assert last["restarts"] == int(result.model.quantizer.restarts)
    expected = reference_metrics(tmp_path / "run" / "checkpoint.pt", pixels_of((folder / "val").iterdir()), 64)
    assert last["val_num_images"] == 3
    assert last["val_mse"] == pytest.approx(expected["mse"], rel=1e-5)
    assert last["val_perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert last["val_codebook_usage"] == pytest.approx(expected["codebook_usage"])


def test_a_resumed_run_keeps_the_variance_it_started_with(folder, tmp_path, monkeypatch):
    """Photos added to the folder between the two halves change its variance; the resumed half still divides by
    the variance the run started with (the one saved in the checkpoint)."""
    data = tmp_path / "photos"
    shutil.copytree(folder, data)
    started = np.var(pixels_of((data / "train").iterdir()))
    train.train(Config(data=str(data), out=str(tmp_path / "run"), **TINY))
    for i in range(4):
        save_array(data / "train" / f"grey{i}.png", np.full((16, 16, 3), 128))
    assert np.var(pixels_of((data / "train").iterdir())) < 0.8 * started
    seen = SeenByTheModel(monkeypatch)
    result = train.train(Config(data=str(data), out=str(tmp_path / "run"), **{**TINY, "steps": 3}, resume=True))
    assert [r["step"] for r in result.history] == [1, 2, 3] and len(seen.steps) == 1
    assert result.history[-1]["recon_loss"] == pytest.approx(seen.mse(1) / started, rel=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# "pass --resume to continue it or --overwrite to start again"


def test_overwrite_starts_again_from_step_zero(folder, tmp_path, capsys, plain_warnings):
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    for argv in (["--out", out, "--steps", 4, "--eval-every", 4],
                 ["--out", out, "--steps", 2, "--eval-every", 2, "--overwrite"],
                 ["--out", fresh, "--steps", 2, "--eval-every", 2]):
        rc, _, err = call_main(train.main, ["--data", folder, *TINY_FLAGS, *argv], capsys)
        assert rc == 0, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    a, b = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (out, fresh))
    assert a["step"] == b["step"] == 2
    for key in b["model"]:                                           # the same weights as a run that never was
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_overwrite_removes_the_old_run_files_before_training(folder, tmp_path):
    """A run started with --overwrite and stopped at its first step (before any checkpoint or validation) leaves
    only its own files: the old checkpoint, which --resume would otherwise pick up, is gone."""
    out = tmp_path / "run"
    train.train(Config(data=str(folder), out=str(out), **TINY))
    assert {"checkpoint.pt", "reconstructions.png", "metrics.jsonl"} <= {p.name for p in out.iterdir()}

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    c = Config(data=str(folder), out=str(out), **{**TINY, "steps": 50, "eval_every": 100}, overwrite=True)
    with pytest.raises(Stop):
        train.train(c, callback=stop)
    assert not (out / "checkpoint.pt").exists() and not (out / "reconstructions.png").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


# ---------------------------------------------------------------------------------------------------------------
# evaluate.py: "--split val|train|all ... mse (over all pixels of the whole set) ... codebook_usage ... perplexity
# (of the code distribution over the set) and num_images"


def reference_metrics(checkpoint: Path, images: np.ndarray, batch_size: int) -> dict:
    """The images through the model in the batches evaluate.py forms (so the same arithmetic picks the same
    codes); the pooling is done here, in NumPy float64."""
    model, config, _ = load_checkpoint(checkpoint)
    squared, count, counts = 0.0, 0, np.zeros(config.num_embeddings)
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float()   # (B, 3, H, W)
        with torch.no_grad():
            out = model(x - 0.5)
        y = np.clip(out.reconstruction.double().numpy() + 0.5, 0, 1)
        squared += float(((y - x.double().numpy()) ** 2).sum())
        count += x.numel()
        counts += np.bincount(out.vq.indices.flatten().numpy(), minlength=config.num_embeddings)
    p = counts / counts.sum()
    entropy = -sum(q * math.log(q) for q in p if q > 0)
    return {"mse": squared / count, "num_images": len(images), "codebook_usage": float((counts > 0).mean()),
            "perplexity": math.exp(entropy)}


@pytest.mark.parametrize("split", ["train", "val", "all", None])
def test_evaluate_split_of_a_folder(split, run, folder, capsys, plain_warnings):
    """Batches of 2, so a mean of per-batch numbers would differ from the pooled ones. Without --split (and without
    --data) it is the checkpoint's validation split."""
    flags = ["--split", split] if split else []
    rc, out, err = call_main(evaluate.main, ["--checkpoint", run, *flags, "--batch-size", 2, "--device", "cpu"],
                             capsys)
    assert rc == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    split = split or "val"
    paths = {"train": (folder / "train").iterdir(), "val": (folder / "val").iterdir(),
             "all": folder.rglob("*.png")}[split]
    expected = reference_metrics(run, pixels_of(paths), 2)
    assert report["split"] == split and report["num_images"] == expected["num_images"]
    assert report["mse"] == pytest.approx(expected["mse"], rel=1e-5)
    assert report["psnr"] == pytest.approx(10 * math.log10(1 / expected["mse"]), rel=1e-5)
    assert report["codebook_usage"] == pytest.approx(expected["codebook_usage"])
    assert report["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)


def test_evaluate_split_all_of_the_sample_is_training_and_validation_crops(tmp_path, capsys, plain_warnings):
    """For a built-in dataset, all = the training split (un-augmented grid crops) followed by the validation one."""
    train.train(Config(data="sample", out=str(tmp_path / "run"), **{**TINY, "steps": 1, "eval_every": 1}))
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    splits = build_data("sample", 16)
    images = np.stack([ds[i][0].permute(1, 2, 0).double().numpy() / 255
                       for ds in (splits.train, splits.val) for i in range(len(ds))])
    rc, out, err = call_main(evaluate.main, ["--checkpoint", checkpoint, "--split", "all", "--batch-size", 128,
                                             "--device", "cpu"], capsys)
    assert rc == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    expected = reference_metrics(checkpoint, images, 128)
    assert report["num_images"] == expected["num_images"] == len(splits.train) + len(splits.val)
    assert report["mse"] == pytest.approx(expected["mse"], rel=1e-5)
    assert report["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# "Mistakes a user can make (... a checkpoint from another model) stop the program with a one-line error: message"


def mismatched_checkpoints(run: Path, tmp_path: Path) -> dict[str, Path]:
    ckpt = torch.load(run, weights_only=True)
    wrong_size = {**ckpt, "config": {**ckpt["config"], "num_embeddings": 16}}
    torch.save(wrong_size, tmp_path / "wrong_size.pt")
    model = dict(ckpt["model"])
    del model["decoder.deconv2.bias"]
    torch.save({**ckpt, "model": model}, tmp_path / "missing_key.pt")
    return {"wrong_size": tmp_path / "wrong_size.pt", "missing_key": tmp_path / "missing_key.pt"}


def test_weights_that_do_not_match_their_config_are_one_error_line(run, tmp_path, capsys, plain_warnings):
    for name, path in mismatched_checkpoints(run, tmp_path).items():
        rc, _, err = call_main(evaluate.main, ["--checkpoint", path, "--device", "cpu"], capsys)
        one_error_line(rc, err, path.name, "do not match")
        rc, _, err = call_main(extract_codes.main, ["--checkpoint", path, "--out", tmp_path / "codes.pt",
                                                    "--device", "cpu", "--no-progress"], capsys)
        one_error_line(rc, err, path.name, "do not match")
    assert not (tmp_path / "codes.pt").exists()


def test_weights_that_do_not_match_their_config_in_a_real_process(run, tmp_path):
    path = mismatched_checkpoints(run, tmp_path)["wrong_size"]
    r = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(path), "--device", "cpu"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    one_error_line(r.returncode, r.stderr, "wrong_size.pt", "do not match")


# ---------------------------------------------------------------------------------------------------------------
# sample.py: "For a class-conditional prior, --class picks the class (its name or index); without it the samples
# go through the classes in turn"; evaluate_prior.py's unigram baseline


def codes_file(path: Path, vqvae_checkpoint: Path, cats: int, dogs: int, n_train: tuple[int, int],
               n_val: tuple[int, int]) -> Path:
    """A codes file as extract_codes.py writes it: every "cats" map is all code `cats`, every "dogs" map all
    `dogs`."""
    ckpt = torch.load(vqvae_checkpoint, weights_only=True)

    def maps(n_cats, n_dogs):
        codes = torch.cat([torch.full((n_cats, 4, 4), cats), torch.full((n_dogs, 4, 4), dogs)]).to(torch.uint8)
        return codes, torch.tensor([0] * n_cats + [1] * n_dogs)

    (train_codes, train_labels), (val_codes, val_labels) = maps(*n_train), maps(*n_val)
    torch.save({"format": extract_codes.CODES_FORMAT, "train_codes": train_codes, "train_labels": train_labels,
                "val_codes": val_codes, "val_labels": val_labels, "classes": ["cats", "dogs"],
                "num_embeddings": ckpt["config"]["num_embeddings"], "vqvae_checkpoint": str(vqvae_checkpoint),
                "vqvae_config": ckpt["config"], "vqvae_step": ckpt["step"], "data": ckpt["config"]["data"],
                "description": "made by the test", "passes": 1}, path)
    return path


COLOURS = {"cats": (230, 40, 40), "dogs": (40, 40, 230)}


@pytest.fixture(scope="module")
def class_prior(tmp_path_factory):
    """The whole pipeline on a folder of red "cats" and blue "dogs": a VQ-VAE (150 steps, enough to tell red from
    blue), its codes (extract_codes.py) and a conditional prior that learns them, so that its greedy samples are
    known: the code map of the class's image."""
    root = tmp_path_factory.mktemp("classes")
    for split, n in (("train", 4), ("val", 1)):
        for name, rgb in COLOURS.items():
            for i in range(n):
                save_array(root / "photos" / split / name / f"{i}.png", np.tile(np.array(rgb), (16, 16, 1)))
    train.train(Config(data=str(root / "photos"), out=str(root / "vqvae"),
                       **{**TINY, "steps": 150, "eval_every": 150, "lr": 3e-3}))
    vqvae = root / "vqvae" / "checkpoint.pt"
    extract_codes.extract_codes(vqvae, root / "codes.pt", device="cpu", progress=False)
    config = prior_checkpoint.PriorConfig(codes=str(root / "codes.pt"), out=str(root / "prior"), channels=8,
                                          num_layers=2, kernel_size=3, dropout=0.0, steps=60, batch_size=16, lr=1e-2,
                                          eval_every=60, log_every=60, progress=False, device="cpu", amp="off")
    train_prior.train_prior(config)
    model, _, _ = load_checkpoint(vqvae)
    images = {name: torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 16, 16) / 255 - 0.5
              for name, rgb in COLOURS.items()}
    decoded = {name: model.decode(model.encode(x))[0] for name, x in images.items()}    # (3, 16, 16) each
    return {"checkpoint": root / "prior" / "checkpoint.pt", "decoded": decoded}


@pytest.fixture(scope="module")
def unigram_prior(run, tmp_path_factory):
    """A prior (barely trained: only its codes file matters here) over maps that are all code 1 for "cats" and all
    code 4 for "dogs": 64 and 32 training maps, 8 and 8 validation maps."""
    root = tmp_path_factory.mktemp("unigram")
    codes = codes_file(root / "codes.pt", run, 1, 4, n_train=(64, 32), n_val=(8, 8))
    config = prior_checkpoint.PriorConfig(codes=str(codes), out=str(root / "prior"), channels=4, num_layers=1,
                                          kernel_size=3, steps=1, batch_size=4, eval_every=1, log_every=1,
                                          progress=False, device="cpu", amp="off")
    train_prior.train_prior(config)
    return root / "prior" / "checkpoint.pt"


def tiles(png: Path, num: int) -> list[np.ndarray]:
    """The images of a one-row grid (padding 2) as uint8 (16, 16, 3)."""
    a = np.asarray(Image.open(png).convert("RGB"))
    return [a[2:18, 2 + 18 * i:18 + 18 * i] for i in range(num)]


def expected_tile(decoded: torch.Tensor) -> np.ndarray:
    """What torchvision.utils.save_image writes for a decoded image (3, H, W) in [-0.5, 0.5]."""
    image = (decoded + 0.5).clamp(0, 1)
    return image.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy().astype(int)


def test_sample_class_picks_the_class_by_name_or_index(class_prior, tmp_path, capsys, plain_warnings):
    expected = {name: expected_tile(d) for name, d in class_prior["decoded"].items()}
    assert np.abs(expected["cats"] - expected["dogs"]).max() > 100                  # red and blue
    base = ["--checkpoint", class_prior["checkpoint"], "--num", 4, "--nrow", 4, "--temperature", 0.01,
            "--device", "cpu"]
    for choice, name in (("dogs", "dogs"), ("1", "dogs"), ("cats", "cats"), ("0", "cats"), (None, None)):
        png = tmp_path / f"{choice}.png"
        extra = ["--class", choice] if choice is not None else []
        rc, _, err = call_main(sample.main, [*base, *extra, "--out", png], capsys)
        assert rc == 0, err
        names = [name] * 4 if name else ["cats", "dogs", "cats", "dogs"]   # without --class: in turn
        for tile, which in zip(tiles(png, 4), names):
            assert np.abs(tile.astype(int) - expected[which]).max() <= 1, (choice, which)


def test_unigram_baseline_counts_training_maps_and_scores_validation_maps(unigram_prior, capsys, plain_warnings):
    """By hand: K = 8, training maps 64 x 16 of code 1 and 32 x 16 of code 4, so with add-one smoothing
    p(1) = 1025 / 1544 and p(4) = 513 / 1544; the validation maps are half and half."""
    rc, out, err = call_main(evaluate_prior.main, ["--checkpoint", unigram_prior, "--no-bits-per-dim",
                                                   "--device", "cpu"], capsys)
    assert rc == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    expected = -(0.5 * math.log(1025 / 1544) + 0.5 * math.log(513 / 1544))
    assert report["unigram_nats_per_code"] == pytest.approx(expected, rel=1e-9)
    assert report["uniform_nats_per_code"] == pytest.approx(math.log(8))
    assert report["val_entropy_nats_per_code"] == pytest.approx(math.log(2))
