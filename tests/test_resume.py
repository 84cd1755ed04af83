"""Resume anywhere: a checkpoint continues as Adam would after a change of memory layout (bf16 <-> off on the CPU
is channels-last <-> NCHW), of the number of visible GPUs, or of --deterministic; a changed model still stops in
one line.

The layout check (benchmarks/resume_check.py) does not trust the optimizer: it records each parameter and its gradient just
before the first step after the resume, and compares the step taken with Adam's formulas (Kingma and Ba,
algorithm 1) applied by hand in float64 to the moments saved in the checkpoint."""
from dataclasses import replace

import pytest
import torch

import resume_check
import runs
import train
from checkpoint import Config

LR = 1e-3


def tiny(out, **kw) -> Config:
    c = Config(data="sample", image_size=16, steps=3, batch_size=4, hidden_channels=8, residual_channels=4,
               num_residual_blocks=1, embedding_dim=4, num_embeddings=16, eval_every=3, log_every=1, lr=LR,
               out=str(out), progress=False, device="cpu", num_workers=0)
    return replace(c, **kw)


def first_step_error(tmp_path, amp_before: str, amp_after: str, layout_fix: bool = True) -> float:
    """resume_check.resume_step_error on a tiny model: 2 steps with amp_before, then one with amp_after; the worst
    deviation from Adam's step (computed by hand in float64 from the saved moments), in units of the step."""
    return resume_check.resume_step_error(tiny(tmp_path), amp_before, amp_after, 2, layout_fix)


@pytest.mark.parametrize("amp_before, amp_after", [("bf16", "off"), ("off", "bf16")])
def test_after_a_layout_change_the_next_step_is_adams(tmp_path, amp_before, amp_after):
    saved_layout_is_channels_last = amp_before == "bf16"
    out = tmp_path / "probe"
    train.train(tiny(out, amp=amp_before, steps=1, eval_every=1))
    conv = next(v for v in torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["state"].values()
                if v["exp_avg"].dim() == 4 and v["exp_avg"].shape[1] > 1)
    assert conv["exp_avg"].is_contiguous(memory_format=torch.channels_last) == saved_layout_is_channels_last
    assert first_step_error(tmp_path, amp_before, amp_after) < 0.05
    # the check itself sees the scrambling that torch's load_state_dict alone leaves (many steps' worth)
    assert first_step_error(tmp_path, amp_before, amp_after, layout_fix=False) > 1


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_without_a_layout_change_the_next_step_is_adams_within_rounding(tmp_path, amp):
    assert first_step_error(tmp_path, amp, amp) < 1e-3


def test_moments_take_the_layout_of_their_parameter_and_keep_their_values():
    conv = torch.nn.Conv2d(3, 5, 3).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(conv.parameters(), fused=True)
    saved = torch.arange(5 * 3 * 3 * 3, dtype=torch.float32).reshape(5, 3, 3, 3)        # NCHW, logical values
    state = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": saved.clone(), "exp_avg_sq": saved.clone()},
                       1: {"step": torch.tensor(1.0), "exp_avg": torch.ones(5), "exp_avg_sq": torch.ones(5)}},
             "param_groups": optimizer.state_dict()["param_groups"]}
    runs.load_optimizer_state(optimizer, state)
    moments = optimizer.state[conv.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert moments[key].stride() == conv.weight.stride()
        assert torch.equal(moments[key], saved)                      # same value at every logical index
        assert moments[key].is_contiguous(memory_format=torch.channels_last)
    # in memory, element [0, 1, 0, 0] now sits right after [0, 0, 0, 0], as the fused kernel pairs them
    assert moments["exp_avg"].as_strided((2,), (1,)).tolist() == [saved[0, 0, 0, 0].item(), saved[0, 1, 0, 0].item()]


def test_a_checkpoint_with_more_cuda_states_than_gpus_resumes(monkeypatch):
    """A checkpoint from a 4-GPU machine (one saved state per visible GPU, as torch.cuda.get_rng_state_all gives)
    restored where one GPU is visible: only this device's generator is set, with its own saved state."""
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append((state, device)))

    def set_all(new_states):   # what restoring every saved state does with one GPU
        if len(new_states) > torch.cuda.device_count():
            raise IndexError("list index out of range")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    ckpt = {"rng": {"torch": torch.get_rng_state(), "cuda": states}}
    runs.restore_rng(ckpt, torch.device("cuda", 0))
    assert len(calls) == 1 and torch.equal(calls[0][0], states[0]) and calls[0][1] == torch.device("cuda", 0)
    calls.clear()
    runs.restore_rng({"rng": {"torch": torch.get_rng_state(), "cuda": states[:1]}}, torch.device("cuda", 3))
    assert len(calls) == 1 and torch.equal(calls[0][0], states[0])
    calls.clear()
    runs.restore_rng({"rng": {"torch": torch.get_rng_state(), "cuda": []}}, torch.device("cuda", 0))
    runs.restore_rng(ckpt, torch.device("cpu"))                      # a GPU checkpoint resumed on the CPU
    assert calls == []


def test_a_checkpoint_saves_the_random_state_of_its_own_gpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((8,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(8, dtype=torch.uint8)] * 8)
    model = torch.nn.Linear(2, 2)
    state = runs.training_state(model, torch.optim.Adam(model.parameters()), 1, 0.0, None, torch.device("cuda", 2))
    assert len(state["rng"]["cuda"]) == 1 and int(state["rng"]["cuda"][0][0]) == 7
    assert runs.training_state(model, torch.optim.Adam(model.parameters()), 1, 0.0, None,
                               torch.device("cpu"))["rng"]["cuda"] == []


def test_deterministic_changes_no_result_on_the_cpu_and_restores_the_global_setting(tmp_path):
    plain = train.train(tiny(tmp_path / "plain", amp="off"))
    strict = train.train(tiny(tmp_path / "strict", amp="off", deterministic=True))
    assert not torch.are_deterministic_algorithms_enabled()
    for (k, a), b in zip(plain.model.state_dict().items(), strict.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert strict.final == plain.final


def test_deterministic_may_change_on_resume_but_a_model_field_may_not(tmp_path, capsys):
    out = tmp_path / "run"
    train.train(tiny(out, amp="off", steps=2, eval_every=2))
    train.train(tiny(out, amp="bf16", steps=3, resume=True, deterministic=True))
    args = ["--data", "sample", "--image-size", "16", "--batch-size", "4", "--hidden-channels", "16",
            "--residual-channels", "4", "--num-residual-blocks", "1", "--embedding-dim", "4",
            "--num-embeddings", "16", "--device", "cpu", "--num-workers", "0", "--no-progress", "--steps", "4",
            "--out", str(out), "--resume", "--deterministic"]
    capsys.readouterr()
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--hidden-channels 8, not 16" in err[0]
