"""A VQ-VAE run's settings and its checkpoint file: `Config`, building the model from it, saving and loading.

This is what every script that touches a trained VQ-VAE needs (evaluate.py, extract_codes.py, sample.py,
evaluate_prior.py, the notebook) without the training loop (train.py):

- `Config`: one dataclass for a run, saved as `asdict(config)` in every checkpoint; train.py's flags are its fields;
- `build_model(config)`: the VQVAE (or, with levels 2, the hierarchy.VQVAE2) its model fields describe;
- `save_checkpoint` / `read_checkpoint` / `load_checkpoint`: model, optimizer, step, RNG state, data variance and
  config in one file, written atomically and loaded with torch.load(..., weights_only=True), so a file that carries
  code is refused unread; `load_checkpoint(path)` rebuilds the model from the file alone;
- `load_model(path)`: that model alone, ready for `encode_images` / `decode_images` in your own code;
- `load_vqvae_for(prior_ckpt)`: the VQ-VAE a prior checkpoint names (the decoder of its codes), checked against it.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hierarchy import VQVAE2
from models import QuantizerOptions, VQVAE
from runs import (FILE_KINDS, CheckpointError, ConfigError, atomic_save, load_plain, pick_device, require_at_least,
                  require_positive, training_state)

CHECKPOINT_FORMAT = "vqvae-checkpoint-v1"
# torch.compile's modes; reduce-overhead captures the step in CUDA graphs, for small batches whose kernels take less
# time to run than to launch
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


@dataclass
class Config:
    """Every setting of a VQ-VAE run; train.py's flags are these fields with dashes, their comments the --help."""

    # data
    data: str = "sample"            # an image folder (searched recursively), or sample / food101 / cifar10
    data_root: str = "data"         # where food101 and cifar10 are stored (and downloaded to)
    download: bool = False          # download food101 / cifar10 into --data-root if they are missing
    image_size: int = 64            # images are resized and centre-cropped to this square size (multiple of 4)
    val_fraction: float = 0.1       # share of a plain folder's images held out for validation
    prepared_dir: str = ""          # where images are kept once decoded (empty: <data-root>/prepared)
    # model (section 4.1 and appendix A.1 of the paper)
    hidden_channels: int = 128      # width of the encoder and decoder convolutions
    residual_channels: int = 32     # width inside each residual block
    num_residual_blocks: int = 2    # residual blocks in the encoder and in the decoder
    block: str = "paper"            # residual blocks: paper (ReLU, 3x3, ReLU, 1x1) or modern (VQGAN's GroupNorm + SiLU)
    attention: bool = False         # one self-attention block at the lowest resolution of encoder and decoder
    downsample: int = 4             # the encoder's downsampling factor: 4 (the paper) or 8 (for 128-256 px images)
    levels: int = 1                 # 1: the VQ-VAE; 2: VQ-VAE-2's bottom (/4) and top (/8) code maps (hierarchy.py)
    top_residual_blocks: int = 0    # with --levels 2: residual blocks in the top encoder and top decoder
    top_num_embeddings: int = 0     # with --levels 2: codes in the top codebook (0: as many as --num-embeddings)
    embedding_dim: int = 64         # D, dimension of each code
    num_embeddings: int = 2048      # K, number of codes (the paper: 512)
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
    steps: int = 2842               # optimizer steps in total (a resumed run continues up to this number)
    batch_size: int = 8             # images per step (per process under torchrun)
    lr: float = 1e-3                # Adam's peak learning rate (the paper: a constant 2e-4, see --lr-schedule)
    lr_schedule: str = "cosine"     # cosine (decays to 0 at --steps) or constant (the paper)
    warmup_steps: int = 100         # steps of linear warm-up from 0 to --lr
    clip_grad_norm: float = 0.0     # scale the gradients down to this total norm where it is larger (0: off)
    seed: int = 0                   # seeds the weights and the order and augmentation of batches
    # hardware
    device: str = "auto"            # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    amp: str = "auto"               # bf16 autocast: auto (where native), bf16, or off (float32; CUDA convs: TF32)
    compile: bool = False           # torch.compile the model (slow first step, faster after)
    compile_mode: str = "default"   # with --compile: default, reduce-overhead (CUDA graphs) or max-autotune
    deterministic: bool = False     # deterministic algorithms only: a resumed CUDA run ends bit-identical (slower)
    num_workers: int = -1           # DataLoader workers for large datasets (-1: one per core, up to 8)
    device_data: float = 0.25       # on CUDA: keep the training split on the GPU if it fits this share of free memory
    # run folder and logging
    out: str = "runs/sample"        # run folder: config.json, metrics.jsonl, checkpoint.pt, reconstructions.png
    resume: bool = False            # continue from the checkpoint in --out (starts fresh if there is none)
    overwrite: bool = False         # start again in an --out that already holds a run
    log_every: int = 50             # steps between metrics.jsonl records
    eval_every: int = 500           # steps between validations over the whole validation split
    checkpoint_every: int = 0       # steps between checkpoints (0: at every validation); the last step saves too
    progress: bool = True           # show a tqdm progress bar
    tensorboard: bool = False       # also write TensorBoard event files into --out (tensorboard --logdir runs)


# What builds the model, derived from the models: "levels" (VQVAE or hierarchy.VQVAE2), the keyword arguments of
# their constructors (but in_channels, RGB here, and options) and the quantizer's options (but eps: no flag, always
# its default).
CONSTRUCTOR_FIELDS = tuple(dict.fromkeys(name for model in (VQVAE, VQVAE2)
                                         for name, p in inspect.signature(model).parameters.items()
                                         if p.kind is p.KEYWORD_ONLY and name not in ("in_channels", "options")))
QUANTIZER_FIELDS = tuple(f.name for f in dataclasses.fields(QuantizerOptions) if f.name != "eps")
MODEL_FIELDS = ("levels", *CONSTRUCTOR_FIELDS, *QUANTIZER_FIELDS)
TOP_FIELDS = ("top_residual_blocks", "top_num_embeddings")   # the 2-level model's alone


def check_config(c: Config) -> None:
    """Raise a one-line ConfigError for the first value that cannot work."""
    positive = ("steps", "batch_size", "hidden_channels", "residual_channels", "num_residual_blocks",
                "embedding_dim", "num_embeddings", "log_every", "eval_every")
    if c.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every must be 0 or more, got {c.checkpoint_every}")
    for name in positive:
        require_at_least(name.replace("_", "-"), getattr(c, name))
    require_at_least("hidden-channels", c.hidden_channels, 2)
    require_positive("lr", c.lr)
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
    if c.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"--compile-mode must be {', '.join(COMPILE_MODES)}, got {c.compile_mode!r}")
    if not 0 <= c.device_data <= 1:
        raise ConfigError(f"--device-data must be a share of free GPU memory between 0 and 1, got {c.device_data}")
    if c.block not in ("paper", "modern"):
        raise ConfigError(f"--block must be paper or modern, got {c.block!r}")
    if c.downsample not in (4, 8):
        raise ConfigError(f"--downsample must be 4 or 8, got {c.downsample}")
    if c.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"--lr-schedule must be constant or cosine, got {c.lr_schedule!r}")
    require_at_least("warmup-steps", c.warmup_steps, 0)
    require_at_least("clip-grad-norm", c.clip_grad_norm, 0)
    require_at_least("top-residual-blocks", c.top_residual_blocks, 0)
    require_at_least("top-num-embeddings", c.top_num_embeddings, 0)
    if c.levels not in (1, 2):
        raise ConfigError(f"--levels must be 1 (VQ-VAE) or 2 (VQ-VAE-2), got {c.levels}")
    if c.levels == 2 and c.quantizer == "fsq" and c.fsq_levels and c.top_num_embeddings:
        raise ConfigError("--fsq-levels serve both levels, so --top-num-embeddings would be ignored: drop one of "
                          "the two (without --fsq-levels, each level's FSQ levels follow its own K)")
    if c.levels == 2 and c.downsample != 4:
        raise ConfigError("--levels 2 downsamples by 4 (bottom) and 8 (top) already: leave --downsample at 4")
    factor = 8 if c.levels == 2 else c.downsample
    if c.image_size < factor or c.image_size % factor:
        raise ConfigError(f"--image-size must be a positive multiple of {factor} (the encoder downsamples "
                          f"by {factor}), got {c.image_size}")


def top_codebook_size(c: Config) -> int:
    """The top codebook's K of a 2-level config: --top-num-embeddings, or with 0 the bottom's --num-embeddings."""
    return c.top_num_embeddings or c.num_embeddings


def learning_rate(c: Config, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based): a linear warm-up over --warmup-steps, then --lr, or
    with --lr-schedule cosine a half cosine from --lr down to 0 at --steps (SGDR, arXiv 1608.03983, without
    restarts). A function of the step alone, so a resumed run continues the schedule exactly."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    if c.lr_schedule == "constant":
        return c.lr
    progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
    return c.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def unused_fields(levels: int) -> tuple[str, ...]:
    """The MODEL_FIELDS a model of `levels` levels does not take: downsample with 2 levels (the 2-level model
    downsamples by 4 and 8 by construction), the TOP_FIELDS with 1."""
    return ("downsample",) if levels == 2 else TOP_FIELDS


def quantizer_options(c: Config) -> QuantizerOptions:
    """The quantizer's options a config gives (each level's, but the top codebook's K): its QUANTIZER_FIELDS, with
    --fsq-levels "8,5,5,5" read as (8, 5, 5, 5) and "" as None."""
    options = {name: getattr(c, name) for name in QUANTIZER_FIELDS}
    options["fsq_levels"] = tuple(int(v) for v in c.fsq_levels.split(",")) if c.fsq_levels else None
    return QuantizerOptions(**options)


def model_args(c: Config) -> dict:
    """The model's constructor arguments and "levels": the CONSTRUCTOR_FIELDS less the `unused_fields` of its levels,
    and `options`, the config's `quantizer_options`."""
    unused = unused_fields(c.levels)
    args = {name: getattr(c, name) for name in ("levels", *CONSTRUCTOR_FIELDS) if name not in unused}
    return {**args, "options": quantizer_options(c)}


def build_model(c: Config) -> VQVAE | VQVAE2:
    """The model a config describes: models.VQVAE, or hierarchy.VQVAE2 with --levels 2."""
    args = model_args(c)
    if args.pop("levels") == 2:
        return VQVAE2(**args)
    return VQVAE(**args)


def save_checkpoint(path: Path, model: VQVAE, optimizer: torch.optim.Optimizer, step: int, config: Config,
                    data_variance: float, elapsed: float, metrics: dict | None = None,
                    device: torch.device | None = None, world: int = 1) -> None:
    """Everything `train` needs to continue the run, written atomically; `world` is the number of processes that
    trained it (each with `config.batch_size` images a step)."""
    atomic_save({"format": CHECKPOINT_FORMAT, "config": asdict(config), "data_variance": data_variance,
                 "world": world, **training_state(model, optimizer, step, elapsed, metrics, device)}, path)


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint dict safely (weights_only: a file that carries code is refused, never run)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass the checkpoint.pt of a run folder")
    ckpt = load_plain(path, "checkpoint ")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        kind = FILE_KINDS.get(ckpt.get("format")) if isinstance(ckpt, dict) else None
        raise CheckpointError(f"{path} is {kind + ', ' if kind else ''}not a checkpoint written by this repo's "
                              f"train.py: pass the checkpoint.pt of a VQ-VAE run")
    return ckpt


def config_from_dict(d: dict) -> Config:
    known = {f.name for f in dataclasses.fields(Config)}
    d = {k: v for k, v in d.items() if k in known}
    if d.get("levels") == 2:
        # written before the field existed, when the top had the bottom's residual stacks (and, as the default
        # top_num_embeddings still gives, the bottom's codebook size)
        d.setdefault("top_residual_blocks", d.get("num_residual_blocks", Config.num_residual_blocks))
    return Config(**d)


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


def load_model(path: str | Path, device: torch.device | str = "auto") -> VQVAE | VQVAE2:
    """A trained VQ-VAE (1 or 2 levels) from its checkpoint alone, in eval mode on `device` ("auto": CUDA, then
    Apple MPS, then the CPU; or "cpu", "cuda", "cuda:1", ...). `model.encode_images(x)` takes images in [0, 1] to
    code maps and `model.decode_images(codes)` takes them back; `model.config` is the run's `Config`. Any problem
    with the file is a one-line CheckpointError (a ValueError) naming it."""
    target = pick_device(device) if isinstance(device, str) else device
    model, config, _ = load_checkpoint(path, target)
    model.config = config
    return model


def check_resume_matches(saved: Config, current: Config, path: Path) -> None:
    """A resumed run must build the same model on the same data; name the first field that differs."""
    unused = unused_fields(saved.levels) if saved.levels == current.levels else ()   # they build nothing there
    for name in (*MODEL_FIELDS, "data", "image_size", "batch_size", "seed"):
        if name in unused:
            continue
        if name == "top_num_embeddings":   # compare the sizes the flags give: 0 is the bottom's K
            if top_codebook_size(saved) == top_codebook_size(current):
                continue
        if getattr(saved, name) != getattr(current, name):
            raise CheckpointError(f"{path} was trained with --{name.replace('_', '-')} {getattr(saved, name)}, "
                                  f"not {getattr(current, name)}: resume with the same value or use another --out")


def load_vqvae_for(prior_ckpt: dict, device: torch.device, override: str | None = None) -> VQVAE | VQVAE2:
    """The VQ-VAE whose codes the prior models (or `override`), in eval mode; its number of levels and its codebook
    size must match the prior's."""
    named = prior_ckpt["vqvae"]["checkpoint"]
    path = Path(override).expanduser() if override else Path(named)
    if not path.is_file():
        hint = "" if override else ": it has moved or was deleted; pass --vqvae with its checkpoint.pt"
        raise CheckpointError(f"the VQ-VAE checkpoint {path} does not exist{hint}")
    vqvae, _, ckpt = load_checkpoint(path, device)
    levels = prior_ckpt.get("levels", 1)   # prior_checkpoint.prior_levels: 1 in checkpoints from before 2 levels
    if vqvae.levels != levels:
        raise CheckpointError(f"{path} is a {vqvae.levels}-level VQ-VAE but the prior models {levels}-level codes: "
                              f"pass --vqvae with the checkpoint.pt of a {levels}-level VQ-VAE (train.py --levels "
                              f"{levels}), the one the prior was trained on ({named})")
    args = prior_ckpt["model_args"]
    prior_ks = [args.get("top_num_embeddings") or args["num_embeddings"], args["num_embeddings"]][-levels:]
    vqvae_ks = [q.num_embeddings for q in vqvae.quantizers]   # top first
    if vqvae_ks != prior_ks:
        raise CheckpointError(f"{path} has {' and '.join(map(str, vqvae_ks))} codes but the prior models "
                              f"{' and '.join(map(str, prior_ks))}: pass the VQ-VAE the prior was trained on ({named})")
    if ckpt["config"] != prior_ckpt["vqvae"]["config"] or ckpt["step"] != prior_ckpt["vqvae"]["step"]:
        warnings.warn(f"{path} is not the VQ-VAE the prior was trained on ({named}, step "
                      f"{prior_ckpt['vqvae']['step']}): the samples may not look like its images", stacklevel=2)
    return vqvae
