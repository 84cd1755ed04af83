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
- `VQVAE`: encoder, quantizer and decoder together, with `encode(x) -> indices` and `decode(indices) -> x`.

Distances and the argmin are computed in float32 even under autocast; the nearest-code search runs in chunks so
its memory is bounded whatever the number of vectors times codes.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------------------------
# Encoder and decoder (section 4.1)


class ResidualBlock(nn.Module):
    """h + conv1x1(relu(conv3x3(relu(h)))): the paper's residual block ("ReLU, 3x3 conv, ReLU, 1x1 conv")."""

    def __init__(self, channels: int, residual_channels: int):
        super().__init__()
        self.conv3 = nn.Conv2d(channels, residual_channels, kernel_size=3, padding=1)
        self.conv1 = nn.Conv2d(residual_channels, channels, kernel_size=1)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.conv1(F.relu(self.conv3(F.relu(h))))


class ResidualStack(nn.Module):
    """`num_blocks` separate residual blocks (each with its own weights) followed by a ReLU."""

    def __init__(self, channels: int, residual_channels: int, num_blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList([ResidualBlock(channels, residual_channels) for _ in range(num_blocks)])

    def forward(self, h: Tensor) -> Tensor:
        for block in self.blocks:
            h = block(h)
        return F.relu(h)


class Encoder(nn.Module):
    """x (B, 3, H, W) -> z_e(x) (B, D, H/4, W/4).

    Two 4x4 stride-2 convolutions (hidden/2, then hidden channels, each followed by a ReLU), a 3x3 convolution,
    the residual stack, and a 1x1 convolution to the embedding dimension D that the quantizer expects.
    Example: Encoder()(torch.zeros(8, 3, 64, 64)).shape == (8, 64, 16, 16).

    hidden_channels: width of the convolutions (the paper uses 256; 128 as in the authors' Sonnet example).
    residual_channels: width inside each residual block.
    num_residual_blocks: number of residual blocks (the paper uses 2).
    embedding_dim: D, the dimension of each latent vector and of each code.
    """

    def __init__(self, hidden_channels: int = 128, residual_channels: int = 32, num_residual_blocks: int = 2,
                 embedding_dim: int = 64, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden_channels // 2, kernel_size=4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(hidden_channels // 2, hidden_channels, kernel_size=4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(hidden_channels, hidden_channels, kernel_size=3, padding=1)
        self.residual = ResidualStack(hidden_channels, residual_channels, num_residual_blocks)
        self.to_embedding = nn.Conv2d(hidden_channels, embedding_dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x))            # (B, hidden/2, H/2, W/2)
        h = F.relu(self.conv2(h))            # (B, hidden, H/4, W/4)
        h = self.residual(self.conv3(h))     # (B, hidden, H/4, W/4)
        return self.to_embedding(h)          # (B, D, H/4, W/4)


class Decoder(nn.Module):
    """z_q(x) (B, D, H/4, W/4) -> reconstruction (B, 3, H, W), the mirror of `Encoder`.

    A 3x3 convolution from D to hidden channels, the residual stack, then two 4x4 stride-2 transposed
    convolutions (to hidden/2 with a ReLU, then to the image channels). The output is unbounded; images are
    scaled to [-0.5, 0.5] for training.
    Example: Decoder()(torch.zeros(8, 64, 16, 16)).shape == (8, 3, 64, 64).
    """

    def __init__(self, hidden_channels: int = 128, residual_channels: int = 32, num_residual_blocks: int = 2,
                 embedding_dim: int = 64, out_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(embedding_dim, hidden_channels, kernel_size=3, padding=1)
        self.residual = ResidualStack(hidden_channels, residual_channels, num_residual_blocks)
        self.deconv1 = nn.ConvTranspose2d(hidden_channels, hidden_channels // 2, kernel_size=4, stride=2, padding=1)
        self.deconv2 = nn.ConvTranspose2d(hidden_channels // 2, out_channels, kernel_size=4, stride=2, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.residual(self.conv1(z))     # (B, hidden, H/4, W/4)
        h = F.relu(self.deconv1(h))          # (B, hidden/2, H/2, W/2)
        return self.deconv2(h)               # (B, 3, H, W)


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


def perplexity_from_counts(counts: Tensor) -> Tensor:
    """exp(-sum_k p_k log p_k) of the distribution p = counts / sum(counts); 0 log 0 is taken as 0."""
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-torch.special.xlogy(p, p).sum())


def flatten_latents(z: Tensor) -> Tensor:
    """(B, D, H, W) -> (B*H*W, D), one row per latent vector."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def unflatten_latents(flat: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(B*H*W, D) -> (B, D, H, W), the inverse of `flatten_latents` (the result is channels-last in memory)."""
    b, d, h, w = shape
    return flat.view(b, h, w, d).permute(0, 3, 1, 2)


class _Quantizer(nn.Module):
    """What the two quantizers share: the lookup from indices, and the float32 search under autocast."""

    num_embeddings: int
    embedding_dim: int

    @property
    def codebook(self) -> Tensor:
        """(K, D) the code vectors e_1..e_K."""
        return self.embedding

    def lookup(self, indices: Tensor) -> Tensor:
        """(B, H, W) code indices -> (B, D, H, W) code vectors."""
        flat = F.embedding(indices.reshape(-1), self.codebook)                    # (B*H*W, D)
        return unflatten_latents(flat, (*indices.shape[:1], self.embedding_dim, *indices.shape[1:]))

    def _flat(self, z: Tensor) -> Tensor:
        """z (B, D, H, W) -> float32 (B*H*W, D), checking D."""
        if z.dim() != 4 or z.shape[1] != self.embedding_dim:
            raise ValueError(f"expected z of shape (B, {self.embedding_dim}, H, W), got {tuple(z.shape)}")
        return flatten_latents(z).float()                                         # (B*H*W, D)

    @torch.no_grad()
    def nearest_indices(self, z: Tensor) -> Tensor:
        """z (B, D, H, W) -> (B, H, W) indices of the nearest codes (eq. 1), in float32; changes nothing."""
        with torch.autocast(z.device.type, enabled=False):
            return nearest_code(self._flat(z), self.codebook).view(z.shape[0], z.shape[2], z.shape[3])

    def _search(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (B, D, H, W) -> (flat z in float32 (N, D), indices (N,), nearest codes (N, D))."""
        flat = self._flat(z)                                                      # (B*H*W, D)
        indices = nearest_code(flat.detach(), self.codebook.detach())              # (B*H*W,)
        codes = F.embedding(indices, self.codebook)                               # (B*H*W, D)
        return flat, indices, codes

    def _output(self, z: Tensor, flat: Tensor, indices: Tensor, codes: Tensor, codebook_loss: Tensor,
                commitment_loss: Tensor, loss: Tensor) -> VQOutput:
        # straight-through estimator: the forward value is exactly the code, the gradient goes to z_e unchanged
        quantized = codes.detach() + (flat - flat.detach())                      # (B*H*W, D)
        counts = torch.bincount(indices, minlength=self.num_embeddings)
        return VQOutput(
            quantized=unflatten_latents(quantized, z.shape),                      # (B, D, H, W)
            loss=loss,
            indices=indices.view(z.shape[0], z.shape[2], z.shape[3]),            # (B, H, W)
            perplexity=perplexity_from_counts(counts),
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
        )


def _variance_scaling_uniform(num_embeddings: int, embedding_dim: int) -> Tensor:
    """Uniform(-sqrt(3/D), sqrt(3/D)): unit variance per component, the Sonnet VQ-VAE's codebook initialiser."""
    limit = math.sqrt(3.0 / embedding_dim)
    return torch.empty(num_embeddings, embedding_dim).uniform_(-limit, limit)


class VectorQuantizer(_Quantizer):
    """Vector quantizer trained by gradient descent (eq. 3).

    num_embeddings: K, the number of codes.
    embedding_dim: D, the dimension of each code and of each encoder output vector.
    beta: the commitment weight, beta in eq. 3 (the paper uses 0.25).
    Example: VectorQuantizer(512, 64)(torch.randn(8, 64, 16, 16)).indices.shape == (8, 16, 16).
    """

    def __init__(self, num_embeddings: int = 512, embedding_dim: int = 64, beta: float = 0.25):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.beta = num_embeddings, embedding_dim, beta
        self.embedding = nn.Parameter(_variance_scaling_uniform(num_embeddings, embedding_dim))  # (K, D)

    def forward(self, z: Tensor) -> VQOutput:
        with torch.autocast(z.device.type, enabled=False):
            flat, indices, codes = self._search(z)
            codebook_loss = F.mse_loss(codes, flat.detach())     # ||sg[z_e(x)] - e||^2: moves the codes
            commitment_loss = F.mse_loss(flat, codes.detach())   # ||z_e(x) - sg[e]||^2: moves the encoder
            loss = codebook_loss + self.beta * commitment_loss
            return self._output(z, flat, indices, codes, codebook_loss, commitment_loss, loss)


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
    processes first, so every process holds the same codebook.

    The update happens only in training mode, in place on the buffers, after the step's output has been computed:
    a step's output uses the codebook as it was before that step. The loss is beta * commitment_loss.

    num_embeddings: K; embedding_dim: D; beta: commitment weight (eq. 3); decay: gamma of appendix A.1 (0.99);
    eps: Laplace smoothing constant (1e-5).
    Example: VectorQuantizerEMA(512, 64)(torch.randn(8, 64, 16, 16)).quantized.shape == (8, 64, 16, 16).
    """

    def __init__(self, num_embeddings: int = 512, embedding_dim: int = 64, beta: float = 0.25,
                 decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.beta, self.decay, self.eps = beta, decay, eps
        embedding = _variance_scaling_uniform(num_embeddings, embedding_dim)
        self.register_buffer("embedding", embedding)                       # (K, D) e_i
        self.register_buffer("cluster_size", torch.ones(num_embeddings))   # (K,)   N_i
        self.register_buffer("embed_sum", embedding.clone())               # (K, D) m_i

    def forward(self, z: Tensor) -> VQOutput:
        with torch.autocast(z.device.type, enabled=False):
            flat, indices, codes = self._search(z)
            commitment_loss = F.mse_loss(flat, codes.detach())   # ||z_e(x) - sg[e]||^2
            codebook_loss = torch.zeros_like(commitment_loss)    # the codebook is learned by EMA, not gradients
            loss = self.beta * commitment_loss
            out = self._output(z, flat, indices, codes, codebook_loss, commitment_loss, loss)
            if self.training:
                self._ema_update(flat.detach(), indices)
            return out

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, indices: Tensor) -> None:
        counts = torch.bincount(indices, minlength=self.num_embeddings).to(flat.dtype)   # (K,)   n_i
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)             # (K, D) sum_j z_{i,j}
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_embeddings * self.eps) * n   # Laplace smoothing
        self.embedding.copy_(self.embed_sum / smoothed.unsqueeze(1))


# ---------------------------------------------------------------------------------------------------------------
# The whole model


class VQVAEOutput(NamedTuple):
    """reconstruction: (B, 3, H, W) decoder output; vq: the quantizer's `VQOutput` for this batch."""

    reconstruction: Tensor
    vq: VQOutput


class VQVAE(nn.Module):
    """Encoder -> quantizer -> decoder. `quantizer` is "ema" (appendix A.1, the default) or "vq" (eq. 3).

    Example: VQVAE()(torch.zeros(8, 3, 32, 32)).vq.indices.shape == (8, 8, 8).
    """

    def __init__(self, hidden_channels: int = 128, residual_channels: int = 32, num_residual_blocks: int = 2,
                 embedding_dim: int = 64, num_embeddings: int = 512, beta: float = 0.25, quantizer: str = "ema",
                 decay: float = 0.99, eps: float = 1e-5, in_channels: int = 3):
        super().__init__()
        self.encoder = Encoder(hidden_channels, residual_channels, num_residual_blocks, embedding_dim, in_channels)
        if quantizer == "ema":
            self.quantizer: _Quantizer = VectorQuantizerEMA(num_embeddings, embedding_dim, beta, decay, eps)
        elif quantizer == "vq":
            self.quantizer = VectorQuantizer(num_embeddings, embedding_dim, beta)
        else:
            raise ValueError(f"quantizer must be 'ema' or 'vq', got {quantizer!r}")
        self.decoder = Decoder(hidden_channels, residual_channels, num_residual_blocks, embedding_dim, in_channels)

    def forward(self, x: Tensor) -> VQVAEOutput:
        vq = self.quantizer(self.encoder(x))
        return VQVAEOutput(self.decoder(vq.quantized), vq)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, H/4, W/4) code indices. Never updates the codebook."""
        return self.quantizer.nearest_indices(self.encoder(x))

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """(B, h, w) code indices -> (B, 3, 4h, 4w) images (in the model's [-0.5, 0.5] scale)."""
        return self.decoder(self.quantizer.lookup(indices))
