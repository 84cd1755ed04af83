"""Train a VQ-VAE (arXiv 1711.00937) on an image folder or a built-in dataset, from Python or the command line.

    python train.py                                   # the built-in sample photos, default model
    python train.py --data ~/photos --image-size 128 --steps 20000 --out runs/photos
    python train.py --out runs/photos --resume        # continue a run from its checkpoint

Everything is configured by one dataclass, `Config` (in checkpoint.py, beside the checkpoint it is saved in); the
command-line flags are its fields with dashes. The notebook calls the same `train(config)` function. What happens
around each step (records, validation, checkpoints, stopping on Ctrl-C, SIGTERM or a non-finite loss) is
training_loop.run_steps, shared with train_prior.py. The run folder (`--out`) receives:

- config.json: the config of the run;
- metrics.jsonl: one JSON object per logged step (training losses; `val_*` fields when validation ran);
- checkpoint.pt: model, optimizer, step, RNG state, data variance and config, written atomically, loadable with
  torch.load(..., weights_only=True) and enough to rebuild the model alone (`load_checkpoint`);
- reconstructions.png: validation originals (top row) above their reconstructions (bottom row);
- with --tensorboard, TensorBoard event files: the same scalars as metrics.jsonl and the reconstructions at each
  validation (`tensorboard --logdir runs`).

The training objective is eq. 3 of the paper with the reconstruction term written as a normalised MSE:
    loss = MSE(x_hat, x) / Var(training pixels) + codebook_loss + beta * commitment_loss
Dividing the MSE by the variance of the training data, as the authors' Sonnet VQ-VAE example does, makes the
reconstruction term independent of the data's contrast, so beta keeps its meaning across datasets.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from checkpoint import (Config, build_model, check_config, check_resume_matches, config_from_dict,
                        learning_rate, read_checkpoint, save_checkpoint)
from evaluate import evaluate
from device_data import device_batches, fits_on_device
from image_data import DataSplits, batches, build_data, default_workers, eval_loader, sample_validation_parts
from models import VQVAE
from pixels import to_image_scale, to_model_scale
from runs import (TENSORBOARD_FILES, MetricsLog, Processes, amp_dtype_for, atomic_write, autocast,
                  deterministic_algorithms, init_processes, make_optimizer, open_run_folder, parse_args, pick_device,
                  restore_rng, restore_training, run_training_cli, use_channels_last)
from training_loop import Cadence, Hooks, run_steps


class TrainResult(NamedTuple):
    """model: the trained VQVAE (eval mode); history: every metrics.jsonl record; final: last validation
    metrics; out: the run folder."""

    model: VQVAE
    history: list[dict]
    final: dict
    out: Path


# ---------------------------------------------------------------------------------------------------------------
# Training


def save_reconstructions(model: VQVAE, images: torch.Tensor, path: Path, device: torch.device,
                         amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Originals (top row) above their reconstructions (bottom row), written atomically as a PNG; returns the grid
    (3, H, W) in [0, 1]."""
    import torchvision

    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device, amp_dtype):
        x = images.to(device).float() / 255
        reconstruction = to_image_scale(model(to_model_scale(x)).reconstruction)
    model.train(was_training)
    grid = torchvision.utils.make_grid(torch.cat([x, reconstruction]).cpu(), nrow=len(x), padding=2, pad_value=1.0)
    atomic_write(path, lambda tmp: torchvision.utils.save_image(grid, tmp))
    return grid


def prepare_out(c: Config, main: bool = True) -> tuple[Path, dict | None]:
    """The VQ-VAE's run folder and the checkpoint to resume from (see `runs.open_run_folder`)."""
    def check(ckpt: dict, path: Path) -> None:
        check_resume_matches(config_from_dict(ckpt["config"]), c, path)

    return open_run_folder(c.out, c.resume, c.overwrite, read_checkpoint, check,
                           ("checkpoint.pt", "metrics.jsonl", "reconstructions.png", TENSORBOARD_FILES), main)


def keep_on_device(split, device: torch.device, share: float) -> bool:
    """Whether the training split goes to the GPU once: on CUDA, when its images take at most `share` of the
    device's free memory."""
    return fits_on_device(split, device, share)


def say_if_processes_changed(ckpt: dict, c: Config, procs: Processes, out: Path) -> None:
    """One line when a run resumes with another number of processes than wrote its checkpoint: `--batch-size`
    is per process, so the global batch, and with it the order of the data, changes from here on."""
    saved = ckpt.get("world")   # absent in checkpoints written before the number was recorded
    if procs.main and saved is not None and saved != procs.world:
        print(f"resuming {out} at step {ckpt['step']} with {procs.world} process(es) (global batch "
              f"{procs.world * c.batch_size}); it was trained with {saved} (global batch {saved * c.batch_size}): "
              f"the batches differ from here on", flush=True)


def model_and_optimizer(c: Config, device: torch.device, channels_last: bool, resume_from: dict | None
                        ) -> tuple[VQVAE, torch.optim.Optimizer]:
    """The model the config describes on `device` (channels-last if asked) and its optimizer, both with the state
    of `resume_from` when resuming (the optimizer's moments take this run's memory layout)."""
    model = build_model(c).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), c.lr, device)
    if resume_from is not None:
        restore_training(model, optimizer, resume_from)
    return model, optimizer


def wrap_for_training(model: VQVAE, c: Config, procs: Processes, device: torch.device) -> torch.nn.Module:
    """What the training step calls: the model, in DistributedDataParallel under torchrun, compiled with
    --compile."""
    wrapped = model
    if procs.world > 1:   # the quantizer keeps its own buffers in step, so DDP need not broadcast them
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          forward_sync_buffers=False)
    return torch.compile(wrapped, mode=c.compile_mode) if c.compile else wrapped


def training_batches(train, c: Config, device: torch.device, start_step: int, procs: Processes, workers: int):
    """This process's share of every step's batch from `start_step` on: drawn and flipped on the GPU from (seed,
    step) when the split is kept there (`keep_on_device`), else by DataLoader workers."""
    if keep_on_device(train, device, c.device_data):
        return device_batches(train, device, c.batch_size, c.seed, start_step, procs.world, procs.rank)
    return batches(train, c.batch_size, c.seed, start_step, workers, device.type == "cuda", procs.world, procs.rank)


def validation_loaders(val, c: Config, procs: Processes, workers: int, pin: bool
                       ) -> tuple[DataLoader, dict[str, DataLoader]]:
    """This process's share of the validation split, and of each of its parts: for the sample its unseen photos
    and held-out strips, each also on its own (val_unseen_*, val_strips_*)."""
    def share(part):
        return part if procs.world == 1 else Subset(part, range(procs.rank, len(part), procs.world))

    parts = sample_validation_parts(val) if c.data == "sample" else {}
    return (eval_loader(share(val), max(c.batch_size, 64), workers, pin),
            {name: eval_loader(share(part), 64) for name, part in parts.items()})


def validate(model: VQVAE, loader: DataLoader, part_loaders: dict[str, DataLoader], device: torch.device,
             amp_dtype: torch.dtype | None, channels_last: bool) -> dict:
    """evaluate.evaluate on the validation split, with PSNR, SSIM and codebook usage of each of its parts
    (`{part}_psnr`, ...)."""
    metrics = evaluate(model, loader, device, amp_dtype, channels_last)
    for name, part_loader in part_loaders.items():
        part = evaluate(model, part_loader, device, amp_dtype, channels_last)
        metrics.update({f"{name}_{key}": part[key] for key in ("psnr", "ssim", "codebook_usage")})
    return metrics


def record_fields(means: list[float], model: VQVAE) -> dict:
    """A metrics record's training fields from the mean loss, reconstruction loss, commitment loss and perplexity
    since the last record, with the codebook restarts so far."""
    return {"loss": means[0], "recon_loss": means[1], "commitment_loss": means[2], "perplexity": means[3],
            "restarts": sum(int(getattr(q, "restarts", torch.zeros(())).item()) for q in model.quantizers)}


def progress_postfix(means: list[float]) -> dict:
    return {"loss": f"{means[0]:.3f}", "recon": f"{means[1]:.3f}", "perplexity": f"{means[3]:.0f}"}


def validation_line(step: int, final: dict, restarts: int) -> str:
    unseen = (f" (unseen photos {final['unseen_psnr']:.2f} dB, SSIM {final['unseen_ssim']:.3f})"
              if "unseen_psnr" in final else "")
    return (f"step {step}: val PSNR {final['psnr']:.2f} dB{unseen}, SSIM {final['ssim']:.3f}, codebook usage "
            f"{final['codebook_usage']:.1%}, perplexity {final['perplexity']:.1f}, restarts {restarts}")


def train(config: Config, callback: Callable[[dict], None] | None = None) -> TrainResult:
    """Train a VQ-VAE as `config` says; `callback(record)` sees every metrics record as it is written.

    Under torchrun each process trains on its own share of every step's batches (`batch_size` images each, so
    the global batch is world x batch_size), gradients are averaged by DistributedDataParallel, the quantizer keeps
    its codebook identical everywhere (see models.py), validation metrics are summed over processes, and only
    rank 0 shows progress and writes files."""
    c = config
    check_config(c)
    if c.deterministic:   # cuBLAS reads this when CUDA starts in this process, so before anything touches CUDA
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    procs, ddp_device = init_processes(c.device)
    try:
        device = ddp_device or pick_device(c.device)
        with deterministic_algorithms(c.deterministic, device):
            return _train(c, procs, device, callback)
    finally:
        if procs.started_here:
            dist.destroy_process_group()


def _train(c: Config, procs: Processes, device: torch.device, callback: Callable[[dict], None] | None
           ) -> TrainResult:
    # set-up: precision, the run folder, the data, the model and its optimizer (restored when resuming)
    amp_dtype = amp_dtype_for(c.amp, device)
    channels_last = use_channels_last(device, amp_dtype)
    out, resume_from = prepare_out(c, procs.main)
    torch.manual_seed(c.seed)
    workers = default_workers() if c.num_workers < 0 else c.num_workers
    data: DataSplits = build_data(c.data, c.image_size, c.data_root, c.download, c.val_fraction,
                                  num_workers=workers, prepared_dir=c.prepared_dir)
    model, optimizer = model_and_optimizer(c, device, channels_last, resume_from)
    start_step, elapsed = 0, 0.0
    # a resumed run divides by the variance it started with, from its checkpoint (and never computes it again)
    variance = resume_from["data_variance"] if resume_from is not None else data.variance
    if resume_from is not None:
        start_step, elapsed = resume_from["step"], resume_from["elapsed"]
        say_if_processes_changed(resume_from, c, procs, out)
    metrics = MetricsLog(out, start_step, resume_from is not None, c.tensorboard, callback, enabled=procs.main)
    if procs.main:
        (out / "config.json").write_text(json.dumps(asdict(c), indent=2) + "\n")
    forward = wrap_for_training(model, c, procs, device)

    # data: this process's batches from the step the run is at, its share of the validation images, the preview
    train_batches = training_batches(data.train, c, device, start_step, procs, workers)
    val_loader, part_loaders = validation_loaders(data.val, c, procs, workers, device.type == "cuda")
    preview = next(iter(eval_loader(data.val, 8)))[0]

    # the loop (training_loop.run_steps): one step, then what to show and save
    def train_step(step: int) -> torch.Tensor:
        images, _ = next(train_batches)
        x = to_model_scale(images.to(device, non_blocking=True).float().div_(255))   # (B, 3, H, W) in [-0.5, 0.5]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            out_ = forward(x)
            reconstruction_loss = F.mse_loss(out_.reconstruction.float(), x) / variance
            loss = reconstruction_loss + out_.vq.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.clip_grad_norm:   # after DDP's all-reduce, so every process scales by the same factor
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.clip_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(c, step)
        optimizer.step()
        return torch.stack([loss, reconstruction_loss, out_.vq.commitment_loss, out_.vq.perplexity]).detach().float()

    def validated(step: int, final: dict, record: dict) -> str | None:
        if procs.main:
            grid = save_reconstructions(model, preview, out / "reconstructions.png", device, amp_dtype)
            metrics.image("val/reconstructions", grid, step)
            return validation_line(step, final, record["restarts"])

    def checkpoint(step: int, final: dict, elapsed: float) -> None:
        if procs.main:
            save_checkpoint(out / "checkpoint.pt", model, optimizer, step, c, variance, elapsed, final, device,
                            procs.world)

    if resume_from is not None:   # restored last, so that nothing above draws from the resumed random stream
        restore_rng(resume_from, device)
    model.train()
    hooks = Hooks(train_step, lambda means: record_fields(means, model), progress_postfix,
                  lambda: validate(model, val_loader, part_loaders, device, amp_dtype, channels_last), validated,
                  checkpoint)
    final = run_steps(hooks, Cadence(c.steps, c.log_every, c.eval_every, c.checkpoint_every or c.eval_every), metrics,
                      out, start_step=start_step, elapsed=elapsed,
                      final=dict(resume_from["metrics"]) if resume_from is not None else {}, rate_key="images_per_s",
                      items_per_step=c.batch_size * procs.world, resume_command=f"python train.py --out {out} --resume",
                      desc="training", progress=c.progress, procs=procs, device=device)

    # the end
    return TrainResult(model.eval(), metrics.history, final, out)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    return run_training_cli(train, parse_args(argv, Config, __doc__), lambda r: (
        f"done: {r.out} | val PSNR {r.final['psnr']:.2f} dB | SSIM {r.final.get('ssim', math.nan):.3f} | "
        f"MSE {r.final['mse']:.5f} | codebook usage {r.final['codebook_usage']:.1%} | "
        f"perplexity {r.final['perplexity']:.1f} | {r.final['num_images']} validation images"))


if __name__ == "__main__":
    sys.exit(main())
