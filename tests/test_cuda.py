"""The CUDA path: skipped where CUDA is absent (every CPU-only machine, CI included). `benchmarks/gpu_checks.sh` runs these on a
GPU machine together with a short train/evaluate run, torchrun with NCCL and bench.py's GPU section.

Written for the GPU machines' own torch (2.11 and later) as well as the pinned 2.14.1."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import device_data
import evaluate
import image_data
import resume_check
import runs
import train
from checkpoint import Config, load_checkpoint
from codebook import nearest_code
from models import VQVAE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


def small(out, **kw) -> Config:
    c = Config(data="sample", image_size=32, steps=60, batch_size=16, hidden_channels=32, residual_channels=16,
               num_residual_blocks=1, embedding_dim=16, num_embeddings=64, eval_every=30, log_every=10, lr=1e-3,
               out=str(out), progress=False, device="cuda", num_workers=0)
    return replace(c, **kw)


def test_nearest_codes_on_cuda_equal_a_float64_brute_force():
    g = torch.Generator().manual_seed(0)
    flat, codebook = torch.randn(5000, 16, generator=g), torch.randn(512, 16, generator=g)
    distances = torch.cdist(flat.double(), codebook.double())                         # (N, K) float64
    ours = nearest_code(flat.to(CUDA), codebook.to(CUDA)).cpu()
    best = distances.min(1).values
    chosen = distances.gather(1, ours[:, None])[:, 0]
    assert torch.all(chosen <= best + 1e-5)                    # the chosen code is nearest up to float32 ties
    assert (ours == distances.argmin(1)).float().mean() > 0.999


def test_a_short_bf16_channels_last_fused_adam_run_learns_and_stays_finite(tmp_path):
    assert runs.amp_dtype_for("auto", CUDA) == torch.bfloat16 and runs.use_channels_last(CUDA, torch.bfloat16)
    # 200 steps after a 20-step warm-up: on the CPU in float32 this configuration ends at 0.33-0.37 of its first
    # logged loss (seeds 0 and 1); at 60 steps inside the default 100-step warm-up it had not learned yet, on the CPU
    # as on an H200 (whose losses matched the CPU's to two decimals)
    result = train.train(small(tmp_path / "run", steps=200, eval_every=200, log_every=20, warmup_steps=20))
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < 0.7 * losses[0], losses
    for name, buffer in result.model.quantizer.state_dict().items():
        assert torch.isfinite(buffer.float()).all(), name
    assert result.final["codebook_usage"] > 0.05 and np.isfinite(result.final["psnr"])


def _eager_and_compiled(dtype):
    """Two copies of one k-means-initialised model, the second torch.compile'd; the input batch."""
    torch.manual_seed(0)
    kw = dict(hidden_channels=32, residual_channels=16, num_residual_blocks=1, embedding_dim=16, num_embeddings=64,
              kmeans_init=True)
    eager = VQVAE(**kw).to(CUDA).to(memory_format=torch.channels_last).train()
    x = (torch.rand(16, 3, 32, 32, device=CUDA) - 0.5).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        eager(x)                                                                # k-means initialisation
    twin = VQVAE(**kw).to(CUDA).to(memory_format=torch.channels_last)
    twin.load_state_dict(eager.state_dict())
    return eager, torch.compile(twin.train()), x


def test_compiled_and_eager_steps_agree_in_float32():
    """Without TF32 the compiled model computes the eager one's function to float32 rounding: almost every pixel
    and code the same. On an H200 (torch 2.11) most pixels differed by at most 1.5e-8 and the largest difference was
    2e-4 (of 0.19), as where a near tie of the 4-d cosine lookup flips one code: so a few flips are allowed, and the
    mean difference must stay at rounding level."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        eager, compiled, x = _eager_and_compiled(torch.float32)
        for _ in range(2):
            a, b = eager(x), compiled(x)
            difference = (a.reconstruction - b.reconstruction).abs()
            assert difference.mean() < 1e-4 * a.reconstruction.abs().mean()    # a flip moves ~1e-6
            assert difference.max() < 0.05 * a.reconstruction.abs().max()
            assert torch.allclose(a.vq.loss, b.vq.loss, rtol=1e-3, atol=1e-6)
            assert (a.vq.indices == b.vq.indices).float().mean() > 0.995       # 5 flips or fewer of 1024 codes
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def test_compiled_and_eager_steps_agree_to_bf16_tolerance():
    """In bf16 the two round differently (other fusions), and in the default 4-d cosine lookup with 64 codes near
    ties are common, so a few codes flip: 96.6% of them agreed on an H200 (torch 2.11). The float32 test above is
    the tight one; this one bounds the bf16 drift."""
    eager, compiled, x = _eager_and_compiled(torch.bfloat16)
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            a, b = eager(x), compiled(x)
        ra, rb = a.reconstruction.float(), b.reconstruction.float()
        assert (ra - rb).abs().max() < 0.05 * ra.abs().max()
        assert torch.allclose(a.vq.loss, b.vq.loss, rtol=2e-2, atol=1e-4)
        assert (a.vq.indices == b.vq.indices).float().mean() > 0.9


def test_evaluate_on_cuda_equals_evaluate_on_the_cpu(tmp_path):
    train.train(small(tmp_path / "run", steps=20, eval_every=20, device="cpu", amp="off"))
    model, config, _ = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    val = image_data.build_data("sample", 32).val
    cpu = evaluate.evaluate(model, image_data.eval_loader(val, 64), torch.device("cpu"))
    gpu = evaluate.evaluate(model.to(CUDA), image_data.eval_loader(val, 64), CUDA)     # float32 on both
    assert gpu["num_images"] == cpu["num_images"]
    assert gpu["psnr"] == pytest.approx(cpu["psnr"], abs=0.02)
    assert gpu["codebook_usage"] == pytest.approx(cpu["codebook_usage"], abs=2 / 64)


def test_a_checkpoint_trained_on_cuda_evaluates_in_a_cpu_only_process(tmp_path):
    train.train(small(tmp_path / "run", steps=10, eval_every=10))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"),
                        "--device", "auto"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["num_images"] > 0 and np.isfinite(report["psnr"])


def test_with_deterministic_a_resumed_cuda_run_ends_bit_identical(tmp_path):
    """In fresh processes (cuBLAS reads CUBLAS_WORKSPACE_CONFIG when CUDA starts): 12 steps at once against 6 steps,
    then a resume to 12, both with --deterministic."""
    flags = ["--data", "sample", "--image-size", "32", "--batch-size", "16", "--hidden-channels", "32",
             "--residual-channels", "16", "--num-residual-blocks", "1", "--embedding-dim", "16",
             "--num-embeddings", "64", "--lr", "1e-3", "--no-progress", "--num-workers", "0", "--device", "cuda",
             "--deterministic", "--log-every", "2"]

    def run(out, steps, *extra):
        r = subprocess.run([sys.executable, "train.py", *flags, "--out", str(out), "--steps", str(steps),
                            "--eval-every", str(steps), *extra], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]

    run(tmp_path / "whole", 12)
    run(tmp_path / "parts", 6)
    run(tmp_path / "parts", 12, "--resume")
    whole, parts = (torch.load(tmp_path / name / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
                    for name in ("whole", "parts"))
    for key, value in whole.items():
        assert torch.equal(value, parts[key]), key


@pytest.mark.parametrize("before, after", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_moves_between_cuda_and_the_cpu_and_steps_as_adam(before, after):
    """CUDA runs are channels-last; a float32 CPU run is NCHW: the move changes device and layout at once."""
    c = small("unused", device=before, image_size=16, hidden_channels=8, residual_channels=4, embedding_dim=4,
              num_embeddings=16, batch_size=4)
    amp_before, amp_after = ("auto", "off") if before == "cuda" else ("off", "auto")
    assert resume_check.resume_step_error(c, amp_before, amp_after, 2, device_after=after) < 0.05


def test_the_checkpoint_holds_the_random_state_of_its_own_gpu_only(tmp_path):
    train.train(small(tmp_path / "run", steps=2, eval_every=2))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng"]["cuda"]) == 1 and ckpt["world"] == 1


def test_torchrun_with_nccl_on_one_gpu(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
           "--data", "sample", "--image-size", "32", "--steps", "6", "--batch-size", "8", "--hidden-channels", "16",
           "--residual-channels", "8", "--num-residual-blocks", "1", "--embedding-dim", "8", "--num-embeddings",
           "32", "--eval-every", "6", "--log-every", "2", "--no-progress", "--num-workers", "0", "--device",
           "cuda", "--out", str(tmp_path / "ddp")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["step"] == 6


def photo_folder(folder: Path, n: int = 24) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


@pytest.mark.parametrize("cache_limit_mb", [1024, 0])
def test_device_resident_batches_equal_the_hosts(tmp_path, cache_limit_mb):
    data = image_data.build_data(str(photo_folder(tmp_path / "photos")), 32, root=str(tmp_path / "root"),
                                 cache_limit_mb=cache_limit_mb, num_workers=0)
    assert train.keep_on_device(data.train, CUDA, 0.25)
    host = image_data.batches(data.train, 8, 5, 3, num_workers=0)
    gpu = device_data.device_batches(data.train, CUDA, 8, 5, 3)
    for _ in range(5):
        (x, y), (gx, gy) = next(host), next(gpu)
        assert gx.device.type == "cuda" and torch.equal(x, gx.cpu()) and torch.equal(y, gy.cpu())


def test_the_memory_mapped_path_reads_with_workers_into_pinned_memory(tmp_path):
    data = image_data.build_data(str(photo_folder(tmp_path / "photos")), 32, root=str(tmp_path / "root"),
                                 cache_limit_mb=0, num_workers=2)
    assert isinstance(data.train, image_data.MappedImages)
    batches = image_data.batches(data.train, 8, 0, 0, num_workers=2, pin_memory=True)
    x, y = next(batches)
    assert x.is_pinned() and x.shape == (8, 3, 32, 32)
    reference = next(image_data.batches(data.train, 8, 0, 0, num_workers=0))[0]
    assert torch.equal(x, reference)
