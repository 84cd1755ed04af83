"""A decoder-only transformer prior over VQ-VAE code maps, beside the gated PixelCNN (prior.py): the prior of
taming-transformers (Esser, Rombach, Ommer 2021, arXiv 2012.09841) and its successors, over the same codes.

The map of h x w codes is read in raster order as a sequence z_0 .. z_{T-1} (T = h w) and factorised as
    p(z | y) = prod_t p(z_t | z_<t, y)
with a K-way softmax per position. The input sequence is a start token, which carries the class y (or a learned
"no class" token), followed by z_0 .. z_{T-2}; the output at step t is the distribution of z_t, so position t sees
exactly the codes before it in raster order (a test checks it with the Jacobian).

- Embeddings: a code embedding plus a row embedding and a column embedding of the position the token predicts
  (so the model knows both coordinates, not only the index t), the start token its own (per class) embedding.
- Blocks (GPT-2's pre-norm form): x + attn(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP; causal multi-head
  attention through `scaled_dot_product_attention(is_causal=True)`; dropout after attention and MLP.
- Classifier-free guidance (Ho and Salimans 2022, arXiv 2207.12598): trained with the class replaced by "no class"
  for a share of the maps (`class_dropout`), the prior gives both p(z_t | z_<t, y) and p(z_t | z_<t); sampling with
  scale s uses the logits l_uncond + s (l_cond - l_uncond), so s = 1 is the conditional prior and s = 0 the
  unconditional one.
- Sampling keeps each layer's keys and values (a KV cache), so step t costs one query against t cached keys
  instead of a pass over the whole prefix; temperature, top-k and top-p (nucleus, Holtzman et al. 2019) shape each
  step's distribution.

The interface is the PixelCNN's: `forward(codes, labels) -> (B, K, H, W)` logits, `nll`, `sample`,
`in_raster_order` (for the codec); a spatial conditioning map (`cond`) is not supported: for VQ-VAE-2 the bottom
level keeps the conditioned PixelCNN (hierarchical_prior.py) and the transformer models the top map.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    """x + attn(LN(x)); x + MLP(LN(x)). attn: causal multi-head self-attention; MLP: 4x width, GELU."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"the width ({width}) must be a multiple of the heads ({heads})")
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, C) -> q, k, v each (B, heads, T, C / heads)."""
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=2)
        return tuple(a.view(b, t, self.heads, c // self.heads).transpose(1, 2) for a in (q, k, v))

    def finish(self, x: Tensor, attended: Tensor) -> Tensor:
        """The residual of the attention output (B, heads, T, C / heads), then the MLP's."""
        b, _, t, _ = attended.shape
        x = x + self.drop(self.proj(attended.transpose(1, 2).reshape(b, t, -1)))   # (B, h, T, hs) -> (B, T, C)
        return x + self.drop(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.split(x)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  dropout_p=self.dropout if self.training else 0.0)
        return self.finish(x, attended)

    def step(self, x: Tensor, t: int, keys: Tensor, values: Tensor) -> Tensor:
        """One new position t: x (B, 1, C); its key and value go into the caches (B, heads, T, hs) at t, and its
        query attends to positions 0..t."""
        q, k, v = self.split(x)
        keys[:, :, t:t + 1], values[:, :, t:t + 1] = k, v
        return self.finish(x, F.scaled_dot_product_attention(q, keys[:, :, :t + 1], values[:, :, :t + 1]))


class TransformerPrior(nn.Module):
    """Autoregressive prior p(z | y) over (B, H, W) maps of codes in [0, K), a causal transformer in raster order.

    num_embeddings: K; num_classes: class labels y (0: unconditional); shape: the (h, w) of the maps it models
    (its row and column embeddings); width, num_layers, heads: the transformer's size; dropout: after attention
    and MLP; class_dropout: the share of training maps whose class is replaced by "no class" (for guidance).
    Example: TransformerPrior(512, shape=(16, 16))(torch.zeros(8, 16, 16, dtype=torch.long)).shape
    == (8, 512, 16, 16).
    """

    levels = 1
    cond_channels = 0   # no spatial conditioning map (the PixelCNN's `cond`)

    def __init__(self, num_embeddings: int, num_classes: int = 0, shape: tuple[int, int] = (16, 16),
                 width: int = 128, num_layers: int = 4, heads: int = 4, dropout: float = 0.0,
                 class_dropout: float = 0.0):
        super().__init__()
        self.num_embeddings, self.num_classes, self.class_dropout = num_embeddings, num_classes, class_dropout
        self.shape = tuple(shape)
        self.code = nn.Embedding(num_embeddings, width)
        self.start = nn.Embedding(num_classes + 1, width)        # one per class, and "no class" last
        self.row = nn.Embedding(self.shape[0], width)
        self.col = nn.Embedding(self.shape[1], width)
        self.blocks = nn.ModuleList([Block(width, heads, dropout) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_embeddings)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def check_conditioning(self, labels: Tensor | None, cond: Tensor | None, shape: tuple[int, int]) -> None:
        if cond is not None:
            raise ValueError("the transformer prior takes no conditioning map (cond)")
        if labels is not None and self.num_classes == 0:
            raise ValueError("labels were given but the prior is unconditional (num_classes = 0)")
        if tuple(shape) != self.shape:
            raise ValueError(f"the prior models maps of {self.shape[0]}x{self.shape[1]}, got {shape[0]}x{shape[1]}")

    def start_tokens(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """(B,) indices of the start embedding: the class, or "no class" (unconditional, or dropped)."""
        none = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if labels is None:
            return none
        labels = labels.to(device)
        if self.training and self.class_dropout > 0:
            labels = torch.where(torch.rand(batch, device=device) < self.class_dropout, none, labels)
        return labels

    def positions(self, device: torch.device) -> Tensor:
        """(T, C): the row plus column embedding of each position, in raster order."""
        h, w = self.shape
        rows = torch.arange(h, device=device).repeat_interleave(w)
        cols = torch.arange(w, device=device).repeat(h)
        return self.row(rows) + self.col(cols)

    def forward(self, codes: Tensor, labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """(B, H, W) codes [, (B,) labels] -> (B, K, H, W) logits of p(z_t | z_<t, y)."""
        x = self.code(codes).permute(0, 3, 1, 2)                                  # (B, H, W, C) -> (B, C, H, W)
        return self.forward_embedded(x, labels, cond)

    def forward_embedded(self, x: Tensor, labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """The same from code embeddings (B, C, H, W): the Jacobian tests differentiate through this."""
        b, c, h, w = x.shape
        self.check_conditioning(labels, cond, (h, w))
        tokens = x.flatten(2).transpose(1, 2)                                     # (B, C, H, W) -> (B, T, C)
        start = self.start(self.start_tokens(labels, b, x.device))[:, None]        # (B, 1, C)
        seq = torch.cat([start, tokens[:, :-1]], dim=1) + self.positions(x.device)  # input t predicts z_t
        for block in self.blocks:
            seq = block(seq)
        logits = self.head(self.norm(seq))                                        # (B, T, K)
        return logits.transpose(1, 2).reshape(b, -1, h, w)                        # (B, K, T) -> (B, K, H, W)

    def nll(self, codes: Tensor, labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """(B, H, W) codes -> (B,) -log p(z | y) of each map, in nats, summed over it."""
        logits = self(codes, labels, cond).float()
        return F.cross_entropy(logits, codes, reduction="none").flatten(1).sum(1)

    # -----------------------------------------------------------------------------------------------------------
    # Position by position, with a KV cache

    @torch.no_grad()
    def in_raster_order(self, num: int, shape: tuple[int, int], choose: Callable[[int, int, Tensor], Tensor],
                        labels: Tensor | None = None, cond: Tensor | None = None, cache: bool = True,
                        guidance: float | None = None) -> Tensor:
        """Fill `num` maps of `shape` position by position: at each (i, j) the (num, K) float32 logits go to
        `choose(i, j, logits)`, which returns the codes put there (as prior.GatedPixelCNN.in_raster_order).

        cache: keep each layer's keys and values, so a step costs one query (False: recompute the whole prefix
        at every step, the reference the cache must match). guidance: with labels, the classifier-free guidance
        scale s (the logits l_none + s (l_class - l_none)); None: the plain conditional prior. Call it in eval
        mode."""
        self.check_conditioning(labels, cond, shape)
        device = self.code.weight.device
        starts = self.start_tokens(labels, num, device)
        if guidance is not None:
            if labels is None:
                raise ValueError("guidance needs class labels")
            none = torch.full_like(starts, self.num_classes)
            starts = torch.cat([starts, none])                                    # (2B,): with, then without class
        batch, (h, w) = len(starts), shape
        codes = torch.zeros(num, h, w, dtype=torch.long, device=device)
        positions = self.positions(device)                                        # (T, C)
        x = self.start(starts)[:, None] + positions[0]                            # (2B or B, 1, C)
        caches = [self._empty_cache(batch, h * w) for _ in self.blocks] if cache else None
        seq = x
        for t in range(h * w):
            if cache:
                hidden = x
                for block, (keys, values) in zip(self.blocks, caches):
                    hidden = block.step(hidden, t, keys, values)
                last = hidden[:, -1]
            else:
                hidden = seq
                for block in self.blocks:
                    hidden = block(hidden)
                last = hidden[:, -1]
            logits = self.head(self.norm(last)).float()                           # (batch, K)
            if guidance is not None:
                with_class, without = logits.chunk(2)
                logits = without + guidance * (with_class - without)
            i, j = divmod(t, w)
            chosen = choose(i, j, logits)
            codes[:, i, j] = chosen
            if t + 1 < h * w:
                step_codes = chosen.repeat(2) if guidance is not None else chosen
                x = (self.code(step_codes) + positions[t + 1])[:, None]             # (batch, 1, C)
                seq = torch.cat([seq, x], dim=1) if not cache else seq
        return codes

    def _empty_cache(self, batch: int, length: int) -> tuple[Tensor, Tensor]:
        block = self.blocks[0]
        width = self.code.weight.shape[1]
        shape = (batch, block.heads, length, width // block.heads)
        return self.code.weight.new_zeros(shape), self.code.weight.new_zeros(shape)

    @torch.no_grad()
    def sample(self, num: int, shape: tuple[int, int], temperature: float = 1.0, labels: Tensor | None = None,
               generator: torch.Generator | None = None, cond: Tensor | None = None, top_k: int = 0,
               top_p: float = 1.0, guidance: float | None = None, cache: bool = True) -> Tensor:
        """Draw `num` maps of `shape`: (num, h, w) int64 in [0, K). temperature divides the logits; top_k keeps the
        k most likely codes (0: all); top_p keeps the smallest set of codes whose probability reaches p; guidance:
        the classifier-free guidance scale (needs labels and a prior trained with class dropout). The model is put
        in eval mode and back; on the CPU the loop runs on one thread, as the PixelCNN's (its small steps lose more to
        the threads' synchronisation than they gain)."""
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        was_training, threads = self.training, torch.get_num_threads()
        self.eval()
        if self.code.weight.device.type == "cpu":
            torch.set_num_threads(1)

        def draw(i: int, j: int, logits: Tensor) -> Tensor:
            return torch.multinomial(filtered_probs(logits, temperature, top_k, top_p), 1,
                                     generator=generator).squeeze(1)

        try:
            return self.in_raster_order(num, shape, draw, labels, cond, cache=cache, guidance=guidance)
        finally:
            torch.set_num_threads(threads)
            self.train(was_training)


def filtered_probs(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """(B, K) logits -> (B, K) probabilities of logits / temperature, keeping the top_k most likely codes (0: all)
    and then the smallest set of most likely codes whose probability reaches top_p (the most likely always kept);
    the rest get probability 0."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[1]:
        kth = logits.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=1, descending=True)
        before = sorted_probs.cumsum(1) - sorted_probs                          # probability of the codes ahead
        keep_sorted = before < top_p
        keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(1, keepdim=True)
    return probs
