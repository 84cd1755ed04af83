"""Multi-process training, crashes and signals, and safe checkpoints, with real processes and real signals."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import checkpoint
import runs
import train
from tests.ddp_worker import tiny, tiny_vq

ROOT = Path(__file__).resolve().parents[1]
TINY_FLAGS = ["--data", "sample", "--image-size", "16", "--batch-size", "4", "--hidden-channels", "8",
              "--residual-channels", "4", "--num-residual-blocks", "1", "--embedding-dim", "4",
              "--num-embeddings", "16", "--lr", "0.001", "--device", "cpu", "--amp", "off", "--no-progress",
              "--num-workers", "0", "--log-every", "1"]


# validation metrics every process reports, pooled over both shards (the sample's unseen photos and strips too)
VALIDATION_KEYS = ("mse", "psnr", "ssim", "codebook_usage", "perplexity", "num_images",
                   *(f"{part}_{key}" for part in ("unseen", "strips") for key in ("psnr", "ssim", "codebook_usage")))


def match_one_process(folder: Path, single) -> list[dict]:
    """The two ranks' saved states against one process that saw both shards together (batch 8): weights and
    quantizer buffers bit-identical between the ranks and equal to the single process to float tolerance, the
    validation metrics the same on both ranks and equal to the single process's (so the sums, code counts
    included, were added over processes), and rank 0's training records (losses averaged over processes)."""
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["model"].keys() == single.model.state_dict().keys()
    for key, value in single.model.state_dict().items():
        assert torch.equal(ranks[0]["model"][key], ranks[1]["model"][key]), key
        torch.testing.assert_close(ranks[0]["model"][key], value, atol=1e-5, rtol=1e-5, msg=key)
    assert set(VALIDATION_KEYS) <= single.final.keys()
    for key in VALIDATION_KEYS:
        assert ranks[0]["final"][key] == ranks[1]["final"][key], key
        assert ranks[0]["final"][key] == pytest.approx(single.final[key], rel=1e-5), key
    assert [r["step"] for r in ranks[0]["history"]] == [r["step"] for r in single.history]
    for mine, theirs in zip(ranks[0]["history"], single.history):
        for key in ("loss", "recon_loss", "commitment_loss", "restarts"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), (mine["step"], key)
    return ranks


def test_two_gloo_processes_hold_identical_codebooks_and_match_one_process(gloo_runs, tmp_path, capsys):
    """torchrun, 2 CPU processes with batch 4 each: the ranks end bit-identical (codebook and weights), and match
    one process that sees both shards together (batch 8) to float tolerance. The run uses k-means initialisation
    and dead-code restarts, the two codebook updates that draw random choices."""
    single = train.train(tiny(str(tmp_path / "single"), 8))
    ranks = match_one_process(gloo_runs / "ema", single)
    assert ranks[0]["final"]["num_images"] == single.final["num_images"]        # the validation shards add up
    assert int(ranks[0]["model"]["quantizer.restarts"]) == int(single.model.quantizer.restarts) > 0
    # only rank 0 wrote the run folder
    records = (gloo_runs / "ema" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in records] == [1, 2, 3, 4, 5, 6]
    assert ranks[1]["history"] == []
    # the 2-process checkpoint resumes in one process, saying at the start that the global batch changed
    run = tmp_path / "ddp"
    shutil.copytree(gloo_runs / "ema", run)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["world"] == 2
    capsys.readouterr()
    resumed = train.train(replace(tiny(str(run), 4), resume=True, steps=8))
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resuming")]
    assert len(said) == 1 and "with 1 process(es) (global batch 4)" in said[0] and "with 2 (global batch 8)" in said[0]
    assert resumed.history[-1]["step"] == 8


def test_the_plain_quantizer_on_two_gloo_processes_matches_one_process(gloo_runs, tmp_path):
    """The vq quantizer on the same two processes: its usage (an EMA of the per-batch code counts) is added over
    processes before the restart decision, so both ranks restart the same codes as one process with both shards
    does; gradient clipping acts after DDP's all-reduce, so both ranks scale alike."""
    single = train.train(tiny_vq(str(tmp_path / "single"), 8))
    ranks = match_one_process(gloo_runs / "vq", single)
    assert int(ranks[0]["model"]["quantizer.restarts"]) == int(single.model.quantizer.restarts) > 0


def run_until_checkpoint(args: list[str], out: Path, min_step: int) -> subprocess.Popen:
    """Start train.py and return once its checkpoint has reached `min_step` (the process still running)."""
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (out / "checkpoint.pt").exists():
            try:
                if torch.load(out / "checkpoint.pt", weights_only=True)["step"] >= min_step:
                    return proc
            except Exception:
                pass
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint in time")


def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path):
    out = tmp_path / "killed"
    args = [*TINY_FLAGS, "--steps", "20", "--eval-every", "20", "--checkpoint-every", "5", "--out", str(out)]
    proc = run_until_checkpoint(args, out, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 5 <= killed_at < 20
    r = subprocess.run([sys.executable, "train.py", *args, "--resume"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    straight = tmp_path / "straight"
    r = subprocess.run([sys.executable, "train.py", *TINY_FLAGS, "--steps", "20", "--eval-every", "20",
                        "--checkpoint-every", "5", "--out", str(straight)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = torch.load(out / "checkpoint.pt", weights_only=True)
    b = torch.load(straight / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 20
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))


def run_until_logged(args: list[str], out: Path, min_step: int) -> subprocess.Popen:
    """Start train.py and return once metrics.jsonl has a record of `min_step` or later (the process still running).
    SIGINT is given its default action in the child, as in a terminal (a shell running it in the background would
    otherwise pass the signal on as ignored)."""
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline:
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        if lines and json.loads(lines[-1])["step"] >= min_step:
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no metrics in time")


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_saves_a_checkpoint_at_the_step_it_stopped_and_says_how_to_resume(tmp_path, name):
    """README: "Ctrl-C or SIGTERM stops at the next step boundary, saves a checkpoint and prints the command that
    resumes it". No checkpoint is due in this run (--checkpoint-every and --eval-every far away), so the checkpoint
    found afterwards is the one the stop saved; it holds the last step logged, and the run resumes from it."""
    out = tmp_path / "run"
    args = [*TINY_FLAGS, "--steps", "100000", "--eval-every", "100000", "--checkpoint-every", "100000", "--out",
            str(out)]
    proc = run_until_logged(args, out, 3)
    try:
        assert not (out / "checkpoint.pt").exists()
        proc.send_signal(getattr(signal, name))
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert name in stderr and "--resume" in stderr, stderr[-1000:]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert ckpt["step"] >= 3 and records[-1]["step"] == ckpt["step"]
    assert f"at step {ckpt['step']}" in stderr                 # the saved step is the step it stopped at
    assert train.main([*args, "--steps", str(ckpt["step"] + 1), "--resume"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == ckpt["step"] + 1


class Payload:
    """Unpickling this runs a shell command (as a malicious checkpoint would)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "checkpoint.pt"
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "config": {}, "model": Payload(marker)}, bad)
    with pytest.raises(runs.CheckpointError, match="refused"):
        checkpoint.read_checkpoint(bad)
    assert not marker.exists()
    r = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(bad)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "refused" in r.stderr
    assert not marker.exists()
    # the payload is real: an unsafe load of the same kind of file does run it
    armed = tmp_path / "armed.pt"
    torch.save({"x": Payload(tmp_path / "ran-unsafely")}, armed)
    torch.load(armed, weights_only=False)
    assert (tmp_path / "ran-unsafely").exists()


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import torch.nn.functional as F

    calls = {"n": 0}
    real = F.mse_loss

    def poisoned(a, b, *args, **kwargs):   # train.py calls mse_loss once per step for the reconstruction loss
        value = real(a, b, *args, **kwargs)
        if a.shape[1] == 3 and a.requires_grad:
            calls["n"] += 1
            if calls["n"] >= 7:
                return value * float("nan")
        return value

    monkeypatch.setattr(train.F, "mse_loss", poisoned)
    c = tiny(str(tmp_path / "run"), 4)
    c.steps, c.eval_every, c.checkpoint_every, c.log_every = 20, 20, 2, 10
    with pytest.raises(FloatingPointError, match="at step 7"):
        train.train(c)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_a_crash_while_saving_leaves_the_previous_checkpoint_readable(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    runs.atomic_save({"step": 1, "weights": torch.ones(3)}, path)

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")          # some bytes reach the disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(runs.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        runs.atomic_save({"step": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]   # no temporary file left behind


def test_tiny_huge_and_bomb_images(tmp_path):
    """A 1x1 and a 2x3 image are upscaled; a 4000x3000 photo is decoded at a reduced scale; an image over PIL's
    decompression-bomb limit is skipped with a warning that names it, and the rest train."""
    import warnings

    import numpy as np
    from PIL import Image

    from image_data import ImageSkippedWarning, build_data

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (1, 1), (10, 200, 30)).save(folder / "dot.png")
    Image.new("L", (2, 3), 77).save(folder / "speck.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), dtype=np.uint8)).save(
        folder / "big.jpg", quality=70)
    Image.new("1", (20000, 10000)).save(folder / "bomb.png")              # 200 megapixels, a few KB on disk
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = build_data(str(folder), 16, val_fraction=0.5, num_workers=0)   # warnings raised in this process
    skipped = [str(w.message) for w in caught if issubclass(w.category, ImageSkippedWarning)]
    assert len(skipped) == 1 and "bomb.png" in skipped[0]
    items = [data.train[i][0] for i in range(len(data.train))] + [data.val[i][0] for i in range(len(data.val))]
    assert len(items) == 3 and all(x.shape == (3, 16, 16) for x in items)
    assert any(torch.equal(x[:, 0, 0], torch.tensor([10, 200, 30], dtype=torch.uint8)) for x in items)
