"""The fast paths compute what the straightforward formulation computes (no timing here: see bench.py)."""
import torch
import torch.nn.functional as F

from bench import ReferenceVectorQuantizerEMA
from codebook import nearest_code
from models import VQVAE, VectorQuantizerEMA


def test_ema_quantizer_matches_the_one_hot_reference_step_for_step():
    """Indexing (embedding / bincount / index_add) against one-hot matmuls: same indices, outputs and EMA state."""
    torch.manual_seed(0)
    ours, ref = VectorQuantizerEMA(64, 8), ReferenceVectorQuantizerEMA(64, 8)
    for name in ("embedding", "cluster_size", "embed_sum"):
        getattr(ref, name).copy_(getattr(ours, name))
    for _ in range(5):
        z = torch.randn(4, 8, 6, 6, requires_grad=True)
        z_ref = z.detach().clone().requires_grad_(True)
        before = ours.embedding.clone()                          # the codebook this step searches
        out = ours(z)
        q_ref, loss_ref, perplexity_ref = ref(z_ref)
        brute = torch.cdist(z.detach().permute(0, 2, 3, 1).reshape(-1, 8).double(), before.double()).argmin(1)
        assert torch.equal(out.indices.flatten(), brute)
        torch.testing.assert_close(out.quantized, q_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.loss, loss_ref)
        torch.testing.assert_close(out.perplexity, perplexity_ref, atol=1e-4, rtol=1e-4)
        w = torch.randn_like(q_ref)
        (out.quantized * w).sum().backward()
        (q_ref * w).sum().backward()
        torch.testing.assert_close(z.grad, z_ref.grad)
        for name in ("embedding", "cluster_size", "embed_sum"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), atol=1e-5, rtol=1e-5)


def test_nearest_code_equals_float64_brute_force_on_large_inputs():
    torch.manual_seed(1)
    flat, codebook = torch.randn(5000, 32), torch.randn(1024, 32)
    fast = nearest_code(flat, codebook, max_chunk_elements=1 << 18)         # 256 rows a chunk
    d = torch.cdist(flat.double(), codebook.double())
    brute = d.argmin(1)
    differ = fast != brute
    # any disagreement must be a tie in float32 precision: equally near codes
    gap = (d.gather(1, fast[:, None]) - d.gather(1, brute[:, None])).abs().squeeze(1)
    assert (gap[differ] < 1e-4).all()
    assert differ.float().mean() < 1e-3


def test_bf16_training_keeps_the_quantizer_in_float32():
    torch.manual_seed(2)
    model = VQVAE(hidden_channels=16, residual_channels=8, num_residual_blocks=1, embedding_dim=8,
                  num_embeddings=32).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = (torch.rand(4, 3, 16, 16) - 0.5).contiguous(memory_format=torch.channels_last)
    seen = {}

    def capture(module, inputs, output):
        seen["z"] = inputs[0].detach()
    model.quantizer.register_forward_hook(capture)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = F.mse_loss(out.reconstruction.float(), x) + out.vq.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert seen["z"].dtype == torch.bfloat16                     # the encoder ran in bf16 ...
    assert out.vq.quantized.dtype == torch.float32               # ... the quantizer in float32
    assert out.vq.loss.dtype == torch.float32
    for name in ("embedding", "cluster_size", "embed_sum"):
        assert getattr(model.quantizer, name).dtype == torch.float32, name
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        indices = model.encode(x)
        z = model.encoder(x)
    # the default search: z projected to 4 dimensions and normalised, against normalised codes, all in float64
    q = model.quantizer
    assert q.cosine and q.lookup_dim == 4
    flat = z.float().permute(0, 2, 3, 1).reshape(-1, 8).double() @ q.project_in.weight.double().t()
    flat = flat + q.project_in.bias.double()
    codes = q.embedding.double()
    brute = torch.cdist(flat / flat.norm(dim=1, keepdim=True), codes / codes.norm(dim=1, keepdim=True)).argmin(1)
    assert torch.equal(indices.flatten(), brute)


def test_bench_report_prints_every_section_and_the_mean_seed_difference():
    """bench.py's report runs after ~20 minutes of measuring: a formatting error there would lose the run."""
    import bench

    runs = [{"seed": s, "off": {"val_psnr": off, "codebook_usage": 1.0, "seconds": 200.0},
             "auto": {"val_psnr": bf, "codebook_usage": 1.0, "seconds": 130.0}, "psnr_difference_db": bf - off}
            for s, off, bf in [(0, 26.0, 25.5), (1, 25.0, 25.7), (2, 26.2, 26.3)]]
    results = {"machine": "test", "device": "cpu", "threads": 2,
               "training": [{"size": 64, "batch": 32, "amp": "bfloat16", "ref_images_per_s": 100.0,
                             "ours_images_per_s": 190.0, "speedup": 1.9, "flops_per_step": 3.2e10}],
               "matmul_peak": {"off": 1.7e11, "bfloat16": 4.0e11},
               "quantizer": [{"case": "c", "shape": "16x256x32x32", "K": 8192, "ref_ms": 2000.0, "ours_ms": 600.0,
                              "speedup": 3.33, "ref_peak_mb": 1580.0, "ours_peak_mb": 155.0, "memory_ratio": 0.098}],
               "end_to_end": {"steps": 300, "end_to_end_images_per_s": 200.0, "model_only_images_per_s": 190.0,
                              "ratio": 200 / 190},
               "quality_steps": 1000,
               "quality": {"runs": runs, "psnr_difference_db": (-0.5 + 0.7 + 0.1) / 3}}
    text, line = bench.report(results), bench.summary(results)
    assert "| mean | 25.73 dB | 25.83 dB | +0.10 dB |" in text       # (26.0 + 25.0 + 26.2) / 3, by hand
    assert "| 1 | 25.00 dB (200 s) | 25.70 dB (130 s) | +0.70 dB |" in text
    assert "1.90x" in text and "105% of the model-only" in text and "3.33x" in text
    assert line.endswith("bf16 PSNR +0.10 dB vs fp32 (mean of 3 seeds)")
