"""Every bad input of train.py and evaluate.py ends with one clear line on stderr, a non-zero exit status and no
traceback, and leaves no half-written run behind.

A handful of cases run the real scripts as subprocesses (that is what proves no traceback escapes); the many
argument checks run through train.main / evaluate.main in-process, which is much faster than importing torch in
a new process each time and checks the same exit code and message."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "16", "--steps", "2", "--batch-size", "4", "--hidden-channels", "8",
        "--residual-channels", "4", "--num-residual-blocks", "1", "--embedding-dim", "4", "--num-embeddings", "8",
        "--eval-every", "2", "--log-every", "1", "--no-progress", "--device", "cpu", "--num-workers", "0"]
RUN_FILES = ("checkpoint.pt", "config.json", "metrics.jsonl", "reconstructions.png")


def make_images(folder: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16 + i, 20, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def script(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, name, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def assert_clean_error(rc: int, stderr: str, *words: str) -> str:
    """Non-zero exit, no traceback, exactly one (non-warning) line on stderr, starting with "error:" and naming
    the problem. Returns that line."""
    assert rc not in (0, None), stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    """A run that failed before training leaves no run files (at most the empty folder it created)."""
    if out.exists():
        assert sorted(p.name for p in out.iterdir()) == [], list(out.iterdir())


@pytest.fixture
def plain_warnings(monkeypatch):
    """main() swaps warnings.formatwarning for a one-line format; restore it after the test."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)


def call_main(main, argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exit_:   # argparse errors
        rc = exit_.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("cli") / "images")


@pytest.fixture(scope="module")
def real_run(images, tmp_path_factory) -> Path:
    """A finished tiny run: its folder holds checkpoint.pt, metrics.jsonl, config.json, reconstructions.png."""
    out = tmp_path_factory.mktemp("cli") / "run"
    formatwarning = warnings.formatwarning
    try:
        assert train.main(["--data", str(images), "--out", str(out), *TINY]) == 0
    finally:
        warnings.formatwarning = formatwarning
    assert all((out / name).is_file() for name in RUN_FILES)
    return out


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# train.py, real subprocesses


def test_subprocess_missing_data_folder(tmp_path):
    out = tmp_path / "run"
    r = script("train.py", "--data", tmp_path / "no_such_folder", "--out", out, *TINY)
    assert_clean_error(r.returncode, r.stderr, "no_such_folder", "does not exist")
    assert_nothing_written(out)


def test_subprocess_image_size_not_multiple_of_4(images, tmp_path):
    r = script("train.py", "--data", images, "--out", tmp_path / "run", *TINY, "--image-size", "30")
    assert_clean_error(r.returncode, r.stderr, "--image-size", "multiple of 4", "30")
    assert_nothing_written(tmp_path / "run")


def test_subprocess_device_cuda_without_cuda(images, tmp_path):
    r = script("train.py", "--data", images, "--out", tmp_path / "run", *TINY, "--device", "cuda",
               env={"CUDA_VISIBLE_DEVICES": ""})
    assert_clean_error(r.returncode, r.stderr, "cuda", "not available")
    assert_nothing_written(tmp_path / "run")


def test_subprocess_food101_without_download(tmp_path):
    out = tmp_path / "run"
    r = script("train.py", "--data", "food101", "--data-root", tmp_path / "datasets", "--out", out, *TINY)
    assert_clean_error(r.returncode, r.stderr, "Food101", "--download")
    assert_nothing_written(out)
    assert not (tmp_path / "datasets" / "food-101").exists()     # nothing was downloaded


def test_subprocess_out_already_holds_a_run(real_run, images):
    before = snapshot(real_run)
    r = script("train.py", "--data", images, "--out", real_run, *TINY)
    line = assert_clean_error(r.returncode, r.stderr, "already holds a run", "--resume", "--overwrite")
    assert "step 2" in line
    assert snapshot(real_run) == before                         # the existing run is untouched


def test_subprocess_broken_image_is_a_warning_not_a_crash(images, tmp_path):
    """A corrupt file among good ones: one "warning:" line naming it (printed from a DataLoader worker here),
    and the run finishes."""
    data = tmp_path / "photos"
    make_images(data, 6)
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    r = script("train.py", "--data", data, "--out", tmp_path / "run", *TINY, "--num-workers", "1")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    warning_lines = [line for line in r.stderr.splitlines() if "broken.jpg" in line]
    assert warning_lines and all(line.startswith("warning: skipping") for line in warning_lines), r.stderr
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert len(warning_lines) == 1, r.stderr                     # once, not once per decoding pass


# ---------------------------------------------------------------------------------------------------------------
# evaluate.py, real subprocesses


def test_subprocess_evaluate_missing_checkpoint(tmp_path):
    r = script("evaluate.py", "--checkpoint", tmp_path / "missing.pt")
    assert_clean_error(r.returncode, r.stderr, "missing.pt", "does not exist")


def test_subprocess_evaluate_truncated_checkpoint(real_run, tmp_path):
    blob = (real_run / "checkpoint.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(blob[: len(blob) // 2])
    r = script("evaluate.py", "--checkpoint", path, "--device", "cpu")
    assert_clean_error(r.returncode, r.stderr, "truncated.pt", "cannot load checkpoint")


def test_subprocess_evaluate_other_pickle(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"a": 1}, path)
    r = script("evaluate.py", "--checkpoint", path, "--device", "cpu")
    assert_clean_error(r.returncode, r.stderr, "other.pt", "not a checkpoint", "this repo")


def test_subprocess_evaluate_bad_device(real_run):
    """evaluate.py takes --device like train.py; an unknown one must be a one-line error there too."""
    r = script("evaluate.py", "--checkpoint", real_run / "checkpoint.pt", "--device", "nonsense")
    assert_clean_error(r.returncode, r.stderr, "--device", "nonsense")


# ---------------------------------------------------------------------------------------------------------------
# train.main in-process: argument and data validation


@pytest.mark.parametrize("extra, words", [
    (["--image-size", "0"], ["--image-size", "multiple of 4"]),
    (["--image-size", "30"], ["--image-size", "multiple of 4"]),
    (["--steps", "-1"], ["--steps", "at least 1", "-1"]),
    (["--batch-size", "0"], ["--batch-size", "at least 1"]),
    (["--num-embeddings", "0"], ["--num-embeddings", "at least 1"]),
    (["--eval-every", "0"], ["--eval-every", "at least 1"]),
    (["--lr", "0"], ["--lr", "positive"]),
    (["--lr", "nan"], ["--lr", "positive"]),
    (["--lr", "-0.001"], ["--lr", "positive"]),
    (["--beta", "-1"], ["--beta"]),
    (["--decay", "1"], ["--decay"]),
    (["--amp", "fp16"], ["--amp", "fp16"]),
    (["--device", "nonsense"], ["--device", "nonsense"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--quantizer", "foo"], ["--quantizer", "foo", "ema", "vq"]),
    (["--val-fraction", "1.5"], ["--val-fraction", "1.5"]),
    (["--val-fraction", "0"], ["--val-fraction"]),
    (["--levels", "3"], ["--levels", "3"]),
    (["--levels", "2", "--downsample", "8"], ["--levels 2", "--downsample"]),
    (["--levels", "2", "--image-size", "36"], ["--image-size", "multiple of 8", "36"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None)
def test_bad_flags(extra, words, images, tmp_path, capsys, plain_warnings):
    out = tmp_path / "run"
    rc, _, err = call_main(train.main, ["--data", images, "--out", out, *TINY, *extra], capsys)
    assert_clean_error(rc, err, *words)
    assert_nothing_written(out)


def test_device_cuda_in_process(images, tmp_path, capsys, plain_warnings):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here; the subprocess test hides it with CUDA_VISIBLE_DEVICES")
    rc, _, err = call_main(train.main, ["--data", images, "--out", tmp_path / "run", *TINY, "--device", "cuda"],
                           capsys)
    assert_clean_error(rc, err, "cuda", "not available")


def bad_data_folder(kind: str, tmp_path: Path) -> tuple[Path, list[str]]:
    if kind == "missing":
        return tmp_path / "nope", ["nope", "does not exist"]
    if kind == "empty":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", ["no images found"]
    if kind == "only_txt":
        (tmp_path / "texts" / "sub").mkdir(parents=True)
        (tmp_path / "texts" / "notes.txt").write_text("hello")
        (tmp_path / "texts" / "sub" / "readme.md").write_text("hello")
        return tmp_path / "texts", ["no images found"]
    if kind == "file":
        Image.new("RGB", (8, 8)).save(tmp_path / "single.png")
        return tmp_path / "single.png", ["is a file", "not a folder"]
    if kind == "one_image":
        make_images(tmp_path / "one", 1)
        return tmp_path / "one", ["at least 2"]
    if kind == "all_broken":
        (tmp_path / "broken").mkdir()
        for name in ("a.jpg", "b.png", "c.webp"):
            (tmp_path / "broken" / name).write_bytes(b"not an image")
        return tmp_path / "broken", ["could be decoded"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "empty", "only_txt", "file", "one_image", "all_broken"])
def test_bad_data(kind, tmp_path, capsys, plain_warnings):
    data, words = bad_data_folder(kind, tmp_path)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the all_broken files each warn before the error
        rc, _, err = call_main(train.main, ["--data", data, "--out", out, *TINY], capsys)
    assert_clean_error(rc, err, *words)
    assert_nothing_written(out)


def test_cifar10_without_download(tmp_path, capsys, plain_warnings):
    out = tmp_path / "run"
    rc, _, err = call_main(train.main, ["--data", "cifar10", "--data-root", tmp_path, "--out", out, *TINY], capsys)
    assert_clean_error(rc, err, "CIFAR-10", "--download")
    assert_nothing_written(out)


def test_out_under_a_regular_file(images, tmp_path, capsys, plain_warnings):
    (tmp_path / "file.txt").write_text("I am a file")
    rc, _, err = call_main(train.main, ["--data", images, "--out", tmp_path / "file.txt" / "run", *TINY], capsys)
    assert_clean_error(rc, err, "--out", "file.txt")
    assert (tmp_path / "file.txt").read_text() == "I am a file"


def test_out_already_holds_a_run_in_process(real_run, images, capsys, plain_warnings):
    before = snapshot(real_run)
    rc, _, err = call_main(train.main, ["--data", images, "--out", real_run, *TINY], capsys)
    assert_clean_error(rc, err, "already holds a run", "--resume")
    assert snapshot(real_run) == before


@pytest.mark.parametrize("flag, value", [("--num-embeddings", "16"), ("--embedding-dim", "8"),
                                         ("--image-size", "32"), ("--quantizer", "vq")])
def test_resume_with_a_different_model(flag, value, real_run, images, capsys, plain_warnings):
    before = snapshot(real_run)
    rc, _, err = call_main(train.main, ["--data", images, "--out", real_run, *TINY, "--resume", flag, value],
                           capsys)
    line = assert_clean_error(rc, err, flag, value)
    assert "checkpoint.pt" in line
    assert snapshot(real_run) == before


def test_resume_with_a_corrupt_checkpoint(images, real_run, tmp_path, capsys, plain_warnings):
    out = tmp_path / "run"
    out.mkdir()
    blob = (real_run / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(blob[: len(blob) // 3])
    rc, _, err = call_main(train.main, ["--data", images, "--out", out, *TINY, "--resume"], capsys)
    assert_clean_error(rc, err, "cannot load checkpoint")
    assert (out / "checkpoint.pt").read_bytes() == blob[: len(blob) // 3]   # not replaced by a fresh run


# ---------------------------------------------------------------------------------------------------------------
# evaluate.main in-process


def test_evaluate_works_on_the_real_run(real_run, capsys, plain_warnings):
    """The positive control for the evaluate errors below."""
    rc, out, err = call_main(evaluate.main, ["--checkpoint", real_run / "checkpoint.pt", "--device", "cpu"], capsys)
    assert rc == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["num_images"] >= 1 and metrics["split"] == "val"


def test_evaluate_zero_byte_checkpoint(tmp_path, capsys, plain_warnings):
    (tmp_path / "empty.pt").write_bytes(b"")
    rc, _, err = call_main(evaluate.main, ["--checkpoint", tmp_path / "empty.pt", "--device", "cpu"], capsys)
    assert_clean_error(rc, err, "empty.pt", "cannot load checkpoint")


def test_evaluate_missing_checkpoint_in_process(tmp_path, capsys, plain_warnings):
    rc, _, err = call_main(evaluate.main, ["--checkpoint", tmp_path / "nope.pt"], capsys)
    assert_clean_error(rc, err, "nope.pt", "does not exist")


def test_evaluate_checkpoint_is_a_folder(tmp_path, capsys, plain_warnings):
    rc, _, err = call_main(evaluate.main, ["--checkpoint", tmp_path], capsys)
    assert_clean_error(rc, err, "does not exist")


def test_evaluate_other_pickles(tmp_path, capsys, plain_warnings):
    for i, obj in enumerate([{"a": 1}, [1, 2, 3], torch.zeros(3), {"format": "something-else", "model": {}}]):
        path = tmp_path / f"other{i}.pt"
        torch.save(obj, path)
        rc, _, err = call_main(evaluate.main, ["--checkpoint", path, "--device", "cpu"], capsys)
        assert_clean_error(rc, err, f"other{i}.pt", "not a checkpoint")


def test_evaluate_bad_batch_size(real_run, capsys, plain_warnings):
    rc, _, err = call_main(evaluate.main, ["--checkpoint", real_run / "checkpoint.pt", "--batch-size", "0"], capsys)
    assert_clean_error(rc, err, "--batch-size")


def test_evaluate_missing_data_folder(real_run, tmp_path, capsys, plain_warnings):
    rc, _, err = call_main(evaluate.main, ["--checkpoint", real_run / "checkpoint.pt", "--device", "cpu",
                                           "--data", tmp_path / "gone"], capsys)
    assert_clean_error(rc, err, "gone", "does not exist")
