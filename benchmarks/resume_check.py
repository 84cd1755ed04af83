"""Does a resumed run continue as Adam would? The first optimizer step after a resume that changes the memory layout
(bf16 <-> off on the CPU is channels-last <-> NCHW, as a GPU run resumed on a float32 CPU), checked against Adam's
formulas applied by hand to the moments saved in the checkpoint.

    python benchmarks/resume_check.py                 # the default model on the sample, 20 steps before the resume
    python benchmarks/resume_check.py --write         # also into BENCHMARKS.md

For each move it prints the largest deviation of any weight's step from Adam's, in units of that step, with this
repo's resume (`runs.restore_training`) and with torch's `optimizer.load_state_dict` alone, which keeps the saved
moments' strides: the fused Adam kernel then pairs each weight with another element's moments.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root: run from anywhere

from bench_report import machine, write_section
from checkpoint import Config, learning_rate


class RecordingAdam(torch.optim.Adam):
    """The fused Adam that train.py uses, recording (parameter, gradient) before each step and the parameter
    after it into `log`."""

    log: list = []

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        before = [(p.detach().clone(), p.grad.detach().clone()) for p in params]
        result = super().step(closure)
        RecordingAdam.log.append([(b, g, p.detach().clone()) for (b, g), p in zip(before, params)])
        return result


def adam_step_by_hand(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: float, lr: float,
                      betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Algorithm 1 of arXiv 1412.6980 (torch's form: eps after the bias-corrected square root) in float64, from the
    saved moments: (the parameter after the step, the step)."""
    b1, b2 = betas
    p, g, m, v = (t.double() for t in (param, grad, exp_avg, exp_avg_sq))
    t = step + 1
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    update = lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    return p - update, update


def resume_step_error(config: Config, amp_before: str, amp_after: str, steps_before: int = 2,
                      layout_fix: bool = True, device_after: str | None = None) -> float:
    """Train `steps_before` steps with --amp amp_before, resume for one step with amp_after, and return the
    largest deviation of that step from Adam's formulas applied to the checkpoint's moments, in units of the step
    (element by element, against max(|step|, lr / 1000), beyond two float32 units in the last place of the
    weight). `layout_fix=False` resumes with torch's optimizer.load_state_dict alone, for comparison;
    `device_after` resumes on another device (a CUDA checkpoint on the CPU, or the reverse)."""
    import train as train_module

    with tempfile.TemporaryDirectory() as folder:
        c = replace(config, out=folder, amp=amp_before, steps=steps_before, eval_every=steps_before,
                    progress=False)
        train_module.train(c)
        saved = torch.load(Path(folder) / "checkpoint.pt", map_location="cpu", weights_only=True)
        RecordingAdam.log = []
        patched = {"make_optimizer": lambda params, lr, device: RecordingAdam(params, lr=lr, fused=True)}
        if not layout_fix:
            patched["restore_training"] = lambda model, optimizer, ckpt: (model.load_state_dict(ckpt["model"]),
                                                                          optimizer.load_state_dict(ckpt["optimizer"]))
        originals = {name: getattr(train_module, name) for name in patched}
        try:
            for name, fn in patched.items():
                setattr(train_module, name, fn)
            train_module.train(replace(c, amp=amp_after, steps=steps_before + 1, resume=True,
                                       device=device_after or c.device))
        finally:
            for name, fn in originals.items():
                setattr(train_module, name, fn)
    (records,) = RecordingAdam.log
    lr = learning_rate(replace(c, steps=steps_before + 1), steps_before)   # the schedule's rate for this step
    state = saved["optimizer"]["state"]
    assert len(records) == len(state), "every parameter has Adam state after the first steps"
    worst = 0.0
    for i, (before, grad, after) in enumerate(records):
        before, grad, after = before.cpu(), grad.cpu(), after.cpu()
        expected, update = adam_step_by_hand(before, grad, state[i]["exp_avg"], state[i]["exp_avg_sq"],
                                             float(state[i]["step"]), lr)
        rounding = 2 * before.double().abs() * torch.finfo(torch.float32).eps
        deviation = ((after.double() - expected).abs() - rounding).clamp_min(0)
        worst = max(worst, (deviation / update.abs().clamp_min(lr / 1000)).max().item())
    return worst


def bench_resume(steps_before: int) -> list[dict]:
    """resume_step_error for the default model on the sample, each move of layout and the controls, with and
    without the layout fix."""
    c = Config(device="cpu", num_workers=0)
    rows = []
    for before, after in (("bf16", "off"), ("off", "bf16"), ("bf16", "bf16"), ("off", "off")):
        rows.append({"before": before, "after": after, "ours": resume_step_error(c, before, after, steps_before),
                     "load_state_dict": resume_step_error(c, before, after, steps_before, layout_fix=False)})
    return rows


def report(rows: list[dict], steps: int) -> str:
    lines = [f"Machine: {machine()}. The default model on the sample, {steps} steps, then one step after the resume "
             "(CPU; `--amp bf16` is channels-last, `--amp off` NCHW). Largest deviation of any weight's step from "
             "Adam's formulas applied to the saved moments, in units of that step:", "",
             "| saved with --amp | resumed with --amp | this repo | torch's load_state_dict alone |",
             "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['before']} | {r['after']} | {r['ours']:.2%} | {r['load_state_dict']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="steps before the resume")
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args(argv)
    rows = bench_resume(args.steps)
    text = report(rows, args.steps)
    print(text)
    moved = max(r["ours"] for r in rows if r["before"] != r["after"])
    print(f"summary: after a layout change the worst step is {moved:.2%} off Adam's")
    if args.write:
        write_section("resume_check.py", "Resume across memory layouts: `resume_check.py`",
                      "python benchmarks/resume_check.py " + " ".join(argv or sys.argv[1:]), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
