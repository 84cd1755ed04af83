"""models.py against independent references: brute-force distances, hand-derived gradients and EMA steps."""
import math

import pytest
import torch
import torch.nn.functional as F

from checkpoint import Config, model_args
from codebook import nearest_code
from models import VQVAE, Decoder, Encoder, ResidualStack, VectorQuantizer, VectorQuantizerEMA, flatten_latents


def brute_force_indices(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B, H, W) by the full distance matrix in float64."""
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    return torch.cdist(flat, codebook.double()).argmin(1).view(z.shape[0], z.shape[2], z.shape[3])


@pytest.mark.parametrize("cls", [VectorQuantizer, VectorQuantizerEMA])
def test_nearest_codes_match_brute_force(cls):
    torch.manual_seed(0)
    vq = cls(num_embeddings=64, embedding_dim=8)
    z = torch.randn(4, 8, 5, 7) * 1.5
    codebook_before = vq.codebook.detach().clone()   # the EMA quantizer updates after the step
    out = vq(z)
    assert out.indices.shape == (4, 5, 7) and out.indices.dtype == torch.long
    assert torch.equal(out.indices, brute_force_indices(z, codebook_before))
    # the forward value is exactly the chosen code
    assert torch.equal(out.quantized, codebook_before[out.indices].permute(0, 3, 1, 2))


def test_chunked_search_equals_unchunked():
    torch.manual_seed(1)
    flat, codebook = torch.randn(1000, 16), torch.randn(300, 16)
    full = nearest_code(flat, codebook, max_chunk_elements=10**9)
    for chunk_elements in (300, 301, 7 * 300, 300 * 999):
        assert torch.equal(nearest_code(flat, codebook, max_chunk_elements=chunk_elements), full)
    assert torch.equal(full, torch.cdist(flat.double(), codebook.double()).argmin(1))


def test_search_is_float32_under_bf16_autocast():
    torch.manual_seed(2)
    vq = VectorQuantizer(128, 16).eval()
    z = torch.randn(2, 16, 6, 6).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
    assert out.quantized.dtype == torch.float32
    assert torch.equal(out.indices, brute_force_indices(z.float(), vq.codebook.detach()))


def one_vector_per_code(num_codes=6, dim=4):
    """A codebook and a z (1, D, 1, num_codes) whose n-th vector sits near code n (distinct assignments)."""
    torch.manual_seed(3)
    codebook = torch.randn(num_codes, dim) * 3
    z = (codebook + 0.1 * torch.randn(num_codes, dim)).t().reshape(1, dim, 1, num_codes)
    return codebook, z


@pytest.mark.parametrize("beta", [0.25, 1.0, 2.0])
def test_beta_weights_the_commitment_term(beta):
    """d loss/d z_e = beta * 2 (z - e) / numel, d loss/d e = 2 (e - z) / numel: so grad_z = -beta * grad_e."""
    codebook, z = one_vector_per_code()
    vq = VectorQuantizer(len(codebook), codebook.shape[1], beta=beta)
    with torch.no_grad():
        vq.embedding.copy_(codebook)
    z = z.clone().requires_grad_(True)
    out = vq(z)
    assert torch.equal(out.indices.flatten(), torch.arange(len(codebook)))
    out.loss.backward()
    grad_z = flatten_latents(z.grad)                                  # (N, D), row n belongs to code n
    grad_e = vq.embedding.grad                                        # (K, D)
    numel = z.numel()
    diff = flatten_latents(z.detach()) - codebook                     # z - e
    torch.testing.assert_close(grad_z, beta * 2 * diff / numel)
    torch.testing.assert_close(grad_e, -2 * diff / numel)
    torch.testing.assert_close(grad_z, -beta * grad_e)
    torch.testing.assert_close(out.loss, (1 + beta) * diff.pow(2).mean())


def test_ema_loss_is_beta_times_commitment_and_codebook_has_no_gradient():
    codebook, z = one_vector_per_code()
    vq = VectorQuantizerEMA(len(codebook), codebook.shape[1], beta=0.5).eval()
    vq.embedding.copy_(codebook)
    z = z.clone().requires_grad_(True)
    out = vq(z)
    diff = flatten_latents(z.detach()) - codebook
    torch.testing.assert_close(out.loss, 0.5 * diff.pow(2).mean())
    assert out.codebook_loss.item() == 0.0
    out.loss.backward()
    torch.testing.assert_close(flatten_latents(z.grad), 0.5 * 2 * diff / z.numel())
    assert not vq.embedding.requires_grad


@pytest.mark.parametrize("cls", [VectorQuantizer, VectorQuantizerEMA])
def test_straight_through_gradient(cls):
    """The gradient of any function of z_q reaches z_e unchanged, and never the codebook through this path."""
    torch.manual_seed(4)
    vq = cls(32, 8)
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = vq(z)
    w = torch.randn_like(out.quantized)
    (out.quantized * w).sum().backward()
    assert torch.equal(z.grad, w)
    if cls is VectorQuantizer:
        assert vq.embedding.grad is None or torch.count_nonzero(vq.embedding.grad) == 0


def test_ema_single_step_by_hand():
    """One EMA step, computed by hand from appendix A.1 with Laplace smoothing."""
    decay, eps = 0.9, 1e-5
    vq = VectorQuantizerEMA(3, 2, decay=decay, eps=eps)
    e0 = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    vq.embedding.copy_(e0)
    vq.embed_sum.copy_(e0)
    vq.cluster_size.fill_(1.0)
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0]])     # codes 0, 0, 1; code 2 unused
    out = vq(vectors.t().reshape(1, 2, 1, 3))
    assert out.indices.flatten().tolist() == [0, 0, 1]
    assert torch.equal(out.quantized.reshape(2, 3).t(), e0[[0, 0, 1]])   # the codebook before the update
    n_batch = torch.tensor([2.0, 1.0, 0.0])
    sums = torch.tensor([[1.0, 1.0], [9.0, 1.0], [0.0, 0.0]])
    N = decay * torch.ones(3) + (1 - decay) * n_batch
    m = decay * e0 + (1 - decay) * sums
    n = N.sum()
    smoothed = (N + eps) / (n + 3 * eps) * n
    torch.testing.assert_close(vq.cluster_size, N)
    torch.testing.assert_close(vq.embed_sum, m)
    torch.testing.assert_close(vq.embedding, m / smoothed[:, None])


def test_ema_converges_to_cluster_means_on_a_fixed_batch():
    torch.manual_seed(5)
    centres = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0], [0.0, -4.0]])
    points = torch.cat([c + 0.5 * torch.randn(50, 2) for c in centres])   # (200, 2), 50 per cluster
    z = points.t().reshape(1, 2, 1, 200)
    vq = VectorQuantizerEMA(4, 2, decay=0.9)
    vq.embedding.copy_(centres + 0.3)
    vq.embed_sum.copy_(centres + 0.3)
    for _ in range(300):
        vq(z)
    means = torch.stack([points[i * 50:(i + 1) * 50].mean(0) for i in range(4)])
    torch.testing.assert_close(vq.embedding, means, atol=1e-4, rtol=0)


def test_ema_buffers_do_not_change_in_eval_mode():
    torch.manual_seed(6)
    vq = VectorQuantizerEMA(16, 4)
    vq(torch.randn(2, 4, 4, 4))                    # one training step so the statistics are not at their start
    vq.eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    for _ in range(5):
        vq(torch.randn(2, 4, 4, 4))
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k
    model = VQVAE(hidden_channels=8, residual_channels=4, num_residual_blocks=1, embedding_dim=4,
                  num_embeddings=16).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.rand(2, 3, 16, 16))
    model.encode(torch.rand(2, 3, 16, 16))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unused_codes_stay_finite_and_in_place_over_many_steps():
    torch.manual_seed(7)
    vq = VectorQuantizerEMA(32, 4, decay=0.99)
    start = vq.embedding.clone()
    z = torch.randn(1, 4, 8, 8) * 0.1 + vq.embedding[0].view(1, 4, 1, 1)   # everything near code 0
    for _ in range(2000):
        out = vq(z)
    assert torch.isfinite(vq.embedding).all() and torch.isfinite(vq.cluster_size).all()
    unused = torch.ones(32, dtype=torch.bool)
    unused[out.indices.unique()] = False
    assert unused.sum() >= 30
    # a code that is never chosen does not blow up: it stays within its starting norm
    assert (vq.embedding[unused].norm(dim=1) <= start[unused].norm(dim=1) + 1e-5).all()


def test_perplexity_extremes():
    vq = VectorQuantizer(8, 2).eval()
    with torch.no_grad():
        vq.embedding.copy_(torch.arange(16.0).view(8, 2) * 10)
    same = vq.embedding[3].detach().view(1, 2, 1, 1).expand(2, 2, 4, 4).contiguous()
    assert vq(same).perplexity.item() == pytest.approx(1.0)
    each_once = vq.embedding.detach().t().reshape(1, 2, 2, 4).repeat(3, 1, 1, 1)   # every code 3 times
    assert vq(each_once).perplexity.item() == pytest.approx(8.0, rel=1e-5)
    # two codes used 3:1 -> exp(H) with H = -(3/4 log 3/4 + 1/4 log 1/4)
    mix = torch.cat([vq.embedding[0:1]] * 3 + [vq.embedding[1:2]]).detach().t().reshape(1, 2, 1, 4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert vq(mix).perplexity.item() == pytest.approx(math.exp(h), rel=1e-5)


def tiny_vqvae(**kw):
    """A small model with the repo's default codebook options (train.Config's)."""
    args = model_args(Config())
    del args["levels"]          # Config's choice between VQVAE and hierarchy.VQVAE2
    args.update(hidden_channels=16, residual_channels=8, num_residual_blocks=2, embedding_dim=8, num_embeddings=32)
    args.update(kw)
    return VQVAE(**args)


@pytest.mark.parametrize("quantizer", ["ema", "vq"])
def test_encode_decode_round_trip_equals_forward_in_eval_mode(quantizer):
    torch.manual_seed(8)
    model = tiny_vqvae(quantizer=quantizer).eval()
    x = torch.rand(3, 3, 32, 24) - 0.5
    out = model(x)
    indices = model.encode(x)
    assert torch.equal(indices, out.vq.indices)
    assert torch.equal(model.decode(indices), out.reconstruction)


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (128, 128), (32, 64), (48, 20)])
def test_shapes(size):
    h, w = size
    encoder, decoder, vq = Encoder(), Decoder(), VectorQuantizerEMA()
    x = torch.zeros(2, 3, h, w)
    z = encoder(x)
    assert z.shape == (2, 64, h // 4, w // 4)
    out = vq(z)
    assert out.quantized.shape == z.shape and out.indices.shape == (2, h // 4, w // 4)
    assert decoder(out.quantized).shape == x.shape
    model = tiny_vqvae()
    assert model.decode(model.encode(x)).shape == x.shape


def test_encoder_matches_the_paper_layout():
    enc = Encoder(hidden_channels=128, residual_channels=32, num_residual_blocks=3, embedding_dim=64)
    assert (enc.conv1.kernel_size, enc.conv1.stride) == ((4, 4), (2, 2))
    assert (enc.conv2.kernel_size, enc.conv2.stride) == ((4, 4), (2, 2))
    assert enc.conv3.kernel_size == (3, 3)
    blocks = enc.residual.blocks
    assert len(blocks) == 3 and len({id(b) for b in blocks}) == 3          # separate modules, not one repeated
    assert len({b.conv3.weight.data_ptr() for b in blocks}) == 3
    assert blocks[0].conv3.kernel_size == (3, 3) and blocks[0].conv1.kernel_size == (1, 1)
    assert blocks[0].conv3.out_channels == 32
    dec = Decoder(num_residual_blocks=3)
    assert isinstance(dec.residual, ResidualStack) and len(dec.residual.blocks) == 3
    assert (dec.deconv1.kernel_size, dec.deconv1.stride) == ((4, 4), (2, 2))
    assert (dec.deconv2.kernel_size, dec.deconv2.stride) == ((4, 4), (2, 2))


def test_residual_block_is_relu_conv3_relu_conv1_plus_identity():
    torch.manual_seed(9)
    stack = ResidualStack(6, 3, 1)
    block = stack.blocks[0]
    h = torch.randn(1, 6, 5, 5)
    inner = F.relu(F.conv2d(F.relu(h), block.conv3.weight, block.conv3.bias, padding=1))
    by_hand = h + F.conv2d(inner, block.conv1.weight, block.conv1.bias)
    torch.testing.assert_close(stack(h), F.relu(by_hand))


def _by_hand_encoder_decoder(enc: Encoder, dec: Decoder, x: torch.Tensor) -> torch.Tensor:
    """The encoder and decoder written out with functional ops and out-of-place ReLUs only."""
    def stack(h, blocks):
        for b in blocks:
            h = h + F.conv2d(F.relu(F.conv2d(F.relu(h), b.conv3.weight, b.conv3.bias, padding=1)), b.conv1.weight,
                             b.conv1.bias)
        return F.relu(h)
    h = F.relu(F.conv2d(x, enc.conv1.weight, enc.conv1.bias, stride=2, padding=1))
    h = F.relu(F.conv2d(h, enc.conv2.weight, enc.conv2.bias, stride=2, padding=1))
    h = stack(F.conv2d(h, enc.conv3.weight, enc.conv3.bias, padding=1), enc.residual.blocks)
    z = F.conv2d(h, enc.to_embedding.weight, enc.to_embedding.bias)
    h = stack(F.conv2d(z, dec.conv1.weight, dec.conv1.bias, padding=1), dec.residual.blocks)
    h = F.relu(F.conv_transpose2d(h, dec.deconv1.weight, dec.deconv1.bias, stride=2, padding=1))
    return F.conv_transpose2d(h, dec.deconv2.weight, dec.deconv2.bias, stride=2, padding=1)


@pytest.mark.parametrize("blocks", [0, 2])
def test_in_place_relus_leave_values_and_gradients_as_written_out(blocks):
    """The modules apply some ReLUs in place (less memory traffic); outputs and every gradient must equal the
    plainly written network's, in float64, and the input must come back untouched."""
    torch.manual_seed(10)
    enc = Encoder(16, 8, blocks, 6).double()
    dec = Decoder(16, 8, blocks, 6).double()
    x = torch.randn(2, 3, 16, 12, dtype=torch.float64, requires_grad=True)
    x_before = x.detach().clone()
    target = torch.randn(2, 3, 16, 12, dtype=torch.float64)
    params = list(enc.parameters()) + list(dec.parameters())
    ours = dec(enc(x))
    grads = torch.autograd.grad((ours - target).pow(2).sum(), [x] + params)
    by_hand = _by_hand_encoder_decoder(enc, dec, x)
    expected = torch.autograd.grad((by_hand - target).pow(2).sum(), [x] + params)
    assert torch.equal(x.detach(), x_before)
    torch.testing.assert_close(ours, by_hand, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    h = torch.randn(1, 16, 3, 3, dtype=torch.float64)
    h_before = h.clone()
    ResidualStack(16, 8, 0).double()(h)
    assert torch.equal(h, h_before)   # an empty stack must not apply its ReLU to the caller's tensor


@pytest.mark.parametrize("quantizer", ["ema", "vq"])
def test_short_overfit_of_a_few_images(quantizer):
    """Four smooth 16x16 images: 400 Adam steps take the reconstruction error far below that of predicting grey.

    With the default codebook options. (From the paper's random initialisation without restarts, the plain
    quantizer can collapse onto a single code and stay there: see test_codebook.py.)"""
    torch.manual_seed(10)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    x = torch.stack([torch.stack([xx, yy, 1 - xx]), torch.stack([yy, 1 - yy, xx]),
                     torch.stack([xx * yy, xx, yy]), torch.stack([1 - xx * yy, yy, 0.5 * xx])]) - 0.5
    model = tiny_vqvae(quantizer=quantizer, num_embeddings=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(400):
        out = model(x)
        loss = F.mse_loss(out.reconstruction, x) + out.vq.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    mse = F.mse_loss(model(x).reconstruction, x).item()
    baseline = F.mse_loss(torch.zeros_like(x), x).item()
    assert mse < 0.1 * baseline, (mse, baseline)
