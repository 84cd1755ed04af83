"""Draw the VQ-VAE architecture (arXiv 1711.00937) as train.py builds it with its default config (`Config()`).

The picture is generated from the code, not drawn by hand: the script builds the model, runs one forward pass
on a 1x3x64x64 image (the scikit-image astronaut photo, when available) and records with forward hooks the
output shape of every top-level layer of the encoder, the quantizer and the decoder. Each box's layer type,
kernel size, stride, channel counts and output shape are read from those modules and hooks, so changing the
defaults in models.py changes the picture. Left to right: input image -> encoder -> z_e(x) -> vector quantizer
(K codes of dimension D, nearest code by eq. 1) -> z_q(x) -> decoder -> reconstruction, with the
straight-through gradient drawn as a dashed arrow from z_q(x) back to z_e(x).

Regenerate from the repository root:
    python model_visualisation/draw_architecture.py [--out model_visualisation/vqvae.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoint import Config, build_model  # noqa: E402
from models import VQVAE, ModernResidualBlock, ResidualStack, SelfAttention  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "vqvae.png"
ENC, DEC, VQ, GREY = "#dbe8f6", "#dcf0dc", "#fbe3c8", "#eeeeee"
Y = 2.45  # the centre line of the flow, in inches from the bottom of the 16 x 5 inch canvas


def shape_str(shape: tuple[int, ...]) -> str:
    """(1, 64, 16, 16) -> "64x16x16" (the batch dimension dropped)."""
    return "x".join(str(s) for s in shape[1:])


def sample_image(size: int = 64) -> torch.Tensor:
    """The astronaut photo, (1, 3, size, size), scaled to [-0.5, 0.5] as in training (grey if unavailable)."""
    try:
        from PIL import Image
        from skimage.data import astronaut
        img = np.asarray(Image.fromarray(astronaut()).resize((size, size), Image.LANCZOS), dtype=np.float32) / 255
    except Exception:  # noqa: BLE001 - the thumbnail is decoration; the shapes do not depend on it
        img = np.full((size, size, 3), 0.5, dtype=np.float32)
    return torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0) - 0.5


def describe(module: nn.Module) -> list[str]:
    """The lines that describe one layer: its type, kernel and stride, and channels (in -> out)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        kh, kw = module.kernel_size
        kind = "ConvT2d" if isinstance(module, nn.ConvTranspose2d) else "Conv2d"
        stride = f", s{module.stride[0]}" if module.stride[0] > 1 else ""
        return [kind, f"{kh}x{kw}{stride}", f"{module.in_channels}→{module.out_channels}"]
    if isinstance(module, ResidualStack) and module.blocks:
        block = module.blocks[0]
        if isinstance(block, ModernResidualBlock):   # VQGAN's: GroupNorm, SiLU, 3x3 conv, twice
            first, second, kind = block.conv1, block.conv2, "GN-SiLU ResBlock"
        else:                                        # the paper's: ReLU, 3x3 conv, ReLU, 1x1 conv
            first, second, kind = block.conv3, block.conv1, "ResBlock"
        kernels = "-".join(f"{c.kernel_size[0]}x{c.kernel_size[1]}" for c in (first, second))
        return [f"{len(module.blocks)}× {kind}", kernels,
                f"{first.in_channels}→{first.out_channels}→{second.out_channels}"]
    if isinstance(module, SelfAttention):
        return ["Self-attention", "1 head", f"{module.proj.in_channels} ch"]
    return [type(module).__name__]


Record = tuple[str, nn.Module, tuple[int, ...]]  # (name, module, output shape)


def trace(model: VQVAE, x: torch.Tensor) -> tuple[list[Record], list[Record], tuple[int, ...], tuple[int, ...]]:
    """One forward pass with hooks: encoder layers and decoder layers as (name, module, output shape) in the
    order they ran, the quantizer's output shape and the indices' shape."""
    records: dict[str, list[Record]] = {"encoder": [], "decoder": []}
    hooks = []
    for part in records:
        for name, module in getattr(model, part).named_children():
            # a ModuleList (the extra down- or upsampling convolutions) is not called itself: hook its layers
            for sub, layer in (module.named_children() if isinstance(module, nn.ModuleList) else [("", module)]):
                hooks.append(layer.register_forward_hook(
                    lambda m, i, o, part=part, name=f"{name}{sub}": records[part].append((name, m, tuple(o.shape)))))
    vq_shapes: list[tuple] = []
    hooks.append(model.quantizer.register_forward_hook(
        lambda m, i, o: vq_shapes.append((tuple(o.quantized.shape), tuple(o.indices.shape)))))
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return records["encoder"], records["decoder"], vq_shapes[0][0], vq_shapes[0][1]


def box(ax: plt.Axes, x: float, w: float, h: float, color: str, lines: list[str]) -> None:
    """A rounded box of width w and height h centred on the flow line, one text line per entry (first bold)."""
    ax.add_patch(FancyBboxPatch((x, Y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.08",
                                fc=color, ec="#555555", lw=1.0))
    for i, line in enumerate(lines):
        ax.text(x + w / 2, Y + 0.18 * ((len(lines) - 1) / 2 - i), line, ha="center", va="center", fontsize=8,
                fontweight="bold" if i == 0 else "normal")


def arrow(ax: plt.Axes, x0: float, x1: float) -> None:
    ax.annotate("", xy=(x1, Y), xytext=(x0, Y), arrowprops=dict(arrowstyle="-|>", color="#333333", lw=1.2))


def tensor_node(ax: plt.Axes, x: float, side: float, name: str, shape: tuple[int, ...]) -> None:
    """A latent tensor as an h x w grid of D-dimensional vectors, with its name above and shape below."""
    bottom, top, (gh, gw) = Y - side / 2, Y + side / 2, shape[2:]
    ax.add_patch(Rectangle((x, bottom), side, side, fc="#f7f2fb", ec="#6a3d9a", lw=1.2))
    for k in range(1, gw):
        ax.plot([x + side * k / gw] * 2, [bottom, top], color="#6a3d9a", lw=0.3, alpha=0.5)
    for k in range(1, gh):
        ax.plot([x, x + side], [bottom + side * k / gh] * 2, color="#6a3d9a", lw=0.3, alpha=0.5)
    ax.text(x + side / 2, top + 0.17, name, ha="center", va="bottom", fontsize=11)
    ax.text(x + side / 2, bottom - 0.12, shape_str(shape), ha="center", va="top", fontsize=8.5)


def draw(model: VQVAE, out: Path, image_size: int = 64) -> Path:
    """Trace `model` on one image_size x image_size sample and write the architecture picture to `out`."""
    x = sample_image(image_size)
    enc, dec, zq_shape, idx_shape = trace(model, x)
    q = model.quantizer
    bw, gap, tw, vw, y = 0.86, 0.17, 0.62, 2.3, Y        # box, arrow, latent, quantizer widths; centre line
    total = 1.1 + (len(enc) + len(dec)) * (gap + bw) + 2 * (gap + tw) + (gap + vw) + (gap + 1.0)
    width = max(16.0, total + 0.3)                        # a deeper model widens the canvas, keeping the aspect
    fig = plt.figure(figsize=(16, 5), dpi=120, facecolor="white")
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, width), ax.set_ylim(2.5 - 2.5 * width / 16, 2.5 + 2.5 * width / 16), ax.axis("off")
    def height(shape: tuple[int, ...]) -> float:  # a box is taller the larger its feature map
        return min(2.6, 1.25 + 0.35 * float(np.log2(shape[-1] / zq_shape[-1])))

    cx = (width - total) / 2                                                # running left edge
    img = (x[0].permute(1, 2, 0).numpy() + 0.5).clip(0, 1)
    ax.imshow(img, extent=(cx, cx + 1.1, y - 0.55, y + 0.55), interpolation="nearest", zorder=2)
    ax.text(cx + 0.55, y + 0.67, "input $x$", ha="center", va="bottom", fontsize=11)
    ax.text(cx + 0.55, y - 0.67, shape_str(tuple(x.shape)), ha="center", va="top", fontsize=8.5)
    cx += 1.1

    def stage(layers: list, color: str, title: str) -> None:
        nonlocal cx
        start = cx + gap
        for name, module, shape in layers:
            arrow(ax, cx, cx + gap)
            cx += gap
            box(ax, cx, bw, height(shape), color, describe(module) + [shape_str(shape)])
            ax.text(cx + bw / 2, y - height(shape) / 2 - 0.08, name, ha="center", va="top", fontsize=7.5,
                    family="monospace", color="#666666")
            cx += bw
        ax.add_patch(FancyBboxPatch((start - 0.08, 0.95), cx - start + 0.16, 3.05, zorder=0, fc="none",
                                    ec="#999999", lw=0.8, ls=":", boxstyle="round,pad=0,rounding_size=0.12"))
        ax.text((start + cx) / 2, 4.07, title, ha="center", va="bottom", fontsize=11, fontweight="bold")

    stage(enc, ENC, type(model.encoder).__name__)
    arrow(ax, cx, cx + gap)
    ze_x = cx + gap
    tensor_node(ax, ze_x, tw, "$z_e(x)$", enc[-1][2])
    cx = ze_x + tw

    # vector quantizer: the codebook (the model's actual K x D buffer) and the nearest-code rule
    arrow(ax, cx, cx + gap)
    vx, vh = cx + gap, 2.4
    ax.add_patch(FancyBboxPatch((vx, y - vh / 2), vw, vh, boxstyle="round,pad=0,rounding_size=0.1", fc=VQ,
                                ec="#555555", lw=1.0))
    ax.text(vx + vw / 2, y + vh / 2 - 0.12, type(q).__name__, ha="center", va="top", fontsize=9, fontweight="bold")
    cb = q.codebook.detach().cpu().numpy()
    ax.imshow(cb, extent=(vx + 0.15, vx + 0.7, y - 0.8, y + 0.75), aspect="auto", cmap="coolwarm",
              interpolation="nearest", zorder=2)
    ax.text(vx + 0.425, y - 0.86, "codebook", ha="center", va="top", fontsize=7.5)
    rule = [f"K = {q.num_embeddings} codes", f"of dimension D = {q.embedding_dim}", "",
            "nearest code, eq. 1:", r"$k=\mathrm{argmin}_j\,\|z_e(x)-e_j\|_2$", f"indices {shape_str(idx_shape)}"]
    if hasattr(q, "decay"):
        rule.append(f"EMA codebook, γ = {q.decay}")
    for i, line in enumerate(rule):
        ax.text(vx + 0.8, y + 0.72 - i * 0.235, line, ha="left", va="center", fontsize=8)
    cx = vx + vw

    arrow(ax, cx, cx + gap)
    zq_x = cx + gap
    tensor_node(ax, zq_x, tw, "$z_q(x)$", zq_shape)
    cx = zq_x + tw
    stage(dec, DEC, type(model.decoder).__name__)

    arrow(ax, cx, cx + gap)
    cx += gap
    h_out = height(dec[-1][2])
    box(ax, cx, 1.0, h_out, GREY, ["reconstruction", shape_str(dec[-1][2])])
    ax.text(cx + 0.5, y + h_out / 2 + 0.12, r"$\hat{x}$", ha="center", va="bottom", fontsize=12)

    # straight-through estimator: the decoder's gradient w.r.t. z_q(x) is copied to z_e(x)
    red, low, a, b = "#b2182b", 0.8, ze_x + tw / 2, zq_x + tw / 2
    ax.plot([b, b, a], [y - tw / 2 - 0.35, low, low], color=red, lw=1.3, ls="--")
    ax.annotate("", xy=(a, y - tw / 2 - 0.35), xytext=(a, low),
                arrowprops=dict(arrowstyle="-|>", color=red, lw=1.3, ls="--", shrinkA=0, shrinkB=0))
    ax.text((a + b) / 2, low - 0.1, "straight-through gradient", ha="center", va="top", fontsize=9, color=red,
            fontstyle="italic")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ax.text(width / 2, 4.7, f"VQ-VAE (arXiv 1711.00937): shapes from one forward pass of {type(model).__name__} "
            f"on a {shape_str((0,) + tuple(x.shape))} image, {n_params / 1e6:.2f} M trainable parameters",
            ha="center", va="center", fontsize=12)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, facecolor="white")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output PNG (default model_visualisation/vqvae.png)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)  # the codebook drawn is the model's random initial one: keep the picture reproducible
    out = draw(build_model(Config()), args.out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
