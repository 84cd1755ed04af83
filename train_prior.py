"""Train a prior over the code maps of a trained VQ-VAE (arXiv 1711.00937, section 3.2): a gated PixelCNN (arXiv
1606.05328; --arch pixelcnn, the default) or a decoder-only transformer in raster order (--arch transformer,
transformer_prior.py), from Python or the command line.

    python extract_codes.py --checkpoint runs/sample/checkpoint.pt --passes 20      # -> runs/sample/codes.pt
    python train_prior.py --codes runs/sample/codes.pt --out runs/sample-prior
    python train_prior.py --codes runs/sample/codes.pt --out runs/sample-transformer --arch transformer
    python train_prior.py --codes runs/sample/codes.pt --out runs/sample-prior --resume --steps 6000

Everything is configured by one dataclass, `PriorConfig` (in prior_checkpoint.py, beside the checkpoint it is saved
in); the flags are its fields with dashes, as in train.py. The objective is the negative log-likelihood of the
training code maps, -log p(z | y) = -sum_ij log p(z_ij | z_<ij, y), averaged over codes (nats per code). The run
folder (`--out`) receives:

- config.json: the config of the run;
- metrics.jsonl: one JSON object per logged step (training NLL; `val_*` fields when validation ran);
- checkpoint.pt: prior, optimizer, step, RNG state, config, the model's arguments, the map shape, the codes file,
  and the path and config of the VQ-VAE whose codes it models; written atomically, loadable with
  torch.load(..., weights_only=True) and enough to rebuild the prior alone (`prior_checkpoint.load_prior`).

What happens around each step (records, validation and a checkpoint every --eval-every steps, stopping on Ctrl-C,
SIGTERM or a non-finite loss) is training_loop.run_steps, as in train.py. Validation runs in float32 (whatever --amp
says for training) over every validation map of the codes file and reports the NLL in nats and bits per code. The
VQ-VAE itself is never loaded here: the prior sees only the codes file. --compile trains through torch.compile (the
checkpoint holds the plain model's weights either way).

The transformer (--width, --depth, --heads, --dropout) is built for the codes file's map size (its row and column
embeddings). On a codes file with classes it is class-conditional and, for --class-dropout of the training maps,
sees the "no class" token instead of the class, so that one model gives the conditional and the unconditional prior
(classifier-free guidance: sample.py --cfg).

A codes file of a 2-level VQ-VAE (hierarchy.VQVAE2; the file's `levels` is 2) trains the two priors of VQ-VAE-2
(hierarchical_prior.HierarchicalPrior, arXiv 1906.00446): the top prior over the top maps (with --attention, one
causal self-attention block) and the bottom prior over the bottom maps, conditioned on the top map. Both are one
model with one optimizer, in the same run folder and the same checkpoint.pt (`levels` 2, `map_shape` the bottom
map's, `top_map_shape`); with --arch transformer the top prior is the transformer and the bottom prior stays the
conditioned PixelCNN; the objective is the sum of the two levels' NLLs per code. Its records give each level's
NLL per code (`top_nll_nats`, `bottom_nll_nats`, and in bits) and `nll_nats_per_image`, -log p(z_top, z_bottom | y)
of one image's two maps, in nats.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from checkpoint import COMPILE_MODES
from extract_codes import read_codes
from image_data import StepBatchSampler
from prior_checkpoint import (ARCHS, MODEL_FIELDS, TRANSFORMER_FIELDS, Prior, PriorConfig, build_prior, code_levels,
                              codebook_sizes, config_from_dict, level_logits, level_maps, level_metrics, model_args,
                              nll_per_level, per_code_record, prior_levels, read_prior_checkpoint,
                              save_prior_checkpoint)
from runs import (TENSORBOARD_FILES, CheckpointError, ConfigError, MetricsLog, amp_dtype_for, autocast,
                  open_run_folder, parse_args, pick_device, require_at_least, require_positive, restore_rng,
                  restore_training, run_training_cli)
from training_loop import Cadence, Hooks, run_steps


class TrainPriorResult(NamedTuple):
    """model: the trained prior (eval mode; a HierarchicalPrior for 2-level codes); history: every metrics.jsonl
    record; final: last validation metrics (nll_nats, nll_bits per code; for 2 levels top_/bottom_nll_nats,
    top_/bottom_nll_bits and nll_nats_per_image); out: the run folder."""

    model: Prior
    history: list[dict]
    final: dict
    out: Path


# ---------------------------------------------------------------------------------------------------------------
# Config, run folder, codes file


def check_config(c: PriorConfig) -> None:
    if c.arch not in ARCHS:
        raise ConfigError(f"--arch must be {' or '.join(ARCHS)}, got {c.arch!r}")
    for name in ("steps", "batch_size", "channels", "num_layers", "log_every", "eval_every", "width", "depth"):
        require_at_least(name.replace("_", "-"), getattr(c, name))
    if c.kernel_size < 1 or c.kernel_size % 2 == 0:
        raise ConfigError(f"--kernel-size must be a positive odd number, got {c.kernel_size}")
    require_positive("lr", c.lr)
    if not 0 <= c.dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1), got {c.dropout}")
    if c.amp not in ("auto", "bf16", "off"):
        raise ConfigError(f"--amp must be auto, bf16 or off, got {c.amp!r}")
    require_at_least("heads", c.heads)
    require_at_least("cond-channels", c.cond_channels)
    require_at_least("cond-blocks", c.cond_blocks, 0)
    if c.attention and c.num_layers < 2:
        raise ConfigError(f"--attention sits between gated layers: --num-layers must be at least 2, got "
                          f"{c.num_layers}")
    if c.attention and c.channels % c.heads:
        raise ConfigError(f"--channels ({c.channels}) must be a multiple of --heads ({c.heads}) with --attention")
    if c.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"--compile-mode must be {', '.join(COMPILE_MODES)}, got {c.compile_mode!r}")
    if c.arch == "pixelcnn":
        defaults = PriorConfig()
        if any(getattr(c, name) != getattr(defaults, name) for name in TRANSFORMER_FIELDS):
            raise ConfigError("--width, --depth and --class-dropout shape the transformer prior: leave them out, or "
                              "add --arch transformer")
        return
    if c.attention:
        raise ConfigError("--attention adds a block to the PixelCNN prior; the transformer is all attention: leave "
                          "it out")
    if c.width % c.heads:
        raise ConfigError(f"--width ({c.width}) must be a multiple of --heads ({c.heads})")
    if not 0 <= c.class_dropout < 1:
        raise ConfigError(f"--class-dropout must be in [0, 1), got {c.class_dropout}")


def prepare_out(c: PriorConfig, levels: int = 1) -> tuple[Path, dict | None]:
    """The prior's run folder and the checkpoint to resume from (see runs.open_run_folder); `levels`: the codes
    file's."""
    def check(ckpt: dict, ckpt_path: Path) -> None:
        if prior_levels(ckpt) != levels:
            raise CheckpointError(f"{ckpt_path} is a prior of {prior_levels(ckpt)}-level codes but --codes {c.codes} "
                                  f"holds {levels}-level codes: resume with the codes file it was trained on or use "
                                  f"another --out")
        saved = config_from_dict(ckpt["config"])
        for name in (*MODEL_FIELDS, "batch_size", "seed"):
            if name == "heads" and saved.arch == c.arch == "pixelcnn" and not (saved.attention or c.attention):
                continue   # no attention block: --heads shapes nothing
            if getattr(saved, name) != getattr(c, name):
                raise CheckpointError(f"{ckpt_path} was trained with --{name.replace('_', '-')} "
                                      f"{getattr(saved, name)}, not {getattr(c, name)}: resume with the same value "
                                      f"or use another --out")
        if Path(ckpt["codes"]) != Path(c.codes).expanduser().resolve():
            raise CheckpointError(f"{ckpt_path} was trained on --codes {ckpt['codes']}, not {c.codes}: resume "
                                  f"with the same codes file or use another --out")

    return open_run_folder(c.out, c.resume, c.overwrite, read_prior_checkpoint, check,
                           ("checkpoint.pt", "metrics.jsonl", TENSORBOARD_FILES))


def load_codes(path: str | Path, conditional: bool) -> tuple[dict, torch.Tensor | None, torch.Tensor | None]:
    """The codes file, and its training and validation labels if the prior is conditioned on them (else None)."""
    codes = read_codes(path)
    if len(codes["train_codes"]) == 0 or len(codes["val_codes"]) == 0:
        raise ConfigError(f"{path} holds no training or no validation maps: extract codes from a larger dataset")
    levels = code_levels(codes)
    if levels not in (1, 2):
        raise CheckpointError(f"{path} holds {levels}-level codes: only 1 (VQ-VAE) and 2 (VQ-VAE-2) are known")
    if levels == 2:
        for split in ("train", "val"):
            top, bottom = level_maps(codes, split) if f"{split}_codes_top" in codes else (None, None)
            if top is None or len(top) != len(bottom) or (2 * top.shape[1], 2 * top.shape[2]) != bottom.shape[1:]:
                raise CheckpointError(f"{path} says 2 levels but its {split} top maps are missing or not half the "
                                      f"bottom maps' size: run extract_codes.py again")
    use_labels = conditional and len(codes["classes"]) > 0
    return (codes, codes["train_labels"] if use_labels else None, codes["val_labels"] if use_labels else None)


# ---------------------------------------------------------------------------------------------------------------
# Training


def train_prior(config: PriorConfig, callback: Callable[[dict], None] | None = None) -> TrainPriorResult:
    """Train a prior as `config` says; `callback(record)` sees every metrics record as it is written."""
    # set-up: the config, the device, the codes file, the run folder, the prior and its optimizer
    c = config
    check_config(c)
    device = pick_device(c.device)
    amp_dtype = amp_dtype_for(c.amp, device)
    codes, train_labels, val_labels = load_codes(c.codes, c.conditional)
    levels = code_levels(codes)
    defaults = PriorConfig()
    if levels == 1 and (c.cond_channels, c.cond_blocks) != (defaults.cond_channels, defaults.cond_blocks):
        raise ConfigError(f"--cond-channels and --cond-blocks shape the bottom prior of 2-level codes, but {c.codes} "
                          f"holds 1-level codes: leave them out, or extract codes from a --levels 2 VQ-VAE")
    out, resume_from = prepare_out(c, levels)
    torch.manual_seed(c.seed)
    args = model_args(c, codes["num_embeddings"], codes["classes"], levels, codebook_sizes(codes)[0],
                      tuple(level_maps(codes, "train")[0].shape[1:]))
    model = build_prior(args, levels).to(device)
    stepped = torch.compile(model, mode=c.compile_mode) if c.compile else model   # what the training step calls
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr)
    start_step, elapsed = 0, 0.0
    if resume_from is not None:
        restore_training(model, optimizer, resume_from)
        start_step, elapsed = resume_from["step"], resume_from["elapsed"]
        restore_rng(resume_from, device)
    metrics = MetricsLog(out, start_step, resume_from is not None, c.tensorboard, callback)
    (out / "config.json").write_text(json.dumps(asdict(c), indent=2) + "\n")

    # data: the training maps on the device, drawn by step; the validation maps
    train_maps = [m.to(device) for m in level_maps(codes, "train")]   # (N, h, w) per level, uint8 or int16
    val_maps = level_maps(codes, "val")
    codes_per_map = [m.shape[1] * m.shape[2] for m in train_maps]
    if train_labels is not None:
        train_labels = train_labels.to(device)
    sampler = StepBatchSampler(len(train_maps[0]), c.batch_size, c.seed)

    # the loop (training_loop.run_steps): one step, then what to show and save
    def train_step(step: int) -> torch.Tensor:
        index = torch.tensor([i for i, _ in sampler.batch_for_step(step)], device=device)
        zs = [m[index].long() for m in train_maps]                          # (B, h, w) per level
        y = train_labels[index] if train_labels is not None else None
        with autocast(device, amp_dtype):
            logits = level_logits(stepped, zs, y)                           # (B, K, h, w) per level
        losses = [F.cross_entropy(l.float(), z) for l, z in zip(logits, zs)]   # nats per code, per level
        loss = sum(losses[1:], losses[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return torch.stack([loss, *losses]).detach()                        # (1 + levels,)

    def checkpoint(step: int, final: dict, elapsed: float) -> None:
        save_prior_checkpoint(out / "checkpoint.pt", model, optimizer, step, c, args, codes, elapsed, final, device)

    hooks = Hooks(train_step, lambda means: per_code_record(means[1:], codes_per_map),
                  lambda means: {"nll": " ".join(f"{m:.3f}" for m in means[1:])},
                  lambda: level_metrics(nll_per_level(model, val_maps, val_labels, device), codes_per_map),
                  lambda step, final, record: f"step {step}: val NLL {summary(final)}", checkpoint)
    model.train()
    final = run_steps(hooks, Cadence(c.steps, c.log_every, c.eval_every, c.eval_every), metrics, out,
                      start_step=start_step, elapsed=elapsed,
                      final=dict(resume_from["metrics"]) if resume_from is not None else {}, rate_key="maps_per_s",
                      items_per_step=c.batch_size, desc="training prior", progress=c.progress,
                      resume_command=f"python train_prior.py --codes {c.codes} --out {out} --resume"
                                     + (f" --arch {c.arch}" if c.arch != "pixelcnn" else ""))

    # the end
    return TrainPriorResult(model.eval(), metrics.history, final, out)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def summary(final: dict) -> str:
    """Validation metrics in words: one level's NLL per code, or each level's and the NLL per image."""
    if "nll_nats" in final:
        return f"{final['nll_nats']:.4f} nats/code ({final['nll_bits']:.4f} bits/code)"
    return (f"top {final['top_nll_nats']:.4f}, bottom {final['bottom_nll_nats']:.4f} nats/code; "
            f"{final['nll_nats_per_image']:.2f} nats/image")


def main(argv: list[str] | None = None) -> int:
    return run_training_cli(train_prior, parse_args(argv, PriorConfig, __doc__), lambda r: (
        f"done: {r.out} | val NLL {summary(r.final)}"))


if __name__ == "__main__":
    sys.exit(main())
