"""The two-level prior of VQ-VAE-2 (Razavi, van den Oord, Vinyals 2019, arXiv 1906.00446, section 3.2 and figure
2b), over the (top, bottom) code maps of hierarchy.VQVAE2:

    p(z_top, z_bottom | y) = p(z_top | y) * p(z_bottom | z_top, y)

- the top prior is a gated PixelCNN (prior.GatedPixelCNN, arXiv 1606.05328) over the top map, optionally with one
  causal self-attention block (the paper's top prior has attention; PixelSNAIL, arXiv 1712.09763), or with
  arch="transformer" a decoder-only transformer over it (transformer_prior.TransformerPrior);
- the bottom prior is a gated PixelCNN over the bottom map conditioned on the whole top map through a conditioning
  stack (eq. 5 of 1606.05328 with a spatial h): the top codes are embedded, passed through a 3x3 convolution and
  residual blocks at the top resolution, and brought to the bottom resolution by a 4x4 stride-2 transposed
  convolution; that map s enters every gated layer of the bottom prior through 1x1 convolutions. The top map is
  known in full before the bottom one is drawn, so every bottom position may see every top code.

The two priors share no weights and their losses are a sum, so training them together in one optimizer (Adam is
per parameter) is training each on its own with the same batches. Sampling draws the top map, then the bottom map
given it, each with its prior's cached raster-order sampler.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import ResidualStack
from prior import GatedPixelCNN
from transformer_prior import TransformerPrior


class LevelOutputs(NamedTuple):
    """One tensor per level, top first: logits (B, K, h, w), NLLs (B,) or sampled codes of the top and the bottom map.
    Example: top, bottom = HierarchicalPrior(16).sample(2, (8, 8)); (top.shape, bottom.shape) == ((2, 4, 4), (2, 8, 8)).
    """

    top: Tensor
    bottom: Tensor


class ConditioningStack(nn.Module):
    """Top codes (B, h, w) -> the bottom prior's conditioning map s (B, channels, 2h, 2w): an embedding, a 3x3
    convolution, `num_blocks` residual blocks of the VQ-VAE's paper kind (models.ResidualStack: ReLU, 3x3, ReLU, 1x1,
    and a ReLU after the stack) at the top resolution, then a 4x4 stride-2 transposed convolution (the m(h) of
    eq. 5 in arXiv 1606.05328).
    Example: ConditioningStack(16, 8)(torch.zeros(2, 4, 4, dtype=torch.long)).shape == (2, 8, 8, 8).
    """

    def __init__(self, num_embeddings: int, channels: int = 32, num_blocks: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, channels)
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.residual = ResidualStack(channels, max(1, channels // 2), num_blocks)
        self.up = nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=2, padding=1)

    def forward(self, top: Tensor) -> Tensor:
        return self.forward_embedded(self.embedding(top).permute(0, 3, 1, 2))   # (B, h, w, C) -> (B, C, h, w)

    def forward_embedded(self, e: Tensor) -> Tensor:
        """The same from top-code embeddings (B, C, h, w): the Jacobian tests differentiate through this."""
        return self.up(self.residual(self.conv(e)))                             # (B, C, 2h, 2w)


class HierarchicalPrior(nn.Module):
    """p(z_top | y) p(z_bottom | z_top, y) over VQVAE2 code maps: `top` and `bottom` GatedPixelCNNs and the bottom
    prior's `conditioning` stack. The bottom level has K = num_embeddings codes, the top top_num_embeddings (default:
    the same).

    num_classes, channels, num_layers, kernel_size, dropout: as for prior.GatedPixelCNN, the same for both priors.
    attention, heads: one causal self-attention block in the top prior (the paper's top prior has attention).
    arch: "pixelcnn", or "transformer" for a TransformerPrior over the top map of `top_shape` (h, w), of `width`,
    `depth` blocks, `heads` and `class_dropout` (the bottom prior stays the conditioned gated PixelCNN).
    cond_channels: width of the conditioning stack and of the map s it gives the bottom prior (eq. 5 of arXiv
    1606.05328); cond_blocks: its residual blocks at the top resolution.
    Example: [l.shape for l in HierarchicalPrior(16)(torch.zeros(2, 4, 4).long(), torch.zeros(2, 8, 8).long())]
    == [(2, 16, 4, 4), (2, 16, 8, 8)].
    """

    levels = 2

    def __init__(self, num_embeddings: int, num_classes: int = 0, channels: int = 32, num_layers: int = 8,
                 kernel_size: int = 5, dropout: float = 0.0, attention: bool = False, heads: int = 4,
                 cond_channels: int = 32, cond_blocks: int = 2, top_num_embeddings: int | None = None,
                 arch: str = "pixelcnn", top_shape: tuple[int, int] = (8, 8), width: int = 128, depth: int = 4,
                 class_dropout: float = 0.0):
        super().__init__()
        if cond_channels < 1:
            raise ValueError(f"the bottom prior needs a conditioning map: cond_channels must be at least 1, got "
                             f"{cond_channels}")
        self.num_embeddings, self.num_classes = num_embeddings, num_classes
        self.top_num_embeddings = top_num_embeddings = top_num_embeddings or num_embeddings
        shared = dict(num_classes=num_classes, channels=channels, num_layers=num_layers, kernel_size=kernel_size,
                      dropout=dropout)
        if arch == "transformer":
            self.top = TransformerPrior(top_num_embeddings, num_classes, tuple(top_shape), width, depth, heads,
                                        dropout, class_dropout)
        else:
            self.top = GatedPixelCNN(top_num_embeddings, attention=attention, heads=heads, **shared)
        self.conditioning = ConditioningStack(top_num_embeddings, cond_channels, cond_blocks)
        self.bottom = GatedPixelCNN(num_embeddings, cond_channels=cond_channels, **shared)

    @staticmethod
    def check_shapes(top: Tensor, bottom: Tensor) -> None:
        if tuple(bottom.shape[-2:]) != (2 * top.shape[-2], 2 * top.shape[-1]):
            raise ValueError(f"the bottom map must be twice the top map's size, got top {tuple(top.shape[-2:])} "
                             f"and bottom {tuple(bottom.shape[-2:])}")

    def forward(self, top: Tensor, bottom: Tensor, labels: Tensor | None = None) -> LevelOutputs:
        """(B, h/2, w/2) top and (B, h, w) bottom codes [, (B,) labels] -> logits (B, K_top, h/2, w/2) of
        p(z_top_ij | z_top_<ij, y) and (B, K, h, w) of p(z_bottom_ij | z_bottom_<ij, z_top, y)."""
        self.check_shapes(top, bottom)
        return LevelOutputs(self.top(top, labels), self.bottom(bottom, labels, self.conditioning(top)))

    def nll(self, top: Tensor, bottom: Tensor, labels: Tensor | None = None) -> LevelOutputs:
        """-log p(z_top | y) and -log p(z_bottom | z_top, y), each (B,) in nats summed over its map."""
        return LevelOutputs(*(F.cross_entropy(logits.float(), z, reduction="none").flatten(1).sum(1)
                              for logits, z in zip(self(top, bottom, labels), (top, bottom))))

    @torch.no_grad()
    def sample(self, num: int, shape: tuple[int, int], temperature: float = 1.0, labels: Tensor | None = None,
               generator: torch.Generator | None = None, top_k: int = 0, top_p: float = 1.0,
               guidance: float | None = None) -> LevelOutputs:
        """Draw `num` pairs of maps, the bottom map of `shape` (h, w) (both even): the top map (num, h/2, w/2) from
        the top prior, then the bottom map (num, h, w) from the bottom prior given it; int64 in [0, K). The
        arguments are those of GatedPixelCNN.sample, for both levels; one generator serves both levels, top first.
        guidance: the classifier-free guidance scale of a transformer top prior (the bottom prior draws from
        p(z_bottom | z_top, y))."""
        height, width = shape
        if height % 2 or width % 2:
            raise ValueError(f"the bottom map's size must be even (twice the top map's), got {shape}")
        guided = {} if guidance is None else {"guidance": guidance}
        top = self.top.sample(num, (height // 2, width // 2), temperature, labels, generator, top_k=top_k,
                              top_p=top_p, **guided)
        cond = self.conditioning(top)                   # (num, C, h, w); the stack has no dropout or batch statistics
        bottom = self.bottom.sample(num, shape, temperature, labels, generator, cond, top_k=top_k, top_p=top_p)
        return LevelOutputs(top, bottom)
