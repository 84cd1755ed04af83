"""The hierarchical VQ-VAE of "Generating Diverse High-Fidelity Images with VQ-VAE-2" (Razavi, van den Oord,
Vinyals 2019, arXiv 1906.00446), section 3.1 and figure 2a: a bottom code map for local detail and a top code map,
half its size, for global structure.

    x (B, 3, H, W) --bottom encoder (/4)--> h_b (B, hidden, H/4, W/4)
    h_b --top encoder (/2)--> z_top (B, D, H/8, W/8) --quantize--> e_top
    e_top --top decoder (x2)--> (B, D, H/4, W/4), joined to h_b --1x1--> z_bottom (B, D, H/4, W/4) --quantize--> e_bot
    [upsample(e_top), e_bot] (B, 2D, H/4, W/4) --decoder (x4)--> reconstruction (B, 3, H, W)

The bottom code is chosen with the top code already known, so it only has to carry what the top level misses; the
decoder sees both. Each level has its own quantizer (models.make_quantizer, with every codebook-health option), and
the loss is the reconstruction term plus each level's quantizer terms (eq. 3 of the VQ-VAE paper, per level).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import (Decoder, Encoder, QuantizerOptions, ResidualStack, SelfAttention, VQOutput, VQVAEOutput,
                    make_quantizer)
from pixels import ImageCodec


class TopEncoder(nn.Module):
    """h_b (B, hidden, h, w) -> z_top (B, D, h/2, w/2): a 4x4 stride-2 convolution and a ReLU, a 3x3 convolution,
    (self-attention,) the residual stack and a 1x1 convolution to D."""

    def __init__(self, hidden_channels: int, residual_channels: int, num_residual_blocks: int, embedding_dim: int,
                 block: str = "paper", attention: bool = False):
        super().__init__()
        self.down = nn.Conv2d(hidden_channels, hidden_channels, kernel_size=4, stride=2, padding=1)
        self.conv = nn.Conv2d(hidden_channels, hidden_channels, kernel_size=3, padding=1)
        self.attention = SelfAttention(hidden_channels) if attention else None
        self.residual = ResidualStack(hidden_channels, residual_channels, num_residual_blocks, block)
        self.to_embedding = nn.Conv2d(hidden_channels, embedding_dim, kernel_size=1)

    def forward(self, h: Tensor) -> Tensor:
        h = self.conv(F.relu(self.down(h)))         # (B, hidden, h/2, w/2)
        if self.attention is not None:
            h = self.attention(h)
        return self.to_embedding(self.residual(h))  # (B, D, h/2, w/2)


class TopDecoder(nn.Module):
    """e_top (B, D, h/2, w/2) -> (B, D, h, w): a 3x3 convolution, (self-attention,) the residual stack and a 4x4
    stride-2 transposed convolution; what the top level tells the bottom quantizer."""

    def __init__(self, hidden_channels: int, residual_channels: int, num_residual_blocks: int, embedding_dim: int,
                 block: str = "paper", attention: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(embedding_dim, hidden_channels, kernel_size=3, padding=1)
        self.attention = SelfAttention(hidden_channels) if attention else None
        self.residual = ResidualStack(hidden_channels, residual_channels, num_residual_blocks, block)
        self.up = nn.ConvTranspose2d(hidden_channels, embedding_dim, kernel_size=4, stride=2, padding=1)

    def forward(self, e: Tensor) -> Tensor:
        h = self.conv(e)                            # (B, hidden, h/2, w/2)
        if self.attention is not None:
            h = self.attention(h)
        return self.up(self.residual(h))            # (B, D, h, w)


class VQVAE2(ImageCodec, nn.Module):
    """The 2-level VQ-VAE: `encode(x) -> (top, bottom)` code maps of (B, H/8, W/8) and (B, H/4, W/4), and
    `decode((top, bottom)) -> x`. The bottom codebook has num_embeddings codes, the top one top_num_embeddings (0:
    as many), all of embedding_dim dimensions and with the same `options` (models.QuantizerOptions, whose fields may
    be given by name as for models.VQVAE; every argument is by name; explicit fsq_levels serve both levels, so
    top_num_embeddings only picks FSQ levels without them); `model.options` are the bottom level's. block applies
    to every residual stack, attention adds one self-attention block in the top encoder and the top decoder (the
    lowest resolution).

    num_residual_blocks sets the bottom encoder's and the decoder's stacks, top_residual_blocks the top encoder's
    and the top decoder's. The paper gives the top the same stacks as the bottom and 512 codes at each level; the
    defaults here (a top without residual stacks, as many top codes as bottom codes) are the ones that
    reconstructed the sample's unseen photos better at 128 px (docs/two-levels.md).
    Example: [c.shape for c in VQVAE2().encode(torch.zeros(2, 3, 128, 128))] == [(2, 16, 16), (2, 32, 32)].
    """

    levels = 2
    downsampling = 8   # the top map's factor: an image's sides must be multiples of it

    def __init__(self, *, hidden_channels: int = 128, residual_channels: int = 32, num_residual_blocks: int = 2,
                 in_channels: int = 3, block: str = "paper", attention: bool = False, top_residual_blocks: int = 0,
                 top_num_embeddings: int = 0, options: QuantizerOptions = QuantizerOptions(), **changes: Any):
        super().__init__()
        self.options = options = replace(options, **changes)
        embedding_dim = options.embedding_dim
        stack = (hidden_channels, residual_channels, num_residual_blocks)
        top_stack = (hidden_channels, residual_channels, top_residual_blocks)
        # the bottom encoder is the 1-level encoder ending in hidden channels instead of D
        self.encoder = Encoder(*stack, embedding_dim=hidden_channels, in_channels=in_channels, block=block)
        self.top_encoder = TopEncoder(*top_stack, embedding_dim, block, attention)
        self.top_decoder = TopDecoder(*top_stack, embedding_dim, block, attention)
        self.join = nn.Conv2d(hidden_channels + embedding_dim, embedding_dim, kernel_size=1)
        self.upsample_top = nn.ConvTranspose2d(embedding_dim, embedding_dim, kernel_size=4, stride=2, padding=1)
        self.decoder = Decoder(*stack, embedding_dim=2 * embedding_dim, out_channels=in_channels, block=block)
        top_options = replace(options, num_embeddings=top_num_embeddings or options.num_embeddings)
        self.top_quantizer = make_quantizer(top_options)
        self.bottom_quantizer = make_quantizer(options)

    @property
    def quantizers(self) -> tuple[nn.Module, nn.Module]:
        """(top, bottom) quantizers."""
        return self.top_quantizer, self.bottom_quantizer

    def _bottom_input(self, h_b: Tensor, e_top: Tensor) -> Tensor:
        """z_bottom (B, D, H/4, W/4) from the bottom features and the quantized top map."""
        return self.join(torch.cat([h_b, self.top_decoder(e_top)], 1))

    def _decode(self, e_top: Tensor, e_bottom: Tensor) -> Tensor:
        return self.decoder(torch.cat([self.upsample_top(e_top), e_bottom], 1))   # (B, 3, H, W)

    def forward(self, x: Tensor) -> VQVAEOutput:
        h_b = self.encoder(x)                                   # (B, hidden, H/4, W/4)
        top = self.top_quantizer(self.top_encoder(h_b))         # quantized (B, D, H/8, W/8)
        bottom = self.bottom_quantizer(self._bottom_input(h_b, top.quantized))
        both = VQOutput(bottom.quantized, top.loss + bottom.loss, bottom.indices, bottom.perplexity,
                        top.codebook_loss + bottom.codebook_loss, top.commitment_loss + bottom.commitment_loss)
        return VQVAEOutput(self._decode(top.quantized, bottom.quantized), both, (top, bottom))

    @torch.no_grad()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) images -> ((B, H/8, W/8) top, (B, H/4, W/4) bottom) code indices; never updates a codebook."""
        h_b = self.encoder(x)
        top = self.top_quantizer.nearest_indices(self.top_encoder(h_b))
        e_top = self.top_quantizer.lookup(top).to(h_b.dtype)
        return top, self.bottom_quantizer.nearest_indices(self._bottom_input(h_b, e_top))

    @torch.no_grad()
    def decode(self, codes: Sequence[Tensor]) -> Tensor:
        """(top, bottom) code indices -> (B, 3, H, W) images (in the model's [-0.5, 0.5] scale)."""
        if len(codes) != 2:
            raise ValueError(f"a 2-level VQ-VAE decodes (top, bottom) code maps, got {len(codes)} maps")
        top, bottom = codes
        return self._decode(self.top_quantizer.lookup(top), self.bottom_quantizer.lookup(bottom))
