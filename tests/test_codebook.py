"""Codebook health options against independent references: restarts, k-means, cosine codes, low-dimensional
lookup, the rotation trick and FSQ; and every option through a checkpoint."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import train
from models import FSQ, VQVAE, VectorQuantizer, VectorQuantizerEMA, flatten_latents, fsq_levels_for
from checkpoint import Config


def as_z(rows: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (1, D, 1, N): rows become latent vectors in raster order."""
    return rows.t().reshape(1, rows.shape[1], 1, rows.shape[0])


def mixture(n: int, centres: torch.Tensor, spread: float, generator: torch.Generator) -> torch.Tensor:
    pick = torch.randint(len(centres), (n,), generator=generator)
    return centres[pick] + spread * torch.randn(n, centres.shape[1], generator=generator)


def test_restart_revives_dead_codes_and_resets_their_statistics():
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(8, 2, decay=0.9, restart_threshold=1.0)
    far = torch.full((8, 2), 100.0)
    far[:2] = torch.tensor([[0.0, 0.0], [1.0, 1.0]])               # codes 0 and 1 sit on the data
    counts = torch.tensor([5.0, 5.0, 0.5, 0.5, 0.5, 0.5, 0.5, 3.0])   # 2..6 are dead, 7 is alive
    vq.embedding.copy_(far)
    vq.embed_sum.copy_(far * counts[:, None])                      # consistent statistics: m_i = N_i e_i
    vq.cluster_size.copy_(counts)
    data = torch.tensor([[0.0, 0.1], [0.1, 0.0], [1.0, 0.9], [0.9, 1.0]])
    vq(as_z(data))
    dead = torch.tensor([False, False, True, True, True, True, True, False])
    # the dead codes (whose count fell further, below 1) now sit on encoder outputs of this batch
    for i in dead.nonzero().flatten():
        assert torch.isclose(vq.embedding[i], data).all(1).any(), vq.embedding[i]
    assert torch.all(vq.cluster_size[dead] == 1.0)
    torch.testing.assert_close(vq.embed_sum[dead], vq.embedding[dead] * 1.0)
    # code 7 is above the threshold (0.9 * 3 = 2.7): not restarted, it stays where it was (Laplace smoothing aside)
    torch.testing.assert_close(vq.embedding[7], torch.tensor([100.0, 100.0]), rtol=1e-4, atol=0)
    assert vq.restarts.item() == 5


def test_plain_quantizer_restarts_by_recent_usage():
    torch.manual_seed(1)
    vq = VectorQuantizer(6, 2, restart_threshold=0.5, usage_decay=0.5)
    with torch.no_grad():
        vq.embedding.copy_(torch.tensor([[0.0, 0.0]] + [[50.0, 50.0]] * 5))
    data = torch.randn(20, 2) * 0.1
    vq(as_z(data))           # usage of unused codes: 0.5 * 1 + 0 = 0.5, not below 0.5 yet
    assert vq.restarts.item() == 0
    vq(as_z(data))           # 0.25 < 0.5: the five far codes are restarted onto the data
    assert vq.restarts.item() == 5
    assert (vq.embedding[1:].detach().abs() < 1).all()
    torch.testing.assert_close(vq.usage[1:], torch.full((5,), 0.5))


def test_kmeans_init_takes_its_centres_from_the_data():
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(2)
    centres = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0], [0.0, -10.0]])
    data = mixture(400, centres, 0.3, g)
    vq = VectorQuantizerEMA(4, 2, kmeans_init=True)
    before = vq.embedding.clone()
    vq(as_z(data))
    assert bool(vq.initialized)
    codebook = vq.embedding    # after the first step's EMA update; check the k-means result via the statistics
    # the k-means fixed point: each centre is the mean of the points nearest to it (brute force)
    assign = torch.cdist(data, vq.embed_sum / vq.cluster_size[:, None]).argmin(1)
    for k in range(4):
        members = data[assign == k]
        assert len(members) > 0
    # every initial centre lay among the data, far from the random start
    assert (codebook - before).abs().max() > 1.0
    assert torch.cdist(codebook, data).min(1).values.max() < 1.0
    # a second step does not initialise again
    snapshot = vq.embedding.clone()
    vq.initialized.fill_(True)
    vq(as_z(data))
    assert torch.cdist(vq.embedding, snapshot).diag().max() < 0.5


def test_kmeans_function_matches_lloyd_fixed_point():
    from codebook import kmeans

    torch.manual_seed(3)
    g = torch.Generator().manual_seed(3)
    data = mixture(300, torch.tensor([[5.0, 5.0], [-5.0, 5.0], [0.0, -6.0]]), 0.5, g)
    centres, counts = kmeans(data, 3, iterations=20)
    assign = torch.cdist(data, centres).argmin(1)
    for k in range(3):
        torch.testing.assert_close(centres[k], data[assign == k].mean(0), atol=1e-4, rtol=0)
    assert counts.tolist() == torch.bincount(assign, minlength=3).float().tolist()


def test_restart_recovers_usage_from_a_collapsed_start():
    """All codes start far from a 64-component mixture, so one code takes every vector. With restarts >= 90% of
    the codes are in use within 300 steps; without them far fewer are. (Without restarts, unused codes do drift
    back slowly: once an unused code's count N_i decays below the smoothing eps, e_i = m_i / N_i shrinks towards
    the origin, where this data lies.)"""
    g0 = torch.Generator().manual_seed(4)
    centres = torch.randn(64, 4, generator=g0) * 4
    start = torch.randn(32, 4, generator=g0) + 100.0
    held_out = mixture(4096, centres, 0.2, g0)
    used = {}
    for restart in (True, False):
        torch.manual_seed(4)
        g = torch.Generator().manual_seed(5)
        vq = VectorQuantizerEMA(32, 4, decay=0.95, restart_threshold=1.0 if restart else 0.0)
        vq.embedding.copy_(start)
        vq.embed_sum.copy_(start)
        assert vq.eval()(as_z(held_out)).indices.unique().numel() == 1      # collapsed at the start
        vq.train()
        for _ in range(300):
            vq(as_z(mixture(512, centres, 0.2, g)))
        used[restart] = vq.eval()(as_z(held_out)).indices.unique().numel() / 32
    assert used[True] >= 0.9, used
    assert used[False] < 0.6, used


def test_cosine_nearest_codes_match_brute_force_cosine_similarity():
    torch.manual_seed(5)
    vq = VectorQuantizerEMA(40, 6, cosine=True).eval()
    z = torch.randn(3, 6, 4, 5)
    out = vq(z)
    flat = flatten_latents(z)
    similarity = F.cosine_similarity(flat[:, None, :], vq.embedding[None, :, :], dim=-1)   # (N, K)
    assert torch.equal(out.indices.flatten(), similarity.argmax(1))
    # the output is the unit-length code
    torch.testing.assert_close(flatten_latents(out.quantized).norm(dim=1), torch.ones(60))


def test_low_dimensional_lookup_searches_in_the_projected_space():
    torch.manual_seed(6)
    vq = VectorQuantizer(32, 16, lookup_dim=3).eval()
    assert vq.codebook.shape == (32, 3)
    z = torch.randn(2, 16, 3, 3)
    out = vq(z)
    projected = vq.project_in(flatten_latents(z))                                           # (N, 3)
    assert torch.equal(out.indices.flatten(), torch.cdist(projected.double(), vq.codebook.double()).argmin(1))
    expected = vq.project_out(vq.codebook[out.indices.flatten()])                          # back to D = 16
    torch.testing.assert_close(flatten_latents(out.quantized), expected)
    assert out.quantized.shape == z.shape


def test_rotation_trick_forward_is_the_code_and_gradient_is_the_scaled_rotation():
    torch.manual_seed(7)
    vq = VectorQuantizer(16, 5, rotation_trick=True)
    z = torch.randn(1, 5, 2, 3, requires_grad=True)
    out = vq(z)
    codes = vq.codebook.detach()[out.indices.flatten()]                                     # (6, 5)
    torch.testing.assert_close(flatten_latents(out.quantized), codes, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out.quantized)
    (out.quantized * w).sum().backward()
    # by hand, one vector at a time: R = I - 2 r r^T + 2 e_hat z_hat^T, lambda = |e| / |z|, grad = lambda R^T w
    zs, ws = flatten_latents(z.detach()), flatten_latents(w)
    for n in range(6):
        zn, en = zs[n], codes[n]
        z_hat, e_hat = zn / zn.norm(), en / en.norm()
        r = (z_hat + e_hat) / (z_hat + e_hat).norm()
        R = torch.eye(5) - 2 * torch.outer(r, r) + 2 * torch.outer(e_hat, z_hat)
        torch.testing.assert_close(R @ zn * en.norm() / zn.norm(), en, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(flatten_latents(z.grad)[n], en.norm() / zn.norm() * R.t() @ ws[n],
                                   atol=1e-5, rtol=1e-5)
    # without the option the gradient is the straight-through copy
    vq.rotation_trick = False
    z.grad = None
    (vq(z).quantized * w).sum().backward()
    assert torch.equal(z.grad, w)


@pytest.mark.parametrize("target, levels, size", [(256, (8, 6, 5), 240), (512, (8, 5, 5, 5), 1000),
                                                  (1024, (8, 5, 5, 5), 1000), (4096, (7, 5, 5, 5, 5), 4375),
                                                  (2**16, (8, 8, 8, 5, 5, 5), 64000)])
def test_fsq_levels_follow_the_paper_and_report_the_codebook_size(target, levels, size):
    assert fsq_levels_for(target) == levels
    fsq = FSQ(target, 16)
    assert fsq.levels == levels and fsq.num_embeddings == size == math.prod(levels)
    assert fsq.codebook.shape == (size, len(levels))
    assert len({tuple(row.tolist()) for row in fsq.codebook}) == size        # every grid point once


def test_fsq_rounds_to_its_grid_with_a_straight_through_gradient():
    torch.manual_seed(8)
    fsq = FSQ(512, 8, levels=(8, 5, 3))
    z = (torch.randn(2, 8, 4, 4) * 3).requires_grad_(True)
    out = fsq(z)
    assert out.indices.min() >= 0 and out.indices.max() < 120
    # the quantized value is the projection of the grid point of its index, the grid point within each level range
    grid = fsq.codebook[out.indices.flatten()]                                             # (32, 3)
    assert torch.equal(grid, grid.round())
    lo = -torch.tensor([4.0, 2.0, 1.0])
    assert ((grid >= lo) & (grid <= lo + torch.tensor([7.0, 4.0, 2.0]))).all()
    torch.testing.assert_close(flatten_latents(out.quantized), fsq.project_out(grid))
    assert torch.equal(fsq.lookup(out.indices), out.quantized.detach())
    # straight through: the gradient is that of the same map with rounding replaced by the identity
    w = torch.randn_like(out.quantized)
    (out.quantized * w).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    smooth = fsq.project_out(fsq._bound(fsq.project_in(flatten_latents(z2))))
    (smooth * flatten_latents(w)).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)
    assert out.loss.item() == 0.0


OPTION_VARIANTS = {
    "kmeans+restart": dict(kmeans_init=True, restart_threshold=1.0),
    "vq+restart+rotation": dict(quantizer="vq", restart_threshold=0.5, rotation_trick=True),
    "cosine": dict(cosine=True),
    "lookup": dict(lookup_dim=3),
    "fsq": dict(quantizer="fsq", fsq_levels="5,3,3"),
    "paper": dict(kmeans_init=False, restart_threshold=0.0),
}


@pytest.mark.parametrize("name", OPTION_VARIANTS)
def test_every_option_survives_a_checkpoint_round_trip(name, tmp_path):
    c = Config(data="sample", image_size=16, steps=3, batch_size=4, hidden_channels=8, residual_channels=4,
               num_residual_blocks=1, embedding_dim=4, num_embeddings=16, eval_every=3, log_every=1,
               out=str(tmp_path / "run"), progress=False, device="cpu", amp="off")
    c = replace(c, **OPTION_VARIANTS[name])
    result = train.train(c)
    model, config, _ = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert config == c
    saved = result.model.cpu().state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    x = torch.rand(2, 3, 16, 16) - 0.5
    assert torch.equal(model(x).reconstruction, result.model(x).reconstruction)
    assert torch.equal(model.decode(model.encode(x)), model(x).reconstruction)
    if c.kmeans_init and c.quantizer != "fsq":
        assert bool(model.quantizer.initialized) and not model.quantizer._pending_init
