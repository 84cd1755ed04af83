"""A prior run's settings and its checkpoint file, and the likelihood of code maps under the prior it rebuilds
(the PixelCNN prior of arXiv 1711.00937, section 3.2; the two priors of VQ-VAE-2, arXiv 1906.00446).

This is what every script that touches a trained prior needs (sample.py, evaluate_prior.py, the notebook) without
the training loop (train_prior.py), as checkpoint.py is for the VQ-VAE:

- `PriorConfig`: one dataclass for a prior run, saved as `asdict(config)` in every checkpoint; train_prior.py's
  flags are its fields;
- `model_args` / `build_prior`: the prior a config and a codes file describe: with --arch pixelcnn a GatedPixelCNN
  (1 level) or HierarchicalPrior (2 levels); with --arch transformer a TransformerPrior (1 level) or a
  HierarchicalPrior whose top prior is a TransformerPrior (2 levels; the bottom stays the conditioned PixelCNN);
- `save_prior_checkpoint` / `read_prior_checkpoint` / `load_prior`: prior, optimizer, step, RNG state, config, the
  model's arguments, the map shapes, the codes file, and the path and config of the VQ-VAE whose codes it models, in
  one file written atomically and loaded with torch.load(..., weights_only=True); `load_prior(path)` rebuilds the
  prior from the file alone;
- a codes file's levels: `code_levels`, `codebook_sizes`, `level_maps`;
- the likelihood: `level_logits`, `nll_per_level` / `nll_per_map` (-log p of each map, in nats) and the per-code
  summaries of the metrics records (`per_code_record`, `level_metrics`, `nll_metrics`);
- `class_labels`: the labels a class-conditional prior is given when it samples.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hierarchical_prior import HierarchicalPrior
from prior import GatedPixelCNN
from transformer_prior import TransformerPrior
from runs import CheckpointError, ConfigError, atomic_save, read_plain_file, training_state

CHECKPOINT_FORMAT = "pixelcnn-prior-v1"   # both kinds of prior; model_args["arch"] names a transformer
ARCHS = ("pixelcnn", "transformer")


@dataclass
class PriorConfig:
    # data
    codes: str = "runs/sample/codes.pt"  # code maps written by extract_codes.py
    arch: str = "pixelcnn"          # the prior: pixelcnn (gated PixelCNN) or transformer (for 2 levels: the top prior)
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
    # model (--arch transformer, transformer_prior.py; --heads and --dropout as above)
    width: int = 128                # transformer: width of the token embeddings and of every block
    depth: int = 4                  # transformer: blocks (attention + MLP)
    class_dropout: float = 0.1      # transformer: share of training maps whose class is dropped (for --cfg sampling)
    # optimisation
    steps: int = 2000               # optimizer steps in total (a resumed run continues up to this number)
    batch_size: int = 32            # code maps per step
    lr: float = 1e-3                # Adam learning rate
    seed: int = 0                   # seeds the weights, the order of the maps and the dropout
    # hardware
    device: str = "auto"            # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    amp: str = "auto"               # bf16 autocast for training: auto (on CUDA and CPUs with native bf16), bf16, or off
    compile: bool = False           # torch.compile the prior for training (slow first step, faster after)
    compile_mode: str = "default"   # with --compile: default, reduce-overhead (CUDA graphs) or max-autotune
    # run folder and logging
    out: str = "runs/sample-prior"  # run folder: config.json, metrics.jsonl, checkpoint.pt
    resume: bool = False            # continue from the checkpoint in --out (starts fresh if there is none)
    overwrite: bool = False         # start again in an --out that already holds a run
    log_every: int = 50             # steps between metrics.jsonl records
    eval_every: int = 500           # steps between validations (and checkpoints); the last step always has one
    progress: bool = True           # show a tqdm progress bar
    tensorboard: bool = False       # also write TensorBoard event files into --out (tensorboard --logdir runs)


MODEL_FIELDS = ("arch", "channels", "num_layers", "kernel_size", "dropout", "conditional", "attention", "heads",
                "cond_channels", "cond_blocks", "width", "depth", "class_dropout")
TRANSFORMER_FIELDS = ("width", "depth", "class_dropout")   # shape only a transformer prior
Prior = GatedPixelCNN | TransformerPrior | HierarchicalPrior


# ---------------------------------------------------------------------------------------------------------------
# The codes file's levels


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


# ---------------------------------------------------------------------------------------------------------------
# The model and its checkpoint


def model_args(c: PriorConfig, num_embeddings: int, classes: list[str], levels: int = 1,
               top_num_embeddings: int | None = None, top_shape: tuple[int, int] | None = None) -> dict:
    """The keyword arguments of GatedPixelCNN or TransformerPrior (1 level) or HierarchicalPrior (2) for this config
    and codes file, with "arch" for a transformer (and absent for a PixelCNN, as in checkpoints written before);
    num_embeddings is the (bottom) level's K, top_num_embeddings the top's (None: the same, as HierarchicalPrior
    takes it); top_shape: the (h, w) of the top map (the only map for 1 level), which a transformer's position
    embeddings need."""
    num_classes = len(classes) if c.conditional else 0
    transformer = {"arch": "transformer", "width": c.width, "depth": c.depth, "heads": c.heads,
                   "class_dropout": c.class_dropout if num_classes else 0.0}
    if c.arch == "transformer" and levels == 1:
        return {**transformer, "num_embeddings": num_embeddings, "num_classes": num_classes,
                "shape": list(top_shape), "dropout": c.dropout}
    args = {"num_embeddings": num_embeddings, "num_classes": num_classes,
            "channels": c.channels, "num_layers": c.num_layers, "kernel_size": c.kernel_size, "dropout": c.dropout}
    if c.attention or levels == 2:
        args.update(attention=c.attention, heads=c.heads)
    if levels == 2:
        args.update(cond_channels=c.cond_channels, cond_blocks=c.cond_blocks,
                    top_num_embeddings=top_num_embeddings)
        if c.arch == "transformer":
            args.update(transformer, top_shape=list(top_shape))
    return args


def build_prior(args: dict, levels: int = 1) -> Prior:
    """The prior that `model_args` describes (no "arch": a PixelCNN, as every checkpoint written before)."""
    if levels == 2:
        return HierarchicalPrior(**args)
    if args.get("arch", "pixelcnn") == "transformer":
        args = {k: v for k, v in args.items() if k != "arch"}
        return TransformerPrior(**{("num_layers" if k == "depth" else k): v for k, v in args.items()})
    return GatedPixelCNN(**args)


def prior_arch(ckpt: dict) -> str:
    """pixelcnn or transformer: the arch of a prior checkpoint (for 2 levels the top prior's; before: pixelcnn)."""
    return ckpt["model_args"].get("arch", "pixelcnn")


def save_prior_checkpoint(path: Path, model: Prior, optimizer: torch.optim.Optimizer, step: int, config: PriorConfig,
                          args: dict, codes: dict, elapsed: float, metrics: dict | None = None,
                          device: torch.device | None = None) -> None:
    """Everything `train_prior` needs to continue the run and `load_prior` to rebuild the prior, written
    atomically; `args`: the prior's `model_args`, `codes`: the codes file it is trained on."""
    maps = level_maps(codes, "train")
    atomic_save({
        "format": CHECKPOINT_FORMAT,
        "config": asdict(config),
        "levels": len(maps),
        "model_args": args,
        "classes": list(codes["classes"]),
        "map_shape": list(maps[-1].shape[1:]),                    # the bottom level's for 2 levels
        **({"top_map_shape": list(maps[0].shape[1:])} if len(maps) == 2 else {}),
        "codes": str(Path(config.codes).expanduser().resolve()),
        "vqvae": {"checkpoint": codes["vqvae_checkpoint"], "config": codes["vqvae_config"],
                  "step": codes["vqvae_step"]},
        **training_state(model, optimizer, step, elapsed, metrics, device),
    }, path)


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
    GatedPixelCNN or TransformerPrior, or a HierarchicalPrior for a 2-level checkpoint."""
    ckpt = read_prior_checkpoint(path)
    model = build_prior(ckpt["model_args"], prior_levels(ckpt))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        lines = str(err).splitlines()
        raise CheckpointError(f"{path}: the weights do not match the prior its arguments describe "
                              f"({lines[1].strip() if len(lines) > 1 else err})") from None
    return model.to(device).eval(), config_from_dict(ckpt["config"]), ckpt


def class_labels(choice: str | None, classes: list[str], num: int, conditional: bool) -> torch.Tensor | None:
    """(num,) labels for a conditional prior: `choice` (a class name or index) for all, or 0, 1, 2, ... in turn;
    None for an unconditional prior (where a `choice` is an error)."""
    if not conditional:
        if choice is not None:
            raise ConfigError("--class was given but this prior is not class-conditional "
                              "(its codes file has no classes, or it was trained with --no-conditional)")
        return None
    if choice is None:
        return torch.arange(num) % len(classes)
    if choice in classes:
        return torch.full((num,), classes.index(choice))
    if choice.lstrip("-").isdigit() and 0 <= int(choice) < len(classes):
        return torch.full((num,), int(choice))
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    raise ConfigError(f"--class {choice!r} is neither a class name ({shown}) nor an index from 0 to "
                      f"{len(classes) - 1}")


# ---------------------------------------------------------------------------------------------------------------
# Likelihood of a set of maps


def level_logits(model: Prior, zs: list[torch.Tensor], labels: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The logits of each level for a batch of maps (one per level, top first), each (B, K, h, w); for two levels
    the bottom level's are those of p(z_bottom | z_top, y)."""
    return (model(*zs, labels),) if model.levels == 1 else tuple(model(*zs, labels))


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


def nll_per_map(model: Prior, codes: torch.Tensor, labels: torch.Tensor | None, device: torch.device,
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
