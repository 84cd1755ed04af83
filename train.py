"""Train a VQ-VAE (arXiv 1711.00937) on an image folder or a built-in dataset, from Python or the command line.

    python train.py                                   # the built-in sample photos, default model
    python train.py --data ~/photos --image-size 128 --steps 20000 --out runs/photos
    python train.py --out runs/photos --resume        # continue a run from its checkpoint

Everything is configured by one dataclass, `Config`; the command-line flags are its fields with dashes. The notebook
calls the same `train(config)` function. The run folder (`--out`) receives:

- config.json: the config of the run;
- metrics.jsonl: one JSON object per logged step (training losses; `val_*` fields when validation ran);
- checkpoint.pt: model, optimizer, step, RNG state, data variance and config, written atomically, loadable with
  torch.load(..., weights_only=True) and enough to rebuild the model alone (`load_checkpoint`);
- reconstructions.png: validation originals (top row) above their reconstructions (bottom row).

The training objective is eq. 3 of the paper with the reconstruction term written as a normalised MSE:
    loss = MSE(x_hat, x) / Var(training pixels) + codebook_loss + beta * commitment_loss
Dividing the MSE by the variance of the training data, as the authors' Sonnet VQ-VAE example does, makes the
reconstruction term independent of the data's contrast, so beta keeps its meaning across datasets.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset

from evaluate import evaluate
from image_data import DataError, DataSplits, batches, build_data, default_workers, eval_loader
from models import VQVAE

CHECKPOINT_FORMAT = "vqvae-checkpoint-v1"


@dataclass
class Config:
    # data
    data: str = "sample"            # an image folder (searched recursively), or sample / food101 / cifar10
    data_root: str = "data"         # where food101 and cifar10 are stored (and downloaded to)
    download: bool = False          # download food101 / cifar10 into --data-root if they are missing
    image_size: int = 64            # images are resized and centre-cropped to this square size (multiple of 4)
    val_fraction: float = 0.1       # share of a plain folder's images held out for validation
    # model (section 4.1 and appendix A.1 of the paper)
    hidden_channels: int = 128      # width of the encoder and decoder convolutions
    residual_channels: int = 32     # width inside each residual block
    num_residual_blocks: int = 2    # residual blocks in the encoder and in the decoder
    embedding_dim: int = 64         # D, dimension of each code
    num_embeddings: int = 512       # K, number of codes
    beta: float = 0.25              # commitment weight, beta in eq. 3
    quantizer: str = "ema"          # ema (moving averages, appendix A.1), vq (codebook loss, eq. 3) or fsq
    decay: float = 0.99             # EMA decay gamma (ema quantizer only)
    kmeans_init: bool = True        # start the codebook from k-means on the first batch's encoder outputs
    restart_threshold: float = 1.0  # restart codes whose recent use per batch falls below this (0: never)
    cosine: bool = True             # l2-normalised codes and inputs (cosine similarity), as in ViT-VQGAN
    lookup_dim: int = 4             # search codes in a projected space of this dimension (0: in D), ViT-VQGAN
    rotation_trick: bool = False    # rotation-trick gradients through the vq quantizer (arXiv 2410.06424)
    fsq_levels: str = ""            # FSQ levels, e.g. 8,5,5,5 (empty: the paper's choice for num_embeddings)
    # optimisation
    steps: int = 1000               # optimizer steps in total (a resumed run continues up to this number)
    batch_size: int = 32            # images per step
    lr: float = 2e-4                # Adam learning rate (the paper's 2e-4)
    seed: int = 0                   # seeds the weights and the order and augmentation of batches
    # hardware
    device: str = "auto"            # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    amp: str = "auto"               # bf16 autocast: auto (on CUDA and on CPUs with native bf16), bf16, or off
    compile: bool = False           # torch.compile the model (slow first step, faster after)
    num_workers: int = -1           # DataLoader workers for large datasets (-1: one per core, up to 8)
    # run folder and logging
    out: str = "runs/sample"        # run folder: config.json, metrics.jsonl, checkpoint.pt, reconstructions.png
    resume: bool = False            # continue from the checkpoint in --out (starts fresh if there is none)
    overwrite: bool = False         # start again in an --out that already holds a run
    log_every: int = 50             # steps between metrics.jsonl records
    eval_every: int = 500           # steps between validations over the whole validation split
    checkpoint_every: int = 0       # steps between checkpoints (0: at every validation); the last step saves too
    progress: bool = True           # show a tqdm progress bar


MODEL_FIELDS = ("hidden_channels", "residual_channels", "num_residual_blocks", "embedding_dim",
                "num_embeddings", "beta", "quantizer", "decay", "kmeans_init", "restart_threshold", "cosine",
                "lookup_dim", "rotation_trick", "fsq_levels")


class ConfigError(ValueError):
    """A config value the user can fix; the message is one line."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not match; the message is one line."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training at a step boundary, after a checkpoint was saved."""


class StopOnSignal:
    """While active, SIGINT and SIGTERM only set `signum`; the training loop checks it between steps, so the
    checkpoint it then saves never holds a half-applied optimizer step. A second SIGINT interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class TrainResult(NamedTuple):
    """model: the trained VQVAE (eval mode); history: every metrics.jsonl record; final: last validation
    metrics; out: the run folder."""

    model: VQVAE
    history: list[dict]
    final: dict
    out: Path


# ---------------------------------------------------------------------------------------------------------------
# Config, device, model


def check_config(c: Config) -> None:
    positive = ("steps", "batch_size", "hidden_channels", "residual_channels", "num_residual_blocks",
                "embedding_dim", "num_embeddings", "log_every", "eval_every")
    if c.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every must be 0 or more, got {c.checkpoint_every}")
    for name in positive:
        if getattr(c, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(c, name)}")
    if c.hidden_channels < 2:
        raise ConfigError(f"--hidden-channels must be at least 2, got {c.hidden_channels}")
    if not (c.lr > 0 and math.isfinite(c.lr)):
        raise ConfigError(f"--lr must be a positive number, got {c.lr}")
    if c.beta < 0:
        raise ConfigError(f"--beta must be non-negative, got {c.beta}")
    if c.quantizer not in ("ema", "vq", "fsq"):
        raise ConfigError(f"--quantizer must be ema, vq or fsq, got {c.quantizer!r}")
    if c.rotation_trick and c.quantizer != "vq":
        raise ConfigError("--rotation-trick changes the gradient of the vq quantizer: use it with --quantizer vq")
    if c.restart_threshold < 0 or c.lookup_dim < 0:
        raise ConfigError("--restart-threshold and --lookup-dim must be non-negative")
    if c.fsq_levels:
        try:
            levels = [int(v) for v in c.fsq_levels.split(",")]
        except ValueError:
            levels = []
        if not levels or min(levels) < 2:
            raise ConfigError(f"--fsq-levels must be integers of at least 2 separated by commas, got "
                              f"{c.fsq_levels!r}")
    if not 0 <= c.decay < 1:
        raise ConfigError(f"--decay must be in [0, 1), got {c.decay}")
    if c.amp not in ("auto", "bf16", "off"):
        raise ConfigError(f"--amp must be auto, bf16 or off, got {c.amp!r}")
    if c.image_size < 4 or c.image_size % 4:
        raise ConfigError(f"--image-size must be a positive multiple of 4 (the encoder downsamples by 4), "
                          f"got {c.image_size}")


def pick_device(name: str = "auto") -> torch.device:
    """auto: CUDA if present, then Apple MPS, then the CPU. An explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available here: use --device auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for but Apple MPS is not available here: use --device auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported --device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX-512 BF16, AMX), where bf16 convolutions are faster than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the encoder and decoder (the quantizer always runs in float32), or None."""
    if amp == "off" or device.type == "mps":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def use_channels_last(device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """Channels-last (NHWC) activations on CUDA and under bf16 autocast on CPUs: oneDNN's bf16 kernels then run
    without the reorders between NCHW and its blocked layout around every convolution, and the quantizer's
    flatten to one row per vector is a free view. Float32 on a CPU stays NCHW."""
    return device.type == "cuda" or (device.type == "cpu" and amp_dtype is not None)


def make_optimizer(params, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam; the fused kernel (one pass over all parameters) on CPUs and CUDA, the default one elsewhere.
    The two keep the same state, so checkpoints load into either."""
    return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda") or None)


def model_args(c: Config) -> dict:
    args = {name: getattr(c, name) for name in MODEL_FIELDS}
    args["fsq_levels"] = tuple(int(v) for v in c.fsq_levels.split(",")) if c.fsq_levels else None
    return args


def build_model(c: Config) -> VQVAE:
    return VQVAE(**model_args(c))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over `path`: a crash during
    the save leaves the previous file intact."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, elapsed: float,
                   metrics: dict | None = None) -> dict:
    """What a checkpoint needs to continue a run exactly: weights, optimizer, step, random state, time, metrics.
    Shared by train.py's and train_prior.py's checkpoints; `restore_rng` is its counterpart."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "elapsed": elapsed,
        "metrics": metrics or {},
    }


def restore_rng(ckpt: dict, device: torch.device) -> None:
    """Set the random state saved by `training_state`."""
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and ckpt["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])


def save_checkpoint(path: Path, model: VQVAE, optimizer: torch.optim.Optimizer, step: int, config: Config,
                    data_variance: float, elapsed: float, metrics: dict | None = None) -> None:
    atomic_save({"format": CHECKPOINT_FORMAT, "config": asdict(config), "data_variance": data_variance,
                 **training_state(model, optimizer, step, elapsed, metrics)}, path)


def load_plain(path: Path, noun: str = "") -> object:
    """torch.load with weights_only=True (a file that carries code is refused, never run); every failure is a
    one-line CheckpointError "cannot load {noun}{path}: reason"."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            reason = "it holds objects other than tensors and plain values, so it was refused unread"
        raise CheckpointError(f"cannot load {noun}{path}: {reason[:200]}") from None


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint dict safely (weights_only: a file that carries code is refused, never run)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass the checkpoint.pt of a run folder")
    ckpt = load_plain(path, "checkpoint ")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint written by this repo's train.py")
    return ckpt


def config_from_dict(d: dict) -> Config:
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in d.items() if k in known})


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[VQVAE, Config, dict]:
    """Rebuild the model from a checkpoint file alone: (model in eval mode on `device`, its config, the dict)."""
    ckpt = read_checkpoint(path)
    config = config_from_dict(ckpt["config"])
    model = build_model(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not match the model its config describes "
                              f"({str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err})"
                              ) from None
    return model.to(device).eval(), config, ckpt


def check_resume_matches(saved: Config, current: Config, path: Path) -> None:
    """A resumed run must build the same model on the same data; name the first field that differs."""
    for name in (*MODEL_FIELDS, "data", "image_size", "batch_size", "seed"):
        if getattr(saved, name) != getattr(current, name):
            raise CheckpointError(f"{path} was trained with --{name.replace('_', '-')} {getattr(saved, name)}, "
                                  f"not {getattr(current, name)}: resume with the same value or use another --out")


# ---------------------------------------------------------------------------------------------------------------
# Training


def save_reconstructions(model: VQVAE, images: torch.Tensor, path: Path, device: torch.device,
                         amp_dtype: torch.dtype | None) -> None:
    """Originals (top row) above their reconstructions (bottom row), as a PNG."""
    import torchvision

    was_training = model.training
    model.eval()
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with torch.no_grad(), ctx:
        x = images.to(device).float() / 255
        reconstruction = (model(x - 0.5).reconstruction.float() + 0.5).clamp(0, 1)
    model.train(was_training)
    grid = torchvision.utils.make_grid(torch.cat([x, reconstruction]).cpu(), nrow=len(x), padding=2, pad_value=1.0)
    tmp = path.with_name(f".{path.name}.tmp.png")
    torchvision.utils.save_image(grid, tmp)
    os.replace(tmp, path)


def open_run_folder(out: str | Path, resume: bool, overwrite: bool, read: Callable[[Path], dict],
                    check: Callable[[dict, Path], None], files: tuple[str, ...],
                    main: bool = True) -> tuple[Path, dict | None]:
    """Create the run folder `out` (on the main process); return it and the checkpoint to resume from (or None).

    `read` loads a checkpoint (raising CheckpointError on a bad one), `check` raises when a checkpoint cannot be
    resumed with the current settings, `files` are what --overwrite deletes. Every process reads and checks;
    only the main one writes. Shared by train.py and train_prior.py."""
    out = Path(out).expanduser()
    ckpt_path = out / "checkpoint.pt"
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"cannot write to --out {out}: {err.strerror or err}") from None
    if ckpt_path.exists() and resume:
        ckpt = read(ckpt_path)
        check(ckpt, ckpt_path)
        return out, ckpt
    if ckpt_path.exists() and not overwrite:
        step = ""
        try:
            step = f" (step {read(ckpt_path)['step']})"
        except CheckpointError:
            pass
        raise ConfigError(f"{out} already holds a run{step}: pass --resume to continue it, --overwrite to start "
                          f"again, or another --out")
    if overwrite and main:
        for name in files:
            (out / name).unlink(missing_ok=True)
    return out, None


def prepare_out(c: Config, main: bool = True) -> tuple[Path, dict | None]:
    """The VQ-VAE's run folder and the checkpoint to resume from (see `open_run_folder`)."""
    def check(ckpt: dict, path: Path) -> None:
        check_resume_matches(config_from_dict(ckpt["config"]), c, path)

    return open_run_folder(c.out, c.resume, c.overwrite, read_checkpoint, check,
                           ("checkpoint.pt", "metrics.jsonl", "reconstructions.png"), main)


class Processes(NamedTuple):
    """This process's place among the torchrun processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    started_here: bool = False   # whether train() initialised torch.distributed (and so closes it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_processes(device_name: str) -> tuple[Processes, torch.device | None]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPUs) and pick this
    process's device. Otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return Processes(), None
    if device_name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"with torchrun, --device must be auto, cuda or cpu (each process takes the GPU of its "
                          f"LOCAL_RANK), got {device_name!r}")
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), started), device


def trim_metrics(path: Path, last_step: int) -> list[dict]:
    """Keep the records up to `last_step` (a run killed after logging but before its checkpoint is resumed
    from the checkpoint, so later records would be repeated)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("step", 0) <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def train(config: Config, callback: Callable[[dict], None] | None = None) -> TrainResult:
    """Train a VQ-VAE as `config` says; `callback(record)` sees every metrics record as it is written.

    Under torchrun each process trains on its own share of every step's batches (`batch_size` images each, so
    the global batch is world x batch_size), gradients are averaged by DistributedDataParallel, the quantizer keeps
    its codebook identical everywhere (see models.py), validation metrics are summed over processes, and only
    rank 0 shows progress and writes files."""
    c = config
    check_config(c)
    procs, ddp_device = init_processes(c.device)
    try:
        return _train(c, procs, ddp_device or pick_device(c.device), callback)
    finally:
        if procs.started_here:
            dist.destroy_process_group()


def _train(c: Config, procs: Processes, device: torch.device, callback: Callable[[dict], None] | None
           ) -> TrainResult:
    from tqdm.auto import tqdm

    amp_dtype = amp_dtype_for(c.amp, device)
    channels_last = use_channels_last(device, amp_dtype)
    out, resume_from = prepare_out(c, procs.main)
    torch.manual_seed(c.seed)

    workers = default_workers() if c.num_workers < 0 else c.num_workers
    data: DataSplits = build_data(c.data, c.image_size, c.data_root, c.download, c.val_fraction,
                                  num_workers=workers)
    model = build_model(c).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), c.lr, device)
    start_step, elapsed, variance = 0, 0.0, data.variance
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        start_step, elapsed = resume_from["step"], resume_from["elapsed"]
        variance = resume_from["data_variance"]   # the normaliser the run started with
    metrics_path = out / "metrics.jsonl"
    history: list[dict] = []
    if procs.main:
        (out / "config.json").write_text(json.dumps(asdict(c), indent=2) + "\n")
        history = trim_metrics(metrics_path, start_step) if resume_from is not None else []
        if resume_from is None:
            metrics_path.write_text("")

    wrapped = model
    if procs.world > 1:   # the quantizer keeps its own buffers in step, so DDP need not broadcast them
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          forward_sync_buffers=False)
    forward = torch.compile(wrapped) if c.compile else wrapped
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    pin = device.type == "cuda"
    train_batches = batches(data.train, c.batch_size, c.seed, start_step, workers, pin, procs.world, procs.rank)
    val_share = data.val if procs.world == 1 else Subset(data.val, range(procs.rank, len(data.val), procs.world))
    val_loader = eval_loader(val_share, max(c.batch_size, 64), workers, pin)
    preview = next(iter(eval_loader(data.val, 8)))[0]

    def validate() -> dict:
        return evaluate(model, val_loader, device, amp_dtype, channels_last)

    def checkpoint(step: int, metrics: dict | None = None) -> None:
        if procs.main:
            save_checkpoint(out / "checkpoint.pt", model, optimizer, step, c, variance, elapsed, metrics)

    def log(record: dict) -> None:
        if not procs.main:
            return
        history.append(record)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if callback is not None:
            callback(record)

    final: dict = dict(resume_from["metrics"]) if resume_from is not None else {}
    if start_step >= c.steps and procs.main:
        print(f"{out} is already at step {start_step} of {c.steps}: raise --steps to train further")
    bar = tqdm(total=c.steps, initial=start_step, desc="training", disable=not (c.progress and procs.main),
               dynamic_ncols=True)
    checkpoint_every = c.checkpoint_every or c.eval_every
    sums = torch.zeros(4, dtype=torch.float64)   # loss, reconstruction loss, commitment loss, perplexity
    pending: list[torch.Tensor] = []
    since_log, tick = 0, time.perf_counter()
    if resume_from is not None:   # restored last, so that nothing above draws from the resumed random stream
        restore_rng(resume_from, device)
    model.train()
    step = start_step
    with StopOnSignal() as stop:
        while step < c.steps:
            images, _ = next(train_batches)
            x = images.to(device, non_blocking=True).float().div_(255).sub_(0.5)   # (B, 3, H, W) in [-0.5, 0.5]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with ctx:
                out_ = forward(x)
                reconstruction_loss = F.mse_loss(out_.reconstruction.float(), x) / variance
                loss = reconstruction_loss + out_.vq.loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            since_log += 1
            # keep the per-step numbers on the device and look at them every 10 steps (no GPU sync every step)
            pending.append(torch.stack([loss, reconstruction_loss, out_.vq.commitment_loss,
                                        out_.vq.perplexity]).detach().float())
            bar.update(1)
            evaluate_now = step % c.eval_every == 0 or step == c.steps
            log_now = step % c.log_every == 0 or evaluate_now
            checkpoint_now = step % checkpoint_every == 0 or step == c.steps
            stop_now = stop.signum is not None
            # a checkpoint is written only after this step's loss was seen to be finite
            if len(pending) == 10 or log_now or checkpoint_now or procs.world == 1 and stop_now:
                block = torch.stack(pending)                                  # (steps, 4)
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
                sums += block.sum(0)
                pending.clear()
                bar.set_postfix(loss=f"{sums[0].item() / since_log:.3f}",
                                recon=f"{sums[1].item() / since_log:.3f}",
                                perplexity=f"{sums[3].item() / since_log:.0f}", refresh=False)
            if log_now:
                now = time.perf_counter()
                elapsed += now - tick
                record = {"step": step, "loss": sums[0].item() / since_log,
                          "recon_loss": sums[1].item() / since_log, "commitment_loss": sums[2].item() / since_log,
                          "perplexity": sums[3].item() / since_log,
                          "restarts": int(getattr(model.quantizer, "restarts", torch.zeros(())).item()),
                          "images_per_s": since_log * c.batch_size * procs.world / max(now - tick, 1e-9),
                          "elapsed_s": round(elapsed, 2)}
                if evaluate_now:
                    final = validate()
                    record.update({f"val_{k}": v for k, v in final.items()})
                    if procs.main:
                        save_reconstructions(model, preview, out / "reconstructions.png", device, amp_dtype)
                        bar.write(f"step {step}: val PSNR {final['psnr']:.2f} dB, codebook usage "
                                  f"{final['codebook_usage']:.1%}, perplexity {final['perplexity']:.1f}, "
                                  f"restarts {record['restarts']}")
                log(record)
                sums.zero_()
                since_log, tick = 0, time.perf_counter()
            if checkpoint_now:
                checkpoint(step, final)
            if stop.signum is not None and not pending:
                bar.close()
                checkpoint(step, final)
                raise Interrupted(f"stopped by {signal.Signals(stop.signum).name} at step {step}; checkpoint saved. "
                                  f"Resume with: python train.py --out {out} --resume" if procs.main else "")
    bar.close()
    if not final:
        final = validate()
    return TrainResult(model.eval(), history, final, out)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def field_help(cls: type = Config) -> dict[str, str]:
    """The one-line comment beside each field of the dataclass `cls` (Config by default), used as its --help."""
    source = inspect.getsource(cls)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#(.*)$", source, re.M)}


def parse_args(argv: list[str] | None = None, cls: type = Config):
    """--key value flags built from the fields of the dataclass `cls` (Config by default; booleans as --flag /
    --no-flag); the description is the first paragraph of the docstring of the module that defines `cls`."""
    doc = sys.modules[cls.__module__].__doc__ or ""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps.get(f.name))
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, default=f.default, help=helps.get(f.name))
    return cls(**vars(parser.parse_args(argv)))


def quiet_warnings() -> None:
    """Show warnings as one plain line ("warning: ...") rather than with a source location."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def run_training_cli(fn: Callable, config, summary: Callable[[object], str]) -> int:
    """Run a training function for a command line: errors a user can cause become one line and exit status 2, a
    non-finite loss 1 (its last good checkpoint kept), an interruption 130; success prints `summary(result)`.
    Shared by train.py and train_prior.py."""
    try:
        result = fn(config)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"error: {err}; the last good checkpoint is kept in {config.out}. Try a lower --lr.", file=sys.stderr)
        return 1
    except Interrupted as err:
        if str(err):
            print(f"\n{err}", file=sys.stderr)
        return 130
    print(summary(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    quiet_warnings()
    return run_training_cli(train, parse_args(argv), lambda r: (
        f"done: {r.out} | val PSNR {r.final['psnr']:.2f} dB | MSE {r.final['mse']:.5f} | codebook usage "
        f"{r.final['codebook_usage']:.1%} | perplexity {r.final['perplexity']:.1f} | "
        f"{r.final['num_images']} validation images"))


if __name__ == "__main__":
    sys.exit(main())
