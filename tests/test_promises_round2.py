"""README's promises about the quantizers and the model flags, round two: each test written for a breakage that once
passed the whole suite, against an independent reference (float64 brute force, NumPy, numbers worked by hand).

- "the quantizer is always float32": the search, the losses and FSQ's rounding under bf16 autocast, fed the bf16
  latents the encoder gives there as well as float32 ones;
- restarts move a dead code onto a *random* current encoder output; k-means keeps an empty cluster's centre;
- the plain quantizer's usage is an EMA of its per-batch counts (decay 0.99), and a code is restarted the step that
  EMA falls below the threshold;
- every model flag of README's tables reaches the model and does what the table says.
"""
import math

import numpy as np
import pytest
import torch

from checkpoint import Config, build_model
from models import FSQ, VectorQuantizer, VectorQuantizerEMA, flatten_latents, kmeans
from runs import parse_args
from test_promises import as_z, close_codes, lloyd

# ---------------------------------------------------------------------------------------------------------------
# "Distances and the argmin are computed in float32 even under autocast"; "--amp ...: the quantizer is always
# float32". Under autocast the encoder hands the quantizer bf16 latents, so each check runs with bf16 z too.


def reference_search(z: torch.Tensor, codes: torch.Tensor, weight: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64: (the rows the search compares (N, d), the nearest code of each, the gap to the second nearest)."""
    rows = flatten_latents(z).double()
    if weight is not None:
        rows = rows @ weight.double().t()
    d = torch.cdist(rows, codes.double())
    two = d.topk(2, largest=False).values
    return rows, d.argmin(1), two[:, 1] - two[:, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lookup_dim", [0, 8])
@pytest.mark.parametrize("cls", [VectorQuantizer, VectorQuantizerEMA])
def test_the_quantizer_searches_in_float32_whatever_autocast_and_the_input_dtype(cls, lookup_dim, dtype):
    """Codes 1% apart (bfloat16 would choose wrongly for most rows), the latents given in `dtype`; with lookup_dim
    the search runs after a projection (a rotation here), which must be float32 too. The nearest codes of
    `nearest_indices` (eval) and of the forward pass (eval and training), the quantized vectors, and the commitment
    loss all against float64."""
    codes, rows = close_codes(11)
    vq = cls(64, 8, lookup_dim=lookup_dim)
    weight = None
    with torch.no_grad():
        vq.embedding.copy_(codes)
        if lookup_dim:
            weight = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(3)))[0]
            vq.project_in.weight.copy_(weight)
            vq.project_in.bias.zero_()
            rows = rows @ weight                                    # so that the projection gives them back
    z = as_z(rows).to(dtype)
    projected, expected, gap = reference_search(z, codes, weight)
    decided = gap > 1e-5                                            # rows float32 itself can tell apart
    assert decided.float().mean() > 0.9
    scores_bf16 = torch.addmm(codes.pow(2).sum(1), projected.float(), codes.t(), alpha=-2.0).bfloat16()
    assert (scores_bf16.float().argmin(1) != expected).float().mean() > 0.5   # a bf16 search would be wrong
    commitment = ((projected - codes.double()[expected]) ** 2).mean().item()
    vq.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        indices = vq.nearest_indices(z).flatten()
        evaluated = vq(z)
    vq.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = vq(z)
    for got in (indices, evaluated.indices.flatten(), trained.indices.flatten()):
        assert torch.equal(got[decided], expected[decided])
    for out in (evaluated, trained):
        assert out.quantized.dtype == torch.float32 and out.loss.dtype == torch.float32
        assert out.commitment_loss.item() == pytest.approx(commitment, rel=1e-4)
        if cls is VectorQuantizer:                                 # ||sg[z_e] - e||^2 has the same value
            assert out.codebook_loss.item() == pytest.approx(commitment, rel=1e-4)
    if not lookup_dim:
        assert torch.equal(flatten_latents(evaluated.quantized)[decided], codes[expected][decided])


def test_fsq_rounds_in_float32_under_bf16_autocast():
    """FSQ's projection, bound and rounding under the caller's bf16 autocast, for float32 and bf16 latents, against
    NumPy float64: the grid point of every channel not within 1e-4 of a rounding boundary, the indices, and the
    projection back. Done in bfloat16, the rounding would differ on many rows."""
    levels = (8, 5, 5, 5)
    torch.manual_seed(5)
    fsq = FSQ(1000, 8, levels=levels)
    L = np.array(levels, dtype=np.float64)
    half = (L - 1) * (1 - 1e-3) / 2
    offset = np.where(L % 2 == 0, 0.5, 0.0)
    W, b = fsq.project_in.weight.detach().double().numpy(), fsq.project_in.bias.detach().double().numpy()
    Wo, bo = fsq.project_out.weight.detach().double().numpy(), fsq.project_out.bias.detach().double().numpy()
    z32 = torch.randn(8, 8, 16, 16) * 1.5
    for z in (z32, z32.bfloat16()):
        flat = flatten_latents(z).double().numpy()
        h = np.tanh(flat @ W.T + b + np.arctanh(offset / half)) * half - offset
        grid = np.round(h)
        clear = (np.abs(np.abs(h - np.floor(h)) - 0.5) > 1e-4).all(1)        # no channel on a boundary
        assert clear.mean() > 0.95
        with torch.no_grad():
            h_bf16 = fsq._bound(torch.nn.functional.linear(torch.from_numpy(flat).bfloat16(),
                                                           fsq.project_in.weight.bfloat16(),
                                                           fsq.project_in.bias.bfloat16()).float())
        assert (torch.round(h_bf16).double().numpy() != grid).any(1).mean() > 0.005  # bf16 would round otherwise
        digits = (grid + L // 2).astype(np.int64)
        index = (digits * np.cumprod(np.concatenate([[1], L[:-1]])).astype(np.int64)).sum(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fsq(z)
            indices = fsq.nearest_indices(z)
        assert out.quantized.dtype == torch.float32
        np.testing.assert_array_equal(out.indices.flatten().numpy()[clear], index[clear])
        np.testing.assert_array_equal(indices.flatten().numpy()[clear], index[clear])
        np.testing.assert_allclose(flatten_latents(out.quantized).detach().double().numpy()[clear],
                                   (grid @ Wo.T + bo)[clear], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# "--restart-threshold T: a code whose recent use ... falls below T vectors per batch is moved onto a random
# current encoder output, its statistics reset to match"


def restart_picks(cls, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step of a quantizer whose 255 codes but one sit far from a batch of 400 distinct rows (row j is
    (j, j mod 7)): every row takes code 0, codes 1..255 fall below the threshold 1 and are restarted. Returns (the
    batch, the row index each restarted code now sits on; -1 where it sits on no row of the batch)."""
    torch.manual_seed(seed)
    vq = cls(256, 2, restart_threshold=1.0)
    rows = torch.stack([torch.arange(400.0), torch.arange(400.0) % 7], 1)
    with torch.no_grad():
        vq.embedding.copy_(torch.full((256, 2), 1e5))
        vq.embedding[0] = rows.mean(0)
        if cls is VectorQuantizerEMA:
            vq.embed_sum.copy_(vq.embedding)
    vq(as_z(rows))
    moved = vq.embedding.detach()[1:]
    match = (moved[:, None, :] == rows[None]).all(-1)                       # (255, 400)
    picks = torch.where(match.any(1), match.float().argmax(1), torch.tensor(-1))
    assert int(vq.restarts) == 255
    return rows, picks


@pytest.mark.parametrize("cls", [VectorQuantizerEMA, VectorQuantizer])
def test_restarts_move_dead_codes_onto_random_rows_of_the_current_batch(cls):
    """Each restarted code sits exactly on a row of the batch; the rows are drawn uniformly over the whole batch
    (each quarter gets at least half its share, and about as many distinct rows as 255 uniform draws from 400
    give, 188 on average), and another seed draws other rows."""
    _, picks = restart_picks(cls, 0)
    assert (picks >= 0).all()
    quarters = torch.bincount(picks // 100, minlength=4)
    assert (quarters >= 255 / 8).all(), quarters
    assert 160 <= len(picks.unique()) <= 215
    _, other = restart_picks(cls, 1)
    assert (other != picks).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------------------------
# k-means: "Centres start at k distinct random rows (with repeats if N < k); an empty cluster keeps its centre"


@pytest.mark.parametrize("cosine", [False, True])
def test_kmeans_keeps_the_centre_of_an_empty_cluster(cosine):
    """Ten distinct points, each repeated four times, and twelve centres: the random start picks some point twice,
    and the second copy never gets a point (ties go to the first), so it must stay where it started. Against
    Lloyd's algorithm in NumPy from the same start, where an empty cluster keeps its centre; and with fewer rows
    than centres (a start with repeats), every centre is one of the rows."""
    points = np.random.default_rng(4).uniform(10, 20, (10, 3))
    if cosine:
        points = np.random.default_rng(4).uniform(0.1, 1, (10, 3))
        points /= np.linalg.norm(points, axis=1, keepdims=True)
    x = torch.from_numpy(np.repeat(points, 4, axis=0)).float()
    for seed in range(5):
        torch.manual_seed(seed)
        start = torch.randperm(len(x))[:12].numpy()
        if len(np.unique(x.numpy()[start], axis=0)) < 12:
            break
    else:
        raise AssertionError("no start with a repeated point")
    torch.manual_seed(seed)
    centres, counts = kmeans(x, 12, cosine=cosine)
    reference, _ = lloyd(x.double().numpy(), start, 10, spherical=cosine)
    assert (counts == 0).any()                                             # an empty cluster is there
    np.testing.assert_allclose(centres.double().numpy(), reference, atol=1e-5)
    assert counts.sum().item() == len(x)
    few = x[::4][:3]                                  # 3 rows, 8 centres: a start with repeats, empty clusters
    for seed in range(3):
        torch.manual_seed(seed)
        centres, counts = kmeans(few, 8, cosine=cosine)
        assert (counts == 0).any() and counts.sum().item() == 3
        assert (centres >= few.min() - 1e-6).all()       # means of the rows or rows themselves, none at the origin


# ---------------------------------------------------------------------------------------------------------------
# "--restart-threshold T: a code whose recent use (EMA count, or an EMA of its per-batch count for vq) falls
# below T vectors per batch ..."


@pytest.mark.parametrize("cls", [VectorQuantizer, VectorQuantizerEMA])
def test_usage_is_an_ema_of_the_per_batch_counts_and_a_code_restarts_when_it_falls_below(cls):
    """Four codes, batches of 5 rows on code 0 and 3 on code 1; codes 2 and 3 unused. Usage starts at 1 (the EMA
    quantizer's counts N_i = 1; the plain one's max(threshold, 1)) and follows u_t = 0.99 u_{t-1} + 0.01 n, so
    u_t = n + (1 - n) 0.99^t by hand: 5 - 4 * 0.99^t, 3 - 2 * 0.99^t, 0.99^t. With threshold 0.5 the unused codes
    are restarted at step 69, the first t with 0.99^t < 0.5, and not before."""
    vq = cls(4, 2, restart_threshold=0.5)
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 1000.0], [1000.0, 0.0]])
    with torch.no_grad():
        vq.embedding.copy_(codes)
        if cls is VectorQuantizerEMA:
            vq.embed_sum.copy_(codes)
    usage = vq.usage if cls is VectorQuantizer else vq.cluster_size
    batch = as_z(torch.tensor([[0.1, 0.0], [-0.1, 0.0], [0.0, 0.1], [0.0, -0.1], [0.0, 0.0],
                               [10.1, 0.0], [9.9, 0.0], [10.0, 0.1]]))
    n = torch.tensor([5.0, 3.0, 0.0, 0.0], dtype=torch.float64)
    for t in range(1, 70):
        vq(batch)
        by_hand = n + (1 - n) * 0.99 ** t
        if t < 69:
            assert int(vq.restarts) == 0, t
            np.testing.assert_allclose(usage.double().numpy(), by_hand.numpy(), rtol=1e-5, err_msg=str(t))
    assert 0.99 ** 68 > 0.5 > 0.99 ** 69
    assert int(vq.restarts) == 2
    np.testing.assert_allclose(usage[:2].double().numpy(), by_hand[:2].numpy(), rtol=1e-5)
    assert usage[2:].tolist() == [0.5, 0.5]                                 # reset to the threshold
    assert (vq.embedding.detach()[2:].abs() < 11).all()                    # onto rows of the batch


# ---------------------------------------------------------------------------------------------------------------
# "train.py's flags are the fields of the Config dataclass": every model flag of README's tables (Command line,
# Codebook health, Two levels) changes what it says, read off the model that `--flag value` builds


TINY_MODEL = ["--hidden-channels", "8", "--residual-channels", "4", "--num-residual-blocks", "1",
              "--embedding-dim", "4", "--num-embeddings", "16"]


def model_of(*flags: str):
    torch.manual_seed(0)
    return build_model(parse_args([*TINY_MODEL, *flags], Config))


def latents(model, n: int = 64, seed: int = 0) -> torch.Tensor:
    """(1, D, 1, n) latents far from the initial codebook: one tight cluster around (50, ..., 50)."""
    g = torch.Generator().manual_seed(seed)
    return as_z(50 + 0.1 * torch.randn(n, model.quantizer.embedding_dim, generator=g))


def step_counts(model) -> torch.Tensor:
    """One training forward of the quantizer on `latents`; how many rows each code took."""
    out = model.quantizer.train()(latents(model))
    return torch.bincount(out.indices.flatten(), minlength=model.quantizer.num_embeddings).float()


def test_the_model_size_flags_build_that_model():
    x = torch.rand(2, 3, 32, 32) - 0.5
    m = model_of("--hidden-channels", "12")
    assert (m.encoder.conv1.out_channels, m.encoder.conv2.out_channels, m.decoder.deconv1.out_channels) == (6, 12, 6)
    m = model_of("--residual-channels", "6")
    assert m.encoder.residual.blocks[0].conv3.out_channels == m.decoder.residual.blocks[0].conv3.out_channels == 6
    m = model_of("--num-residual-blocks", "3")
    assert len(m.encoder.residual.blocks) == len(m.decoder.residual.blocks) == 3
    m = model_of("--embedding-dim", "6")
    assert m.encoder(x).shape == (2, 6, 8, 8) and m.quantizer.embedding_dim == 6
    m = model_of("--num-embeddings", "24")
    assert m.quantizer.codebook.shape[0] == 24
    m = model_of("--downsample", "8")
    assert m.encode(x).shape == (2, 4, 4) and m(x).reconstruction.shape == x.shape
    m = model_of("--block", "modern")
    assert any(isinstance(layer, torch.nn.GroupNorm) for layer in m.encoder.residual.modules())
    assert not any(isinstance(layer, torch.nn.GroupNorm) for layer in model_of().encoder.modules())
    assert model_of("--attention").encoder.attention is not None and model_of().encoder.attention is None
    m = model_of("--levels", "2", "--top-num-embeddings", "8", "--top-residual-blocks", "2")
    top, bottom = m.encode(x)
    assert (top.shape, bottom.shape) == ((2, 4, 4), (2, 8, 8))
    assert (m.quantizers[0].num_embeddings, m.quantizers[1].num_embeddings) == (8, 16)
    assert len(m.top_encoder.residual.blocks) == len(m.top_decoder.residual.blocks) == 2


@pytest.mark.parametrize("beta", ["0.7", "2.0"])
def test_beta_and_the_quantizer_flags_set_the_loss(beta):
    z = torch.randn(2, 4, 3, 3)
    out = model_of("--beta", beta).quantizer.eval()(z)
    assert out.loss.item() == pytest.approx(float(beta) * out.commitment_loss.item(), rel=1e-6)
    out = model_of("--quantizer", "vq", "--beta", beta).quantizer.eval()(z)
    assert out.codebook_loss.item() > 0
    assert out.loss.item() == pytest.approx(out.codebook_loss.item() + float(beta) * out.commitment_loss.item(),
                                            rel=1e-6)
    assert isinstance(model_of("--quantizer", "fsq").quantizer, FSQ)
    assert model_of("--quantizer", "fsq", "--fsq-levels", "3,5").quantizer.num_embeddings == 15


def test_the_codebook_health_flags_do_what_the_table_says():
    # --decay: the EMA counts move by (1 - decay) of the batch's counts: N = decay * 1 + (1 - decay) * n
    m = model_of("--decay", "0.5", "--no-kmeans-init", "--restart-threshold", "0", "--no-cosine", "--lookup-dim", "0")
    n = step_counts(m)
    np.testing.assert_allclose(m.quantizer.cluster_size.numpy(), (0.5 + 0.5 * n).numpy(), rtol=1e-6)
    # --kmeans-init: the first training batch's cluster of latents becomes the codebook; without it, it does not
    plain = ("--restart-threshold", "0", "--no-cosine", "--lookup-dim", "0")
    for flag, near in (("--kmeans-init", True), ("--no-kmeans-init", False)):
        m = model_of(flag, *plain)
        step_counts(m)
        assert bool((m.quantizer.embedding - 50).abs().max() < 1) == near, flag
    # --restart-threshold: the code that took the batch keeps 0.99 + 0.01 * 64 = 1.63, the others fall to 0.99:
    # at T = 1.5 those 15 restart, at T = 2 all 16, at T = 0 none
    for threshold, restarts in (("1.5", 15), ("2", 16), ("0", 0)):
        m = model_of("--no-kmeans-init", "--restart-threshold", threshold, "--no-cosine", "--lookup-dim", "0")
        step_counts(m)
        assert int(m.quantizer.restarts) == restarts, threshold
    # --cosine: unit-length codes, and the nearest code by cosine similarity; --lookup-dim: the codebook's width
    m = model_of("--cosine", "--lookup-dim", "0")
    torch.testing.assert_close(m.quantizer.codebook.norm(dim=1), torch.ones(16))
    z = torch.randn(2, 4, 3, 3)
    rows = flatten_latents(z)
    by_cosine = (rows / rows.norm(dim=1, keepdim=True) @ m.quantizer.codebook.t().detach()).argmax(1)
    assert torch.equal(m.quantizer.nearest_indices(z).flatten(), by_cosine)
    assert not torch.allclose(model_of("--no-cosine", "--lookup-dim", "0").quantizer.codebook.norm(dim=1),
                              torch.ones(16))
    assert model_of("--lookup-dim", "3").quantizer.codebook.shape == (16, 3)
    assert model_of("--lookup-dim", "0").quantizer.codebook.shape == (16, 4)
    # --rotation-trick: the encoder's gradient is no longer the plain copy of the straight-through estimator
    grads = {}
    for flags in ((), ("--rotation-trick",)):
        m = model_of("--quantizer", "vq", "--lookup-dim", "0", "--no-cosine", *flags).train()
        z = torch.randn(2, 4, 3, 3, requires_grad=True)
        upstream = torch.randn(2, 4, 3, 3)
        (m.quantizer(z).quantized * upstream).sum().backward()
        grads[flags] = (z.grad, upstream)
    torch.testing.assert_close(*grads[()])
    assert not torch.allclose(*grads[("--rotation-trick",)])


def test_fsq_levels_flag_and_its_default_follow_the_paper_table():
    assert model_of("--quantizer", "fsq", "--fsq-levels", "3,5").quantizer.levels == (3, 5)
    assert model_of("--quantizer", "fsq", "--num-embeddings", "1024").quantizer.levels == (8, 5, 5, 5)
    assert math.prod(model_of("--quantizer", "fsq", "--num-embeddings", "256").quantizer.levels) == 240
