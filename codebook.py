"""The codebook's tools, shared by the quantizers of models.py: the nearest-code search of eq. 1 (in float32, in
chunks of bounded memory), code counts and perplexity, the codebook's start (Sonnet's uniform initialiser, or plain
or spherical k-means), and the cross-process helpers that keep every process's codebook identical under
torch.distributed.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def nearest_code(flat: Tensor, codebook: Tensor, max_chunk_elements: int = 1 << 24) -> Tensor:
    """Index of the nearest code (squared Euclidean distance) for each row: (N, D), (K, D) -> (N,) int64.

    ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, and ||z||^2 is the same for every code, so the argmin is taken
    over ||e||^2 - 2 z.e, computed in float32 by one matrix product per chunk of rows. A chunk holds at most
    `max_chunk_elements` distances (64 MiB), so memory stays bounded however large N x K is.
    """
    flat, codebook = flat.float(), codebook.float()
    num_codes = codebook.shape[0]
    chunk = max(1, max_chunk_elements // num_codes)
    code_sq = codebook.pow(2).sum(1)                                   # (K,)
    indices = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for start in range(0, flat.shape[0], chunk):
        rows = flat[start:start + chunk]                               # (n, D)
        scores = torch.addmm(code_sq, rows, codebook.t(), alpha=-2.0)  # (n, K): ||e||^2 - 2 z.e
        indices[start:start + chunk] = scores.argmin(1)
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
