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

A codes file of a 2-level VQ-VAE (hierarchy.VQVAE2; the file's `levels` is 2) trains the two priors of VQ-VAE-2
(hierarchical_prior.HierarchicalPrior, arXiv 1906.00446): the top prior over the top maps (with --attention, one
causal self-attention block) and the bottom prior over the bottom maps, conditioned on the top map. Both are one
model with one optimizer, in the same run folder and the same checkpoint.pt (`levels` 2, `map_shape` the bottom
map's, `top_map_shape`); the objective is the sum of the two levels' NLLs per code. Its records give each level's
NLL per code (`top_nll_nats`, `bottom_nll_nats`, and in bits) and `nll_nats_per_image`, -log p(z_top, z_bottom | y)
of one image's two maps, in nats.
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
from hierarchical_prior import HierarchicalPrior
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
    attention: bool = False         # one causal self-attention block in the prior (for 2-level codes: the top prior)
    heads: int = 4                  # attention heads (channels must be a multiple)
    cond_channels: int = 32         # 2-level codes only: width of the bottom prior's conditioning stack on the top map
    cond_blocks: int = 2            # 2-level codes only: residual blocks of that stack at the top resolution
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


MODEL_FIELDS = ("channels", "num_layers", "kernel_size", "dropout", "conditional", "attention", "heads",
                "cond_channels", "cond_blocks")
Prior = GatedPixelCNN | HierarchicalPrior


class TrainPriorResult(NamedTuple):
    """model: the trained prior (eval mode; a HierarchicalPrior for 2-level codes); history: every metrics.jsonl
    record; final: last validation metrics (nll_nats, nll_bits per code; for 2 levels top_/bottom_nll_nats,
    top_/bottom_nll_bits and nll_nats_per_image); out: the run folder."""

    model: Prior
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
    require_at_least("heads", c.heads)
    require_at_least("cond-channels", c.cond_channels)
    require_at_least("cond-blocks", c.cond_blocks, 0)
    if c.attention and c.num_layers < 2:
        raise ConfigError(f"--attention sits between gated layers: --num-layers must be at least 2, got "
                          f"{c.num_layers}")
    if c.attention and c.channels % c.heads:
        raise ConfigError(f"--channels ({c.channels}) must be a multiple of --heads ({c.heads}) with --attention")


def model_args(c: PriorConfig, num_embeddings: int, classes: list[str], levels: int = 1,
               top_num_embeddings: int | None = None) -> dict:
    """The keyword arguments of GatedPixelCNN (1 level) or HierarchicalPrior (2) for this config and codes file;
    num_embeddings is the (bottom) level's K, top_num_embeddings the top's (None: the same, as HierarchicalPrior
    takes it)."""
    args = {"num_embeddings": num_embeddings, "num_classes": len(classes) if c.conditional else 0,
            "channels": c.channels, "num_layers": c.num_layers, "kernel_size": c.kernel_size, "dropout": c.dropout}
    if c.attention or levels == 2:
        args.update(attention=c.attention, heads=c.heads)
    if levels == 2:
        args.update(cond_channels=c.cond_channels, cond_blocks=c.cond_blocks,
                    top_num_embeddings=top_num_embeddings)
    return args


def build_prior(args: dict, levels: int = 1) -> Prior:
    """The prior that `model_args` describes."""
    return HierarchicalPrior(**args) if levels == 2 else GatedPixelCNN(**args)


def read_prior_checkpoint(path: str | Path) -> dict:
    """Load a prior checkpoint dict safely (weights_only); a one-line CheckpointError for any other file."""
    return read_plain_file(path, CHECKPOINT_FORMAT, "the checkpoint.pt of a prior run (train_prior.py)")


def config_from_dict(d: dict) -> PriorConfig:
    known = set(PriorConfig.__dataclass_fields__)
    return PriorConfig(**{k: v for k, v in d.items() if k in known})


def prior_levels(ckpt: dict) -> int:
    """1 or 2: the code levels a prior checkpoint models (checkpoints written before 2 levels existed: 1)."""
    return ckpt.get("levels", 1)


def load_prior(path: str | Path, device: torch.device | str = "cpu") -> tuple[Prior, PriorConfig, dict]:
    """Rebuild the prior from a checkpoint file alone: (model in eval mode on `device`, its config, the dict); a
    GatedPixelCNN, or a HierarchicalPrior for a 2-level checkpoint."""
    ckpt = read_prior_checkpoint(path)
    model = build_prior(ckpt["model_args"], prior_levels(ckpt))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        lines = str(err).splitlines()
        raise CheckpointError(f"{path}: the weights do not match the prior its arguments describe "
                              f"({lines[1].strip() if len(lines) > 1 else err})") from None
    return model.to(device).eval(), config_from_dict(ckpt["config"]), ckpt


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
            if name == "heads" and not (saved.attention or c.attention):
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


# ---------------------------------------------------------------------------------------------------------------
# Likelihood of a set of maps


@torch.no_grad()
def nll_per_level(model: Prior, maps: list[torch.Tensor], labels: torch.Tensor | None, device: torch.device,
                  batch_size: int = 256) -> list[torch.Tensor]:
    """-log p of each map of each level in nats: `maps` [codes (N, h, w)] for a GatedPixelCNN, [top, bottom] for a
    HierarchicalPrior (the bottom level's given the top map) -> one (N,) float64 CPU tensor per level. Eval mode,
    float32; the model is left in its previous mode."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(maps[0]), batch_size):
        zs = [m[start:start + batch_size].to(device).long() for m in maps]              # (B, h, w) per level
        y = labels[start:start + batch_size].to(device) if labels is not None else None
        nll = model.nll(*zs, y)
        out.append([n.double().cpu() for n in ((nll,) if model.levels == 1 else nll)])
    model.train(was_training)
    return [torch.cat(level) for level in zip(*out)]


def nll_per_map(model: GatedPixelCNN, codes: torch.Tensor, labels: torch.Tensor | None, device: torch.device,
                batch_size: int = 256) -> torch.Tensor:
    """-log p(z | y) in nats for each map of `codes` (N, h, w): (N,) float64 on the CPU. Eval mode, float32;
    the model is left in its previous mode."""
    return nll_per_level(model, [codes], labels, device, batch_size)[0]


def nll_metrics(nll: torch.Tensor, codes_per_map: int) -> dict:
    """Per-map NLLs (nats) -> mean NLL per code in nats and in bits."""
    return level_metrics([nll], [codes_per_map])


def per_code_record(nats: list[float], codes_per_map: list[int]) -> dict:
    """Each level's mean NLL per code (nats) -> nll_nats, nll_bits for one level; for two, each level's
    (top_nll_nats, ..., bottom_nll_bits) and nll_nats_per_image, both levels' per-code NLL times their codes per map,
    summed (the mean over images of both levels' sum)."""
    if len(nats) == 1:
        return {"nll_nats": nats[0], "nll_bits": nats[0] / math.log(2)}
    out = {}
    for name, x in zip(("top", "bottom"), nats):
        out.update({f"{name}_nll_nats": x, f"{name}_nll_bits": x / math.log(2)})
    out["nll_nats_per_image"] = sum(x * n for x, n in zip(nats, codes_per_map))
    return out


def level_metrics(nlls: list[torch.Tensor], codes_per_map: list[int]) -> dict:
    """Per-map NLLs of each level (nats) -> `per_code_record` of their means per code."""
    return per_code_record([nll.sum().item() / (len(nll) * n) for nll, n in zip(nlls, codes_per_map)], codes_per_map)


# ---------------------------------------------------------------------------------------------------------------
# Training


def code_levels(codes: dict) -> int:
    """1 or 2: the levels of a codes file (files written before 2-level VQ-VAEs existed have no `levels`: 1)."""
    return codes.get("levels", 1)


def codebook_sizes(codes: dict) -> list[int]:
    """K of each level of a codes file, top first (files written before the top had its own K: the bottom's)."""
    k = codes["num_embeddings"]
    return [codes.get("num_embeddings_top", k), k] if code_levels(codes) == 2 else [k]


def level_maps(codes: dict, split: str) -> list[torch.Tensor]:
    """The maps of `split` ("train" or "val") of each level, top first: [codes] or [top, bottom]."""
    bottom = codes[f"{split}_codes"]
    return [codes[f"{split}_codes_top"], bottom] if code_levels(codes) == 2 else [bottom]


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


def level_logits(model: Prior, zs: list[torch.Tensor], labels: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The logits of each level for a batch of maps (one per level, top first), each (B, K, h, w); for two levels
    the bottom level's are those of p(z_bottom | z_top, y)."""
    return (model(*zs, labels),) if model.levels == 1 else tuple(model(*zs, labels))


def train_prior(config: PriorConfig, callback: Callable[[dict], None] | None = None) -> TrainPriorResult:
    """Train a prior as `config` says; `callback(record)` sees every metrics record as it is written."""
    from tqdm.auto import tqdm

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

    train_maps = [m.to(device) for m in level_maps(codes, "train")]   # (N, h, w) per level, uint8 or int16
    val_maps = level_maps(codes, "val")
    map_shape = tuple(train_maps[-1].shape[1:])                       # the bottom level's for 2 levels
    codes_per_map = [m.shape[1] * m.shape[2] for m in train_maps]
    args = model_args(c, codes["num_embeddings"], codes["classes"], levels, codebook_sizes(codes)[0])
    model = build_prior(args, levels).to(device)
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
    sampler = StepBatchSampler(len(train_maps[0]), c.batch_size, c.seed)

    def checkpoint(step: int, metrics: dict | None = None) -> None:
        atomic_save({
            "format": CHECKPOINT_FORMAT,
            "config": asdict(c),
            "levels": levels,
            "model_args": args,
            "classes": list(codes["classes"]),
            "map_shape": list(map_shape),
            **({"top_map_shape": list(train_maps[0].shape[1:])} if levels == 2 else {}),
            "codes": str(Path(c.codes).expanduser().resolve()),
            "vqvae": {"checkpoint": codes["vqvae_checkpoint"], "config": codes["vqvae_config"],
                      "step": codes["vqvae_step"]},
            **training_state(model, optimizer, step, elapsed, metrics, device),
        }, out / "checkpoint.pt")

    def validate() -> dict:
        return level_metrics(nll_per_level(model, val_maps, val_labels, device), codes_per_map)

    ctx = autocast(device, amp_dtype)
    final: dict = dict(resume_from["metrics"]) if resume_from is not None else {}
    if start_step >= c.steps:
        print(f"{out} is already at step {start_step} of {c.steps}: raise --steps to train further")
    bar = tqdm(total=c.steps, initial=start_step, desc="training prior", disable=not c.progress, dynamic_ncols=True)
    pending: list[torch.Tensor] = []
    totals, since_log, tick = [0.0] * levels, 0, time.perf_counter()
    model.train()
    step = start_step
    with StopOnSignal() as stop, closing(metrics):
        while step < c.steps:
            index = torch.tensor([i for i, _ in sampler.batch_for_step(step)], device=device)
            zs = [m[index].long() for m in train_maps]                          # (B, h, w) per level
            y = train_labels[index] if train_labels is not None else None
            with ctx:
                logits = level_logits(model, zs, y)                             # (B, K, h, w) per level
            losses = [F.cross_entropy(l.float(), z) for l, z in zip(logits, zs)]   # nats per code, per level
            loss = sum(losses[1:], losses[0])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            since_log += 1
            pending.append(torch.stack(losses).detach())                        # (levels,)
            bar.update(1)
            evaluate_now = step % c.eval_every == 0 or step == c.steps
            if len(pending) == 10 or step % c.log_every == 0 or evaluate_now:
                block = torch.stack(pending).double().cpu()                     # (n, levels)
                if not torch.isfinite(block).all():
                    raise FloatingPointError(f"the loss became {block[~torch.isfinite(block)][0].item()} near "
                                             f"step {step}")
                totals = [t + block[:, l].sum().item() for l, t in enumerate(totals)]
                pending.clear()
                bar.set_postfix(nll=" ".join(f"{t / since_log:.3f}" for t in totals), refresh=False)
            if step % c.log_every == 0 or evaluate_now:
                now = time.perf_counter()
                elapsed += now - tick
                record = {"step": step, **per_code_record([t / since_log for t in totals], codes_per_map),
                          "maps_per_s": since_log * c.batch_size / max(now - tick, 1e-9),
                          "elapsed_s": round(elapsed, 2)}
                if evaluate_now:
                    final = validate()
                    record.update({f"val_{k}": v for k, v in final.items()})
                    checkpoint(step, final)
                    bar.write(f"step {step}: val NLL {summary(final)}")
                metrics.log(record)
                totals, since_log, tick = [0.0] * levels, 0, time.perf_counter()
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


def summary(final: dict) -> str:
    """Validation metrics in words: one level's NLL per code, or each level's and the NLL per image."""
    if "nll_nats" in final:
        return f"{final['nll_nats']:.4f} nats/code ({final['nll_bits']:.4f} bits/code)"
    return (f"top {final['top_nll_nats']:.4f}, bottom {final['bottom_nll_nats']:.4f} nats/code; "
            f"{final['nll_nats_per_image']:.2f} nats/image")


def main(argv: list[str] | None = None) -> int:
    return run_training_cli(train_prior, parse_args(argv, PriorConfig), lambda r: (
        f"done: {r.out} | val NLL {summary(r.final)}"))


if __name__ == "__main__":
    sys.exit(main())
