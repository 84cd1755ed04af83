"""The step loop both trainers share (train.py for the VQ-VAE, train_prior.py for the prior): what happens around
each optimizer step, so that a fix here reaches both.

A trainer hands `run_steps` its own parts (`Hooks`: one optimizer step, its metrics fields, validation, a
checkpoint) and its cadence (`Cadence`); `run_steps` then does, step by step:

- the numbers of each step (the loss first) stay on the device and are looked at every 10 steps, at every record
  and checkpoint, and when a signal arrived (no GPU sync every step); under torchrun they are averaged over the
  processes there, and a signal seen by any process stops them all;
- a non-finite loss stops training with FloatingPointError naming the step; since the numbers are looked at before
  any checkpoint is written, a checkpoint only ever holds steps whose loss was seen to be finite, and the last good
  one is kept;
- every `log_every` steps (and at every validation) one metrics.jsonl record: the step, the trainer's fields
  (means since the last record), the throughput (`rate_key`: items per second) and the training time so far
  (`elapsed_s`, without validation);
- every `eval_every` steps and at the last step a validation: its metrics join the record as `val_*` and the
  trainer's line about them is printed;
- every `checkpoint_every` steps and at the last step a checkpoint, written after that step's record;
- SIGINT or SIGTERM (runs.StopOnSignal) stops at the next step boundary whose numbers were looked at: a checkpoint
  is saved and `Interrupted` says how to resume (`resume_command`).

At the end the last validation's metrics are returned (a run that never validated validates once).
"""
from __future__ import annotations

import signal
import time
from contextlib import closing
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from runs import Interrupted, MetricsLog, Processes, StopOnSignal


class Cadence(NamedTuple):
    """When the loop records, validates and checkpoints: at every multiple of each, and at the last step."""

    steps: int              # the last step
    log_every: int          # steps between metrics records (a validation always has one)
    eval_every: int         # steps between validations
    checkpoint_every: int   # steps between checkpoints


class Hooks(NamedTuple):
    """A trainer's own parts of the loop."""

    step: Callable[[int], torch.Tensor]                 # one optimizer step from `step` -> its numbers (n,), loss first
    fields: Callable[[list[float]], dict]               # mean numbers since the last record -> the record's fields
    postfix: Callable[[list[float]], dict]              # the same -> the progress bar's postfix
    validate: Callable[[], dict]                        # -> validation metrics
    validated: Callable[[int, dict, dict], str | None]  # (step, validation metrics, record) -> a line to print
    checkpoint: Callable[[int, dict, float], None]      # (step, last validation metrics, training seconds): save


def looked_at(pending: list[torch.Tensor], stop: StopOnSignal, procs: Processes, device: torch.device,
              step: int) -> torch.Tensor:
    """The numbers of the steps up to `step` that nobody has looked at yet, (steps, n) float64 on the CPU, averaged
    over processes; raises FloatingPointError naming the first step whose loss is not finite."""
    block = torch.stack(pending)                                           # (steps, n)
    if procs.world > 1:   # average over processes; stop everywhere if any process was signalled
        dist.all_reduce(block)
        block /= procs.world
        flag = torch.tensor([stop.signum or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop.signum = int(flag.item()) or None
    block = block.double().cpu()
    bad = (~torch.isfinite(block[:, 0])).nonzero()
    if len(bad):
        raise FloatingPointError(f"the loss became {block[bad[0, 0], 0].item()} at step "
                                 f"{step - len(block) + 1 + bad[0, 0].item()}")
    return block


def run_steps(hooks: Hooks, cadence: Cadence, metrics: MetricsLog, out: Path, *, start_step: int, elapsed: float,
              final: dict, rate_key: str, items_per_step: int, resume_command: str, desc: str, progress: bool,
              procs: Processes = Processes(), device: torch.device = torch.device("cpu")) -> dict:
    """Train from `start_step` to `cadence.steps` as the module docstring says; `elapsed`: training seconds before
    `start_step`, `final`: the last validation metrics before it ({} for a new run). Returns the last validation
    metrics. Only the main process prints; `metrics` is closed at the end."""
    from tqdm.auto import tqdm

    if start_step >= cadence.steps and procs.main:
        print(f"{out} is already at step {start_step} of {cadence.steps}: raise --steps to train further")
    bar = tqdm(total=cadence.steps, initial=start_step, desc=desc, disable=not (progress and procs.main),
               dynamic_ncols=True)
    pending: list[torch.Tensor] = []
    sums: torch.Tensor | float = 0.0   # the numbers summed since the last record, float64
    since_log, tick = 0, time.perf_counter()
    step = start_step
    with StopOnSignal() as stop, closing(metrics):
        while step < cadence.steps:
            pending.append(hooks.step(step))
            step += 1
            since_log += 1
            bar.update(1)
            evaluate_now = step % cadence.eval_every == 0 or step == cadence.steps
            log_now = step % cadence.log_every == 0 or evaluate_now
            checkpoint_now = step % cadence.checkpoint_every == 0 or step == cadence.steps
            stop_now = stop.signum is not None
            # a checkpoint is written only after this step's loss was seen to be finite
            if len(pending) == 10 or log_now or checkpoint_now or procs.world == 1 and stop_now:
                sums = sums + looked_at(pending, stop, procs, device, step).sum(0)
                pending.clear()
                bar.set_postfix(hooks.postfix((sums / since_log).tolist()), refresh=False)
            if log_now:
                now = time.perf_counter()
                elapsed += now - tick
                record = {"step": step, **hooks.fields((sums / since_log).tolist()),
                          rate_key: since_log * items_per_step / max(now - tick, 1e-9), "elapsed_s": round(elapsed, 2)}
                if evaluate_now:
                    final = hooks.validate()
                    record.update({f"val_{k}": v for k, v in final.items()})
                    line = hooks.validated(step, final, record)
                    if line:
                        bar.write(line)
                metrics.log(record)
                sums, since_log, tick = 0.0, 0, time.perf_counter()
            if checkpoint_now:
                hooks.checkpoint(step, final, elapsed)
            if stop.signum is not None and not pending:
                bar.close()
                hooks.checkpoint(step, final, elapsed)
                raise Interrupted(f"stopped by {signal.Signals(stop.signum).name} at step {step}; checkpoint saved. "
                                  f"Resume with: {resume_command}" if procs.main else "")
    bar.close()
    return final or hooks.validate()
