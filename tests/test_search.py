"""The nearest-code search (codebook.nearest_code) and every caller of it against a float64 brute force: random
inputs, exact ties, every split into chunks and groups of codes, under bf16 autocast; the two-stage argmax
against torch.argmax; bounded memory however large N x K; the fused (compiled) search the training step takes, and
its fallback."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import codebook
from checkpoint import Config, build_model
from codebook import argmax_in_groups, kmeans, nearest_code
from models import VectorQuantizer, VectorQuantizerEMA, flatten_latents


def squared_distances(flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(N, D), (K, D) -> (N, K) ||z - e||^2 in float64, from the differences (no expansion of the square)."""
    return torch.cdist(flat.double(), codes.double(), compute_mode="donot_use_mm_for_euclid_dist").pow(2)


def excess(indices: torch.Tensor, flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(N,) how much farther (float64) each chosen code is than the nearest one, relative to the size of the
    terms that cancel in the distance."""
    d = squared_distances(flat, codes)                                          # (N, K)
    scale = flat.double().pow(2).sum(1) + codes.double().pow(2).sum(1).max()
    return (d.gather(1, indices[:, None]).squeeze(1) - d.min(1).values) / scale


def assert_nearest(indices: torch.Tensor, flat: torch.Tensor, codes: torch.Tensor, tol: float = 1e-5) -> None:
    """Every index names a code whose float64 distance is the smallest, up to what float32 cannot tell apart (a
    tie may go either way); where the nearest code leads the runner-up by more, it is the brute force's code."""
    assert indices.shape == (flat.shape[0],) and indices.dtype == torch.long
    assert ((indices >= 0) & (indices < codes.shape[0])).all()
    worst = excess(indices, flat, codes).max()
    assert worst <= tol, worst


def rows_and_codes(n: int, k: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian codes of varied length; rows: Gaussian, near the origin (every code's score z.e - |e|^2/2 < 0),
    exactly on codes, and near codes."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(k, d, generator=g) * torch.rand(k, 1, generator=g).add(0.5)
    pick = torch.randint(k, (n,), generator=g)
    rows = torch.randn(n, d, generator=g)
    rows[1::4] *= 0.01
    rows[2::4] = codes[pick[2::4]]
    rows[3::4] = codes[pick[3::4]] + 0.05 * torch.randn(rows[3::4].shape, generator=g)
    return rows, codes


# (N, K, D, scores per chunk): the default chunk, several rows per chunk with a partial last one, one row per
# chunk, fewer codes than a group, a single code, codes padded up to whole groups (by 20, by 63), many groups
CASES = [(1000, 2048, 4, None), (1001, 300, 8, 320 * 7), (97, 130, 3, 1), (257, 40, 5, None), (50, 1, 4, None),
         (513, 2049, 64, 1 << 16), (300, 8193, 4, None), (64, 512, 64, 512 * 5)]


@pytest.mark.parametrize("n,k,d,chunk", CASES)
def test_nearest_code_equals_a_float64_brute_force(n, k, d, chunk):
    rows, codes = rows_and_codes(n, k, d, seed=n + k)
    indices = nearest_code(rows, codes, max_chunk_elements=chunk)
    assert_nearest(indices, rows, codes)
    # with these inputs almost every row has a clear winner: the brute force's own argmin
    assert (indices == squared_distances(rows, codes).argmin(1)).float().mean() > 0.99


@pytest.mark.parametrize("chunk", [None, 1, 3 * 192, 192 * 1000])
def test_tied_codes_go_to_one_of_the_tied(chunk):
    """Codes repeated exactly (in another group, and in the padded last group), rows on them and halfway between
    two codes: every row's distance to the chosen code is the smallest."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(65, 4, generator=g)
    codes = torch.cat([base, base.flip(0), base[:20]])                          # K = 150: 3 groups, the last padded
    a, b = torch.randint(65, (200,), generator=g), torch.randint(65, (200,), generator=g)
    rows = torch.cat([base, (base[a] + base[b]) / 2, torch.zeros(3, 4)])
    indices = nearest_code(rows, codes, max_chunk_elements=chunk)
    assert_nearest(indices, rows, codes)
    assert torch.equal(codes[indices[:65]], base)                               # a row on a code: that code's copy


def test_nearest_code_is_float32_under_bf16_autocast():
    """Codes within 1% of one point: float32 tells the distances apart, bfloat16 does not."""
    g = torch.Generator().manual_seed(7)
    point = F.normalize(torch.randn(1, 8, generator=g), dim=1)
    codes, rows = point + 0.01 * torch.randn(300, 8, generator=g), point + 0.01 * torch.randn(500, 8, generator=g)
    bf16 = squared_distances(rows.bfloat16(), codes.bfloat16()).argmin(1)
    assert excess(bf16, rows, codes).max() > 1e-5                               # a bf16 search would fail below
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for chunk in (None, 300):
            assert_nearest(nearest_code(rows, codes, max_chunk_elements=chunk), rows, codes, tol=1e-7)


@pytest.mark.parametrize("k,group", [(64, 64), (192, 64), (12, 4), (7, 1), (5, 5)])
def test_argmax_in_groups_is_the_first_maximum(k, group):
    """Scores of a few values only, so most rows hold their maximum several times, and a few NaNs (the largest,
    as torch.argmax counts them): the same index as torch.argmax, the first maximum."""
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 4, (400, k), generator=g).float()
    scores[::37, ::3] = float("nan")
    assert torch.equal(argmax_in_groups(scores, group), scores.argmax(1))


def test_a_non_finite_row_still_gets_a_code():
    rows, codes = torch.randn(6, 4), torch.randn(100, 4)                        # padded to 128 codes
    rows[0, 0], rows[1, 1], rows[2] = float("inf"), float("-inf"), float("nan")
    indices = nearest_code(rows, codes)
    assert ((indices >= 0) & (indices < 100)).all()
    assert_nearest(indices[3:], rows[3:], codes)


class LargestNewTensor(TorchDispatchMode):
    """The largest storage (bytes) among the outputs of every operation run inside."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_the_search_holds_a_bounded_number_of_scores():
    rows, codes = F.normalize(torch.randn(4096, 4), dim=1), F.normalize(torch.randn(8192, 4), dim=1)
    with LargestNewTensor() as seen:
        nearest_code(rows, codes)
    assert seen.largest <= 4 * (1 << 22)              # 16 MiB at most, where N x K scores would take 128 MiB


# ---------------------------------------------------------------------------------------------------------------
# The callers: both quantizers (training forward and nearest_indices), in D dimensions and in the default 4-d
# cosine lookup; the model's forward (what evaluate.py runs) and encode (what extract_codes.py runs); k-means


def reference_search_space(vq, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows and codes the quantizer must compare, in float64: z projected (with the low-dimensional lookup)
    and both normalised (with cosine)."""
    flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()         # (B, D, H, W) -> (N, D)
    codes = vq.embedding.detach().double()
    if vq.lookup_dim:
        flat = flat @ vq.project_in.weight.detach().double().t() + vq.project_in.bias.detach().double()
    if vq.cosine:
        flat, codes = flat / flat.norm(dim=1, keepdim=True), codes / codes.norm(dim=1, keepdim=True)
    return flat, codes


SEARCHES = {"in-D": dict(), "cosine-in-D": dict(cosine=True), "cosine-4d-lookup": dict(cosine=True, lookup_dim=4)}


@pytest.mark.parametrize("cls", [VectorQuantizer, VectorQuantizerEMA])
@pytest.mark.parametrize("options", SEARCHES.values(), ids=SEARCHES.keys())
@pytest.mark.parametrize("autocast", [False, True])
def test_the_quantizers_search_equals_a_float64_brute_force(cls, options, autocast):
    torch.manual_seed(11)
    vq = cls(2048, 16, **options)
    z = torch.randn(4, 16, 12, 10)
    if autocast:
        z = z.bfloat16()
    flat, codes = reference_search_space(vq, z)                                # before the EMA step moves the codes
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        encoded = vq.eval().nearest_indices(z)
        out = vq.train()(z)
    assert_nearest(out.indices.flatten(), flat, codes)
    assert_nearest(encoded.flatten(), flat, codes)
    assert (out.indices.flatten() == squared_distances(flat, codes).argmin(1)).float().mean() > 0.99


@pytest.mark.parametrize("autocast", [False, True])
def test_the_default_models_forward_and_encode_equal_a_float64_brute_force(autocast):
    """train.Config's model (K = 2048, the 4-d cosine lookup): the forward evaluate.py runs and the encode
    extract_codes.py runs both pick the nearest codes of the encoder's output."""
    torch.manual_seed(12)
    model = build_model(Config(hidden_channels=16, residual_channels=8, num_residual_blocks=1)).eval()
    assert model.quantizer.num_embeddings == 2048 and model.quantizer.lookup_dim == 4 and model.quantizer.cosine
    x = torch.rand(2, 3, 32, 32) - 0.5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        z = model.encoder(x)
        forward, encoded = model(x).vq.indices, model.encode(x)
    flat, codes = reference_search_space(model.quantizer, z)
    assert_nearest(forward.flatten(), flat, codes)
    assert torch.equal(encoded, forward)


def test_kmeans_assigns_every_row_to_its_nearest_centre():
    """One Lloyd step by hand with the brute force's assignment gives k-means' centres after one iteration."""
    torch.manual_seed(13)
    x = torch.randn(3000, 4)
    torch.manual_seed(14)
    centres, _ = kmeans(x, 300, iterations=1)                                # 300 codes: 5 groups, padded
    torch.manual_seed(14)
    start = x[torch.randperm(3000)[:300]]
    assign = squared_distances(x, start).argmin(1)
    expected = torch.stack([x[assign == i].mean(0) if (assign == i).any() else start[i] for i in range(300)])
    torch.testing.assert_close(centres, expected)


# ---------------------------------------------------------------------------------------------------------------
# The fused search (codebook.fused_nearest_code, compiled): what nearest_code(fused=True) runs on a CPU for codes of
# at most 8 dimensions and at least FUSED_MIN_SCORES scores, as the training step calls it. Here the size floor is
# lowered so small inputs take it; each distinct (rows per call, D, K) compiles once per process.

@pytest.fixture
def fused_for_any_size(monkeypatch):
    """The fused path for inputs of any size, and the unfused one made to fail: a row the fused search answers
    must not be passed on to the unfused search."""
    monkeypatch.setattr(codebook, "FUSED_MIN_SCORES", 0)

    def unfused_must_not_run(flat, codes, max_chunk_elements=None):
        raise AssertionError(f"the unfused search ran on {flat.shape[0]} rows")

    monkeypatch.setattr(codebook, "chunked_nearest_code", unfused_must_not_run)


def test_the_fused_search_equals_a_float64_brute_force(fused_for_any_size, monkeypatch):
    """1000 rows in calls of 64 (the last one partial), K = 300 (not a whole number of vector lanes)."""
    monkeypatch.setattr(codebook, "FUSED_CHUNK_SCORES", 300 * 64)
    rows, codes = rows_and_codes(1000, 300, 4, seed=21)
    assert codebook.fused_search_applies(rows, codes)
    indices = nearest_code(rows, codes, fused=True)
    assert_nearest(indices, rows, codes)
    assert (indices == squared_distances(rows, codes).argmin(1)).float().mean() > 0.99


def test_the_fused_search_sends_ties_to_one_of_the_tied(fused_for_any_size):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(65, 4, generator=g)
    codes = torch.cat([base, base.flip(0), base[:20]])                          # K = 150, every code twice or more
    a, b = torch.randint(65, (200,), generator=g), torch.randint(65, (200,), generator=g)
    rows = torch.cat([base, (base[a] + base[b]) / 2, torch.zeros(3, 4)])
    indices = nearest_code(rows, codes, fused=True)
    assert_nearest(indices, rows, codes)
    assert torch.equal(codes[indices[:65]], base)


def test_the_fused_search_is_float32_under_bf16_autocast(fused_for_any_size):
    """8-d codes within 1% of one point (the largest dimension the fused search takes): float32 tells them apart."""
    g = torch.Generator().manual_seed(7)
    point = F.normalize(torch.randn(1, 8, generator=g), dim=1)
    codes, rows = point + 0.01 * torch.randn(300, 8, generator=g), point + 0.01 * torch.randn(500, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_nearest(nearest_code(rows, codes, fused=True), rows, codes, tol=1e-7)


def test_a_row_the_fused_search_cannot_answer_gets_the_unfused_searchs_code(monkeypatch):
    """A NaN row has no highest score: it alone goes to the unfused search, and every index stays in range."""
    monkeypatch.setattr(codebook, "FUSED_MIN_SCORES", 0)
    monkeypatch.setattr(codebook, "FUSED_CHUNK_SCORES", 300 * 64)
    calls = []
    unfused = codebook.chunked_nearest_code
    monkeypatch.setattr(codebook, "chunked_nearest_code", lambda flat, codes: calls.append(len(flat)) or
                        unfused(flat, codes))
    rows, codes = rows_and_codes(1000, 300, 4, seed=22)
    rows[5, 1], rows[700] = float("nan"), float("nan")
    indices = nearest_code(rows, codes, fused=True)
    assert calls == [2]
    assert ((indices >= 0) & (indices < 300)).all()
    keep = torch.ones(1000, dtype=torch.bool)
    keep[[5, 700]] = False
    assert_nearest(indices[keep], rows[keep], codes)


def test_the_fused_search_falls_back_with_one_warning_when_it_cannot_be_compiled(monkeypatch):
    monkeypatch.setattr(codebook, "FUSED_MIN_SCORES", 0)
    calls = []

    def no_compiler(*args):
        calls.append(1)
        raise RuntimeError("no C++ compiler")

    monkeypatch.setitem(codebook._fused, "search", no_compiler)
    monkeypatch.setitem(codebook._fused, "failed", False)
    rows, codes = rows_and_codes(500, 300, 4, seed=23)
    with pytest.warns(RuntimeWarning, match="could not be compiled"):
        indices = nearest_code(rows, codes, fused=True)
    assert_nearest(indices, rows, codes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_nearest(nearest_code(rows, codes, fused=True), rows, codes)
    assert len(calls) == 1 and not codebook.fused_search_applies(rows, codes)


def test_the_training_step_and_only_it_takes_the_fused_search(monkeypatch):
    """The default quantizer (K = 2048, cosine, the 4-d lookup) in training mode takes the fused path once its
    search reaches FUSED_MIN_SCORES, with the nearest codes; below that size, in eval mode (evaluate, encode,
    extract_codes), in D = 64 dimensions and on the k-means start it does not."""
    monkeypatch.setattr(codebook, "FUSED_MIN_SCORES", 2048 * 480)
    fused_rows = []
    fused = codebook.fused_nearest_code
    monkeypatch.setattr(codebook, "fused_nearest_code", lambda flat, codes: fused_rows.append(len(flat)) or
                        fused(flat, codes))
    torch.manual_seed(24)
    vq = VectorQuantizerEMA(2048, 16, cosine=True, lookup_dim=4, kmeans_init=True)
    z = torch.randn(4, 16, 12, 10)                                              # 480 rows
    flat, codes = reference_search_space(vq, z)
    with torch.no_grad():
        vq.eval()(z)                                                            # what evaluate.py runs
    vq.nearest_indices(z)                                                       # encode, extract_codes, the codec
    assert fused_rows == []
    with torch.no_grad():
        vq.train()(z[:3])                                                       # k-means, then 360 rows: too few
        assert fused_rows == []
        flat, codes = reference_search_space(vq, z)
        out = vq(z)
    assert fused_rows == [480] and not codebook._fused["failed"]
    assert_nearest(out.indices.flatten(), flat, codes)
    VectorQuantizerEMA(2048, 64).train()(torch.randn(4, 64, 12, 10))
    assert fused_rows == [480]


def test_the_fused_search_serves_training_from_a_64_px_batch_of_32_at_the_default_k():
    """With the module's own size floor, as docs/codebook.md says: the default 4-d lookup at K = 2048 takes it for
    a 64 px batch of 32 (8192 rows) and a 128 px one (32768); the quick start's 64 px batch of 8 and D = 64 do not."""
    codes = F.normalize(torch.randn(2048, 4), dim=1)
    assert codebook.fused_search_applies(torch.randn(32 * 16 * 16, 4), codes)
    assert codebook.fused_search_applies(torch.randn(32 * 32 * 32, 4), codes)
    assert not codebook.fused_search_applies(torch.randn(8 * 16 * 16, 4), codes)
    assert not codebook.fused_search_applies(torch.randn(32 * 16 * 16, 64), torch.randn(2048, 64))
