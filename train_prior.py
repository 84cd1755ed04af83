"""Train a gated PixelCNN prior (arXiv 1606.05328) over the code maps of a trained VQ-VAE (arXiv 1711.00937,
section 3.2), from Python or the command line.

    python extract_codes.py --checkpoint runs/sample/checkpoint.pt --passes 20      # -> runs/sample/codes.pt
    python train_prior.py --codes runs/sample/codes.pt --out runs/sample-prior
    python train_prior.py --codes runs/sample/codes.pt --out runs/sample-prior --resume --steps 6000

Everything is configured by one dataclass, `PriorConfig`; the flags are its fields with dashes, as in train.py.
The objective is the negative log-likelihood of the training code maps, -log p(z | y) = -sum_ij log p(z_ij | z_<ij,
y), averaged over codes (nats per code). The run folder (`--out`) receives:

- config.json: the config of the run;
- metrics.jsonl: one JSON object per logged step (training NLL; `val_*` fields when validation ran);
- checkpoint.pt: prior, optimizer, step, RNG state, config, the model's arguments, the map shape, the codes file,
  and the path and config of the VQ-VAE whose codes it models; written atomically, loadable with
  torch.load(..., weights_only=True) and enough to rebuild the prior alone (`load_prior`).

Validation runs in float32 (whatever --amp says for training) over every validation map of the codes file and reports
the NLL in nats and bits per code. The VQ-VAE itself is never loaded here: the prior sees only the codes file.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from extract_codes import read_codes
from image_data import StepBatchSampler
from prior import GatedPixelCNN
from runs import (TENSORBOARD_FILES, CheckpointError, ConfigError, Interrupted, MetricsLog, StopOnSignal,
                  amp_dtype_for, atomic_save, autocast, open_run_folder, parse_args, pick_device, read_plain_file,
                  require_at_least, require_positive, restore_rng, restore_training, run_training_cli, training_state)

CHECKPOINT_FORMAT = "pixelcnn-prior-v1"


@dataclass
class PriorConfig:
    # data
    codes: str = "runs/sample/codes.pt"  # code maps written by extract_codes.py
    # model (gated PixelCNN, arXiv 1606.05328)
    channels: int = 32              # width of the vertical and horizontal stacks
    num_layers: int = 8             # gated layers; each adds kernel_size // 2 to the reach up, left and right
    kernel_size: int = 5            # k (odd): vertical convolutions are (k//2 + 1) x k, horizontal 1 x (k//2 + 1)
    dropout: float = 0.1            # dropout on the horizontal stack's gated output
    conditional: bool = True        # condition on the class labels when the codes file has classes (eq. 4)
    # optimisation
    steps: int = 2000               # optimizer steps in total (a resumed run continues up to this number)
    batch_size: int = 32            # code maps per step
    lr: float = 1e-3                # Adam learning rate
    seed: int = 0                   # seeds the weights, the order of the maps and the dropout
    # hardware
    device: str = "auto"            # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    amp: str = "auto"               # bf16 autocast for training: auto (on CUDA and CPUs with native bf16), bf16, or off
    # run folder and logging
    out: str = "runs/sample-prior"  # run folder: config.json, metrics.jsonl, checkpoint.pt
    resume: bool = False            # continue from the checkpoint in --out (starts fresh if there is none)
    overwrite: bool = False         # start again in an --out that already holds a run
    log_every: int = 50             # steps between metrics.jsonl records
    eval_every: int = 500           # steps between validations (and checkpoints); the last step always has one
    progress: bool = True           # show a tqdm progress bar
    tensorboard: bool = False       # also write TensorBoard event files into --out (tensorboard --logdir runs)


MODEL_FIELDS = ("channels", "num_layers", "kernel_size", "dropout", "conditional")


class TrainPriorResult(NamedTuple):
    """model: the trained prior (eval mode); history: every metrics.jsonl record; final: last validation metrics
    (nll_nats, nll_bits per code); out: the run folder."""

    model: GatedPixelCNN
    history: list[dict]
    final: dict
    out: Path


# ---------------------------------------------------------------------------------------------------------------
# Config, model, checkpoints


def check_config(c: PriorConfig) -> None:
    for name in ("steps", "batch_size", "channels", "num_layers", "log_every", "eval_every"):
        require_at_least(name.replace("_", "-"), getattr(c, name))
    if c.kernel_size < 1 or c.kernel_size % 2 == 0:
        raise ConfigError(f"--kernel-size must be a positive odd number, got {c.kernel_size}")
    require_positive("lr", c.lr)
    if not 0 <= c.dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1), got {c.dropout}")
    if c.amp not in ("auto", "bf16", "off"):
        raise ConfigError(f"--amp must be auto, bf16 or off, got {c.amp!r}")


def model_args(c: PriorConfig, num_embeddings: int, classes: list[str]) -> dict:
    """The keyword arguments of GatedPixelCNN for this config and codes file."""
    return {"num_embeddings": num_embeddings, "num_classes": len(classes) if c.conditional else 0,
            "channels": c.channels, "num_layers": c.num_layers, "kernel_size": c.kernel_size, "dropout": c.dropout}


def read_prior_checkpoint(path: str | Path) -> dict:
    """Load a prior checkpoint dict safely (weights_only); a one-line CheckpointError for any other file."""
    return read_plain_file(path, CHECKPOINT_FORMAT, "the checkpoint.pt of a prior run (train_prior.py)")


def config_from_dict(d: dict) -> PriorConfig:
    known = set(PriorConfig.__dataclass_fields__)
    return PriorConfig(**{k: v for k, v in d.items() if k in known})


def load_prior(path: str | Path, device: torch.device | str = "cpu") -> tuple[GatedPixelCNN, PriorConfig, dict]:
    """Rebuild the prior from a checkpoint file alone: (model in eval mode on `device`, its config, the dict)."""
    ckpt = read_prior_checkpoint(path)
    model = GatedPixelCNN(**ckpt["model_args"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        lines = str(err).splitlines()
        raise CheckpointError(f"{path}: the weights do not match the prior its arguments describe "
                              f"({lines[1].strip() if len(lines) > 1 else err})") from None
    return model.to(device).eval(), config_from_dict(ckpt["config"]), ckpt


def prepare_out(c: PriorConfig) -> tuple[Path, dict | None]:
    """The prior's run folder and the checkpoint to resume from (see runs.open_run_folder)."""
    def check(ckpt: dict, ckpt_path: Path) -> None:
        saved = config_from_dict(ckpt["config"])
        for name in (*MODEL_FIELDS, "batch_size", "seed"):
            if getattr(saved, name) != getattr(c, name):
                raise CheckpointError(f"{ckpt_path} was trained with --{name.replace('_', '-')} "
                                      f"{getattr(saved, name)}, not {getattr(c, name)}: resume with the same value "
                                      f"or use another --out")
        if Path(ckpt["codes"]) != Path(c.codes).expanduser().resolve():
            raise CheckpointError(f"{ckpt_path} was trained on --codes {ckpt['codes']}, not {c.codes}: resume "
                                  f"with the same codes file or use another --out")

    return open_run_folder(c.out, c.resume, c.overwrite, read_prior_checkpoint, check,
                           ("checkpoint.pt", "metrics.jsonl", TENSORBOARD_FILES))


# ---------------------------------------------------------------------------------------------------------------
# Likelihood of a set of maps


@torch.no_grad()
def nll_per_map(model: GatedPixelCNN, codes: torch.Tensor, labels: torch.Tensor | None, device: torch.device,
                batch_size: int = 256) -> torch.Tensor:
    """-log p(z | y) in nats for each map of `codes` (N, h, w): (N,) float64 on the CPU. Eval mode, float32;
    the model is left in its previous mode."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(codes), batch_size):
        z = codes[start:start + batch_size].to(device).long()                          # (B, h, w)
        y = labels[start:start + batch_size].to(device) if labels is not None else None
        out.append(model.nll(z, y).double().cpu())
    model.train(was_training)
    return torch.cat(out)


def nll_metrics(nll: torch.Tensor, codes_per_map: int) -> dict:
    """Per-map NLLs (nats) -> mean NLL per code in nats and in bits."""
    nats = nll.sum().item() / (len(nll) * codes_per_map)
    return {"nll_nats": nats, "nll_bits": nats / math.log(2)}


# ---------------------------------------------------------------------------------------------------------------
# Training


def load_codes(path: str | Path, conditional: bool) -> tuple[dict, torch.Tensor | None, torch.Tensor | None]:
    """The codes file, and its training and validation labels if the prior is conditioned on them (else None)."""
    codes = read_codes(path)
    if len(codes["train_codes"]) == 0 or len(codes["val_codes"]) == 0:
        raise ConfigError(f"{path} holds no training or no validation maps: extract codes from a larger dataset")
    use_labels = conditional and len(codes["classes"]) > 0
    return (codes, codes["train_labels"] if use_labels else None, codes["val_labels"] if use_labels else None)


def train_prior(config: PriorConfig, callback: Callable[[dict], None] | None = None) -> TrainPriorResult:
    """Train a prior as `config` says; `callback(record)` sees every metrics record as it is written."""
    from tqdm.auto import tqdm

    c = config
    check_config(c)
    device = pick_device(c.device)
    amp_dtype = amp_dtype_for(c.amp, device)
    codes, train_labels, val_labels = load_codes(c.codes, c.conditional)
    out, resume_from = prepare_out(c)
    torch.manual_seed(c.seed)

    train_codes = codes["train_codes"].to(device)                  # (N, h, w), uint8 or int16
    val_codes = codes["val_codes"]
    map_shape = tuple(train_codes.shape[1:])
    codes_per_map = map_shape[0] * map_shape[1]
    args = model_args(c, codes["num_embeddings"], codes["classes"])
    model = GatedPixelCNN(**args).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr)
    start_step, elapsed = 0, 0.0
    if resume_from is not None:
        restore_training(model, optimizer, resume_from)
        start_step, elapsed = resume_from["step"], resume_from["elapsed"]
        restore_rng(resume_from, device)
    metrics = MetricsLog(out, start_step, resume_from is not None, c.tensorboard, callback)
    (out / "config.json").write_text(json.dumps(asdict(c), indent=2) + "\n")
    if train_labels is not None:
        train_labels = train_labels.to(device)
    sampler = StepBatchSampler(len(train_codes), c.batch_size, c.seed)

    def checkpoint(step: int, metrics: dict | None = None) -> None:
        atomic_save({
            "format": CHECKPOINT_FORMAT,
            "config": asdict(c),
            "model_args": args,
            "classes": list(codes["classes"]),
            "map_shape": list(map_shape),
            "codes": str(Path(c.codes).expanduser().resolve()),
            "vqvae": {"checkpoint": codes["vqvae_checkpoint"], "config": codes["vqvae_config"],
                      "step": codes["vqvae_step"]},
            **training_state(model, optimizer, step, elapsed, metrics, device),
        }, out / "checkpoint.pt")

    def validate() -> dict:
        return nll_metrics(nll_per_map(model, val_codes, val_labels, device), codes_per_map)

    ctx = autocast(device, amp_dtype)
    final: dict = dict(resume_from["metrics"]) if resume_from is not None else {}
    if start_step >= c.steps:
        print(f"{out} is already at step {start_step} of {c.steps}: raise --steps to train further")
    bar = tqdm(total=c.steps, initial=start_step, desc="training prior", disable=not c.progress, dynamic_ncols=True)
    pending: list[torch.Tensor] = []
    total, since_log, tick = 0.0, 0, time.perf_counter()
    model.train()
    step = start_step
    with StopOnSignal() as stop, closing(metrics):
        while step < c.steps:
            index = torch.tensor([i for i, _ in sampler.batch_for_step(step)], device=device)
            z = train_codes[index].long()                                       # (B, h, w)
            y = train_labels[index] if train_labels is not None else None
            with ctx:
                logits = model(z, y)                                            # (B, K, h, w)
            loss = F.cross_entropy(logits.float(), z)                           # nats per code
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            since_log += 1
            pending.append(loss.detach())
            bar.update(1)
            evaluate_now = step % c.eval_every == 0 or step == c.steps
            if len(pending) == 10 or step % c.log_every == 0 or evaluate_now:
                block = torch.stack(pending).double().cpu()
                if not torch.isfinite(block).all():
                    raise FloatingPointError(f"the loss became {block[~torch.isfinite(block)][0].item()} near "
                                             f"step {step}")
                total += block.sum().item()
                pending.clear()
                bar.set_postfix(nll=f"{total / since_log:.3f}", refresh=False)
            if step % c.log_every == 0 or evaluate_now:
                now = time.perf_counter()
                elapsed += now - tick
                record = {"step": step, "nll_nats": total / since_log, "nll_bits": total / since_log / math.log(2),
                          "maps_per_s": since_log * c.batch_size / max(now - tick, 1e-9),
                          "elapsed_s": round(elapsed, 2)}
                if evaluate_now:
                    final = validate()
                    record.update({f"val_{k}": v for k, v in final.items()})
                    checkpoint(step, final)
                    bar.write(f"step {step}: val NLL {final['nll_nats']:.4f} nats/code "
                              f"({final['nll_bits']:.4f} bits/code)")
                metrics.log(record)
                total, since_log, tick = 0.0, 0, time.perf_counter()
            if stop.signum is not None:
                bar.close()
                checkpoint(step, final)
                raise Interrupted(f"stopped by {signal.Signals(stop.signum).name} at step {step}; checkpoint saved. "
                                  f"Resume with: python train_prior.py --codes {c.codes} --out {out} --resume")
    bar.close()
    if not final:
        final = validate()
    return TrainPriorResult(model.eval(), metrics.history, final, out)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    return run_training_cli(train_prior, parse_args(argv, PriorConfig), lambda r: (
        f"done: {r.out} | val NLL {r.final['nll_nats']:.4f} nats/code ({r.final['nll_bits']:.4f} bits/code)"))


if __name__ == "__main__":
    sys.exit(main())
