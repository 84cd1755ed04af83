"""The plumbing of a run, shared by both trainers (train.py, train_prior.py) and every script; nothing here knows a
particular model or config: every function takes what it needs as arguments.

- user-facing errors: `ConfigError`, `DataError`, `CheckpointError` (one-line messages that say what to do) and
  `Interrupted`;
- device and precision: `pick_device`, `amp_dtype_for`, `use_channels_last`, `autocast`; `make_optimizer`;
- files: `atomic_write` / `atomic_save`, `load_plain` / `read_plain_file` (weights-only loading), `open_run_folder`,
  `trim_metrics`, `MetricsLog` (metrics.jsonl and, with --tensorboard, TensorBoard event files);
- a run's life: `StopOnSignal`, `training_state` / `restore_training` / `restore_rng` (resume on any device, in
  any memory layout), `Processes` / `init_processes` (torchrun), `deterministic_algorithms`;
- the command line: `field_help`, `parse_args` (flags built from a config dataclass), `quiet_warnings`,
  `run_training_cli` and `run_cli` (errors become one `error:` line and an exit status).
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
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist


class ConfigError(ValueError):
    """A config value the user can fix; the message is one line."""


class DataError(ValueError):
    """A problem with the user's data or data flags; the message is one line that says what to do."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not match; the message is one line."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training at a step boundary, after a checkpoint was saved."""


USER_ERRORS = (ConfigError, DataError, CheckpointError)
TENSORBOARD_FILES = "events.out.tfevents.*"   # what --overwrite deletes besides a trainer's own files


# ---------------------------------------------------------------------------------------------------------------
# Device, precision, optimizer


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
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)   # so that kernels, generators and caches without a device go to it
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
        return torch.bfloat16 if cuda_has_native_bf16(device) else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def cuda_has_native_bf16(device: torch.device) -> bool:
    """True on GPUs with bf16 arithmetic in hardware (Ampere and later); a T4 or V100 only emulates it, slowly."""
    with torch.cuda.device(device):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:   # a torch without the argument
            return torch.cuda.get_device_capability(device)[0] >= 8


def use_channels_last(device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """Channels-last (NHWC) activations on CUDA and under bf16 autocast on CPUs: oneDNN's bf16 kernels then run
    without the reorders between NCHW and its blocked layout around every convolution, and the quantizer's
    flatten to one row per vector is a free view. Float32 on a CPU stays NCHW."""
    return device.type == "cuda" or (device.type == "cpu" and amp_dtype is not None)


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """A context that runs under `amp_dtype` autocast on `device`, or does nothing when it is None."""
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


@contextmanager
def deterministic_algorithms(enabled: bool, device: torch.device):
    """While active, with `enabled`: deterministic algorithms only (use_deterministic_algorithms, cuDNN deterministic,
    CUBLAS_WORKSPACE_CONFIG), for bit-exact CUDA resumes; without it, cudnn.benchmark on CUDA (the shapes are fixed).
    The previous settings come back afterwards (a notebook keeps its own)."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[1], previous[2]


def make_optimizer(params, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam; the fused kernel (one pass over all parameters) on CPUs and CUDA, the default one elsewhere.
    The two keep the same state, so checkpoints load into either."""
    return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda") or None)


# ---------------------------------------------------------------------------------------------------------------
# Files: atomic saves, weights-only loads


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary file beside `path` (same suffix, so writers that read the format from it work),
    flush it to disk, then rename it over `path`: a crash while writing leaves the previous file intact and no
    half-written file under `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj, path: Path) -> None:
    """torch.save through `atomic_write`."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write)


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


# What each format tag of this repo's files is, for the message when the wrong kind of file is given.
FILE_KINDS = {"vqvae-checkpoint-v1": "a VQ-VAE checkpoint (train.py)",
              "vqvae-codes-v1": "a codes file (extract_codes.py)",
              "pixelcnn-prior-v1": "a prior checkpoint (train_prior.py)"}


def read_plain_file(path: str | Path, fmt: str, what: str) -> dict:
    """torch.load a dict of plain tensors and values written by this repo (weights_only: a file that carries code
    is refused, never run) whose "format" is `fmt`; every problem is a one-line CheckpointError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: pass {what}")
    obj = load_plain(path)
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = FILE_KINDS.get(obj.get("format"), "") if isinstance(obj, dict) else ""
        raise CheckpointError(f"{path} is {found or 'not a file written by this repo'}: pass {what}")
    return obj


# ---------------------------------------------------------------------------------------------------------------
# The run folder and its metrics


def open_run_folder(out: str | Path, resume: bool, overwrite: bool, read: Callable[[Path], dict],
                    check: Callable[[dict, Path], None], files: tuple[str, ...],
                    main: bool = True) -> tuple[Path, dict | None]:
    """Create the run folder `out` (on the main process); return it and the checkpoint to resume from (or None).

    `read` loads a checkpoint (raising CheckpointError on a bad one), `check` raises when a checkpoint cannot be
    resumed with the current settings, `files` are the names (or glob patterns) that --overwrite deletes. Every
    process reads and checks; only the main one writes."""
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
        for pattern in files:
            for path in out.glob(pattern):
                path.unlink(missing_ok=True)
    return out, None


def trim_metrics(path: Path, last_step: int) -> list[dict]:
    """Keep the records up to `last_step` (a run killed after logging but before its checkpoint is resumed
    from the checkpoint, so later records would be repeated)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("step", 0) <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


class MetricsLog:
    """The run's record: metrics.jsonl in `out` (a JSON object per logged step), `history`, a `callback` per record,
    and with `tensorboard` the same scalars (and images) as event files in `out` itself, so `tensorboard --logdir
    runs` names runs by folder. A resume keeps the records up to its step. Only the main process writes."""

    def __init__(self, out: Path, start_step: int, resumed: bool, tensorboard: bool = False,
                 callback: Callable[[dict], None] | None = None, enabled: bool = True):
        self.path, self.callback, self.enabled = out / "metrics.jsonl", callback, enabled
        self.history: list[dict] = []
        self.writer = None
        if not enabled:
            return
        if tensorboard:   # first, so that a missing package stops the run before any file is touched
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard (it is in "
                                  "the Pipfile), or drop --tensorboard") from None
            # a resumed run drops the events an earlier attempt logged after its checkpoint's step
            self.writer = SummaryWriter(log_dir=str(out), purge_step=start_step + 1 if resumed else None)
        if resumed:
            self.history = trim_metrics(self.path, start_step)
        else:
            self.path.write_text("")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.history.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    group = "val" if key.startswith("val_") else "train"
                    self.writer.add_scalar(f"{group}/{key.removeprefix('val_')}", value, record["step"])
            self.writer.flush()
        if self.callback is not None:
            self.callback(record)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """A (3, H, W) image in [0, 1] into the TensorBoard log (nothing without --tensorboard)."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ---------------------------------------------------------------------------------------------------------------
# A run's life: signals, random state, processes


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


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, elapsed: float,
                   metrics: dict | None = None, device: torch.device | None = None) -> dict:
    """What a checkpoint needs to continue a run exactly: weights, optimizer, step, random state, time, metrics.
    Shared by train.py's and train_prior.py's checkpoints; `restore_training` is its counterpart.

    The CUDA random state saved is that of this process's own `device` alone (a list of one state, or empty off
    CUDA), so that the checkpoint resumes wherever any number of GPUs, or none, is visible."""
    cuda = []
    if device is not None and device.type == "cuda":
        cuda = [torch.cuda.get_rng_state(device)]
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "rng": {"torch": torch.get_rng_state(), "cuda": cuda},
        "elapsed": elapsed,
        "metrics": metrics or {},
    }


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, then give every state tensor its parameter's memory layout, values kept
    by logical index: load_state_dict keeps the saved strides, and fused Adam pairs a parameter with its moments by
    memory position, so a channels-last checkpoint resumed in NCHW (or the reverse) would scramble every 4-d moment."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            slots = optimizer.state.get(param, {})
            for key, value in slots.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    slots[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def restore_rng(ckpt: dict, device: torch.device) -> None:
    """Set the random state saved by `training_state`. On CUDA the saved state of this device is used: the one
    state a checkpoint holds, or, in checkpoints that saved every visible GPU's state, that of the same index
    (the first when this device's index is beyond them)."""
    torch.set_rng_state(ckpt["rng"]["torch"])
    states = ckpt["rng"].get("cuda") or []
    if device.type == "cuda" and states:
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_rng_state(states[index] if index < len(states) else states[0], device)


def restore_training(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: dict) -> None:
    """Load the weights and the optimizer state of a checkpoint written by `training_state` into a model and
    optimizer already on their device and in their memory layout (which may differ from the writer's). The
    random state is restored separately (`restore_rng`), last, so that nothing drawn in between moves it."""
    model.load_state_dict(ckpt["model"])
    load_optimizer_state(optimizer, ckpt["optimizer"])


class Processes(NamedTuple):
    """This process's place among the torchrun processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    started_here: bool = False   # whether this process initialised torch.distributed (and so closes it)

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


# ---------------------------------------------------------------------------------------------------------------
# The command line


def require_at_least(flag: str, value, minimum: int = 1) -> None:
    """A ConfigError "--flag must be at least N, got V" unless value >= minimum."""
    if value < minimum:
        raise ConfigError(f"--{flag} must be at least {minimum}, got {value}")


def require_positive(flag: str, value: float) -> None:
    """A ConfigError unless value is a finite number above 0 (a learning rate, a temperature)."""
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"--{flag} must be a positive number, got {value}")


def script_parser(doc: str, checkpoint_help: str) -> argparse.ArgumentParser:
    """The parser of a script that works on one checkpoint: the first paragraph of `doc` as its description, a
    required --checkpoint and --device."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help=checkpoint_help)
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    return parser


def field_help(cls: type) -> dict[str, str]:
    """The one-line comment beside each field of the dataclass `cls`, used as its --help."""
    source = inspect.getsource(cls)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#(.*)$", source, re.M)}


def parse_args(argv: list[str] | None, cls: type, doc: str | None = None):
    """--key value flags built from the fields of the dataclass `cls` (booleans as --flag / --no-flag); the
    description is the first paragraph of `doc` (by default the docstring of the module that defines `cls`)."""
    doc = (doc if doc is not None else sys.modules[cls.__module__].__doc__) or ""
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


def run_cli(fn: Callable[[], int], out: str | Path | None = None) -> int:
    """Run a script's body for a command line: an error a user can cause becomes one `error: ...` line on stderr
    and exit status 2; in training (`out`: the run folder), a non-finite loss 1 (the last good checkpoint is
    kept) and an interruption 130."""
    quiet_warnings()
    try:
        return fn()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"error: {err}; the last good checkpoint is kept in {out}. Try a lower --lr.", file=sys.stderr)
        return 1
    except Interrupted as err:
        if str(err):
            print(f"\n{err}", file=sys.stderr)
        return 130


def run_training_cli(fn: Callable, config, summary: Callable[[object], str]) -> int:
    """`run_cli` for a training function `fn(config)`; success prints `summary(result)`."""
    return run_cli(lambda: print(summary(fn(config))) or 0, config.out)
