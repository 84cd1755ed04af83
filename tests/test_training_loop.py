"""training_loop.run_steps, the loop both trainers share, driven by hand-made steps whose numbers are known: the
records and their means, the cadence of validations and checkpoints, a non-finite loss and a stop signal; then the
same promises through train_prior.py. The expected values are worked out by hand from the steps' numbers, never
from the loop's own output."""
import json
import math
import os
import signal

import pytest
import torch

import train_prior
from runs import Interrupted, MetricsLog
from test_prior import prior_config, synthetic_maps, write_codes
from training_loop import Cadence, Hooks, run_steps


def numbers(step: int) -> torch.Tensor:
    """The made-up numbers of the step from `step` (0-based) to step + 1: step n (1-based) has (n, 10 n)."""
    return torch.tensor([step + 1.0, 10.0 * (step + 1)])


class Trainer:
    """Hooks that write down what they are asked: the steps taken, validations, lines shown, checkpoints."""

    def __init__(self, step=numbers):
        self.step, self.taken, self.validated, self.shown, self.checkpoints = step, [], [], [], []

    def hooks(self) -> Hooks:
        def one_step(s: int) -> torch.Tensor:
            self.taken.append(s + 1)
            return self.step(s)

        def validate() -> dict:
            self.validated.append(self.taken[-1] if self.taken else 0)
            return {"score": float(self.validated[-1])}

        def shown(s: int, last: dict, record: dict) -> str:
            self.shown.append(s)
            return f"step {s}"

        return Hooks(one_step, lambda means: {"a": means[0], "b": means[1]}, lambda means: {"a": f"{means[0]:.1f}"},
                     validate, shown, lambda s, last, elapsed: self.checkpoints.append((s, dict(last))))

    def run(self, tmp_path, cadence: Cadence, start_step: int = 0) -> dict:
        metrics = MetricsLog(tmp_path, start_step, start_step > 0)
        return run_steps(self.hooks(), cadence, metrics, tmp_path, start_step=start_step, elapsed=0.0, final={},
                         rate_key="things_per_s", items_per_step=4, resume_command="python x.py --resume",
                         desc="test", progress=False)


def records(folder) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_records_validations_and_checkpoints_follow_the_cadence(tmp_path):
    trainer = Trainer()
    result = trainer.run(tmp_path, Cadence(steps=7, log_every=2, eval_every=3, checkpoint_every=5))
    # records at multiples of 2, at every validation (3, 6) and at the last step; each the mean since the last
    windows = {2: [1, 2], 3: [3], 4: [4], 6: [5, 6], 7: [7]}
    assert [r["step"] for r in records(tmp_path)] == list(windows)
    for r in records(tmp_path):
        window = windows[r["step"]]
        assert r["a"] == sum(window) / len(window) and r["b"] == 10 * sum(window) / len(window)
        assert r["things_per_s"] > 0 and r["elapsed_s"] >= 0
        assert list(r)[:5] == ["step", "a", "b", "things_per_s", "elapsed_s"]
        assert ("val_score" in r) == (r["step"] in (3, 6, 7)) and r.get("val_score", r["step"]) == r["step"]
    assert trainer.validated == trainer.shown == [3, 6, 7]
    # checkpoints at multiples of 5 and at the last step, each with the last validation's metrics
    assert trainer.checkpoints == [(5, {"score": 3.0}), (7, {"score": 7.0})]
    assert result == {"score": 7.0}


def test_a_run_already_at_its_last_step_validates_once_and_writes_nothing(tmp_path, capsys):
    trainer = Trainer()
    assert trainer.run(tmp_path, Cadence(3, 1, 1, 1), start_step=3) == {"score": 0.0}
    assert trainer.taken == [] and trainer.checkpoints == [] and records(tmp_path) == []
    assert "already at step 3 of 3" in capsys.readouterr().out


@pytest.mark.parametrize("bad, value", [(5, math.nan), (6, math.inf), (1, -math.inf)])
def test_a_non_finite_loss_names_its_step_and_only_finite_steps_are_checkpointed(tmp_path, bad, value):
    trainer = Trainer(lambda s: numbers(s) * (value if s + 1 == bad else 1.0))
    with pytest.raises(FloatingPointError, match=f"^the loss became {value} at step {bad}$"):
        trainer.run(tmp_path, Cadence(steps=30, log_every=20, eval_every=30, checkpoint_every=2))
    # the numbers are looked at every 10 steps and before every checkpoint (each even step)
    assert trainer.taken[-1] == bad + bad % 2
    assert trainer.checkpoints == [(s, {}) for s in range(2, bad, 2)]


def test_a_non_finite_number_other_than_the_loss_does_not_stop_training(tmp_path):
    trainer = Trainer(lambda s: torch.tensor([1.0, math.nan]))
    trainer.run(tmp_path, Cadence(steps=4, log_every=2, eval_every=4, checkpoint_every=4))
    assert [r["a"] for r in records(tmp_path)] == [1.0, 1.0] and trainer.taken == [1, 2, 3, 4]


def signalling(at: int, signum: int, loss: float = 1.0):
    """A step that sends this process `signum` during step `at` (1-based), its loss multiplied by `loss` there."""
    def step(s: int) -> torch.Tensor:
        if s + 1 == at:
            os.kill(os.getpid(), signum)
            return numbers(s) * loss
        return numbers(s)

    return step


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_at_that_step_with_a_checkpoint_and_the_resume_command(tmp_path, signum):
    trainer, before = Trainer(signalling(3, signum)), signal.getsignal(signum)
    with pytest.raises(Interrupted) as stopped:
        trainer.run(tmp_path, Cadence(steps=100, log_every=50, eval_every=100, checkpoint_every=100))
    assert str(stopped.value) == (f"stopped by {signal.Signals(signum).name} at step 3; checkpoint saved. Resume "
                                  f"with: python x.py --resume")
    assert trainer.taken == [1, 2, 3] and trainer.checkpoints == [(3, {})]
    assert signal.getsignal(signum) is before and records(tmp_path) == []   # the handler is given back


def test_a_signal_at_a_step_whose_loss_is_not_finite_saves_no_checkpoint(tmp_path):
    trainer = Trainer(signalling(3, signal.SIGTERM, math.nan))
    with pytest.raises(FloatingPointError, match="at step 3$"):
        trainer.run(tmp_path, Cadence(steps=100, log_every=50, eval_every=100, checkpoint_every=100))
    assert trainer.checkpoints == []


# ---------------------------------------------------------------------------------------------------------------
# The same promises through train_prior.py, whose loop this is


@pytest.fixture
def codes(tmp_path):
    return write_codes(tmp_path / "codes.pt", synthetic_maps(64, 4, 4, 0.1, 0), synthetic_maps(16, 4, 4, 0.1, 1), 4)


def test_the_prior_stops_at_a_non_finite_loss_naming_the_step_and_keeps_the_last_good_checkpoint(codes, tmp_path,
                                                                                                 monkeypatch):
    import torch.nn.functional as F

    real, calls = F.cross_entropy, {"n": 0}

    def poisoned(logits, target, *args, **kwargs):   # train_prior.py calls it once per level and step in training
        value = real(logits, target, *args, **kwargs)
        if logits.requires_grad:
            calls["n"] += 1
            if calls["n"] >= 7:
                return value * float("nan")
        return value

    monkeypatch.setattr(train_prior.F, "cross_entropy", poisoned)
    with pytest.raises(FloatingPointError, match="at step 7$"):
        train_prior.train_prior(prior_config(codes, tmp_path / "run", steps=20, eval_every=3, log_every=10))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [r["step"] for r in records(tmp_path / "run")] == [3, 6]


def test_the_prior_stops_on_a_signal_with_a_checkpoint_and_resumes_to_the_same_weights(codes, tmp_path):
    def stop_at_step_5(record: dict) -> None:
        if record["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    config = prior_config(codes, tmp_path / "run", steps=8, eval_every=4, log_every=1, dropout=0.3)
    with pytest.raises(Interrupted, match=f"at step 5; checkpoint saved. Resume with: python train_prior.py "
                                          f"--codes {codes} --out {tmp_path / 'run'} --resume"):
        train_prior.train_prior(config, callback=stop_at_step_5)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 5
    resumed = train_prior.train_prior(prior_config(codes, tmp_path / "run", steps=8, eval_every=4, log_every=1,
                                                   dropout=0.3, resume=True))
    straight = train_prior.train_prior(prior_config(codes, tmp_path / "straight", steps=8, eval_every=4, log_every=1,
                                                    dropout=0.3))
    for (key, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), key
    assert [r["step"] for r in records(tmp_path / "run")] == list(range(1, 9))
