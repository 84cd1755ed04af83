"""The fast paths compute what the straightforward formulation computes (no timing here: see bench.py)."""
import torch
import torch.nn.functional as F

from bench import ReferenceVectorQuantizerEMA
from models import VQVAE, VectorQuantizerEMA, nearest_code


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
