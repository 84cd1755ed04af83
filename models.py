"""VQ-VAE, from "Neural Discrete Representation Learning" (van den Oord, Vinyals, Kavukcuoglu, 2017,
arXiv 1711.00937).

- `Encoder` / `Decoder`: the image architecture of section 4.1 (two 4x4 stride-2 convolutions and residual
  blocks ReLU-3x3-ReLU-1x1; the decoder mirrors it with two 4x4 stride-2 transposed convolutions), with the
  3x3 convolution before the residual stack and the 1x1 projection to D that the authors' Sonnet example adds.
  A 32x32 image becomes an 8x8 grid of D-dimensional vectors.
- `VectorQuantizer`: the nearest-neighbour bottleneck of eq. 1-2, trained with the last two terms of eq. 3:
  codebook loss ||sg[z_e] - e||^2 plus beta times commitment loss ||z_e - sg[e]||^2, and the straight-through
  estimator for the encoder's gradient.
- `VectorQuantizerEMA`: the same bottleneck with the codebook learned by exponential moving averages of the
  assigned encoder outputs (appendix A.1) with Laplace smoothing of the counts, as in the authors' Sonnet code.
- `FSQ`: finite scalar quantization (Mentzer et al. 2023), a drop-in for the vector quantizers.
- `QuantizerOptions`: every setting of a quantizer, by name only; `make_quantizer(options)` builds it.
- `VQVAE`: encoder, quantizer and decoder together, with `encode(x) -> indices` and `decode(indices) -> x`.

Distances and the argmin are computed in float32 even under autocast, by codebook.py's nearest-code search.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from codebook import code_counts, distributed, gather_rows, kmeans, l2norm, nearest_code, perplexity_from_counts, \
    same_everywhere, variance_scaling_uniform
from pixels import ImageCodec

# ---------------------------------------------------------------------------------------------------------------
# Encoder and decoder (section 4.1)


class ResidualBlock(nn.Module):
    """h + conv1x1(relu(conv3x3(relu(h)))): the paper's residual block ("ReLU, 3x3 conv, ReLU, 1x1 conv")."""

    def __init__(self, channels: int, residual_channels: int):
        super().__init__()
        self.conv3 = nn.Conv2d(channels, residual_channels, kernel_size=3, padding=1)
        self.conv1 = nn.Conv2d(residual_channels, channels, kernel_size=1)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.conv1(F.relu(self.conv3(F.relu(h)), inplace=True))


def num_groups(channels: int, most: int = 32) -> int:
    """The largest number of GroupNorm groups, at most `most`, that divides `channels`."""
    return max(g for g in range(1, min(most, channels) + 1) if channels % g == 0)


class ModernResidualBlock(nn.Module):
    """h + conv3x3(SiLU(GN(conv3x3(SiLU(GN(h)))))): the residual block of VQGAN's encoder and decoder (Esser et al.
    2021, arXiv 2012.09841), GroupNorm and SiLU in place of the paper's bare ReLUs, `residual_channels` inside."""

    def __init__(self, channels: int, residual_channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups(channels), channels)
        self.conv1 = nn.Conv2d(channels, residual_channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups(residual_channels), residual_channels)
        self.conv2 = nn.Conv2d(residual_channels, channels, kernel_size=3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(h))))))


class SelfAttention(nn.Module):
    """h + proj(softmax(q k^T / sqrt(C)) v) over the H*W positions, with q, k, v 1x1 convolutions of GN(h): the
    single-head attention block VQGAN puts at its lowest resolution (arXiv 2012.09841)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, h: Tensor) -> Tensor:
        b, c, height, width = h.shape
        qkv = self.qkv(self.norm(h)).reshape(b, 3, c, height * width).transpose(-1, -2)     # (B, 3, HW, C)
        q, k, v = qkv.unbind(1)                                                              # (B, HW, C) each
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]       # (B, HW, C)
        return h + self.proj(out.transpose(1, 2).reshape(b, c, height, width))               # (B, C, H, W)


class ResidualStack(nn.Module):
    """`num_blocks` separate residual blocks (each with its own weights) followed by the activation: the paper's
    blocks and a ReLU (`block="paper"`), or VQGAN's blocks and GroupNorm + SiLU (`block="modern"`)."""

    def __init__(self, channels: int, residual_channels: int, num_blocks: int, block: str = "paper"):
        super().__init__()
        if block not in ("paper", "modern"):
            raise ValueError(f"block must be 'paper' or 'modern', got {block!r}")
        kind = ResidualBlock if block == "paper" else ModernResidualBlock
        self.blocks = nn.ModuleList([kind(channels, residual_channels) for _ in range(num_blocks)])
        self.norm = nn.GroupNorm(num_groups(channels), channels) if block == "modern" else None

    def forward(self, h: Tensor) -> Tensor:
        for block in self.blocks:
            h = block(h)
        if self.norm is not None:
            return F.silu(self.norm(h))
        return F.relu(h, inplace=len(self.blocks) > 0)   # in place only on a tensor made here, not the input


class Encoder(nn.Module):
    """x (B, 3, H, W) -> z_e(x) (B, D, H/4, W/4) (H/8 with downsample=8).

    Two 4x4 stride-2 convolutions (hidden/2, then hidden channels, each followed by a ReLU), a 3x3 convolution,
    the residual stack, and a 1x1 convolution to the embedding dimension D that the quantizer expects.
    Example: Encoder()(torch.zeros(8, 3, 64, 64)).shape == (8, 64, 16, 16).

    hidden_channels: width of the convolutions (the paper uses 256; 128 as in the authors' Sonnet example).
    residual_channels: width inside each residual block.
    num_residual_blocks: number of residual blocks (the paper uses 2).
    embedding_dim: D, the dimension of each latent vector and of each code.
    Beyond the paper (the defaults are the paper's): block="modern" uses VQGAN's GroupNorm + SiLU residual blocks,
    attention=True adds one self-attention block at the lowest resolution before them, downsample=8 adds a third
    4x4 stride-2 convolution (for 128-256 px images).
    """

    def __init__(self, hidden_channels: int = 128, residual_channels: int = 32, num_residual_blocks: int = 2,
                 embedding_dim: int = 64, in_channels: int = 3, block: str = "paper", attention: bool = False,
                 downsample: int = 4):
        super().__init__()
        if downsample not in (4, 8):
            raise ValueError(f"downsample must be 4 or 8, got {downsample}")
        self.conv1 = nn.Conv2d(in_channels, hidden_channels // 2, kernel_size=4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(hidden_channels // 2, hidden_channels, kernel_size=4, stride=2, padding=1)
        self.down = nn.ModuleList([nn.Conv2d(hidden_channels, hidden_channels, kernel_size=4, stride=2, padding=1)
                                   for _ in range(downsample == 8)])
        self.conv3 = nn.Conv2d(hidden_channels, hidden_channels, kernel_size=3, padding=1)
        self.attention = SelfAttention(hidden_channels) if attention else None
        self.residual = ResidualStack(hidden_channels, residual_channels, num_residual_blocks, block)
        self.to_embedding = nn.Conv2d(hidden_channels, embedding_dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x), inplace=True)     # (B, hidden/2, H/2, W/2)
        h = F.relu(self.conv2(h), inplace=True)     # (B, hidden, H/4, W/4)
        for down in self.down:
            h = F.relu(down(h), inplace=True)       # (B, hidden, H/8, W/8)
        h = self.conv3(h)                           # (B, hidden, h, w)
        if self.attention is not None:
            h = self.attention(h)
        h = self.residual(h)                        # (B, hidden, h, w)
        return self.to_embedding(h)                 # (B, D, h, w)


class Decoder(nn.Module):
    """z_q(x) (B, D, H/4, W/4) -> reconstruction (B, 3, H, W), the mirror of `Encoder`.

    A 3x3 convolution from D to hidden channels, the residual stack, then two 4x4 stride-2 transposed
    convolutions (to hidden/2 with a ReLU, then to the image channels). The output is unbounded; images are
    scaled to [-0.5, 0.5] for training. block, attention and downsample mirror the Encoder's options.
    Example: Decoder()(torch.zeros(8, 64, 16, 16)).shape == (8, 3, 64, 64).
    """

    def __init__(self, hidden_channels: int = 128, residual_channels: int = 32, num_residual_blocks: int = 2,
                 embedding_dim: int = 64, out_channels: int = 3, block: str = "paper", attention: bool = False,
                 downsample: int = 4):
        super().__init__()
        if downsample not in (4, 8):
            raise ValueError(f"downsample must be 4 or 8, got {downsample}")
        self.conv1 = nn.Conv2d(embedding_dim, hidden_channels, kernel_size=3, padding=1)
        self.attention = SelfAttention(hidden_channels) if attention else None
        self.residual = ResidualStack(hidden_channels, residual_channels, num_residual_blocks, block)
        self.up = nn.ModuleList([nn.ConvTranspose2d(hidden_channels, hidden_channels, kernel_size=4, stride=2,
                                                    padding=1) for _ in range(downsample == 8)])
        self.deconv1 = nn.ConvTranspose2d(hidden_channels, hidden_channels // 2, kernel_size=4, stride=2, padding=1)
        self.deconv2 = nn.ConvTranspose2d(hidden_channels // 2, out_channels, kernel_size=4, stride=2, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv1(z)                           # (B, hidden, h, w)
        if self.attention is not None:
            h = self.attention(h)
        h = self.residual(h)                        # (B, hidden, h, w)
        for up in self.up:
            h = F.relu(up(h), inplace=True)         # (B, hidden, 2h, 2w)
        h = F.relu(self.deconv1(h), inplace=True)   # (B, hidden/2, H/2, W/2)
        return self.deconv2(h)                      # (B, 3, H, W)


# ---------------------------------------------------------------------------------------------------------------
# Vector quantization (eq. 1-3, appendix A.1)


class VQOutput(NamedTuple):
    """What a quantizer returns.

    quantized: (B, D, H, W) z_q(x): each vector replaced by its nearest code; its gradient flows straight through
        to z_e(x) (the straight-through estimator), never to the codebook.
    loss: scalar, codebook_loss + beta * commitment_loss (eq. 3 without the reconstruction term). For the EMA
        quantizer the codebook has no gradient, so this is beta * commitment_loss.
    indices: (B, H, W) int64, the chosen code k = argmin_j ||z_e(x) - e_j||_2 (eq. 1).
    perplexity: scalar, exp(entropy) of the batch's code-usage distribution: 1 if one code is used, K if all K
        codes are used equally often.
    codebook_loss: scalar, mean ||sg[z_e(x)] - e||^2 (zero for the EMA quantizer).
    commitment_loss: scalar, mean ||z_e(x) - sg[e]||^2, before multiplying by beta.
    """

    quantized: Tensor
    loss: Tensor
    indices: Tensor
    perplexity: Tensor
    codebook_loss: Tensor
    commitment_loss: Tensor


def flatten_latents(z: Tensor) -> Tensor:
    """(B, D, H, W) -> (B*H*W, D), one row per latent vector."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def unflatten_latents(flat: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(B*H*W, D) -> (B, D, H, W), the inverse of `flatten_latents` (the result is channels-last in memory)."""
    b, d, h, w = shape
    return flat.view(b, h, w, d).permute(0, 3, 1, 2)


class _Quantizer(nn.Module):
    """What the two vector quantizers share.

    - The nearest-code search in float32 under autocast, and the lookup from indices.
    - `cosine`: l2-normalised codes and inputs, so the nearest code is the one with the highest cosine similarity
      (the "l2-normalized codes" of ViT-VQGAN, Yu et al. 2021, arXiv 2110.04627).
    - `lookup_dim`: a low-dimensional lookup: z is projected from D to lookup_dim dimensions, the codebook lives
      there, and the chosen code is projected back to D (ViT-VQGAN's "factorized codes").
    - `kmeans_init`: the codebook starts from k-means (10 Lloyd iterations) on the encoder outputs of the first
      training batch (of all processes), as proposed in SoundStream (Zeghidour et al. 2021, arXiv 2107.03312).
    - `restart_threshold`: a code whose recent use (its EMA count, or for the plain quantizer an EMA of its
      per-batch count, decay 0.99) falls below the threshold is moved onto a randomly chosen current encoder
      output, with its statistics reset to match (as in Jukebox, Dhariwal et al. 2020, arXiv 2005.00341).
    Under torch.distributed, k-means and restarts use every process's encoder outputs, and the random choices
    are made on rank 0 and broadcast, so every process holds the same codebook.
    """

    def _setup(self, num_embeddings: int, embedding_dim: int, beta: float, cosine: bool, lookup_dim: int,
               kmeans_init: bool, restart_threshold: float) -> int:
        if lookup_dim < 0 or restart_threshold < 0:
            raise ValueError("lookup_dim and restart_threshold must be non-negative")
        self.num_embeddings, self.embedding_dim, self.beta = num_embeddings, embedding_dim, beta
        self.cosine, self.lookup_dim, self.restart_threshold = cosine, lookup_dim, restart_threshold
        self.code_dim = lookup_dim or embedding_dim
        if lookup_dim:
            self.project_in = nn.Linear(embedding_dim, lookup_dim)
            self.project_out = nn.Linear(lookup_dim, embedding_dim)
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))   # codes restarted so far
        self._pending_init = kmeans_init   # a Python copy of `not initialized`: no device sync every step
        return self.code_dim

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._pending_init = not bool(self.initialized)

    @property
    def codebook(self) -> Tensor:
        """(K, D) the code vectors e_1..e_K ((K, lookup_dim) with the low-dimensional lookup; normalised when
        cosine)."""
        return l2norm(self.embedding) if self.cosine else self.embedding

    def lookup(self, indices: Tensor) -> Tensor:
        """(B, H, W) code indices -> (B, D, H, W) code vectors, as the decoder receives them."""
        flat = F.embedding(indices.reshape(-1), self.codebook)                    # (B*H*W, code_dim)
        if self.lookup_dim:
            flat = self.project_out(flat)                                          # (B*H*W, D)
        return unflatten_latents(flat, (*indices.shape[:1], self.embedding_dim, *indices.shape[1:]))

    def _flat(self, z: Tensor) -> Tensor:
        """z (B, D, H, W) -> float32 (B*H*W, code_dim): projected and normalised as the options say."""
        if z.dim() != 4 or z.shape[1] != self.embedding_dim:
            raise ValueError(f"expected z of shape (B, {self.embedding_dim}, H, W), got {tuple(z.shape)}")
        flat = flatten_latents(z).float()                                         # (B*H*W, D)
        if self.lookup_dim:
            flat = F.linear(flat, self.project_in.weight.float(), self.project_in.bias.float())  # (N, lookup_dim)
        return l2norm(flat) if self.cosine else flat

    @torch.no_grad()
    def nearest_indices(self, z: Tensor) -> Tensor:
        """z (B, D, H, W) -> (B, H, W) indices of the nearest codes (eq. 1), in float32; changes nothing."""
        with torch.autocast(z.device.type, enabled=False):
            return nearest_code(self._flat(z), self.codebook).view(z.shape[0], z.shape[2], z.shape[3])

    def _search(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (B, D, H, W) -> (flat z (N, code_dim) float32, indices (N,), nearest codes (N, code_dim))."""
        flat = self._flat(z)
        if self.training and self._pending_init:
            self._initialize(flat.detach())
        indices = nearest_code(flat.detach(), self.codebook.detach(), fused=self.training)   # (N,)
        codes = F.embedding(indices, self.codebook)                               # (N, code_dim)
        return flat, indices, codes

    def _straight_through(self, flat: Tensor, codes: Tensor) -> Tensor:
        # straight-through estimator: the forward value is exactly the code, the gradient goes to z_e unchanged
        return codes.detach() + (flat - flat.detach())

    def _output(self, z: Tensor, flat: Tensor, indices: Tensor, codes: Tensor, codebook_loss: Tensor,
                commitment_loss: Tensor, loss: Tensor) -> VQOutput:
        quantized = self._straight_through(flat, codes)                          # (N, code_dim)
        if self.lookup_dim:
            quantized = F.linear(quantized, self.project_out.weight.float(), self.project_out.bias.float())
        counts = code_counts(indices, self.num_embeddings)
        return VQOutput(
            quantized=unflatten_latents(quantized, z.shape),                      # (B, D, H, W)
            loss=loss,
            indices=indices.view(z.shape[0], z.shape[2], z.shape[3]),            # (B, H, W)
            perplexity=perplexity_from_counts(counts),
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
        )

    @torch.no_grad()
    def _initialize(self, flat: Tensor) -> None:
        """k-means on the first training batch's vectors (of all processes); rank 0's result everywhere."""
        centres, counts = kmeans(gather_rows(flat), self.num_embeddings, cosine=self.cosine)
        centres, counts = same_everywhere(centres.contiguous()), same_everywhere(counts.contiguous())
        self._set_codes(torch.ones_like(counts, dtype=torch.bool), centres, counts.clamp_min(1.0))
        self.initialized.fill_(True)
        self._pending_init = False

    @torch.no_grad()
    def _restart_dead_codes(self, flat: Tensor, usage: Tensor) -> None:
        """Move every code whose usage is below the threshold onto a random current encoder output.

        Fixed shapes and no host synchronisation: a candidate is drawn for every code and applied where dead."""
        if not self.restart_threshold:
            return
        dead = usage < self.restart_threshold                                     # (K,), the same everywhere
        pool = gather_rows(flat)             # (N of all processes, code_dim): the same rows as one big batch
        pick = same_everywhere(torch.randint(pool.shape[0], (self.num_embeddings,), device=flat.device))
        self._set_codes(dead, pool[pick], torch.full_like(usage, self.restart_threshold))
        self.restarts += dead.sum()

    def _set_codes(self, where: Tensor, codes: Tensor, counts: Tensor) -> None:
        raise NotImplementedError


class VectorQuantizer(_Quantizer):
    """Vector quantizer trained by gradient descent (eq. 3).

    num_embeddings: K, the number of codes.
    embedding_dim: D, the dimension of each code and of each encoder output vector.
    beta: the commitment weight, beta in eq. 3 (the paper uses 0.25).
    rotation_trick: pass gradients through the quantizer with the rotation trick (Fifty et al. 2024,
        arXiv 2410.06424) instead of the straight-through copy: z is mapped onto its code by a scaled rotation
        (treated as a constant), and the gradient goes back through that rotation, so it carries the angle
        between z and its code. The forward value is the code.
    cosine, lookup_dim, kmeans_init, restart_threshold: the codebook options of `_Quantizer`.
    Example: VectorQuantizer(512, 64)(torch.randn(8, 64, 16, 16)).indices.shape == (8, 16, 16).
    """

    def __init__(self, num_embeddings: int = 512, embedding_dim: int = 64, beta: float = 0.25,
                 rotation_trick: bool = False, cosine: bool = False, lookup_dim: int = 0, kmeans_init: bool = False,
                 restart_threshold: float = 0.0, usage_decay: float = 0.99):
        super().__init__()
        code_dim = self._setup(num_embeddings, embedding_dim, beta, cosine, lookup_dim, kmeans_init,
                               restart_threshold)
        self.rotation_trick, self.usage_decay = rotation_trick, usage_decay
        self.embedding = nn.Parameter(variance_scaling_uniform(num_embeddings, code_dim))   # (K, code_dim)
        # recent use of each code (an EMA of its per-batch count), for dead-code restarts
        self.register_buffer("usage", torch.full((num_embeddings,), max(restart_threshold, 1.0)))

    def forward(self, z: Tensor) -> VQOutput:
        with torch.autocast(z.device.type, enabled=False):
            flat, indices, codes = self._search(z)
            codebook_loss = F.mse_loss(codes, flat.detach())     # ||sg[z_e(x)] - e||^2: moves the codes
            commitment_loss = F.mse_loss(flat, codes.detach())   # ||z_e(x) - sg[e]||^2: moves the encoder
            loss = codebook_loss + self.beta * commitment_loss
            out = self._output(z, flat, indices, codes, codebook_loss, commitment_loss, loss)
            if self.training:
                with torch.no_grad():
                    counts = code_counts(indices, self.num_embeddings)
                    if distributed():
                        dist.all_reduce(counts)
                    self.usage.mul_(self.usage_decay).add_(counts, alpha=1.0 - self.usage_decay)
                    self._restart_dead_codes(flat.detach(), self.usage)
            return out

    def _straight_through(self, flat: Tensor, codes: Tensor) -> Tensor:
        if not (self.rotation_trick and self.training and torch.is_grad_enabled()):
            return super()._straight_through(flat, codes)
        # rotation trick: q = lambda * R z with R rotating z/|z| onto e/|e| and lambda = |e|/|z|, both constants:
        # R = I - 2 r r^T + 2 e_hat z_hat^T with r = (z_hat + e_hat) / |z_hat + e_hat|, so R z_hat = e_hat.
        with torch.no_grad():
            e = codes.detach()
            z_norm, e_norm = flat.norm(dim=1, keepdim=True).clamp_min(1e-6), e.norm(dim=1, keepdim=True)
            z_hat, e_hat = flat / z_norm, e / e_norm.clamp_min(1e-6)
            r = l2norm(z_hat + e_hat)
            scale = e_norm / z_norm
        rz = flat - 2 * r * (r * flat).sum(1, keepdim=True) + 2 * e_hat * (z_hat * flat).sum(1, keepdim=True)
        return scale * rz

    def _set_codes(self, where: Tensor, codes: Tensor, counts: Tensor) -> None:
        self.embedding.data.copy_(torch.where(where[:, None], codes, self.embedding.data))
        self.usage.copy_(torch.where(where, counts, self.usage))


class VectorQuantizerEMA(_Quantizer):
    """Vector quantizer whose codebook follows exponential moving averages (appendix A.1).

    For code i with n_i assigned vectors z_{i,1..n_i} in the batch:
        N_i <- decay * N_i + (1 - decay) * n_i
        m_i <- decay * m_i + (1 - decay) * sum_j z_{i,j}
        e_i <- m_i / N_i
    with N_i Laplace-smoothed as (N_i + eps) / (n + K eps) * n, n = sum_i N_i, so an unused code never divides by
    zero. The statistics start consistent with the initial codebook (N_i = 1, m_i = e_i), so a code that is never
    chosen keeps its place rather than collapsing to zero (zero-initialised, bias-corrected averages) or jumping by
    a factor 1/eps (zero counts with m_i = e_i). Under torch.distributed the batch counts and sums are summed over
    processes first, so every process holds the same codebook. A restarted code gets N_i = restart_threshold and
    m_i = N_i e_i for its new e_i, so the average does not pull it back to where it was.

    The update happens only in training mode, in place on the buffers, after the step's output has been computed:
    a step's output uses the codebook as it was before that step. The loss is beta * commitment_loss.

    num_embeddings: K; embedding_dim: D; beta: commitment weight (eq. 3); decay: gamma of appendix A.1 (0.99);
    eps: Laplace smoothing constant (1e-5); cosine, lookup_dim, kmeans_init, restart_threshold: see `_Quantizer`.
    Example: VectorQuantizerEMA(512, 64)(torch.randn(8, 64, 16, 16)).quantized.shape == (8, 64, 16, 16).
    """

    def __init__(self, num_embeddings: int = 512, embedding_dim: int = 64, beta: float = 0.25,
                 decay: float = 0.99, eps: float = 1e-5, cosine: bool = False, lookup_dim: int = 0,
                 kmeans_init: bool = False, restart_threshold: float = 0.0):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        code_dim = self._setup(num_embeddings, embedding_dim, beta, cosine, lookup_dim, kmeans_init,
                               restart_threshold)
        self.decay, self.eps = decay, eps
        embedding = variance_scaling_uniform(num_embeddings, code_dim)
        self.register_buffer("embedding", embedding)                       # (K, code_dim) e_i
        self.register_buffer("cluster_size", torch.ones(num_embeddings))   # (K,)   N_i
        self.register_buffer("embed_sum", embedding.clone())               # (K, code_dim) m_i

    def forward(self, z: Tensor) -> VQOutput:
        with torch.autocast(z.device.type, enabled=False):
            flat, indices, codes = self._search(z)
            commitment_loss = F.mse_loss(flat, codes.detach())   # ||z_e(x) - sg[e]||^2
            codebook_loss = torch.zeros_like(commitment_loss)    # the codebook is learned by EMA, not gradients
            loss = self.beta * commitment_loss
            out = self._output(z, flat, indices, codes, codebook_loss, commitment_loss, loss)
            if self.training:
                self._ema_update(flat.detach(), indices)
                self._restart_dead_codes(flat.detach(), self.cluster_size)
            return out

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, indices: Tensor) -> None:
        counts = code_counts(indices, self.num_embeddings).to(flat.dtype)                # (K,)   n_i
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)             # (K, D) sum_j z_{i,j}
        if distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_embeddings * self.eps) * n   # Laplace smoothing
        self.embedding.copy_(self.embed_sum / smoothed.unsqueeze(1))

    def _set_codes(self, where: Tensor, codes: Tensor, counts: Tensor) -> None:
        self.embedding.copy_(torch.where(where[:, None], codes, self.embedding))
        self.cluster_size.copy_(torch.where(where, counts, self.cluster_size))
        self.embed_sum.copy_(torch.where(where[:, None], codes * counts[:, None], self.embed_sum))


# Levels recommended by the FSQ paper (Mentzer et al. 2023, arXiv 2309.15505, section 4.1) for target codebook
# sizes 2^8 ... 2^16.
FSQ_LEVELS = {2**8: (8, 6, 5), 2**10: (8, 5, 5, 5), 2**12: (7, 5, 5, 5, 5), 2**14: (8, 8, 8, 6, 5),
              2**16: (8, 8, 8, 5, 5, 5)}


def fsq_levels_for(target_size: int) -> tuple[int, ...]:
    """The paper's recommended levels for the target size nearest (in log2) to `target_size`; ties go up."""
    return FSQ_LEVELS[min(FSQ_LEVELS, key=lambda k: (abs(math.log2(k) - math.log2(target_size)), -k))]


class FSQ(nn.Module):
    """Finite Scalar Quantization (Mentzer et al. 2023, arXiv 2309.15505), a drop-in for the vector quantizers.

    z (B, D, H, W) is projected to d = len(levels) channels, each bounded by a (shifted) tanh to
    [-(L_j - 1)/2, (L_j - 1)/2] and rounded to the nearest integer with a straight-through gradient, then
    projected back to D. The implicit codebook is the grid of prod(levels) points; there is no codebook loss and
    no commitment loss. `levels` defaults to the paper's recommendation for the target size `num_embeddings`.
    Example: FSQ(512, 64).num_embeddings == 1000 (levels 8, 5, 5, 5).
    """

    def __init__(self, num_embeddings: int = 512, embedding_dim: int = 64, levels: Sequence[int] | None = None):
        super().__init__()
        self.levels = tuple(int(v) for v in (levels or fsq_levels_for(num_embeddings)))
        if any(v < 2 for v in self.levels):
            raise ValueError(f"every FSQ level must be at least 2, got {self.levels}")
        self.embedding_dim, self.num_embeddings = embedding_dim, math.prod(self.levels)
        self.project_in = nn.Linear(embedding_dim, len(self.levels))
        self.project_out = nn.Linear(len(self.levels), embedding_dim)
        levels_t = torch.tensor(self.levels, dtype=torch.float32)
        self.register_buffer("_levels", levels_t, persistent=False)
        self.register_buffer("_basis", torch.cumprod(torch.tensor((1,) + self.levels[:-1]), 0), persistent=False)

    def _bound(self, h: Tensor) -> Tensor:
        """Squash each channel into (-(L-1)/2, (L-1)/2), shifted by half a step for even L so rounding gives L
        values."""
        half = (self._levels - 1) * (1 - 1e-3) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(h + shift) * half - offset

    def _grid(self, indices: Tensor) -> Tensor:
        """(N,) indices -> (N, d) integer grid points centred on zero."""
        digits = (indices[:, None] // self._basis) % self._levels.long()
        return digits.float() - (self._levels // 2)

    @property
    def codebook(self) -> Tensor:
        """(K, d) every grid point, in the quantized space before the projection back to D."""
        return self._grid(torch.arange(self.num_embeddings, device=self._levels.device))

    def lookup(self, indices: Tensor) -> Tensor:
        """(B, H, W) indices -> (B, D, H, W), as the decoder receives them."""
        flat = self.project_out(self._grid(indices.reshape(-1)))
        return unflatten_latents(flat, (*indices.shape[:1], self.embedding_dim, *indices.shape[1:]))

    def _quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (B, D, H, W) -> (grid points (N, d) with straight-through gradient, indices (N,))."""
        if z.dim() != 4 or z.shape[1] != self.embedding_dim:
            raise ValueError(f"expected z of shape (B, {self.embedding_dim}, H, W), got {tuple(z.shape)}")
        h = self._bound(F.linear(flatten_latents(z).float(), self.project_in.weight.float(),
                                 self.project_in.bias.float()))                 # (N, d)
        rounded = h + (torch.round(h) - h).detach()                              # straight-through rounding
        digits = (torch.round(h) + self._levels // 2).long()                      # (N, d) in [0, L)
        return rounded, (digits * self._basis).sum(1)

    @torch.no_grad()
    def nearest_indices(self, z: Tensor) -> Tensor:
        with torch.autocast(z.device.type, enabled=False):
            return self._quantize(z)[1].view(z.shape[0], z.shape[2], z.shape[3])

    def forward(self, z: Tensor) -> VQOutput:
        with torch.autocast(z.device.type, enabled=False):
            rounded, indices = self._quantize(z)
            quantized = F.linear(rounded, self.project_out.weight.float(), self.project_out.bias.float())
            zero = rounded.new_zeros(())
            return VQOutput(unflatten_latents(quantized, z.shape), zero, indices.view(z.shape[0], *z.shape[2:]),
                            perplexity_from_counts(code_counts(indices, self.num_embeddings)), zero,
                            zero)


# ---------------------------------------------------------------------------------------------------------------
# The whole model


@dataclass(frozen=True, kw_only=True)
class QuantizerOptions:
    """What builds a quantizer (`make_quantizer`): one level's options, given by name only. The defaults are
    train.Config's: the paper's where the comment cites it, otherwise the best variant of benchmarks/ablation.py
    (the quantizer classes on their own default to the paper's random codebook in D dimensions, never restarted).
    Example: make_quantizer(QuantizerOptions(quantizer="vq", num_embeddings=512)).num_embeddings == 512.
    """

    quantizer: str = "ema"            # ema (a moving-average codebook, appendix A.1), vq (eq. 3's loss) or fsq
    num_embeddings: int = 2048        # K, the number of codes (the paper: 512); for fsq the target size of its grid
    embedding_dim: int = 64           # D, the dimension of each code and of each encoder output z_e(x)
    beta: float = 0.25                # the commitment weight beta of eq. 3 (the paper's 0.25)
    decay: float = 0.99               # ema: the decay gamma of the moving averages, appendix A.1 (the paper's 0.99)
    eps: float = 1e-5                 # ema: Laplace smoothing of the counts N_i (the authors' Sonnet code's)
    kmeans_init: bool = True          # start from k-means on the first batch (SoundStream; the paper: random codes)
    restart_threshold: float = 1.0    # restart codes used less than this per batch (Jukebox; the paper: 0, never)
    cosine: bool = True               # l2-normalised codes and inputs (ViT-VQGAN; the paper: Euclidean, eq. 1)
    lookup_dim: int = 4               # search codes in a projection of this dimension (ViT-VQGAN; the paper: 0, in D)
    rotation_trick: bool = False      # vq: rotation-trick gradients (arXiv 2410.06424; the paper: straight-through)
    fsq_levels: tuple[int, ...] | None = None   # fsq: its levels (None: the FSQ paper's choice for num_embeddings)

    def __post_init__(self):
        if self.fsq_levels is not None:   # a list would be unequal to the same levels as a tuple, and unhashable
            object.__setattr__(self, "fsq_levels", tuple(int(v) for v in self.fsq_levels))


def make_quantizer(options: QuantizerOptions) -> nn.Module:
    """The quantizer `options` describe: VectorQuantizerEMA ("ema"), VectorQuantizer ("vq") or FSQ ("fsq");
    `VQVAE` builds one, hierarchy.VQVAE2 one per level."""
    if not isinstance(options, QuantizerOptions):
        raise TypeError(f"make_quantizer takes a QuantizerOptions, got {type(options).__name__}")
    o = options
    size = dict(num_embeddings=o.num_embeddings, embedding_dim=o.embedding_dim)
    codebook = dict(beta=o.beta, cosine=o.cosine, lookup_dim=o.lookup_dim, kmeans_init=o.kmeans_init,
                    restart_threshold=o.restart_threshold)
    if o.quantizer == "ema":
        return VectorQuantizerEMA(**size, **codebook, decay=o.decay, eps=o.eps)
    if o.quantizer == "vq":
        return VectorQuantizer(**size, **codebook, rotation_trick=o.rotation_trick)
    if o.quantizer == "fsq":
        return FSQ(**size, levels=o.fsq_levels)
    raise ValueError(f"quantizer must be 'ema', 'vq' or 'fsq', got {o.quantizer!r}")


class VQVAEOutput(NamedTuple):
    """reconstruction: (B, 3, H, W) decoder output; vq: the quantizer's `VQOutput` for this batch (for a 2-level
    model: its losses summed over the levels, the bottom level's indices and perplexity); levels: each level's own
    `VQOutput`, top first (one for `VQVAE`)."""

    reconstruction: Tensor
    vq: VQOutput
    levels: tuple = ()


class VQVAE(ImageCodec, nn.Module):
    """Encoder -> quantizer -> decoder; every argument by name.

    options: the quantizer's `QuantizerOptions` (their embedding_dim D is also the encoder's output and the
    decoder's input); any of its fields given by name replaces the one in `options`, as in
    VQVAE(num_embeddings=512, cosine=False). The defaults are train.Config's. block, attention, downsample: see
    `Encoder`. The options the model was built with are kept as `model.options`.
    Example: VQVAE()(torch.zeros(8, 3, 32, 32)).vq.indices.shape == (8, 8, 8).
    """

    def __init__(self, *, hidden_channels: int = 128, residual_channels: int = 32, num_residual_blocks: int = 2,
                 in_channels: int = 3, block: str = "paper", attention: bool = False, downsample: int = 4,
                 options: QuantizerOptions = QuantizerOptions(), **changes: Any):
        super().__init__()
        self.options = options = replace(options, **changes)
        stack = (hidden_channels, residual_channels, num_residual_blocks, options.embedding_dim, in_channels)
        shape = dict(block=block, attention=attention, downsample=downsample)
        self.encoder = Encoder(*stack, **shape)
        self.quantizer = make_quantizer(options)
        self.decoder = Decoder(*stack, **shape)

    levels = 1

    @property
    def downsampling(self) -> int:   # the pixels one code stands for in each direction: 4, or 8 with downsample=8
        return 8 if len(self.encoder.down) else 4

    @property
    def quantizers(self) -> tuple[nn.Module, ...]:
        """The model's quantizers, top level first (one here; two in hierarchy.VQVAE2)."""
        return (self.quantizer,)

    def forward(self, x: Tensor) -> VQVAEOutput:
        vq = self.quantizer(self.encoder(x))
        return VQVAEOutput(self.decoder(vq.quantized), vq, (vq,))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, H/f, W/f) code indices (f = downsampling); never updates the codebook."""
        return self.quantizer.nearest_indices(self.encoder(x))

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """(B, h, w) code indices -> (B, 3, f h, f w) images (in the model's [-0.5, 0.5] scale)."""
        return self.decoder(self.quantizer.lookup(indices))
