"""Draw the VQ-VAE (arXiv 1711.00937) or, with --levels 2, VQ-VAE-2 (arXiv 1906.00446) architecture from the code.

The models are the ones train.py builds with its default config: `Config()` (models.VQVAE) and `Config(levels=2)`
(hierarchy.VQVAE2, figure 2a of the VQ-VAE-2 paper).

The picture is generated from the code, not drawn by hand: the script builds the model, runs one forward pass
on a 1x3x64x64 image (the scikit-image astronaut photo, when available) and records with forward hooks the
output shape of every top-level layer of the encoder, the quantizer and the decoder. Each box's layer type,
kernel size, stride, channel counts and output shape are read from those modules and hooks, so changing the
defaults in models.py changes the picture. Left to right: input image -> encoder -> z_e(x) -> vector quantizer
(K codes of dimension D, nearest code by eq. 1) -> z_q(x) -> decoder -> reconstruction, with the
straight-through gradient drawn as a dashed arrow from z_q(x) back to z_e(x).

The 2-level picture is traced the same way on a 1x3x128x128 image, the size VQ-VAE-2 is for, in two rows as
VQVAE2.forward computes it. Bottom row: x -> bottom encoder -> h_b -> join (a 1x1 convolution over
[h_b, top decoder output]) -> z_bottom -> bottom quantizer -> e_bottom -> [upsample_top(e_top), e_bottom] ->
decoder -> reconstruction. Top row, fed by h_b: top encoder -> z_top -> top quantizer -> e_top -> top decoder,
whose output runs back down to the join.

Regenerate from the repository root:
    python model_visualisation/draw_architecture.py [--levels 2] [--out model_visualisation/vqvae.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoint import Config, build_model  # noqa: E402
from hierarchy import VQVAE2  # noqa: E402
from models import FSQ, VQVAE, ModernResidualBlock, ResidualStack, SelfAttention, VQOutput  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = {1: HERE / "vqvae.png", 2: HERE / "vqvae2.png"}   # by --levels
IMAGE_SIZE = {1: 64, 2: 128}                                      # the input traced, by --levels
ENC, DEC, VQ, GREY = "#dbe8f6", "#dcf0dc", "#fbe3c8", "#eeeeee"
Y = 2.45  # the centre line of the 1-level flow, in inches from the bottom of the 16 x 5 inch canvas
BW, GAP, TW, VW = 0.86, 0.17, 0.62, 2.3  # widths of a layer box, an arrow, a latent tensor, a quantizer


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
    if isinstance(module, ResidualStack):           # no blocks: only the stack's closing activation
        return ["GN-SiLU" if module.norm is not None else "ReLU", "(0 ResBlocks)"]
    if isinstance(module, SelfAttention):
        return ["Self-attention", "1 head", f"{module.proj.in_channels} ch"]
    return [type(module).__name__]


class Record(NamedTuple):
    """One hooked module as the forward pass ran it."""

    name: str                      # its attribute name (a ModuleList's layers numbered: up0, up1)
    module: nn.Module
    shape: tuple[int, ...]         # its output's shape (a quantizer's: the quantized map's)
    in_shape: tuple[int, ...]      # its first input's shape
    indices: tuple[int, ...] = ()  # a quantizer's code map, (B, h, w)


Parts = dict[str, list[tuple[str, nn.Module]]]  # part -> the (name, module) pairs to hook


def layers(part: nn.Module) -> list[tuple[str, nn.Module]]:
    """The top-level layers of `part` as (name, layer); a ModuleList (the extra down- or upsampling convolutions)
    is not called itself, so its layers stand in its place."""
    return [(f"{name}{sub}", layer) for name, module in part.named_children()
            for sub, layer in (module.named_children() if isinstance(module, nn.ModuleList) else [("", module)])]


def parts_of(model: VQVAE | VQVAE2) -> Parts:
    """What the picture shows of `model`: each stage's layers, each quantizer and each single module, and for
    VQVAE2 the decoder itself under "concat" (its input is [upsample_top(e_top), e_bottom])."""
    if not isinstance(model, VQVAE2):
        return {"encoder": layers(model.encoder), "quantizer": [("quantizer", model.quantizer)],
                "decoder": layers(model.decoder)}
    parts = {name: layers(getattr(model, name)) for name in ("encoder", "top_encoder", "top_decoder", "decoder")}
    parts.update({name: [(name, getattr(model, name))]
                  for name in ("top_quantizer", "join", "bottom_quantizer", "upsample_top")})
    parts["concat"] = [("decoder", model.decoder)]
    return parts


def trace(model: nn.Module, x: torch.Tensor, parts: Parts) -> dict[str, list[Record]]:
    """One forward pass with hooks on every module of `parts`: each part's Records in the order they ran."""
    records: dict[str, list[Record]] = {part: [] for part in parts}

    def hook(part: str, name: str):
        def record(m: nn.Module, inputs: tuple, o) -> None:
            if isinstance(o, VQOutput):
                shape, indices = tuple(o.quantized.shape), tuple(o.indices.shape)
            else:
                shape, indices = tuple(o.shape), ()
            records[part].append(Record(name, m, shape, tuple(inputs[0].shape), indices))
        return record

    hooks = [module.register_forward_hook(hook(part, name)) for part, pairs in parts.items() for name, module in pairs]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return records


def height(shape: tuple[int, ...], ref: int) -> float:
    """A box is taller the larger its feature map (ref: the width of the code map, drawn 1.25 tall)."""
    return min(2.6, 1.25 + 0.35 * float(np.log2(shape[-1] / ref)))


def box(ax: plt.Axes, x: float, w: float, h: float, color: str, lines: list[str], y: float = Y) -> None:
    """A rounded box of width w and height h centred on the flow line y, one text line per entry (first bold)."""
    ax.add_patch(FancyBboxPatch((x, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.08",
                                fc=color, ec="#555555", lw=1.0))
    for i, line in enumerate(lines):
        ax.text(x + w / 2, y + 0.18 * ((len(lines) - 1) / 2 - i), line, ha="center", va="center", fontsize=8,
                fontweight="bold" if i == 0 else "normal")


def arrow(ax: plt.Axes, x0: float, x1: float, y: float = Y) -> None:
    ax.annotate("", xy=(x1, y), xytext=(x0, y), arrowprops=dict(arrowstyle="-|>", color="#333333", lw=1.2))


def route(ax: plt.Axes, points: list[tuple[float, float]], color: str = "#333333", ls: str = "-",
          shrink: float = 2) -> None:
    """A polyline through points with an arrowhead on its last segment (shrink: points short of the end);
    dashed lines are drawn a little heavier."""
    lw = 1.3 if ls == "--" else 1.2
    if len(points) > 2:
        ax.plot(*zip(*points[:-1]), color=color, lw=lw, ls=ls)
    ax.annotate("", xy=points[-1], xytext=points[-2],
                arrowprops=dict(arrowstyle="-|>", color=color, lw=lw, ls=ls, shrinkA=0, shrinkB=shrink))


def tensor_node(ax: plt.Axes, x: float, side: float, name: str, shape: tuple[int, ...], y: float = Y) -> None:
    """A latent tensor as an h x w grid of D-dimensional vectors, with its name above and shape below."""
    bottom, top, (gh, gw) = y - side / 2, y + side / 2, shape[2:]
    ax.add_patch(Rectangle((x, bottom), side, side, fc="#f7f2fb", ec="#6a3d9a", lw=1.2))
    for k in range(1, gw):
        ax.plot([x + side * k / gw] * 2, [bottom, top], color="#6a3d9a", lw=0.3, alpha=0.5)
    for k in range(1, gh):
        ax.plot([x, x + side], [bottom + side * k / gh] * 2, color="#6a3d9a", lw=0.3, alpha=0.5)
    ax.text(x + side / 2, top + 0.17, name, ha="center", va="bottom", fontsize=11)
    ax.text(x + side / 2, bottom - 0.12, shape_str(shape), ha="center", va="top", fontsize=8.5)


def input_image(ax: plt.Axes, x: torch.Tensor, cx: float, y: float = Y) -> float:
    """The input thumbnail, 1.1 wide, with its name and shape; returns its right edge."""
    img = (x[0].permute(1, 2, 0).numpy() + 0.5).clip(0, 1)
    ax.imshow(img, extent=(cx, cx + 1.1, y - 0.55, y + 0.55), interpolation="nearest", zorder=2)
    ax.text(cx + 0.55, y + 0.67, "input $x$", ha="center", va="bottom", fontsize=11)
    ax.text(cx + 0.55, y - 0.67, shape_str(tuple(x.shape)), ha="center", va="top", fontsize=8.5)
    return cx + 1.1


def stage(ax: plt.Axes, cx: float, layers: list[Record], color: str, title: str, ref: int, y: float = Y,
          frame: tuple[float, float] = (0.95, 4.0)) -> float:
    """Arrow, box, arrow, box ... for each layer from cx, in a dotted frame from frame[0] to frame[1] (heights)
    titled above; returns the right edge of the last box."""
    start = cx + GAP
    for r in layers:
        arrow(ax, cx, cx + GAP, y)
        cx += GAP
        h = height(r.shape, ref)
        box(ax, cx, BW, h, color, describe(r.module) + [shape_str(r.shape)], y)
        ax.text(cx + BW / 2, y - h / 2 - 0.08, r.name, ha="center", va="top", fontsize=7.5,
                family="monospace", color="#666666")
        cx += BW
    ax.add_patch(FancyBboxPatch((start - 0.08, frame[0]), cx - start + 0.16, frame[1] - frame[0], zorder=0,
                                fc="none", ec="#999999", lw=0.8, ls=":", boxstyle="round,pad=0,rounding_size=0.12"))
    ax.text((start + cx) / 2, frame[1] + 0.07, title, ha="center", va="bottom", fontsize=11, fontweight="bold")
    return cx


def rule_lines(q: nn.Module, z: str, indices: tuple[int, ...]) -> list[str]:
    """The quantizer's codebook and nearest-code rule as it runs: eq. 1 in D dimensions, or (the defaults) between
    unit vectors in a low-dimensional projection u = W z, or FSQ's rounding to a grid."""
    if isinstance(q, FSQ):
        return [f"K = {q.num_embeddings} grid points", f"levels {','.join(map(str, q.levels))}", "",
                f"${z}$ projected to {len(q.levels)}-d,", "bounded and rounded", f"indices {shape_str(indices)}"]
    lookup, cosine = getattr(q, "lookup_dim", 0), getattr(q, "cosine", False)
    u = "u" if lookup else z
    unit = (lambda v: rf"\hat{{{v}}}") if cosine else (lambda v: v)
    lines = [f"K = {q.num_embeddings} codes", f"of dimension {lookup or q.embedding_dim}"]
    lines.append(rf"searched in $u = W{z}$" if lookup else "")
    lines += ["nearest code, eq. 1" + (" (^ unit):" if cosine else ":"),
              rf"$k=\mathrm{{argmin}}_j\,\|{unit(u)}-{unit('e')}_j\|_2$", f"indices {shape_str(indices)}"]
    if hasattr(q, "decay"):
        lines.append(f"EMA codebook, γ = {q.decay}")
    return lines


def quantizer_box(ax: plt.Axes, vx: float, q: nn.Module, r: Record, z: str, y: float = Y) -> float:
    """The vector quantizer at vx: the codebook (the model's actual K x D buffer) and the nearest-code rule for
    the input called z; returns its right edge."""
    vh = 2.4
    ax.add_patch(FancyBboxPatch((vx, y - vh / 2), VW, vh, boxstyle="round,pad=0,rounding_size=0.1", fc=VQ,
                                ec="#555555", lw=1.0))
    ax.text(vx + VW / 2, y + vh / 2 - 0.12, type(q).__name__, ha="center", va="top", fontsize=9, fontweight="bold")
    cb = q.codebook.detach().cpu().numpy()
    ax.imshow(cb, extent=(vx + 0.15, vx + 0.7, y - 0.8, y + 0.75), aspect="auto", cmap="coolwarm",
              interpolation="nearest", zorder=2)
    ax.text(vx + 0.425, y - 0.86, "codebook", ha="center", va="top", fontsize=7.5)
    for i, line in enumerate(rule_lines(q, z, r.indices)):
        ax.text(vx + 0.8, y + 0.72 - i * 0.235, line, ha="left", va="center", fontsize=8)
    return vx + VW


def title(ax: plt.Axes, x: float, y: float, model: nn.Module, image: torch.Tensor, paper: str) -> None:
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ax.text(x, y, f"{paper}: shapes from one forward pass of {type(model).__name__} "
            f"on a {shape_str((0,) + tuple(image.shape))} image, {n_params / 1e6:.2f} M trainable parameters",
            ha="center", va="center", fontsize=12)


def save(fig: plt.Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, facecolor="white")
    plt.close(fig)
    return out


def draw(model: VQVAE, out: Path, image_size: int = 64) -> Path:
    """Trace `model` on one image_size x image_size sample and write the architecture picture to `out`."""
    x = sample_image(image_size)
    rec = trace(model, x, parts_of(model))
    enc, dec, (vq,) = rec["encoder"], rec["decoder"], rec["quantizer"]
    ref, y = vq.shape[-1], Y
    total = 1.1 + (len(enc) + len(dec)) * (GAP + BW) + 2 * (GAP + TW) + (GAP + VW) + (GAP + 1.0)
    width = max(16.0, total + 0.3)                        # a deeper model widens the canvas, keeping the aspect
    fig = plt.figure(figsize=(16, 5), dpi=120, facecolor="white")
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, width), ax.set_ylim(2.5 - 2.5 * width / 16, 2.5 + 2.5 * width / 16), ax.axis("off")

    cx = input_image(ax, x, (width - total) / 2)
    cx = stage(ax, cx, enc, ENC, type(model.encoder).__name__, ref)
    arrow(ax, cx, cx + GAP)
    ze_x = cx + GAP
    tensor_node(ax, ze_x, TW, "$z_e(x)$", enc[-1].shape)
    arrow(ax, ze_x + TW, ze_x + TW + GAP)
    cx = quantizer_box(ax, ze_x + TW + GAP, model.quantizer, vq, "z_e(x)")
    arrow(ax, cx, cx + GAP)
    zq_x = cx + GAP
    tensor_node(ax, zq_x, TW, "$z_q(x)$", vq.shape)
    cx = stage(ax, zq_x + TW, dec, DEC, type(model.decoder).__name__, ref)

    arrow(ax, cx, cx + GAP)
    cx += GAP
    h_out = height(dec[-1].shape, ref)
    box(ax, cx, 1.0, h_out, GREY, ["reconstruction", shape_str(dec[-1].shape)])
    ax.text(cx + 0.5, y + h_out / 2 + 0.12, r"$\hat{x}$", ha="center", va="bottom", fontsize=12)

    # straight-through estimator: the decoder's gradient w.r.t. z_q(x) is copied to z_e(x)
    red, low, a, b = "#b2182b", 0.8, ze_x + TW / 2, zq_x + TW / 2
    route(ax, [(b, y - TW / 2 - 0.35), (b, low), (a, low), (a, y - TW / 2 - 0.35)], red, "--", shrink=0)
    ax.text((a + b) / 2, low - 0.1, "straight-through gradient", ha="center", va="top", fontsize=9, color=red,
            fontstyle="italic")
    title(ax, width / 2, 4.7, model, x, "VQ-VAE (arXiv 1711.00937)")
    return save(fig, out)


def draw_vqvae2(model: VQVAE2, out: Path, image_size: int = 128) -> Path:
    """Trace the 2-level `model` on one image_size x image_size sample and write its picture to `out`: the bottom
    level in the lower row, the top level above it, with every arrow a tensor that VQVAE2.forward passes on."""
    x = sample_image(image_size)
    rec = trace(model, x, parts_of(model))
    enc, top_enc, top_dec, dec = (rec[k] for k in ("encoder", "top_encoder", "top_decoder", "decoder"))
    (tq,), (join,), (bq,), (up,), (cat,) = (rec[k] for k in ("top_quantizer", "join", "bottom_quantizer",
                                                             "upsample_top", "concat"))
    h_b, d_top = enc[-1].shape, top_dec[-1].shape
    assert join.in_shape[1] == h_b[1] + d_top[1] and cat.in_shape[1] == up.shape[1] + bq.shape[1]
    ref, yb, yt = tq.shape[-1], 1.8, 5.9         # boxes grow from the top code map's width; the rows' centre lines
    yc, yu = yt - 1.45, 3.8                      # the channel back to the join; upsample_top's centre line
    bottom_frame, top_frame, dark = (yb - 1.5, yb + 1.55), (yt - 1.12, yt + 0.92), "#333333"
    fig = plt.figure(dpi=120, facecolor="white")
    ax = fig.add_axes([0, 0, 1, 1])
    ax.axis("off")

    def name(x: float, y: float, text: str, ha: str = "center") -> None:
        ax.text(x, y, text, ha=ha, va="top", fontsize=7.5, family="monospace", color="#666666")

    def fork(x: float, y: float) -> None:
        ax.plot(x, y, "o", color=dark, ms=3.5)

    # bottom row to h_b, which goes right to the join and up to the top encoder
    cx = input_image(ax, x, 0.3, yb)
    cx = stage(ax, cx, enc, ENC, f"{type(model.encoder).__name__} (bottom)", ref, yb, bottom_frame)
    arrow(ax, cx, cx + GAP, yb)
    hb_x = cx + GAP
    tensor_node(ax, hb_x, TW, "$h_b$", h_b, yb)
    up_x = hb_x + TW + 0.25
    arrow(ax, hb_x + TW, up_x + GAP, yb)
    ax.plot([up_x, up_x], [yb, yt], color=dark, lw=1.2)
    fork(up_x, yb)

    # top row: top encoder -> z_top -> top quantizer -> e_top -> top decoder (and e_top down to upsample_top)
    cx = stage(ax, up_x, top_enc, ENC, type(model.top_encoder).__name__, ref, yt, top_frame)
    arrow(ax, cx, cx + GAP, yt)
    tensor_node(ax, cx + GAP, TW, "$z_{top}$", top_enc[-1].shape, yt)
    arrow(ax, cx + GAP + TW, cx + 2 * GAP + TW, yt)
    cx = quantizer_box(ax, cx + 2 * GAP + TW, model.top_quantizer, tq, "z_{top}", yt)
    name(cx - VW / 2, yt - 1.24, "top_quantizer")
    arrow(ax, cx, cx + GAP, yt)
    tensor_node(ax, cx + GAP, TW, "$e_{top}$", tq.shape, yt)
    et_x = cx + GAP + TW + 0.25
    ax.plot([cx + GAP + TW, et_x], [yt, yt], color=dark, lw=1.2)
    fork(et_x, yt)
    cx = stage(ax, et_x, top_dec, DEC, type(model.top_decoder).__name__, ref, yt, top_frame)
    td_end = cx + 0.2

    # the join: a 1x1 convolution over [h_b, top decoder output], fed from the left and from above
    jx, hj = up_x + GAP, height(join.shape, ref)
    lines = describe(join.module)
    box(ax, jx, BW, hj, ENC, [lines[0], lines[1], f"{h_b[1]}+{d_top[1]}→{join.module.out_channels}",
                              shape_str(join.shape)], yb)
    name(jx + BW / 2, yb - hj / 2 - 0.08, join.name)
    route(ax, [(cx, yt), (td_end, yt), (td_end, yc), (jx + BW / 2, yc), (jx + BW / 2, yb + hj / 2)])
    ax.text(jx + BW / 2 + 0.12, yc - 0.06, f"top decoder output {shape_str(d_top)}, joined to $h_b$", ha="left",
            va="top", fontsize=8, fontstyle="italic")

    # bottom row on: z_bottom -> bottom quantizer -> e_bottom -> concat (with upsample_top(e_top)) -> decoder
    cx = jx + BW
    arrow(ax, cx, cx + GAP, yb)
    tensor_node(ax, cx + GAP, TW, "$z_{bottom}$", join.shape, yb)
    arrow(ax, cx + GAP + TW, cx + 2 * GAP + TW, yb)
    cx = quantizer_box(ax, cx + 2 * GAP + TW, model.bottom_quantizer, bq, "z_{bottom}", yb)
    name(cx - VW / 2, yb - 1.24, "bottom_quantizer")
    arrow(ax, cx, cx + GAP, yb)
    tensor_node(ax, cx + GAP, TW, "$e_{bottom}$", bq.shape, yb)
    cx += 2 * GAP + TW
    hc, mid = height(cat.in_shape, ref), cx + BW / 2
    box(ax, cx, BW, hc, GREY, ["concat", f"{up.shape[1]}+{bq.shape[1]}", shape_str(cat.in_shape)], yb)
    ax.plot([et_x] * 2, [yc - 0.12, yc + 0.12], color="white", lw=6)   # a gap where e_top crosses the channel
    route(ax, [(et_x, yt), (et_x, yu), (cx + BW, yu)])
    box(ax, cx, BW, 1.0, DEC, describe(up.module) + [shape_str(up.shape)], yu)
    name(cx - 0.06, yu - 0.3, up.name, ha="right")
    route(ax, [(mid, yu - 0.5), (mid, yb + hc / 2)])
    cx = stage(ax, cx + BW, dec, DEC, type(model.decoder).__name__, ref, yb, bottom_frame)
    arrow(ax, cx, cx + GAP, yb)
    cx += GAP
    h_out = height(dec[-1].shape, ref)
    box(ax, cx, 1.0, h_out, GREY, ["reconstruction", shape_str(dec[-1].shape)], yb)
    ax.text(cx + 0.5, yb + h_out / 2 + 0.12, r"$\hat{x}$", ha="center", va="bottom", fontsize=12)

    factor = image_size // tq.indices[-1], image_size // bq.indices[-1]
    ax.text(0.3, yt + 0.55, f"top level: {shape_str(tq.indices)} codes (H/{factor[0]}), the global "
            f"structure\nbottom level: {shape_str(bq.indices)} codes (H/{factor[1]}), chosen given the top "
            f"(section 3.1)\nthe decoder sees both: $[\\uparrow e_{{top}}, e_{{bottom}}]$", ha="left", va="top",
            fontsize=10, linespacing=1.6)
    width, total_height = max(cx + 1.0, td_end) + 0.3, yt + 1.95
    title(ax, width / 2, yt + 1.6, model, x, "VQ-VAE-2 (arXiv 1906.00446, figure 2a)")
    ax.set_xlim(0, width), ax.set_ylim(0, total_height)
    fig.set_size_inches(width, total_height)
    return save(fig, out)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, choices=(1, 2), default=1,
                        help="1: the VQ-VAE, traced at 64 px; 2: VQ-VAE-2 (hierarchy.VQVAE2), traced at 128 px")
    parser.add_argument("--out", type=Path, default=None,
                        help="output PNG (default model_visualisation/vqvae.png, or vqvae2.png with --levels 2)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)  # the codebook drawn is the model's random initial one: keep the picture reproducible
    model = build_model(Config(levels=args.levels))
    out = (draw if args.levels == 1 else draw_vqvae2)(model, args.out or DEFAULT_OUT[args.levels],
                                                      IMAGE_SIZE[args.levels])
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
