"""A gated PixelCNN prior over VQ-VAE code maps, from "Conditional Image Generation with PixelCNN Decoders"
(van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves, Kavukcuoglu, 2016, arXiv 1606.05328), as used for the
prior in section 3.2 of the VQ-VAE paper (arXiv 1711.00937).

The model factorises a map of h x w codes in raster order (eq. 1 of 1606.05328):
    p(z) = prod_{i,j} p(z_ij | z_<ij, y)        z_<ij: the codes in rows above, and left of j in row i
with a K-way softmax per position and an optional class label y.

Two stacks of convolutions carry the context, so the receptive field has no blind spot (section 2.2):

- the vertical stack sees every code in the rows strictly above: its input is the code embeddings shifted down by
  one row, and each of its convolutions is (k//2 + 1) x k, padded above and on both sides, never below;
- the horizontal stack sees the codes strictly left in the same row: its input is shifted right by one column,
  and each of its convolutions is 1 x (k//2 + 1), padded on the left only. It also receives the vertical stack's
  features at the same position through a 1x1 convolution (they already exclude row i, so no further shift).

After L layers the logits at (i, j) depend on exactly the codes in rows i-1-L*(k//2) .. i-1, columns
j-L*(k//2) .. j+L*(k//2), and on row i, columns j-1-L*(k//2) .. j-1; the tests check this set position by position
with the Jacobian.

Each layer is the gated block of Figure 2 (eq. 2 and 4): y = tanh(W_f * x + V_f^T h) * sigmoid(W_g * x + V_g^T h),
where h is the one-hot class, so V^T h is a learned bias per class. The horizontal stack has a residual connection
(a 1x1 convolution of the gated output added to its input) and a 1x1 skip connection; the skips of all layers are
summed and mapped by ELU-1x1-ELU-1x1 to K logits per position.

Two options serve the hierarchical prior of VQ-VAE-2 (Razavi, van den Oord, Vinyals 2019, arXiv 1906.00446, section
3.2; hierarchical_prior.py):

- spatial conditioning (`cond_channels`): eq. 5 of 1606.05328 with a spatial h, y = tanh(W_f * x + V_f * s) *
  sigmoid(W_g * x + V_g * s), where s = m(h) is a feature map of the map's own size (for the bottom prior: features
  of the whole top map) and V * s are 1x1 convolutions, one per layer, into both stacks' pre-activations. s may
  depend on anything but the codes being modelled, so it adds no path from later codes;
- one causal self-attention block (`attention`), as the VQ-VAE-2 top prior has (after PixelSNAIL, arXiv
  1712.09763): multi-head attention over the horizontal stack's features in raster order, position t attending to
  positions s <= t only. The features at s already depend only on codes before s, so the block stays strictly
  causal; it is added to the horizontal stack only (the vertical stack at row i must not see row i).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer_prior import filtered_probs


def down_shift(x: Tensor) -> Tensor:
    """(B, C, H, W): row i takes row i-1's values, row 0 zeros; position (i, j) then sees only rows above i."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x: Tensor) -> Tensor:
    """(B, C, H, W): column j takes column j-1's values, column 0 zeros."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


def gate(x: Tensor) -> Tensor:
    """(B, 2C, H, W) -> (B, C, H, W): tanh(first half) * sigmoid(second half), the gated unit of eq. 2."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def linear_1x1(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 convolution applied to vectors: (B, C_in) -> (B, C_out)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class GatedLayer(nn.Module):
    """One gated block of Figure 2 (arXiv 1606.05328): (v, h) -> (v', h', skip), all (B, C, H, W).

    v' = gate(Wv * v + bias_v[y]), the vertical stack (no residual, as in the paper);
    h' = h + W_res gate(Wh * h + W_link (Wv * v) + bias_h[y]), the horizontal stack with its residual;
    skip = W_skip gate(...) of the horizontal stack.
    The convolutions are padded so that v' at row i depends on v at rows <= i only, and h' at column j on h at
    columns <= j only; the inputs of the first layer are already shifted, which makes both strict.
    `bias` (see `bias`) holds the conditioning terms of both stacks: the class's V^T h (eq. 4) and, with
    cond_channels, the 1x1 convolution V * s of a spatial conditioning map s (eq. 5).
    Example: GatedLayer(8, 3)(torch.zeros(2, 8, 5, 5), torch.zeros(2, 8, 5, 5))[1].shape == (2, 8, 5, 5).
    """

    def __init__(self, channels: int, kernel_size: int, num_classes: int = 0, dropout: float = 0.0,
                 cond_channels: int = 0):
        super().__init__()
        self.pad = kernel_size // 2
        self.v_conv = nn.Conv2d(channels, 2 * channels, (self.pad + 1, kernel_size))   # rows i-pad..i
        self.h_conv = nn.Conv2d(channels, 2 * channels, (1, self.pad + 1))             # columns j-pad..j
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_residual = nn.Conv2d(channels, channels, 1)
        self.h_skip = nn.Conv2d(channels, channels, 1)
        # the class-conditional biases V_f^T h and V_g^T h of eq. 4, one for each stack
        self.class_bias = nn.Embedding(num_classes, 4 * channels) if num_classes else None
        # the spatial terms V_f * s and V_g * s of eq. 5, for both stacks: a 1x1 convolution of the map s
        self.cond_bias = nn.Conv2d(cond_channels, 4 * channels, 1) if cond_channels else None
        self.dropout = nn.Dropout(dropout)

    def bias(self, labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor | None:
        """The conditioning terms of both stacks' pre-activations: (B, 4C, 1, 1) from the class, (B, 4C, H, W) from
        a conditioning map cond (B, cond_channels, H, W), their sum with both; None without conditioning. Channels
        0..2C-1 go to the vertical stack, 2C..4C-1 to the horizontal one."""
        out = None
        if self.class_bias is not None:
            out = self.class_bias(labels)[:, :, None, None]                    # (B, 4C, 1, 1)
        if self.cond_bias is not None:
            spatial = self.cond_bias(cond)                                     # (B, 4C, H, W)
            out = spatial if out is None else out + spatial
        return out

    def vertical(self, v: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """v (B, C, H, W) -> (v' (B, C, H, W), the link into the horizontal stack (B, 2C, H, W))."""
        p = self.pad
        v_pre = self.v_conv(F.pad(v, (p, p, p, 0)))                            # (B, 2C, H, W)
        link = self.v_to_h(v_pre)                                              # (B, 2C, H, W)
        if bias is not None:
            v_pre = v_pre + bias[:, :2 * v.shape[1]]
        return gate(v_pre), link

    def horizontal(self, h: Tensor, link: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """h (B, C, H, W) and the link from `vertical` -> (h' (B, C, H, W), skip (B, C, H, W))."""
        h_pre = self.h_conv(F.pad(h, (self.pad, 0, 0, 0))) + link              # (B, 2C, H, W)
        if bias is not None:
            h_pre = h_pre + bias[:, 2 * h.shape[1]:]
        gated = self.dropout(gate(h_pre))                                      # (B, C, H, W)
        return h + self.h_residual(gated), self.h_skip(gated)

    def horizontal_step(self, window: Tensor, link: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`horizontal` at one position, for sampling: window (B, C, k//2 + 1), the layer's input at columns
        j-k//2..j (zeros left of column 0), link (B, 2C) and bias (B, 4C) at column j -> (h' (B, C), skip (B, C))
        at column j. The same arithmetic as `horizontal`, as matrix products on vectors instead of convolutions."""
        h_pre = F.linear(window.flatten(1), self.h_conv.weight.flatten(1), self.h_conv.bias) + link   # (B, 2C)
        if bias is not None:
            h_pre = h_pre + bias[:, h_pre.shape[1]:]
        gated = gate(h_pre)                                                                         # (B, C)
        return window[:, :, -1] + linear_1x1(self.h_residual, gated), linear_1x1(self.h_skip, gated)

    def forward(self, v: Tensor, h: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        v, link = self.vertical(v, bias)
        h, skip = self.horizontal(h, link, bias)
        return v, h, skip


class CausalSelfAttention(nn.Module):
    """h + W_o MultiHead(LN(h)) over the H*W positions of (B, C, H, W) features in raster order, position t
    attending to positions s <= t only (the masked attention of PixelSNAIL, arXiv 1712.09763, which the VQ-VAE-2 top
    prior uses). LayerNorm normalises each position over its channels (GroupNorm would mix positions and so leak
    later codes). heads: attention heads, each of C / heads channels.
    Example: CausalSelfAttention(8, 2)(torch.zeros(3, 8, 4, 5)).shape == (3, 8, 4, 5).
    """

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, h: Tensor) -> Tensor:
        b, c, height, width = h.shape
        x = h.flatten(2).transpose(1, 2)                                        # (B, C, H, W) -> (B, T, C)
        qkv = self.qkv(self.norm(x)).view(b, height * width, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                    # each (B, nh, T, hs)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)             # (B, nh, T, hs), s <= t only
        a = a.transpose(1, 2).reshape(b, height * width, c)                     # (B, T, C)
        return h + self.out(a).transpose(1, 2).reshape(b, c, height, width)     # (B, T, C) -> (B, C, H, W)

    def step(self, h: Tensor, t: int, keys: Tensor, values: Tensor) -> Tensor:
        """`forward` at position t alone, for sampling: h (B, C) there -> (B, C). keys and values (B, nh, T, hs)
        cache every earlier position's; this position's are written into them at t."""
        b, c = h.shape
        q, k, v = self.qkv(self.norm(h)).view(b, 3, self.heads, 1, c // self.heads).unbind(1)   # (B, nh, 1, hs)
        keys[:, :, t:t + 1], values[:, :, t:t + 1] = k, v
        a = F.scaled_dot_product_attention(q, keys[:, :, :t + 1], values[:, :, :t + 1])       # (B, nh, 1, hs)
        return h + self.out(a.reshape(b, c))


class GatedPixelCNN(nn.Module):
    """Autoregressive prior p(z | y) over (B, H, W) maps of integer codes in [0, K).

    num_embeddings: K, the number of codes (the VQ-VAE's codebook size); the output is K logits per position.
    num_classes: number of class labels y for conditioning (eq. 4); 0 for an unconditional prior.
    channels: width of both stacks (the paper's p); each gated convolution produces 2 * channels.
    num_layers: gated layers; with kernel_size k each adds k//2 to the reach up, left and right.
    kernel_size: k, the width of the vertical stack's (k//2 + 1) x k convolutions (odd).
    dropout: dropout rate on the horizontal stack's gated output, before its residual and skip convolutions.
    cond_channels: channels of a spatial conditioning map s (eq. 5 with a spatial h; 0: none), the same size as the
    code map, passed as `cond` to forward and sample; each layer adds its own 1x1 convolution of s to both stacks.
    attention: one CausalSelfAttention block on the horizontal stack after the first num_layers // 2 layers (needs
    num_layers >= 2), as in the VQ-VAE-2 top prior; heads: its attention heads (channels must be a multiple).
    Example: GatedPixelCNN(512)(torch.zeros(8, 16, 16, dtype=torch.long)).shape == (8, 512, 16, 16).
    """

    levels = 1   # one code map (hierarchical_prior.HierarchicalPrior models two)

    def __init__(self, num_embeddings: int, num_classes: int = 0, channels: int = 32, num_layers: int = 8,
                 kernel_size: int = 5, dropout: float = 0.0, cond_channels: int = 0, attention: bool = False,
                 heads: int = 4):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if attention and num_layers < 2:
            raise ValueError(f"attention sits between gated layers: num_layers must be at least 2, got {num_layers}")
        self.num_embeddings, self.num_classes, self.cond_channels = num_embeddings, num_classes, cond_channels
        self.num_layers, self.kernel_size = num_layers, kernel_size
        self.embedding = nn.Embedding(num_embeddings, channels)
        self.layers = nn.ModuleList([GatedLayer(channels, kernel_size, num_classes, dropout, cond_channels)
                                     for _ in range(num_layers)])
        # the attention block follows layer `attention_after` (-1: no block)
        self.attention = CausalSelfAttention(channels, heads) if attention else None
        self.attention_after = num_layers // 2 - 1 if attention else -1
        self.head_hidden = nn.Conv2d(channels, channels, 1)
        self.head_out = nn.Conv2d(channels, num_embeddings, 1)

    def forward(self, codes: Tensor, labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """(B, H, W) int codes [, (B,) labels] [, (B, cond_channels, H, W) cond] -> (B, K, H, W) logits of
        p(z_ij | z_<ij, y, s)."""
        x = self.embedding(codes).permute(0, 3, 1, 2)             # (B, H, W, C) -> (B, C, H, W)
        return self.forward_embedded(x, labels, cond)

    def check_conditioning(self, labels: Tensor | None, cond: Tensor | None, shape: tuple[int, int]) -> None:
        """A ValueError unless labels and cond are given exactly when the prior was built for them."""
        if (labels is None) != (self.num_classes == 0):
            raise ValueError("pass labels exactly when the prior is class-conditional "
                             f"(num_classes = {self.num_classes})")
        if (cond is None) != (self.cond_channels == 0):
            raise ValueError("pass cond exactly when the prior is conditioned on a map "
                             f"(cond_channels = {self.cond_channels})")
        if cond is not None and (cond.shape[1] != self.cond_channels or tuple(cond.shape[2:]) != tuple(shape)):
            raise ValueError(f"cond must be (B, {self.cond_channels}, {shape[0]}, {shape[1]}), got "
                             f"{tuple(cond.shape)}")

    def forward_embedded(self, x: Tensor, labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """The same from code embeddings (B, C, H, W): the Jacobian tests differentiate through this."""
        self.check_conditioning(labels, cond, x.shape[2:])
        v, h = down_shift(x), right_shift(x)                       # strictly above; strictly left
        skips = 0
        for l, layer in enumerate(self.layers):
            v, h, skip = layer(v, h, layer.bias(labels, cond))
            skips = skips + skip
            if l == self.attention_after:
                h = self.attention(h)                              # the horizontal stack only
        return self.head_out(F.elu(self.head_hidden(F.elu(skips))))    # (B, K, H, W)

    def nll(self, codes: Tensor, labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """(B, H, W) codes -> (B,) negative log-likelihood -log p(z | y) of each map, in nats, summed over it."""
        logits = self(codes, labels, cond).float()
        return F.cross_entropy(logits, codes, reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, num: int, shape: tuple[int, int], temperature: float = 1.0, labels: Tensor | None = None,
               generator: torch.Generator | None = None, cond: Tensor | None = None, top_k: int = 0,
               top_p: float = 1.0) -> Tensor:
        """Draw `num` code maps of `shape` (h, w) in raster order: (num, h, w) int64 in [0, K).

        temperature: the logits are divided by it before the softmax (1: the model's distribution; below 1:
        sharper); top_k, top_p: keep the k most likely codes (0: all), then the fewest most likely codes whose
        probability reaches p (transformer_prior.filtered_probs). labels: (num,) class labels for a conditional
        prior; cond: (num, cond_channels, h, w), the
        conditioning map of a prior built with cond_channels. generator: a torch.Generator on the
        model's device, for reproducible samples. The model is put in eval mode (no dropout) and back.

        The maps are filled by `in_raster_order`, which caches what each position can reuse (no full recompute
        per position). On the CPU the loop runs on one thread:
        its thousands of small operations gain nothing from intra-op threads, and lose a lot to their
        synchronisation when other processes share the cores.
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.check_conditioning(labels, cond, shape)
        was_training, threads = self.training, torch.get_num_threads()
        self.eval()
        if self.embedding.weight.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            return self._sample(num, shape, temperature, labels, generator, cond, top_k, top_p)
        finally:
            torch.set_num_threads(threads)
            self.train(was_training)

    def _sample(self, num: int, shape: tuple[int, int], temperature: float, labels: Tensor | None,
                generator: torch.Generator | None, cond: Tensor | None, top_k: int = 0, top_p: float = 1.0) -> Tensor:
        def draw(i: int, j: int, logits: Tensor) -> Tensor:
            probs = filtered_probs(logits, temperature, top_k, top_p)
            return torch.multinomial(probs, 1, generator=generator).squeeze(1)

        return self.in_raster_order(num, shape, draw, labels, cond)

    @torch.no_grad()
    def in_raster_order(self, num: int, shape: tuple[int, int], choose: Callable[[int, int, Tensor], Tensor],
                        labels: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """Fill `num` code maps of `shape` position by position in raster order: at each (i, j) the model's logits
        of p(z_ij | z_<ij, y, s), (num, K) float32, go to `choose(i, j, logits)`, which returns the (num,) codes
        put there. The sampler draws them; the codec (codec.py) returns the codes it codes, or those its decoder
        reads, so both sides see the same logits computed the same way. Returns the (num, h, w) maps.

        The logits are those of running the whole network once per position (up to float rounding; a test compares
        the two in float64), computed faster with the caching of Ramachandran et al. 2017 (arXiv 1704.06001): a
        layer's output at (i, j) needs its input at rows i-k//2..i (vertical stack) or at columns j-k//2..j of row
        i (horizontal stack) only, and those never change once computed. So each layer keeps its inputs in a
        buffer and computes one new row of the vertical stack per row, and one new position of the horizontal
        stack per position. The conditioning terms of every layer (class and map) are computed once, for the whole
        map. The attention block keeps the keys and values of every position filled so far (a cache of h*w
        entries), so each position costs one query against them: no full recompute. Call it in eval mode."""
        weight = self.embedding.weight
        height, width = shape
        p, channels = self.kernel_size // 2, weight.shape[1]
        codes = torch.zeros(num, height, width, dtype=torch.long, device=weight.device)
        if labels is not None:
            labels = labels.to(weight.device)
        if cond is not None:
            cond = cond.to(weight.device, weight.dtype)
        # bias[l]: layer l's conditioning terms over the whole map (B, 4C, H, W), or None
        bias = [b if b is None else b.expand(num, -1, height, width) for b in
                (layer.bias(labels, cond) for layer in self.layers)]
        if self.attention is not None:   # the attention block's keys and values of every position filled so far
            hs = channels // self.attention.heads
            keys, values = (weight.new_zeros(num, self.attention.heads, height * width, hs) for _ in range(2))
        # v_in[l]: the input of layer l's vertical stack, filled row by row; v_in[0] is the down-shifted embedding
        v_in = [weight.new_zeros(num, channels, height, width) for _ in self.layers]
        for i in range(height):
            if i > 0:
                v_in[0][:, :, i] = self.embedding(codes[:, i - 1]).transpose(1, 2)    # (B, W, C) -> (B, C, W)
            links = []
            for l, layer in enumerate(self.layers):
                rows = slice(max(0, i - p), i + 1)                                    # rows i-p..i -> row i last
                v, link = layer.vertical(v_in[l][:, :, rows], None if bias[l] is None else bias[l][:, :, rows])
                links.append(link[:, :, -1:])                                         # (B, 2C, 1, W)
                if l + 1 < len(self.layers):
                    v_in[l + 1][:, :, i] = v[:, :, -1]
            # h_in[l]: the input of layer l's horizontal stack along row i, with k//2 columns of zeros on the left;
            # h_in[0] is the right-shifted embedding
            h_in = [weight.new_zeros(num, channels, p + width) for _ in self.layers]
            for j in range(width):
                if j > 0:
                    h_in[0][:, :, p + j] = self.embedding(codes[:, i, j - 1])          # (B, C)
                skips = 0
                for l, layer in enumerate(self.layers):
                    h, skip = layer.horizontal_step(h_in[l][:, :, j:j + p + 1], links[l][:, :, 0, j],
                                                    None if bias[l] is None else bias[l][:, :, i, j])
                    skips = skips + skip                                               # (B, C)
                    if l == self.attention_after:
                        h = self.attention.step(h, i * width + j, keys, values)
                    if l + 1 < len(self.layers):
                        h_in[l + 1][:, :, p + j] = h
                hidden = linear_1x1(self.head_hidden, F.elu(skips))
                logits = linear_1x1(self.head_out, F.elu(hidden)).float()              # (B, K)
                codes[:, i, j] = choose(i, j, logits)
        return codes
