"""The shape of the code: no import circles, small modules and short training functions, the run plumbing and the
library code below every script; checkpoints from before the move still load and resume; --tensorboard writes what
metrics.jsonl holds."""
import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import checkpoint
import runs
import train

ROOT = Path(__file__).resolve().parents[1]
FILES = {p.stem: p for p in [*ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]}   # library, scripts, benchmarks
MODULES = sorted(FILES)
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoint-v1-before-runs.pt"


def repo_imports(name: str) -> set[str]:
    """The repo's own modules that `name`.py imports anywhere (top level or inside functions)."""
    tree = ast.parse(FILES[name].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in MODULES:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES}
    return found


def test_no_import_circles():
    graph = {m: repo_imports(m) for m in MODULES}
    done, path = set(), []

    def visit(m):
        assert m not in path, "import circle: " + " -> ".join(path[path.index(m):] + [m])
        if m in done:
            return
        path.append(m)
        for d in graph[m]:
            visit(d)
        path.pop()
        done.add(m)

    for m in MODULES:
        visit(m)


def test_runs_and_checkpoint_sit_below_every_script():
    assert repo_imports("runs") == set()
    assert repo_imports("checkpoint") <= {"runs", "models", "hierarchy"}
    assert repo_imports("hierarchy") <= {"models", "pixels"}
    assert repo_imports("codebook") == set()          # the quantizers' tools, below models
    assert repo_imports("pixels") == set()            # the pixel scale, below both models
    assert repo_imports("training_loop") <= {"runs"}
    assert repo_imports("prior_checkpoint") <= {"runs", "prior", "hierarchical_prior", "transformer_prior"}
    assert repo_imports("transformer_prior") == set()   # the transformer and its sampling filter, below prior.py
    for script in ("evaluate", "extract_codes", "sample", "evaluate_prior", "train_prior", "bench_report"):
        assert "train" not in repo_imports(script), f"{script}.py imports the training loop"
    for script in ("sample", "evaluate_prior"):   # the prior's library code lives in prior_checkpoint and checkpoint
        assert not repo_imports(script) & {"train_prior", "sample", "evaluate_prior"}, f"{script}.py imports a script"
    assert "bench" not in repo_imports("ablation")


def test_modules_stay_small():
    for m in MODULES:
        lines = len(FILES[m].read_text().splitlines())
        assert lines <= (650 if m == "models" else 500), f"{m}.py has {lines} lines"


def test_the_training_functions_are_short():
    for name in ("train", "train_prior"):
        for node in ast.walk(ast.parse(FILES[name].read_text())):
            if isinstance(node, ast.FunctionDef):
                lines = node.end_lineno - node.lineno + 1
                assert lines <= 80, f"{name}.{node.name} has {lines} lines"


def test_a_checkpoint_written_before_the_move_loads_evaluates_and_resumes(tmp_path, capsys):
    """The fixture was written by train.py as it was before runs.py and checkpoint.py existed (commit 87fe6f9)."""
    model, config, ckpt = checkpoint.load_checkpoint(FIXTURE)
    assert "tensorboard" not in ckpt["config"] and config.tensorboard is False
    assert (config.image_size, config.num_embeddings, ckpt["step"]) == (16, 8, 3)
    z = model.encode(torch.rand(1, 3, 16, 16) - 0.5)
    assert z.shape == (1, 4, 4) and int(z.max()) < 8
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(FIXTURE.read_bytes())
    args = ["--out", str(run), "--resume", "--steps", "4", "--device", "cpu", "--num-workers", "0", "--no-progress",
            "--image-size", "16", "--batch-size", "4", "--hidden-channels", "8", "--residual-channels", "4",
            "--num-residual-blocks", "1", "--embedding-dim", "4", "--num-embeddings", "8", "--eval-every", "3",
            "--log-every", "1"]
    assert train.main(args) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 4
    assert "done:" in capsys.readouterr().out


def read_events(folder: Path) -> tuple[dict, dict]:
    """Scalars {tag: {step: value}} and image tags {tag: [steps]} from TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}
    images = {t: [e.step for e in acc.Images(t)] for t in acc.Tags()["images"]}
    return scalars, images


def test_tensorboard_holds_the_metrics_records_and_the_reconstructions(tmp_path):
    pytest.importorskip("tensorboard")
    c = checkpoint.Config(data="sample", image_size=16, steps=4, batch_size=4, hidden_channels=8,
                          residual_channels=4, num_residual_blocks=1, embedding_dim=4, num_embeddings=8,
                          eval_every=2, log_every=1, out=str(tmp_path / "run"), progress=False, device="cpu",
                          num_workers=0, tensorboard=True)
    train.train(c)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scalars, images = read_events(tmp_path / "run")
    assert scalars["train/loss"].keys() == {r["step"] for r in records} == {1, 2, 3, 4}
    for r in records:
        assert scalars["train/loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)
        assert scalars["train/perplexity"][r["step"]] == pytest.approx(r["perplexity"], rel=1e-6)
    for step in (2, 4):
        psnr = next(r["val_psnr"] for r in records if r["step"] == step)
        assert scalars["val/psnr"][step] == pytest.approx(psnr, rel=1e-6)
    assert images["val/reconstructions"] == [2, 4]
    # --overwrite removes the old event files with the other run files
    train.train(replace(c, overwrite=True, steps=2))
    scalars, images = read_events(tmp_path / "run")
    assert set(scalars["train/loss"]) == {1, 2} and images["val/reconstructions"] == [2]


def test_without_the_tensorboard_package_the_run_stops_with_one_line_before_writing(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(runs.ConfigError, match="pip install tensorboard"):
        runs.MetricsLog(tmp_path, 0, resumed=False, tensorboard=True)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_prior_writes_its_nll_to_tensorboard_too_and_a_resume_keeps_one_value_per_step(tmp_path):
    pytest.importorskip("tensorboard")
    from test_prior import prior_config, synthetic_maps, write_codes
    from train_prior import train_prior

    codes = write_codes(tmp_path / "codes.pt", synthetic_maps(64, 4, 4, 0.1, 0), synthetic_maps(16, 4, 4, 0.1, 1), 4)
    c = prior_config(codes, tmp_path / "prior", tensorboard=True, steps=4)
    result = train_prior(c)
    train_prior(replace(c, resume=True, steps=6))
    scalars, _ = read_events(tmp_path / "prior")
    records = [json.loads(line) for line in (tmp_path / "prior" / "metrics.jsonl").read_text().splitlines()]
    assert set(scalars["train/nll_nats"]) == {r["step"] for r in records} == set(range(1, 7))
    for r in records:
        assert scalars["train/nll_nats"][r["step"]] == pytest.approx(r["nll_nats"], rel=1e-6)
    assert scalars["val/nll_nats"][4] == pytest.approx(result.final["nll_nats"], rel=1e-6)
