"""Benchmark this repo's VQ-VAE against the straightforward formulation the public PyTorch ports use.

    python benchmarks/bench.py                 # prints a table and a final summary line
    python benchmarks/bench.py --write         # also writes the results into BENCHMARKS.md (with this command and machine)
    python benchmarks/bench.py --quick         # fewer repeats, for a smoke test

The reference ("ref") is the usual port: eager float32, NCHW, the full N x K distance matrix, a one-hot (N, K)
matrix for the codebook lookup and for the EMA statistics (counts = one_hot.sum(0), sums = one_hot.T @ z). It uses
the same Encoder and Decoder modules as this repo (with their in-place ReLUs), so the two differ only in how they
are run, in the optimizer and in the quantizer. "Ours" is models.VQVAE run as train.py runs it: bfloat16 autocast
on CPUs with native bf16 and on CUDA (the quantizer in float32), channels-last activations whenever bf16 is on
(train.use_channels_last), the fused Adam kernel (train.make_optimizer; the reference keeps torch's default Adam),
indexing instead of one-hot matmuls, a chunked nearest-code search.

Every timing is a median over repeats that alternate between the variants being compared, so a slow moment of
the machine hits both. Measured:
- training images/s (forward, backward, Adam step) of the default model at 32x32 and 64x64, batch 32;
- quantizer forward+backward time and peak extra memory at (a) 32x64x8x8, K=512; (b) 32x64x32x32, K=512;
  (c) 16x256x32x32, K=8192. On the CPU the peak is the growth of the process's peak resident memory (VmHWM,
  reset through /proc/self/clear_refs just before the call) over its resident memory then, each case in a fresh
  subprocess; on CUDA it is
  torch.cuda.max_memory_allocated over the memory allocated before the call;
- train.py's end-to-end images/s on the built-in sample (data loading included, validation excluded), against
  the model-only images/s of the same configuration on a fixed batch;
- achieved FLOP/s (FLOPs of one training step counted by torch.utils.flop_counter) against the machine's
  measured matmul peak in the same dtype;
- with --quality-steps N, the validation PSNR of train.py runs of N steps with every default, float32 and bf16,
  for --quality-seeds seeds (the mean difference is the summary: one seed's PSNR moves by a few tenths of a dB
  with the last bits of any sum).
The timed models search their codes in D = 64 dimensions like the reference (not in the default's cosine 4-d
projection), so a speedup comes from how the same computation is run, not from a cheaper model.
On a GPU it also runs 128x128 at batch 128.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root: run from anywhere

from bench_report import machine, peak_extra_bytes, publish
from checkpoint import Config
from models import VQVAE, Decoder, Encoder, VectorQuantizerEMA
from runs import amp_dtype_for, make_optimizer, pick_device, use_channels_last

ROOT = Path(__file__).resolve().parents[1]   # the repository root


# ---------------------------------------------------------------------------------------------------------------
# The reference: the straightforward formulation


class ReferenceVectorQuantizerEMA(nn.Module):
    """The EMA quantizer as most public ports write it: full distance matrix, one-hot matmuls, float32 NCHW."""

    def __init__(self, num_embeddings: int, embedding_dim: int, beta: float = 0.25, decay: float = 0.99,
                 eps: float = 1e-5):
        super().__init__()
        self.K, self.D, self.beta, self.decay, self.eps = num_embeddings, embedding_dim, beta, decay, eps
        embedding = torch.empty(num_embeddings, embedding_dim).uniform_(-(3 / embedding_dim) ** 0.5,
                                                                         (3 / embedding_dim) ** 0.5)
        self.register_buffer("embedding", embedding)
        self.register_buffer("cluster_size", torch.ones(num_embeddings))
        self.register_buffer("embed_sum", embedding.clone())

    def forward(self, z: Tensor):
        z = z.permute(0, 2, 3, 1).contiguous()                                   # (B, D, H, W) -> (B, H, W, D)
        flat = z.view(-1, self.D)                                                # (N, D)
        distances = (flat.pow(2).sum(1, keepdim=True) + self.embedding.pow(2).sum(1)
                     - 2 * flat @ self.embedding.t())                           # (N, K)
        indices = distances.argmin(1)
        one_hot = torch.zeros(flat.shape[0], self.K, device=z.device).scatter_(1, indices[:, None], 1)  # (N, K)
        quantized = (one_hot @ self.embedding).view(z.shape)
        if self.training:
            with torch.no_grad():
                self.cluster_size.mul_(self.decay).add_(one_hot.sum(0), alpha=1 - self.decay)
                self.embed_sum.mul_(self.decay).add_(one_hot.t() @ flat, alpha=1 - self.decay)
                n = self.cluster_size.sum()
                smoothed = (self.cluster_size + self.eps) / (n + self.K * self.eps) * n
                self.embedding.copy_(self.embed_sum / smoothed[:, None])
        loss = self.beta * F.mse_loss(quantized.detach(), z)
        quantized = z + (quantized - z).detach()
        probs = one_hot.mean(0)
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        return quantized.permute(0, 3, 1, 2).contiguous(), loss, perplexity    # (B, D, H, W)


class ReferenceVQVAE(nn.Module):
    def __init__(self, num_embeddings: int = 512, embedding_dim: int = 64):
        super().__init__()
        self.encoder = Encoder(embedding_dim=embedding_dim)
        self.quantizer = ReferenceVectorQuantizerEMA(num_embeddings, embedding_dim)
        self.decoder = Decoder(embedding_dim=embedding_dim)

    def forward(self, x: Tensor):
        quantized, loss, _ = self.quantizer(self.encoder(x))
        return self.decoder(quantized), loss


# ---------------------------------------------------------------------------------------------------------------
# Timing helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, callable], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each fn over `repeats` rounds, the fns taking turns within each round."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class Trainer:
    """One training step of a model on a fixed batch: forward, normalised MSE + VQ loss, backward, Adam."""

    def __init__(self, model: nn.Module, x: Tensor, amp_dtype: torch.dtype | None, channels_last: bool,
                 reference: bool, compile_mode: str | None = None):
        """The reference gets the default torch.optim.Adam, as the public ports use; ours gets train.py's.
        `compile_mode`: None (eager) or a torch.compile mode (reduce-overhead: CUDA graphs)."""
        self.model, self.reference = model, reference
        self.x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(model, mode=compile_mode) if compile_mode else model
        self.ctx = (lambda: torch.autocast(x.device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
        self.opt = (torch.optim.Adam(model.parameters(), lr=2e-4) if reference
                    else make_optimizer(model.parameters(), 2e-4, x.device))

    def loss(self) -> Tensor:
        with self.ctx():
            if self.reference:
                reconstruction, vq_loss = self.forward(self.x)
            else:
                out = self.forward(self.x)
                reconstruction, vq_loss = out.reconstruction, out.vq.loss
            return F.mse_loss(reconstruction.float(), self.x) / 0.06 + vq_loss

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            loss = self.loss()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()


def step_flops(trainer: Trainer) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss = trainer.loss()
        loss.backward()
    trainer.opt.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    t = interleaved({"mm": lambda: a @ b}, repeats, device)["mm"]
    return 2 * n**3 / t


# ---------------------------------------------------------------------------------------------------------------
# The measurements

# The speed figures compare like with like: "ours" searches its codes in D dimensions, as the reference does,
# rather than with the default cosine 4-d lookup (which would make the search cheaper still). It keeps k-means
# initialisation and dead-code restarts, which cost it time the reference does not spend.
SAME_MATH = dict(cosine=False, lookup_dim=0)


def bench_training(device: torch.device, size: int, batch: int, repeats: int, steps_per_repeat: int,
                   compile_model: bool) -> dict:
    amp_dtype = amp_dtype_for("auto", device)
    torch.manual_seed(0)
    x = torch.rand(batch, 3, size, size, device=device) - 0.5
    ref = Trainer(ReferenceVQVAE().to(device), x, None, channels_last=False, reference=True)
    channels_last = use_channels_last(device, amp_dtype)
    ours = Trainer(VQVAE(**SAME_MATH).to(device), x, amp_dtype, channels_last=channels_last, reference=False)
    fns = {"ref": lambda: ref.step(steps_per_repeat), "ours": lambda: ours.step(steps_per_repeat)}
    if compile_model:   # compiled, and on CUDA also captured in CUDA graphs (torch.compile's reduce-overhead)
        for name, mode in [("ours+compile", "default")] + ([("ours+graphs", "reduce-overhead")]
                                                          if device.type == "cuda" else []):
            trainer = Trainer(VQVAE(**SAME_MATH).to(device), x, amp_dtype, channels_last=channels_last,
                              reference=False, compile_mode=mode)
            trainer.step(3)   # compile (and record the graphs) outside the timing
            fns[name] = lambda trainer=trainer: trainer.step(steps_per_repeat)
    for fn in fns.values():
        fn()         # warm-up
    t = interleaved(fns, repeats, device)
    result = {"size": size, "batch": batch, "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off"}
    for name, seconds in t.items():
        result[f"{name}_images_per_s"] = batch * steps_per_repeat / seconds
    result["speedup"] = result["ours_images_per_s"] / result["ref_images_per_s"]
    result["flops_per_step"] = step_flops(ours)
    return result


QUANTIZER_CASES = {"a": (32, 64, 8, 8, 512), "b": (32, 64, 32, 32, 512), "c": (16, 256, 32, 32, 8192)}


def quantizer_call(kind: str, case: str, device: torch.device):
    """A function doing one forward+backward of the quantizer on the case's input (inputs made beforehand)."""
    B, D, H, W, K = QUANTIZER_CASES[case]
    torch.manual_seed(0)
    vq = (ReferenceVectorQuantizerEMA(K, D) if kind == "ref" else VectorQuantizerEMA(K, D)).to(device)
    z = torch.randn(B, D, H, W, device=device, requires_grad=True)
    w = torch.randn(B, D, H, W, device=device)

    def call():
        out = vq(z)
        quantized, loss = (out[0], out[1]) if kind == "ref" else (out.quantized, out.loss)
        ((quantized * w).sum() + loss).backward()
        z.grad = None
    return call


def quantizer_peak_memory(kind: str, case: str, device: torch.device) -> int:
    """Peak extra bytes of one forward+backward, measured in a fresh process on the CPU."""
    return peak_extra_bytes(device, lambda: quantizer_call(kind, case, device),
                            f"import bench; print(bench._peak_rss_child({kind!r}, {case!r}))")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_rss_child(kind: str, case: str) -> int:
    """In a fresh process: reset the kernel's peak-RSS mark (VmHWM), make the call, read the peak's growth."""
    call = quantizer_call(kind, case, torch.device("cpu"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                   # Linux: reset VmHWM to the current resident size
    before = _status_kb("VmRSS")
    call()
    return (_status_kb("VmHWM") - before) * 1024


def bench_quantizers(device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for case in QUANTIZER_CASES:
        fns = {kind: quantizer_call(kind, case, device) for kind in ("ref", "ours")}
        for fn in fns.values():
            fn()
        t = interleaved(fns, repeats, device)
        mem = {kind: quantizer_peak_memory(kind, case, device) for kind in ("ref", "ours")}
        rows.append({"case": case, "shape": "x".join(map(str, QUANTIZER_CASES[case][:4])),
                     "K": QUANTIZER_CASES[case][4], "ref_ms": 1000 * t["ref"], "ours_ms": 1000 * t["ours"],
                     "speedup": t["ref"] / t["ours"], "ref_peak_mb": mem["ref"] / 2**20,
                     "ours_peak_mb": mem["ours"] / 2**20, "memory_ratio": mem["ours"] / max(mem["ref"], 1)})
    return rows


def bench_end_to_end(device: torch.device, steps: int, model_only_images_per_s: float) -> dict:
    """train.py's own loop on the sample data, against the model-only rate of the same model and settings."""
    from train import train

    with tempfile.TemporaryDirectory() as out:
        config = Config(steps=steps, out=out, eval_every=10**9, log_every=max(1, steps // 5), progress=False,
                        device=str(device), batch_size=32, **SAME_MATH)   # the batch of the model-only figure
        result = train(config)
    rates = [r["images_per_s"] for r in result.history[1:]]   # the first block includes warm-up
    e2e = statistics.median(rates)
    return {"steps": steps, "end_to_end_images_per_s": e2e, "model_only_images_per_s": model_only_images_per_s,
            "ratio": e2e / model_only_images_per_s}


def bench_quality(device: torch.device, steps: int, seeds: int = 1) -> dict:
    """Validation PSNR of train.py runs of `steps` steps with every default, float32 and bf16, for seeds 0..seeds-1.

    One run's PSNR after a short training moves by a few tenths of a dB with the last bits of any sum (the codebook
    restarts and the argmin make training chaotic), so the precision's own effect is the mean over seeds of the
    per-seed difference."""
    from train import train

    runs = []
    for seed in range(seeds):
        row = {"seed": seed}
        for amp in ("off", "auto"):
            with tempfile.TemporaryDirectory() as folder:
                start = time.perf_counter()
                r = train(Config(steps=steps, out=folder, progress=False, device=str(device), amp=amp, seed=seed))
                row[amp] = {"val_psnr": r.final["psnr"], "codebook_usage": r.final["codebook_usage"],
                            "seconds": time.perf_counter() - start}
        row["psnr_difference_db"] = row["auto"]["val_psnr"] - row["off"]["val_psnr"]
        runs.append(row)
    return {"runs": runs, "psnr_difference_db": statistics.mean(r["psnr_difference_db"] for r in runs)}


# ---------------------------------------------------------------------------------------------------------------
# Report


def report(results: dict) -> str:
    lines = [f"Machine: {results['machine']}; device {results['device']}; {results['threads']} threads.", ""]
    lines += ["| training (batch, size) | amp | ref images/s | ours images/s | speedup | ours+compile images/s "
              "| ours+graphs images/s | best / ref | achieved FLOP/s | of matmul peak |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["training"]:
        best = max(v for k, v in r.items() if k.startswith("ours") and k.endswith("_images_per_s"))
        achieved = r["flops_per_step"] * best / r["batch"]   # the fastest of ours
        peak = results["matmul_peak"][r["amp"]]
        compiled = f"{r['ours+compile_images_per_s']:.0f}" if "ours+compile_images_per_s" in r else "-"
        graphs = f"{r['ours+graphs_images_per_s']:.0f}" if "ours+graphs_images_per_s" in r else "-"
        amp = r["amp"]
        if amp == "off" and results["device"].startswith("cuda"):   # cuDNN's default for float32 convolutions
            amp = "off (TF32 convolutions)" if torch.backends.cudnn.allow_tf32 else "off"
        lines.append(f"| {r['batch']} x {r['size']}x{r['size']} | {amp} | {r['ref_images_per_s']:.0f} | "
                     f"{r['ours_images_per_s']:.0f} | {r['speedup']:.2f}x | {compiled} | {graphs} | "
                     f"{best / r['ref_images_per_s']:.2f}x | {achieved / 1e9:.0f} G | "
                     f"{achieved / peak:.0%} |")
    lines += ["", "Reference FLOP/s: the float32 reference reaches "
              + ", ".join(f"{r['flops_per_step'] * r['ref_images_per_s'] / r['batch'] / 1e9:.0f} GFLOP/s at "
                          f"{r['size']}x{r['size']}" for r in results["training"])
              + f" (float32 matmul peak {results['matmul_peak']['off'] / 1e9:.0f} GFLOP/s, bf16 "
              f"{results['matmul_peak'].get('bfloat16', float('nan')) / 1e9:.0f} GFLOP/s).", ""]
    lines += ["| quantizer (B x D x H x W, K) | ref ms | ours ms | speedup | ref peak MB | ours peak MB "
              "| memory ratio |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for q in results["quantizer"]:
        lines.append(f"| ({q['case']}) {q['shape']}, K={q['K']} | {q['ref_ms']:.1f} | {q['ours_ms']:.1f} | "
                     f"{q['speedup']:.2f}x | {q['ref_peak_mb']:.0f} | {q['ours_peak_mb']:.0f} | "
                     f"{q['memory_ratio']:.2f} |")
    e = results.get("end_to_end")
    if e:
        lines += ["", f"train.py end to end on the sample ({e['steps']} steps, data loading included): "
                  f"{e['end_to_end_images_per_s']:.0f} images/s = {e['ratio']:.0%} of the model-only "
                  f"{e['model_only_images_per_s']:.0f} images/s."]
    q = results.get("quality")
    if q:
        lines += ["", f"Validation PSNR after {results['quality_steps']} steps on the sample, every default, float32 "
                  "against bf16 (seconds of each run in brackets):", "",
                  "| seed | float32 | bf16 | bf16 - float32 |", "| --- | --- | --- | --- |"]
        for r in q["runs"]:
            lines.append(f"| {r['seed']} | {r['off']['val_psnr']:.2f} dB ({r['off']['seconds']:.0f} s) | "
                         f"{r['auto']['val_psnr']:.2f} dB ({r['auto']['seconds']:.0f} s) | "
                         f"{r['psnr_difference_db']:+.2f} dB |")
        lines.append(f"| mean | {statistics.mean(r['off']['val_psnr'] for r in q['runs']):.2f} dB | "
                     f"{statistics.mean(r['auto']['val_psnr'] for r in q['runs']):.2f} dB | "
                     f"{q['psnr_difference_db']:+.2f} dB |")
    return "\n".join(lines)


def summary(results: dict) -> str:
    parts = [f"train {r['size']}x{r['size']} {r['speedup']:.2f}x" for r in results["training"]]
    parts += [f"quantizer ({q['case']}) {q['speedup']:.2f}x time, {q['memory_ratio']:.2f}x memory"
              for q in results["quantizer"]]
    if results.get("end_to_end"):
        parts.append(f"end-to-end {results['end_to_end']['ratio']:.0%} of model-only")
    if results.get("quality"):
        parts.append(f"bf16 PSNR {results['quality']['psnr_difference_db']:+.2f} dB vs fp32 "
                     f"(mean of {len(results['quality']['runs'])} seeds)")
    return "summary: " + "; ".join(parts)


def done(section: str, value):
    """Print one finished section's raw figures as a JSON line at once (a run stopped by a time limit keeps them)."""
    print(json.dumps({section: value}, default=str), flush=True)
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats per timing (median)")
    p.add_argument("--steps-per-repeat", type=int, default=5)
    p.add_argument("--e2e-steps", type=int, default=300, help="train.py steps for the end-to-end figure (0: skip)")
    p.add_argument("--quality-steps", type=int, default=0, help="steps of the fp32-vs-bf16 PSNR comparison")
    p.add_argument("--quality-seeds", type=int, default=1, help="seeds of that comparison (their mean is reported)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--quick", action="store_true", help="3 repeats, 2 steps each, 30 end-to-end steps")
    p.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    p.add_argument("--json", default=None, help="also save the raw results to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps_per_repeat, args.e2e_steps = 3, 2, 30
    device = pick_device(args.device)
    results: dict = {"machine": machine(), "device": str(device), "threads": torch.get_num_threads()}
    # (batch, size): on a GPU, 64x64 batch 32, 128x128 batch 128 and 256x256 batch 64
    sizes = [(32, 64), (128, 128), (64, 256)] if device.type == "cuda" else [(32, 32), (32, 64)]
    if args.compile:   # every compiled model is a new instance, and each one's guards count against this limit
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    results["training"] = [done("training", bench_training(device, size, batch, args.repeats, args.steps_per_repeat,
                                                           args.compile)) for batch, size in sizes]
    results["matmul_peak"] = {"off": done("matmul_peak float32", matmul_peak(device, torch.float32, args.repeats))}
    if amp_dtype_for("auto", device) is not None:
        results["matmul_peak"]["bfloat16"] = done("matmul_peak bfloat16",
                                                  matmul_peak(device, torch.bfloat16, args.repeats))
    results["quantizer"] = done("quantizer", bench_quantizers(device, args.repeats))
    if args.e2e_steps:
        model_only = next(r for r in results["training"] if r["size"] == 64)["ours_images_per_s"]
        results["end_to_end"] = done("end_to_end", bench_end_to_end(device, args.e2e_steps, model_only))
    if args.quality_steps:
        results["quality_steps"] = args.quality_steps
        results["quality"] = done("quality", bench_quality(device, args.quality_steps, args.quality_seeds))
    text = report(results)
    print(text)
    print(summary(results))
    publish("bench.py", "Speed: `bench.py`", argv, text + "\n\n" + summary(results), args.write, args.json,
            results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
