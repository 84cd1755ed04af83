"""The codebook's tools, shared by the quantizers of models.py: the nearest-code search of eq. 1 (in float32, in
chunks of bounded memory), code counts and perplexity, the codebook's start (Sonnet's uniform initialiser, or plain
or spherical k-means), and the cross-process helpers that keep every process's codebook identical under
torch.distributed.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


GROUP = 64   # scores per group in the two-stage argmax of nearest_code
FUSED_MAX_DIM = 8             # the fused search serves codes of at most this many dimensions (the 4-d lookup)
FUSED_MIN_SCORES = 1 << 24    # and searches of at least this many scores N x K, where it repays its compile
FUSED_CHUNK_SCORES = 1 << 23  # rows per call of the compiled search: this many scores' worth


def search_chunk_elements(device: torch.device) -> int:
    """How many scores nearest_code holds at once on `device`. On a CPU 2^21 (8 MiB): few enough to stay in the
    cache between the product that writes them and the argmax that reads them, and enough that each of a chunk's
    operations, split over the cores, is worth starting (many small parallel operations stall whenever a core is
    busy elsewhere). Elsewhere 2^22 (16 MiB): memory is fast, and every chunk costs a few kernel launches."""
    return 1 << 21 if device.type == "cpu" else 1 << 22


def argmax_in_groups(scores: Tensor, group: int) -> Tensor:
    """(n, K), K a multiple of `group` -> (n,) the index of each row's first maximum, exactly as scores.argmax(1)
    (NaN counting as the largest), found in two stages that torch runs far faster than one argmax over a long
    row: the first group of `group` consecutive scores holding the row's maximum, then the first maximum in it."""
    n = scores.shape[0]
    s = scores.view(n, -1, group)                                                      # (n, K) -> (n, G, group)
    best_group = s.amax(2).max(1).indices                                              # (n,)
    best_in_group = s[torch.arange(n, device=scores.device), best_group].max(1).indices   # (n,)
    return best_group * group + best_in_group


def nearest_code(flat: Tensor, codebook: Tensor, max_chunk_elements: int | None = None,
                 fused: bool = False) -> Tensor:
    """Index of the nearest code (squared Euclidean distance) for each row: (N, D), (K, D) -> (N,) int64.

    ||z - e||^2 = ||z||^2 - 2 (z.e - ||e||^2 / 2), and ||z||^2 is the same for every code, so the nearest code has
    the highest score z.e + b, b = -||e||^2 / 2, all in float32 (autocast cannot lower it).

    `fused` allows the compiled search of fused_nearest_code, which never writes the (N, K) scores: it is used on
    a CPU for codes of at most FUSED_MAX_DIM dimensions and at least FUSED_MIN_SCORES scores, and costs a compile
    (seconds, once per process and per K), so it suits a search repeated every step, as in training. Otherwise,
    and wherever it cannot be compiled, a chunk of rows gets its scores from one float32 matrix product of [z, 1]
    with [e, b] written into a preallocated buffer (b is never broadcast over the rows), at most
    `max_chunk_elements` scores at a time (by default search_chunk_elements of the device), so memory stays
    bounded however large N x K is. The codes are padded up to whole groups of GROUP with b = -inf (a padding code
    never wins) for argmax_in_groups. Both paths return the index of a highest float32 score; they can differ
    only where two codes' scores are within float32 rounding of each other.
    """
    flat, codebook = flat.float(), codebook.float()
    if fused and fused_search_applies(flat, codebook):
        indices = fused_nearest_code(flat, codebook)
        if indices is not None:
            return indices
    return chunked_nearest_code(flat, codebook, max_chunk_elements)


def chunked_nearest_code(flat: Tensor, codebook: Tensor, max_chunk_elements: int | None = None) -> Tensor:
    """nearest_code's unfused search: the scores of a chunk of rows from one matrix product, then their argmax."""
    flat, codebook = flat.float(), codebook.float()
    num_codes, dim = codebook.shape
    group = min(GROUP, num_codes)
    padded = -(-num_codes // group) * group
    table = torch.zeros(padded, dim + 1, device=codebook.device)                   # (K padded, D + 1): [e, b]
    table[:num_codes, :dim] = codebook
    table[:num_codes, dim] = codebook.pow(2).sum(1).mul_(-0.5)
    table[num_codes:, dim] = float("-inf")
    elements = max_chunk_elements or search_chunk_elements(flat.device)
    chunk = max(1, min(elements // padded, flat.shape[0]))
    rows = torch.ones(chunk, dim + 1, device=flat.device)                          # (n, D + 1): [z, 1]
    scores = torch.empty(chunk, padded, device=flat.device)
    indices = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for start in range(0, flat.shape[0], chunk):
        n = min(chunk, flat.shape[0] - start)
        rows[:n, :dim] = flat[start:start + n]
        torch.mm(rows[:n], table.t(), out=scores[:n])                              # (n, K padded): z.e + b
        indices[start:start + n] = argmax_in_groups(scores[:n], group)
    return indices.clamp_(max=num_codes - 1)   # only a non-finite z can score a padding code highest


def first_highest_score(rows: Tensor, codes_t: Tensor, bias: Tensor, code_index: Tensor) -> Tensor:
    """(n, d) rows z, (d, K) codes e, (K,) b, (K,) float32 0..K-1 -> (n,) float32: for each row the first k
    whose score z.e_k + b_k equals the row's highest score, or K where none does (a row holding a NaN).

    Written for torch.compile, which turns it into one loop over the rows: a row's K scores, d multiply-adds
    each, go into a small per-thread buffer, then their maximum, then the first index holding it. The (n, K)
    matrix is never written to memory, and the index comes from a minimum, which vectorises, not an argmax."""
    scores = bias                                                                 # (K,)
    for j in range(rows.shape[1]):
        scores = scores + rows[:, j:j + 1] * codes_t[j]                          # (n, K): z.e + b, term by term
    best = scores.amax(1, keepdim=True)                                           # (n, 1)
    return torch.where(scores >= best, code_index, float(codes_t.shape[1])).amin(1)


_fused = {"search": None, "failed": False}   # the compiled first_highest_score, made on first use


def fused_search_applies(flat: Tensor, codebook: Tensor) -> bool:
    """Whether nearest_code(fused=True) takes the compiled path for these inputs (see nearest_code)."""
    return (flat.device.type == "cpu" and codebook.shape[1] <= FUSED_MAX_DIM and codebook.shape[0] < 1 << 24
            and flat.shape[0] * codebook.shape[0] >= FUSED_MIN_SCORES and not _fused["failed"]
            and not torch.compiler.is_compiling())   # float32 holds the indices of fewer than 2^24 codes exactly


@torch.no_grad()
def fused_nearest_code(flat: Tensor, codebook: Tensor) -> Tensor | None:
    """nearest_code by the compiled first_highest_score, in calls of a fixed number of rows (the last chunk
    padded), so one compile serves every N. None, with a warning once per process, when it cannot be compiled
    (no C++ compiler, say): the caller falls back to the unfused search. Rows without a result (a NaN) get the
    unfused search's."""
    num_codes, dim = codebook.shape
    if _fused["search"] is None:
        _fused["search"] = torch.compile(first_highest_score, dynamic=False, fullgraph=True)
    chunk = max(1, FUSED_CHUNK_SCORES // num_codes)
    codes_t = codebook.t().contiguous()                                            # (d, K)
    bias = codebook.pow(2).sum(1).mul_(-0.5)                                       # (K,) b = -||e||^2 / 2
    code_index = torch.arange(num_codes, dtype=torch.float32)                      # exact up to 2^24 codes
    rows = torch.zeros(chunk, dim, dtype=torch.float32)
    found = torch.empty(flat.shape[0], dtype=torch.float32)
    try:
        for start in range(0, flat.shape[0], chunk):
            end = min(start + chunk, flat.shape[0])
            rows[:end - start] = flat[start:end]
            found[start:end] = _fused["search"](rows, codes_t, bias, code_index)[:end - start]
    except Exception as error:   # the compiler's failures have no common type
        _fused["failed"] = True
        warnings.warn(f"the fused codebook search could not be compiled ({type(error).__name__}); "
                      "using the unfused search", RuntimeWarning)
        return None
    indices = found.long()
    missing = (indices >= num_codes).nonzero().squeeze(1)
    if len(missing):
        indices[missing] = chunked_nearest_code(flat[missing], codebook)
    return indices


def code_counts(indices: Tensor, num_codes: int) -> Tensor:
    """How often each of the K codes occurs in `indices`: (N,) int64 -> (K,) float32.

    torch.bincount's output size depends on the largest index, so it waits for the device and breaks a compiled
    graph; adding ones into a fixed (K,) vector does neither (exact up to 2^24 vectors, deterministic on CUDA
    under torch.use_deterministic_algorithms)."""
    counts = torch.zeros(num_codes, dtype=torch.float32, device=indices.device)
    return counts.index_add_(0, indices.reshape(-1), torch.ones(indices.numel(), device=indices.device))


def perplexity_from_counts(counts: Tensor) -> Tensor:
    """exp(-sum_k p_k log p_k) of the distribution p = counts / sum(counts); 0 log 0 is taken as 0."""
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-torch.special.xlogy(p, p).sum())


def variance_scaling_uniform(num_embeddings: int, embedding_dim: int) -> Tensor:
    """Uniform(-sqrt(3/D), sqrt(3/D)): unit variance per component, the Sonnet VQ-VAE's codebook initialiser."""
    limit = math.sqrt(3.0 / embedding_dim)
    return torch.empty(num_embeddings, embedding_dim).uniform_(-limit, limit)


def l2norm(x: Tensor) -> Tensor:
    """Each row scaled to unit length (the cosine codebook's normalisation)."""
    return F.normalize(x, dim=-1, eps=1e-6)


def distributed() -> bool:
    """Whether this process is one of several under torch.distributed."""
    return dist.is_available() and dist.is_initialized()


def gather_rows(x: Tensor) -> Tensor:
    """(n, d) on each process -> (sum of n, d) on every process (rows of all processes, rank order)."""
    if not distributed():
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, x.shape[1], dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


def same_everywhere(x: Tensor) -> Tensor:
    """Rank 0's value of x on every process (a no-op without torch.distributed)."""
    if distributed():
        dist.broadcast(x, src=0)
    return x


@torch.no_grad()
def kmeans(x: Tensor, k: int, iterations: int = 10, cosine: bool = False) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on the rows of x (N, d): (centres (k, d), cluster sizes (k,)).

    Centres start at k distinct random rows (with repeats if N < k); an empty cluster keeps its centre. With
    `cosine` the centres are renormalised after each update (spherical k-means)."""
    start = torch.randperm(x.shape[0], device=x.device)[:k] if x.shape[0] >= k else \
        torch.randint(x.shape[0], (k,), device=x.device)
    centres = x[start].clone()
    for _ in range(iterations):
        assign = nearest_code(x, centres)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        if cosine:
            centres = l2norm(centres)
    return centres, torch.bincount(nearest_code(x, centres), minlength=k).to(x.dtype)
