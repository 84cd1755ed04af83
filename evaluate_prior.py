"""Evaluate a trained prior (gated PixelCNN or transformer): the validation NLL of the codes, a unigram baseline, and
an upper bound on the images' bits per dimension (arXiv 1711.00937, section 3.2; the prior of arXiv 1606.05328).

    python evaluate_prior.py --checkpoint runs/sample-prior/checkpoint.pt [--time-sampling]

The method, step by step:

1. Prior NLL: -log p(z | y) of every validation code map in the prior's codes file (the VQ-VAE's codes of the
   validation images, un-augmented), averaged over codes: nats per code, and bits per code = nats / ln 2.
2. Unigram baseline: p_uni(k) = (n_k + 1) / (N + K), the codes' own frequencies counted over the TRAINING maps
   (add-one smoothing, so a code never seen in training keeps a non-zero probability), evaluated as a cross-entropy
   on the VALIDATION codes, -mean_ij log p_uni(z_ij). For reference the entropy of the validation codes' own
   frequencies is printed too: no position-independent model does better on them, even one fitted to them. The
   report gives how far the prior's NLL lies below the unigram baseline, in % (`reduction_vs_unigram`).
3. Bits per dimension. An image x has D = 3 * H * W dimensions of 256 levels; z = encode(x) is its code map. Since
   p(x) = sum_z' p(x | z') p(z') >= p(x | z) p(z), which is the ELBO of section 3.2 with the encoder's one-hot
   posterior (entropy zero),
       bits/dim(x) = -log2 p(x) / D  <=  ( NLL_prior(z) + NLL_decoder(x | z) ) / (D ln 2),
   with both NLLs in nats per image, averaged over the validation images. The decoder likelihood p(x | z) treats the
   D values as independent Gaussians whose mean is the decoder's output in pixel units, 255 * (decode(z) + 0.5),
   with one scale sigma for all, discretised to the 256 levels (level 0 takes the tail below 0.5, level 255 the
   tail above 254.5). The Gaussian is the likelihood the VQ-VAE's MSE objective assumes; sigma is fitted by maximum
   likelihood on the TRAINING images (one un-augmented pass over all of them, or over an evenly spaced subset
   holding at most 2000 x 3 x 64 x 64 pixel values, so the fit's memory stays bounded at large sizes) and evaluated
   on the VALIDATION images. The bound is
   printed for three priors with the same decoder term: uniform (ln K nats per code, what the VQ-VAE's training
   assumes), unigram, and the trained prior (keyed by its arch, "pixelcnn" or "transformer"; `arch` names it).

The last line printed is one JSON object with every number. --time-sampling adds the median time of drawing 16 maps
(the prior's map size) over --runs runs, after one warm-up run.

A 2-level prior (hierarchical_prior.HierarchicalPrior over a VQ-VAE-2's top and bottom maps, arXiv 1906.00446) is
reported level by level: under "top" and "bottom", each level's NLL per code (the bottom level's given the top map),
its own unigram baseline and entropy, as in steps 1 and 2; then per image, -log p(z_top, z_bottom | y) = the two
levels' NLLs summed, in nats, against the sum of the two unigram baselines per image (and the % below it); and the
bits/dim bound of step 3 with z = (z_top, z_bottom): NLL_prior(z) is both levels' NLL and the decoder term uses
decode((top, bottom)). The keys of a 1-level report are unchanged.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings

import torch
from torch import Tensor

from checkpoint import config_from_dict, load_vqvae_for
from extract_codes import read_codes
from image_data import build_data, eval_loader
from pixels import to_image_scale, to_model_scale
from prior_checkpoint import (class_labels, code_levels, level_maps, load_prior, nll_metrics, nll_per_level,
                              nll_per_map, prior_arch, prior_levels)
from runs import CheckpointError, pick_device, require_at_least, run_cli, script_parser

# ---------------------------------------------------------------------------------------------------------------
# Unigram baseline


def unigram_cross_entropy(train_codes: Tensor, val_codes: Tensor, num_embeddings: int) -> float:
    """-mean log p_uni(z) over `val_codes`, p_uni = add-one-smoothed frequencies of `train_codes`; nats per code."""
    counts = torch.bincount(train_codes.flatten().long(), minlength=num_embeddings).double() + 1.0   # (K,)
    log_p = counts.log() - counts.sum().log()
    return -log_p[val_codes.flatten().long()].mean().item()


def empirical_entropy(codes: Tensor, num_embeddings: int) -> float:
    """Entropy (nats) of the frequency distribution of `codes` itself."""
    p = torch.bincount(codes.flatten().long(), minlength=num_embeddings).double()
    p = p / p.sum()
    return -torch.special.xlogy(p, p).sum().item()


# ---------------------------------------------------------------------------------------------------------------
# Decoder likelihood: a discretised Gaussian over the 256 levels


def discretized_gaussian_log_prob(x: Tensor, mean: Tensor, sigma: float) -> Tensor:
    """log P(x | mean, sigma) for integer levels x in 0..255 of a Gaussian N(mean, sigma^2) (pixel units)
    discretised to the bins [x - 0.5, x + 0.5], level 0 taking (-inf, 0.5] and level 255 [254.5, inf); float64.

    P = Phi(b) - Phi(a) with a = (x - 0.5 - mean) / sigma, b = (x + 0.5 - mean) / sigma; computed as
    log Phi(b) + log(1 - Phi(a) / Phi(b)), after reflecting (a, b) -> (-b, -a) where a > 0 so that the arguments
    stay in the accurate left tail of log_ndtr."""
    x, mean = x.double(), mean.double()
    a = torch.where(x <= 0, -math.inf, (x - 0.5 - mean) / sigma)
    b = torch.where(x >= 255, math.inf, (x + 0.5 - mean) / sigma)
    flip = a > 0
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_b + torch.log1p(-torch.exp(log_a - log_b))


def fit_sigma(x: Tensor, mean: Tensor, low: float = 0.05, high: float = 255.0, iterations: int = 40) -> float:
    """The sigma of maximum likelihood, by golden-section search on log sigma in [low, high]."""
    def nll(log_sigma: float) -> float:
        return -discretized_gaussian_log_prob(x, mean, math.exp(log_sigma)).sum().item()

    lo, hi = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fc, fd = nll(c), nll(d)
    for _ in range(iterations):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - ratio * (hi - lo)
            fc = nll(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + ratio * (hi - lo)
            fd = nll(d)
    return math.exp((lo + hi) / 2)


@torch.no_grad()
def decoder_means(vqvae, images: Tensor, device: torch.device) -> tuple[list[Tensor], Tensor]:
    """uint8 images (B, 3, S, S) -> (the code maps of each level, top first: [(B, S/4, S/4)] or [(B, S/8, S/8),
    (B, S/4, S/4)], decoder means in pixel units (B, 3, S, S) float64), CPU."""
    codes = vqvae.encode(to_model_scale(images.to(device).float().div(255)))
    mean = to_image_scale(vqvae.decode(codes).double(), clamp=False) * 255
    return [c.cpu() for c in ([codes] if vqvae.levels == 1 else codes)], mean.cpu()


CODE_MISMATCH_LIMIT = 0.01   # above this fraction of differing codes the codes file is not this VQ-VAE's


def check_codes_agree(differ: int, positions: int, limit: float = CODE_MISMATCH_LIMIT) -> None:
    """The validation images, encoded again here, must give the codes file's maps. A few positions may differ:
    codes extracted on one device (or with other kernels) and encoded again on another can flip where two codes
    are nearly equally near. Below `limit` of all positions: a warning that says how many; above: stop."""
    fraction = differ / max(positions, 1)
    if fraction > limit:
        raise CheckpointError(f"the validation images no longer encode to the codes in the prior's codes file "
                              f"({fraction:.1%} of the codes differ; the data or the VQ-VAE changed): run "
                              f"extract_codes.py again")
    if differ:
        warnings.warn(f"{differ} of {positions} validation codes ({fraction:.3%}) differ from the codes file "
                      f"(near-ties decided differently on this device); the decoder term uses the codes computed "
                      f"here", stacklevel=2)


FIT_VALUES = 2000 * 3 * 64 * 64   # sigma's fit holds at most this many pixel values: 2000 images at 64 px


def fit_subset(train: torch.utils.data.Dataset, values_per_image: int, max_values: int = FIT_VALUES) -> list[int]:
    """Evenly spaced indices of the training images sigma is fitted on: all of them, or as many as hold at most
    `max_values` pixel values (at least one), so the fit's memory (9 bytes a value) stays bounded at any size."""
    count = max(1, min(len(train), max_values // values_per_image))
    return [i * len(train) // count for i in range(count)]


def decoder_term(vqvae, vq_config, data: str, val_maps: list[Tensor], device: torch.device,
                 max_fit_values: int = FIT_VALUES, batch_size: int = 64) -> dict:
    """The decoder's NLL -ln p(x | z) in nats per validation image of `data`, with sigma fitted on (an evenly
    spaced subset of, see fit_subset) its training images; `val_maps`: the codes file's validation maps of each
    level, top first, which z must equal."""
    splits = build_data(data, vq_config.image_size, vq_config.data_root, download=False,
                        val_fraction=vq_config.val_fraction, prepared_dir=vq_config.prepared_dir)
    # fit sigma on the training split, un-augmented
    indices = fit_subset(splits.train, 3 * vq_config.image_size ** 2, max_fit_values)
    subset = torch.utils.data.Subset(splits.train, indices)
    xs, means = [], []
    for images, _ in eval_loader(subset, batch_size):
        if len(images):
            _, mean = decoder_means(vqvae, images, device)
            xs.append(images)
            means.append(mean)
    sigma = fit_sigma(torch.cat(xs), torch.cat(means))
    # evaluate on the validation split, whose codes must be the codes file's (up to near-ties, see below)
    total, count, dims, start, differ, positions = 0.0, 0, 0, 0, 0, 0
    for images, _ in eval_loader(splits.val, batch_size):
        if not len(images):
            continue
        codes, mean = decoder_means(vqvae, images, device)
        for level, maps in zip(codes, val_maps):
            stored = maps[start:start + len(images)].long()
            if level.shape != stored.shape:
                raise CheckpointError("the validation images no longer encode to code maps of the codes file's "
                                      "shape (the data or the VQ-VAE changed): run extract_codes.py again")
            differ += int((level != stored).sum())
            positions += level.numel()
        start += len(images)
        total -= discretized_gaussian_log_prob(images, mean, sigma).sum().item()
        count += len(images)
        dims = images[0].numel()
    if start != len(val_maps[0]):
        raise CheckpointError(f"the validation split has {start} images but the codes file {len(val_maps[0])} maps: "
                              f"run extract_codes.py again")
    check_codes_agree(differ, positions)
    return {"sigma": sigma, "nats_per_image": total / count, "dims": dims, "num_images": count,
            "fit_images": len(subset)}


# ---------------------------------------------------------------------------------------------------------------
# The report


def sampling_time(prior, shape: tuple[int, int], num: int = 16, runs: int = 5, labels: Tensor | None = None) -> dict:
    """Median and all wall-clock times (seconds) of `prior.sample(num, shape)`, after one warm-up run (for a 2-level
    prior `shape` is the bottom map's, and both levels are drawn)."""
    device = next(prior.parameters()).device

    def once(seed: int) -> float:
        generator = torch.Generator(device=device).manual_seed(seed)
        start = time.perf_counter()
        prior.sample(num, shape, labels=labels, generator=generator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once(0)
    times = [once(seed) for seed in range(1, runs + 1)]
    return {"num": num, "shape": list(shape), "median_s": statistics.median(times), "times_s": times,
            "device": str(device)}


def bits_per_dim_terms(dec: dict, nats_per_image: dict) -> dict:
    """The report's decoder fields and the bits/dim bound for each prior's NLL per image (nats) in `nats_per_image`."""
    scale = 1 / (dec["dims"] * math.log(2))                           # nats per image -> bits per dimension
    out = {"decoder_sigma": dec["sigma"], "decoder_nats_per_image": dec["nats_per_image"],
           "decoder_bits_per_dim": dec["nats_per_image"] * scale, "dims_per_image": dec["dims"],
           "sigma_fit_images": dec["fit_images"],
           "bpd_prior_term": {name: nats * scale for name, nats in nats_per_image.items()}}
    out["bits_per_dim_bound"] = {name: term + out["decoder_bits_per_dim"]
                                 for name, term in out["bpd_prior_term"].items()}
    return out


def evaluate_prior(checkpoint: str, device: torch.device, bits_per_dim: bool = True, time_runs: int = 0,
                   vqvae: str | None = None) -> dict:
    """Everything the module docstring lists, as one dict (see `print_report`); `vqvae`: the VQ-VAE checkpoint of
    the decoder term (default: the one the prior names)."""
    prior, _, ckpt = load_prior(checkpoint, device)
    codes = read_codes(ckpt["codes"])
    if code_levels(codes) != prior_levels(ckpt):
        raise CheckpointError(f"the prior models {prior_levels(ckpt)}-level codes but its codes file {ckpt['codes']} "
                              f"now holds {code_levels(codes)}-level codes (extracted again from another VQ-VAE): "
                              f"extract the codes of the VQ-VAE the prior was trained on again, or train a new prior")
    if prior_levels(ckpt) == 2:
        return evaluate_two_levels(prior, ckpt, codes, checkpoint, device, bits_per_dim, time_runs, vqvae)
    k, (h, w) = ckpt["model_args"]["num_embeddings"], ckpt["map_shape"]
    conditional = prior.num_classes > 0
    val_codes = codes["val_codes"]
    nll = nll_per_map(prior, val_codes, codes["val_labels"] if conditional else None, device)   # (N,) nats
    prior_nats = nll_metrics(nll, h * w)["nll_nats"]
    unigram = unigram_cross_entropy(codes["train_codes"], val_codes, k)
    report = {
        "checkpoint": checkpoint, "codes": ckpt["codes"], "step": ckpt["step"], "arch": prior_arch(ckpt),
        "num_embeddings": k,
        "map_shape": [h, w], "val_maps": len(val_codes), "train_maps": len(codes["train_codes"]),
        "prior_nats_per_code": prior_nats, "prior_bits_per_code": prior_nats / math.log(2),
        "unigram_nats_per_code": unigram, "unigram_bits_per_code": unigram / math.log(2),
        "val_entropy_nats_per_code": empirical_entropy(val_codes, k),
        "uniform_nats_per_code": math.log(k),
        "reduction_vs_unigram": 1 - prior_nats / unigram,
    }
    if bits_per_dim:
        dec = decoder_term(load_vqvae_for(ckpt, device, vqvae), config_from_dict(ckpt["vqvae"]["config"]),
                           codes["data"], [val_codes], device)
        priors = (("uniform", math.log(k)), ("unigram", unigram), (prior_arch(ckpt), prior_nats))
        report.update(bits_per_dim_terms(dec, {name: nats * h * w for name, nats in priors}))
    if time_runs:
        labels = class_labels(None, ckpt["classes"], 16, conditional)
        report["sampling"] = sampling_time(prior, (h, w), 16, time_runs, labels)
    return report


def evaluate_two_levels(prior, ckpt: dict, codes: dict, checkpoint: str, device: torch.device, bits_per_dim: bool,
                        time_runs: int, vqvae: str | None = None) -> dict:
    """`evaluate_prior` for a 2-level prior: each level's numbers under "top" and "bottom", then per image."""
    k, (h, w) = ckpt["model_args"]["num_embeddings"], ckpt["map_shape"]
    ks = (prior.top_num_embeddings, k)   # K of each level, top first
    conditional = prior.num_classes > 0
    train_maps, val_maps = level_maps(codes, "train"), level_maps(codes, "val")
    nlls = nll_per_level(prior, val_maps, codes["val_labels"] if conditional else None, device)   # (N,) per level
    report = {"checkpoint": checkpoint, "codes": ckpt["codes"], "step": ckpt["step"], "levels": 2,
              "arch": prior_arch(ckpt), "num_embeddings": k,
              "num_embeddings_top": ks[0], "map_shape": [h, w], "top_map_shape": list(val_maps[0].shape[1:]),
              "val_maps": len(val_maps[0]), "train_maps": len(train_maps[0])}
    for name, nll, train, val, k_level in zip(("top", "bottom"), nlls, train_maps, val_maps, ks):
        n = val.shape[1] * val.shape[2]
        prior_nats, unigram = nll_metrics(nll, n)["nll_nats"], unigram_cross_entropy(train, val, k_level)
        report[name] = {"codes_per_map": n, "prior_nats_per_code": prior_nats,
                        "prior_bits_per_code": prior_nats / math.log(2), "unigram_nats_per_code": unigram,
                        "unigram_bits_per_code": unigram / math.log(2),
                        "val_entropy_nats_per_code": empirical_entropy(val, k_level),
                        "uniform_nats_per_code": math.log(k_level),
                        "reduction_vs_unigram": 1 - prior_nats / unigram}
    per_image = {name: sum(report[level][f"{name}_nats_per_code"] * report[level]["codes_per_map"]
                           for level in ("top", "bottom")) for name in ("prior", "unigram")}
    report.update({"prior_nats_per_image": per_image["prior"], "unigram_nats_per_image": per_image["unigram"],
                   "uniform_nats_per_image": sum(report[level]["uniform_nats_per_code"] *
                                                 report[level]["codes_per_map"] for level in ("top", "bottom")),
                   "reduction_vs_unigram": 1 - per_image["prior"] / per_image["unigram"]})
    if bits_per_dim:
        dec = decoder_term(load_vqvae_for(ckpt, device, vqvae), config_from_dict(ckpt["vqvae"]["config"]),
                           codes["data"], val_maps, device)
        report.update(bits_per_dim_terms(dec, {"uniform": report["uniform_nats_per_image"],
                                               "unigram": per_image["unigram"], prior_arch(ckpt): per_image["prior"]}))
    if time_runs:
        labels = class_labels(None, ckpt["classes"], 16, conditional)
        report["sampling"] = sampling_time(prior, (h, w), 16, time_runs, labels)
    return report


ROWS = (("uniform (ln K)", "uniform"), ("unigram (train freq., on val)", "unigram"),
        ("val codes' own entropy", "val_entropy"), ("gated PixelCNN", "prior"))
NAMES = {"pixelcnn": "PixelCNN", "transformer": "transformer"}   # the prior's name in the printed report


def rows(r: dict) -> tuple:
    """ROWS, the last one named by the report's prior (for 2 levels its top prior; the bottom is a PixelCNN)."""
    arch = r.get("arch", "pixelcnn")
    name = "gated PixelCNN" if arch == "pixelcnn" else ("transformer" if r.get("levels", 1) == 1 else
                                                        "transformer top, PixelCNN bottom")
    return (*ROWS[:-1], (name, "prior"))


def print_levels(r: dict) -> None:
    """The NLL table of a 2-level report: each level's nats per code, then both levels per image."""
    top, bottom = r["top_map_shape"], r["map_shape"]
    print(f"prior {r['checkpoint']} (step {r['step']}), top {top[0]}x{top[1]} code maps of K = "
          f"{r['num_embeddings_top']} and bottom {bottom[0]}x{bottom[1]} of K = {r['num_embeddings']}; "
          f"{r['train_maps']} training and {r['val_maps']} validation images")
    print("validation NLL of the codes          top nats/code  bottom nats/code (given the top map)")
    for name, key in rows(r):
        nats = [r[level][f"{key}_nats_per_code"] for level in ("top", "bottom")]
        print(f"  {name:34s} {nats[0]:13.4f}  {nats[1]:16.4f}")
    print(f"per image, both levels: {NAMES[r.get('arch', 'pixelcnn')]} {r['prior_nats_per_image']:.2f} nats, unigram "
          f"{r['unigram_nats_per_image']:.2f} nats: {r['reduction_vs_unigram']:.1%} lower")


def print_report(r: dict) -> None:
    if r.get("levels", 1) == 2:
        print_levels(r)
    else:
        print(f"prior {r['checkpoint']} (step {r['step']}), K = {r['num_embeddings']}, {r['map_shape'][0]}x"
              f"{r['map_shape'][1]} code maps; {r['train_maps']} training and {r['val_maps']} validation maps")
        print("validation NLL of the codes          nats/code  bits/code")
        for name, key in rows(r):
            nats = r[f"{key}_nats_per_code"]
            print(f"  {name:34s} {nats:9.4f}  {nats / math.log(2):9.4f}")
        print(f"{NAMES[r.get('arch', 'pixelcnn')]} vs unigram: {r['reduction_vs_unigram']:.1%} lower")
    if "bits_per_dim_bound" in r:
        print(f"decoder term: discretised Gaussian, sigma = {r['decoder_sigma']:.3f} levels (fitted on "
              f"{r['sigma_fit_images']} training images): {r['decoder_bits_per_dim']:.4f} bits/dim")
        print("bits/dim upper bound = (NLL_prior(z) + NLL_decoder(x|z)) / (D ln 2), D = "
              f"{r['dims_per_image']}:")
        for name in ("uniform", "unigram", r.get("arch", "pixelcnn")):
            print(f"  prior {name:9s} {r['bpd_prior_term'][name]:.4f} + {r['decoder_bits_per_dim']:.4f} = "
                  f"{r['bits_per_dim_bound'][name]:.4f} bits/dim")
    if "sampling" in r:
        s = r["sampling"]
        where = "cpu (one thread, as sample() runs there)" if s["device"] == "cpu" else s["device"]
        maps = "bottom maps (with their top maps)" if r.get("levels", 1) == 2 else "maps"
        print(f"sampling {s['num']} {maps} of {s['shape'][0]}x{s['shape'][1]} on {where}: "
              f"median {s['median_s']:.2f} s of {len(s['times_s'])} runs")


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__, "checkpoint.pt of a prior run (train_prior.py)")
    parser.add_argument("--no-bits-per-dim", dest="bits_per_dim", action="store_false",
                        help="skip the decoder term (needs the VQ-VAE and the images)")
    parser.add_argument("--time-sampling", action="store_true", help="also time sampling 16 maps")
    parser.add_argument("--runs", type=int, default=5, help="timed sampling runs (median reported)")
    parser.add_argument("--vqvae", default=None, help="the VQ-VAE checkpoint of the decoder term (default: the one "
                                                      "the prior names)")
    args = parser.parse_args(argv)
    return run_cli(lambda: report(args))


def report(args: argparse.Namespace) -> int:
    """evaluate_prior.py's body: the report as text, then as one JSON object on the last line."""
    require_at_least("runs", args.runs)
    result = evaluate_prior(args.checkpoint, pick_device(args.device), args.bits_per_dim,
                            args.runs if args.time_sampling else 0, args.vqvae)
    print_report(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
