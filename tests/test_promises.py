"""README's promises about the model, each against a reference worked out independently of the code under test:
numbers by hand, NumPy in float64, or the notebook's own source parsed. Each test names the promise it guards
(tests/PROMISES.md lists them all, and tests/mutate.py breaks them on purpose to check these tests notice)."""
import ast
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint import TOP_FIELDS, Config, model_args
from codebook import kmeans
from hierarchy import VQVAE2
from models import FSQ, VQVAE, VQOutput, VectorQuantizer, VectorQuantizerEMA, flatten_latents

ROOT = Path(__file__).resolve().parents[1]


def as_z(rows: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (1, D, 1, N): rows become latent vectors in raster order."""
    return rows.t().reshape(1, rows.shape[1], 1, rows.shape[0]).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# "The EMA statistics start consistent with the initial codebook (N_i = 1, m_i = e_i) ... an unused code keeps its
# place", and the Laplace smoothing of the counts (appendix A.1)


def test_ema_statistics_start_at_one_count_and_the_code_itself():
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(8, 3)
    assert torch.equal(vq.cluster_size, torch.ones(8))          # N_i = 1
    assert torch.equal(vq.embed_sum, vq.embedding)              # m_i = e_i


def test_an_unused_code_keeps_its_place_after_one_step_and_after_many():
    """Every vector sits next to code 0, so codes 1..7 are never chosen. Reference: appendix A.1 in NumPy float64
    from the documented start N_i = 1, m_i = e_i. Zero counts would throw the unused codes ~1e5 times further out;
    zero sums (Sonnet's bias-corrected start) would put them on the origin."""
    torch.manual_seed(1)
    decay, eps, k = 0.9, 1e-5, 8
    vq = VectorQuantizerEMA(k, 3, decay=decay, eps=eps)
    e0 = vq.embedding.double().numpy().copy()
    z = torch.from_numpy(e0[0] + 1e-3 * np.random.default_rng(1).standard_normal((16, 3))).float()
    out = vq(as_z(z))
    assert out.indices.flatten().tolist() == [0] * 16
    counts = np.array([16.0] + [0.0] * (k - 1))
    sums = np.zeros_like(e0)
    sums[0] = z.double().numpy().sum(0)
    N = decay * 1.0 + (1 - decay) * counts                       # from N_i = 1
    m = decay * e0 + (1 - decay) * sums                          # from m_i = e_i
    n = N.sum()
    e1 = m / ((N + eps) / (n + k * eps) * n)[:, None]
    np.testing.assert_allclose(vq.embedding.double().numpy(), e1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(e1[1:], e0[1:], rtol=1e-4)       # so the unused codes are where they started
    for _ in range(60):                                           # decay**60 = 0.002, still far above eps
        vq(as_z(z))
    np.testing.assert_allclose(vq.embedding[1:].double().numpy(), e0[1:], rtol=1e-2)


def test_laplace_smoothing_worked_by_hand():
    """K = 2 codes on a line at 0 and 10, decay 0.5 and eps 0.5 (large, so the smoothing shows). The batch 1, 3
    goes to code 0. By hand: N = 0.5 [1, 1] + 0.5 [2, 0] = [1.5, 0.5]; m = 0.5 [0, 10] + 0.5 [4, 0] = [2, 5];
    n = 2; smoothed N = (N + eps) / (n + K eps) * n = [2, 1] / 3 * 2 = [4/3, 2/3]; e = m / smoothed = [1.5, 7.5]
    (without smoothing it would be [4/3, 10])."""
    vq = VectorQuantizerEMA(2, 1, decay=0.5, eps=0.5)
    vq.embedding.copy_(torch.tensor([[0.0], [10.0]]))
    vq.embed_sum.copy_(torch.tensor([[0.0], [10.0]]))
    vq.cluster_size.copy_(torch.tensor([1.0, 1.0]))
    out = vq(as_z(torch.tensor([[1.0], [3.0]])))
    assert out.indices.flatten().tolist() == [0, 0]
    assert vq.cluster_size.tolist() == [1.5, 0.5]
    assert vq.embed_sum.flatten().tolist() == [2.0, 5.0]
    torch.testing.assert_close(vq.embedding.flatten(), torch.tensor([1.5, 7.5]), rtol=1e-6, atol=1e-6)


def test_ema_update_is_in_place_on_the_buffers():
    """"The update happens in training mode only, in place": the codebook tensor a caller holds is the one that
    moves (no new tensor is swapped in)."""
    torch.manual_seed(2)
    vq = VectorQuantizerEMA(8, 3)
    held = vq.embedding
    before = held.clone()
    vq(torch.randn(2, 3, 4, 4))
    assert vq.embedding is held and not torch.equal(held, before)


# ---------------------------------------------------------------------------------------------------------------
# "the codebook starts from 10 iterations of k-means on the first batch's encoder outputs"


def lloyd(x: np.ndarray, start: np.ndarray, iterations: int, spherical: bool = False) -> tuple[np.ndarray, float]:
    """Lloyd's algorithm in float64 from the given rows (`spherical`: each new centre scaled to unit length); also
    the smallest gap between a point's nearest and second-nearest centre seen at any assignment (so the test can
    check float32 cannot decide differently)."""
    centres, gap = x[start].copy(), np.inf
    for _ in range(iterations):
        d = ((x[:, None, :] - centres[None]) ** 2).sum(-1)      # (N, k)
        two = np.sort(d, axis=1)[:, :2]
        gap = min(gap, float((two[:, 1] - two[:, 0]).min()))
        assign = d.argmin(1)
        for j in range(len(centres)):
            if (assign == j).any():
                centres[j] = x[assign == j].mean(0)
                if spherical:
                    centres[j] /= np.linalg.norm(centres[j])
    return centres, gap


def kmeans_data():
    """Uniform points in a square: Lloyd's algorithm moves the centres for many iterations, so (from the random
    starts below) 9, 10, 11 and 12 iterations give visibly different centres."""
    return torch.from_numpy(np.random.default_rng(2).random((400, 2))).float()


def test_kmeans_runs_ten_lloyd_iterations():
    x, k = kmeans_data(), 12
    torch.manual_seed(2)
    start = torch.randperm(len(x))[:k].numpy()                  # "centres start at k distinct random rows"
    torch.manual_seed(2)
    centres, counts = kmeans(x, k)
    ref = {i: lloyd(x.double().numpy(), start, i) for i in (9, 10, 11)}
    assert ref[10][1] > 1e-5                                     # no near-ties float32 could break differently
    assert np.abs(ref[9][0] - ref[10][0]).max() > 1e-3 and np.abs(ref[11][0] - ref[10][0]).max() > 1e-3
    np.testing.assert_allclose(centres.double().numpy(), ref[10][0], atol=1e-5)
    d = ((x.double().numpy()[:, None] - ref[10][0][None]) ** 2).sum(-1)
    assert counts.tolist() == np.bincount(d.argmin(1), minlength=k).astype(float).tolist()


def test_spherical_kmeans_renormalises_the_centres():
    """With `cosine` (the default codebook) the centres are scaled back to unit length after every update."""
    g = np.random.default_rng(8)
    x = g.standard_normal((300, 3)) * np.array([1.0, 0.6, 0.3])
    x = torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True)).float()            # on the unit sphere
    torch.manual_seed(3)
    start = torch.randperm(len(x))[:10].numpy()
    torch.manual_seed(3)
    centres, _ = kmeans(x, 10, cosine=True)
    reference, gap = lloyd(x.double().numpy(), start, 10, spherical=True)
    assert gap > 1e-5
    assert np.abs(lloyd(x.double().numpy(), start, 10)[0] - reference).max() > 1e-2    # renormalising matters
    np.testing.assert_allclose(centres.double().numpy(), reference, atol=1e-5)


def test_kmeans_initialisation_of_the_quantizer_uses_ten_iterations():
    """The quantizer's first training step: k-means (10 iterations) on the batch, then its EMA update. With
    decay 0 and a negligible eps that update is one more Lloyd step, so the codebook after the step is Lloyd's
    11th iteration from the same random start."""
    x, k = kmeans_data(), 12
    vq = VectorQuantizerEMA(k, 2, decay=0.0, eps=1e-12, kmeans_init=True)
    torch.manual_seed(1)
    start = torch.randperm(len(x))[:k].numpy()
    torch.manual_seed(1)
    vq(as_z(x))
    assert bool(vq.initialized)
    reference, gap = lloyd(x.double().numpy(), start, 11)
    assert gap > 1e-5
    d = ((x.double().numpy()[:, None] - reference[None]) ** 2).sum(-1)
    assert len(np.unique(d.argmin(1))) == k                       # no empty cluster (decay 0 would zero it)
    assert np.abs(lloyd(x.double().numpy(), start, 10)[0] - reference).max() > 1e-3
    np.testing.assert_allclose(vq.embedding.double().numpy(), reference, atol=1e-5)


def test_cosine_codes_compare_normalised_inputs_with_normalised_codes():
    """"--cosine: l2-normalised codes and inputs": the commitment loss is between the unit-length z and its
    unit-length code (NumPy float64); with unnormalised inputs the nearest code would be the same but not the loss."""
    torch.manual_seed(9)
    vq = VectorQuantizerEMA(16, 6, beta=0.25, cosine=True).eval()
    z = torch.randn(2, 6, 3, 3) * 3
    out = vq(z)
    flat = flatten_latents(z).double().numpy()
    z_hat = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    e = vq.embedding.double().numpy()
    e_hat = e / np.linalg.norm(e, axis=1, keepdims=True)
    nearest = (z_hat @ e_hat.T).argmax(1)
    assert out.indices.flatten().tolist() == nearest.tolist()
    commitment = ((z_hat - e_hat[nearest]) ** 2).mean()
    assert out.commitment_loss.item() == pytest.approx(commitment, rel=1e-5)
    assert out.loss.item() == pytest.approx(0.25 * commitment, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# FSQ: "each of a few channels rounded to a small grid"


def test_fsq_rounds_each_channel_to_the_nearest_grid_point():
    """Reference in NumPy float64: the projection, the bound of each channel to (-(L-1)/2, (L-1)/2) (shifted by
    half a step for even L), then the nearest integer; the output is the projection back of that grid point."""
    torch.manual_seed(6)
    levels = (8, 5, 3)
    fsq = FSQ(512, 6, levels=levels)
    z = torch.randn(2, 6, 4, 4) * 2
    out = fsq(z)
    flat = flatten_latents(z).double().numpy()
    W, b = fsq.project_in.weight.detach().double().numpy(), fsq.project_in.bias.detach().double().numpy()
    L = np.array(levels, dtype=np.float64)
    half = (L - 1) * (1 - 1e-3) / 2
    offset = np.where(L % 2 == 0, 0.5, 0.0)
    h = np.tanh(flat @ W.T + b + np.arctanh(offset / half)) * half - offset
    nearest = np.round(h)
    assert (np.floor(h) != nearest).mean() > 0.2                  # rounding down would differ on many channels
    grid = fsq.codebook[out.indices.flatten()].double().numpy()
    np.testing.assert_array_equal(grid, nearest)
    Wo, bo = fsq.project_out.weight.detach().double().numpy(), fsq.project_out.bias.detach().double().numpy()
    np.testing.assert_allclose(flatten_latents(out.quantized).detach().double().numpy(), nearest @ Wo.T + bo, rtol=1e-5,
                               atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# "Distances and the argmin are computed in float32 even under autocast"


def close_codes(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """64 codes and 200 vectors within 1% of one point: float32 tells the distances apart, bfloat16 (8 bits of
    mantissa) does not."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(8, generator=g)
    base = base / base.norm()
    codes = base + 0.01 * torch.randn(64, 8, generator=g)
    rows = base + 0.01 * torch.randn(200, 8, generator=g)
    return codes, rows


def brute_force(rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return torch.cdist(rows.double(), codes.double()).argmin(1)


@pytest.mark.parametrize("cls", [VectorQuantizer, VectorQuantizerEMA])
def test_search_under_bf16_autocast_equals_float64_brute_force(cls):
    codes, rows = close_codes(7)
    expected = brute_force(rows, codes)
    scores_bf16 = torch.addmm(codes.pow(2).sum(1), rows, codes.t(), alpha=-2.0).bfloat16()
    assert (scores_bf16.float().argmin(1) != expected).float().mean() > 0.5   # bf16 search would be wrong
    vq = cls(64, 8).eval()
    with torch.no_grad():
        vq.embedding.copy_(codes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(as_z(rows))
        indices = vq.nearest_indices(as_z(rows))
    assert torch.equal(out.indices.flatten(), expected)
    assert torch.equal(indices.flatten(), expected)
    assert out.quantized.dtype == torch.float32 and torch.equal(flatten_latents(out.quantized), codes[expected])


# ---------------------------------------------------------------------------------------------------------------
# The outputs and defaults README names


def test_quantizer_output_fields_in_the_documented_order():
    fields = ("quantized", "loss", "indices", "perplexity", "codebook_loss", "commitment_loss")
    assert VQOutput._fields == fields
    for q in (VectorQuantizer(16, 4), VectorQuantizerEMA(16, 4), FSQ(16, 4)):
        out = q(torch.randn(1, 4, 2, 2))
        assert type(out) is VQOutput and out.indices.shape == (1, 2, 2)


def test_config_defaults_are_the_ones_readme_states():
    """Values copied by hand from README (command-line table, codebook-health table, the default run)."""
    c = Config()
    assert (c.data, c.image_size, c.batch_size, c.steps, c.lr) == ("sample", 64, 8, 2842, 1e-3)
    assert (c.lr_schedule, c.warmup_steps) == ("cosine", 100)
    assert (c.block, c.attention, c.downsample) == ("paper", False, 4)
    assert (c.quantizer, c.kmeans_init, c.restart_threshold) == ("ema", True, 1.0)
    assert (c.cosine, c.lookup_dim, c.rotation_trick, c.fsq_levels) == (True, 4, False, "")
    assert (c.num_embeddings, c.embedding_dim, c.beta) == (2048, 64, 0.25)
    assert (c.hidden_channels, c.residual_channels, c.num_residual_blocks) == (128, 32, 2)
    assert (c.device, c.amp, c.compile, c.out, c.resume) == ("auto", "auto", False, "runs/sample", False)
    assert (c.eval_every, c.checkpoint_every, c.log_every, c.val_fraction) == (500, 0, 50, 0.1)


def test_vqvae_defaults_are_the_configs():
    """models.VQVAE's docstring: "the defaults are train.Config's" (levels is Config's choice between VQVAE and
    hierarchy.VQVAE2, whose shared arguments have the same defaults)."""
    params = inspect.signature(VQVAE).parameters
    params2 = inspect.signature(VQVAE2).parameters
    args = model_args(Config())
    assert args.pop("levels") == VQVAE.levels == 1
    for name, value in args.items():   # "options" among them: the models' default QuantizerOptions are the config's
        assert params[name].default == value, name
        assert name == "downsample" or params2[name].default == value, name
    for name in TOP_FIELDS:
        assert params2[name].default == model_args(Config(levels=2))[name], name


# ---------------------------------------------------------------------------------------------------------------
# The notebook: "it imports Encoder, VectorQuantizer, VectorQuantizerEMA and Decoder from models.py ... then it
# trains through the same train(config) function as the command line"


def notebook_tree() -> ast.Module:
    nb = json.loads((ROOT / "vqvae.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    code = "\n".join(line for cell in cells for line in cell.splitlines() if not line.lstrip().startswith(("%", "!")))
    return ast.parse(code)


def test_notebook_imports_the_four_parts_from_models_and_trains_through_train():
    tree = notebook_tree()
    imported = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    for name in ("Encoder", "VectorQuantizer", "VectorQuantizerEMA", "Decoder"):
        assert ("models", name) in imported, name
        assert name in used, name                                # and shown on a batch, not only imported
    assert ("train", "train") in imported
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
             and node.func.id == "train"]
    assert calls, "the notebook never calls train(config)"
