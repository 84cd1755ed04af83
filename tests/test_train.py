"""train.py and evaluate.py: run folder contents, checkpoint round trip, exact resume, pooled metrics."""
import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import evaluate
import runs
import train
from image_data import build_data
from checkpoint import Config


def tiny_config(out, **kw) -> Config:
    c = Config(data="sample", image_size=16, steps=6, batch_size=4, hidden_channels=8, residual_channels=4,
               num_residual_blocks=1, embedding_dim=4, num_embeddings=16, eval_every=3, log_every=1, lr=1e-3,
               out=str(out), progress=False, device="cpu", amp="off", lr_schedule="constant", warmup_steps=0)
    return replace(c, **kw)


def test_run_folder_contents(tmp_path):
    c = tiny_config(tmp_path / "run")
    result = train.train(c)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text()) == asdict(c)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert {"loss", "recon_loss", "commitment_loss", "perplexity"} <= r.keys()
        assert math.isfinite(r["loss"])
    assert [r["step"] for r in records if "val_psnr" in r] == [3, 6]
    assert records[-1]["val_psnr"] == pytest.approx(result.final["psnr"])
    # reconstructions.png: a row of 8 validation originals above a row of their reconstructions
    png = Image.open(run / "reconstructions.png")
    assert png.size == (2 + 8 * (16 + 2), 2 + 2 * (16 + 2))
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["config"] == asdict(c)
    assert {"model", "optimizer", "rng", "data_variance"} <= ckpt.keys()
    assert "quantizer.embedding" in ckpt["model"] and "quantizer.cluster_size" in ckpt["model"]


def test_checkpoint_rebuilds_the_model_alone(tmp_path):
    result = train.train(tiny_config(tmp_path / "run", quantizer="vq"))
    model, config, _ = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert config.quantizer == "vq" and config.num_embeddings == 16
    for (k, a), (k2, b) in zip(result.model.state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.equal(a.cpu(), b), k
    x = torch.rand(2, 3, 16, 16) - 0.5
    assert torch.equal(result.model.cpu()(x).reconstruction, model(x).reconstruction)


def test_resume_continues_exactly(tmp_path):
    straight = train.train(tiny_config(tmp_path / "a", steps=8, eval_every=4))
    train.train(tiny_config(tmp_path / "b", steps=4, eval_every=4))
    resumed = train.train(tiny_config(tmp_path / "b", steps=8, eval_every=4, resume=True))
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    # the random stream matters after the resume: codes are restarted (random encoder outputs) in steps 5-8
    assert straight.history[-1]["restarts"] > straight.history[3]["restarts"]


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    train.train(tiny_config(tmp_path / "run", steps=4, eval_every=2))
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:   # as if the run was killed after logging step 5 but before checkpointing it
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    train.train(tiny_config(tmp_path / "run", steps=6, eval_every=2, resume=True))
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_an_existing_run_is_never_overwritten_silently(tmp_path):
    train.train(tiny_config(tmp_path / "run", steps=2, eval_every=2))
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(runs.ConfigError, match="--resume"):
        train.train(tiny_config(tmp_path / "run", steps=2, eval_every=2))
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_evaluate_cli_pooled_metrics_match_an_independent_computation(tmp_path, capsys):
    train.train(tiny_config(tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    assert evaluate.main(["--checkpoint", str(ckpt), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"mse", "psnr", "codebook_usage", "perplexity", "num_images"} <= report.keys()
    # independent: per image in NumPy float64, pooled over all pixels of the validation split
    model, config, _ = checkpoint.load_checkpoint(ckpt)
    val = build_data("sample", 16).val
    total, count, used = 0.0, 0, set()
    for i in range(len(val)):
        image = val[i][0]
        x = image.float().unsqueeze(0) / 255
        with torch.no_grad():
            out = model(x - 0.5)
        y = np.clip(out.reconstruction.double().numpy() + 0.5, 0, 1)
        total += float(((y - x.double().numpy()) ** 2).sum())
        count += x.numel()
        used |= set(out.vq.indices.flatten().tolist())
    mse = total / count
    assert report["num_images"] == len(val)
    assert report["mse"] == pytest.approx(mse, rel=1e-5)
    assert report["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    assert report["codebook_usage"] == pytest.approx(len(used) / config.num_embeddings)
    assert 1.0 <= report["perplexity"] <= len(used) + 1e-6


def test_evaluate_on_a_folder_uses_every_image(tmp_path, capsys):
    train.train(tiny_config(tmp_path / "run", steps=2, eval_every=2))
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.full((20, 30, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    assert evaluate.main(["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--data",
                          str(tmp_path / "photos"), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_images"] == 5


def test_cli_flags_come_from_the_config_fields():
    c = runs.parse_args(["--image-size", "32", "--batch-size", "8", "--lr", "0.001", "--no-progress",
                         "--quantizer", "vq", "--data", "some/folder"], Config)
    assert (c.image_size, c.batch_size, c.lr, c.progress, c.quantizer, c.data) == (32, 8, 1e-3, False, "vq",
                                                                                   "some/folder")
    helps = runs.field_help(Config)
    assert set(helps) == {f for f in asdict(Config())}


def test_train_optimizer_is_fused_adam_and_follows_plain_adam_both_ways():
    """train.py's optimizer (fused Adam on CPUs) takes the same steps as torch's plain Adam, and either one's state
    (e.g. a checkpoint written before the switch) loads into the other and carries on identically."""
    torch.manual_seed(11)
    shapes = [(5, 3), (7,), (2, 2, 3, 3)]
    grads = [[torch.randn(s) for s in shapes] for _ in range(6)]

    def run(make, state=None, steps=range(6)):
        params = [torch.nn.Parameter(torch.ones(s)) for s in shapes]
        opt = make(params)
        if state is not None:
            params_state, opt_state = state
            with torch.no_grad():
                for p, v in zip(params, params_state):
                    p.copy_(v)
            opt.load_state_dict(opt_state)
        for i in steps:
            for p, g in zip(params, grads[i]):
                p.grad = g.clone()
            opt.step()
        return [p.detach().clone() for p in params], opt.state_dict()

    fused = lambda ps: runs.make_optimizer(ps, 1e-2, torch.device("cpu"))
    plain = lambda ps: torch.optim.Adam(ps, lr=1e-2)
    assert fused([torch.nn.Parameter(torch.ones(1))]).defaults["fused"] is True
    whole, _ = run(plain)
    for first, second in [(plain, fused), (fused, plain), (fused, fused)]:
        half = run(first, steps=range(3))
        resumed, _ = run(second, state=half, steps=range(3, 6))
        for a, b in zip(resumed, whole):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _first_step_gradients(monkeypatch, c: Config) -> list[torch.Tensor]:
    """The gradients the optimizer receives at the first step of a run of c (copies, in parameter order)."""
    seen = []
    make = train.make_optimizer

    def recording(params, lr, device):
        optimizer = make(params, lr, device)
        step = optimizer.step

        def step_and_record(*args, **kwargs):
            if not seen:
                seen.extend(p.grad.detach().double().clone() for g in optimizer.param_groups for p in g["params"])
            return step(*args, **kwargs)
        optimizer.step = step_and_record
        return optimizer
    monkeypatch.setattr(train, "make_optimizer", recording)
    train.train(c)
    return seen


def test_clip_grad_norm_scales_the_gradients_down_to_the_norm_and_keeps_their_direction(tmp_path, monkeypatch):
    plain = _first_step_gradients(monkeypatch, tiny_config(tmp_path / "plain", steps=1, eval_every=1))
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in plain))   # the total norm, computed here by hand
    assert norm > 0
    clipped = _first_step_gradients(monkeypatch, tiny_config(tmp_path / "clipped", steps=1, eval_every=1,
                                                             clip_grad_norm=norm / 4))
    assert math.sqrt(sum(float((g ** 2).sum()) for g in clipped)) == pytest.approx(norm / 4, rel=1e-5)
    for a, b in zip(plain, clipped):
        torch.testing.assert_close(b, a / 4, rtol=1e-5, atol=1e-12)
    loose = _first_step_gradients(monkeypatch, tiny_config(tmp_path / "loose", steps=1, eval_every=1,
                                                           clip_grad_norm=norm * 4))   # below the limit: untouched
    for a, b in zip(plain, loose):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    with pytest.raises(checkpoint.ConfigError, match="--clip-grad-norm must be at least 0"):
        checkpoint.check_config(tiny_config(tmp_path / "bad", clip_grad_norm=-1.0))
