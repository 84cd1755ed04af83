"""The pixel scale: images in [0, 1] to and from the [-0.5, 0.5] the models are trained in (the shift of the
authors' Sonnet example), in one place, and `ImageCodec`, which gives a model with `encode` / `decode` in that
scale the `encode_images` / `decode_images` a user calls (models.VQVAE and hierarchy.VQVAE2 have them)."""
from __future__ import annotations

import torch
from torch import Tensor


def to_model_scale(images: Tensor) -> Tensor:
    """Images in [0, 1] -> the [-0.5, 0.5] scale the models are trained in."""
    return images - 0.5


def to_image_scale(x: Tensor, clamp: bool = True) -> Tensor:
    """A decoder's output in the model's [-0.5, 0.5] scale -> images in [0, 1], float32 (float64 stays float64),
    clamped to [0, 1] unless `clamp` is False (the decoder's mean in a likelihood)."""
    x = (x if x.dtype == torch.float64 else x.float()) + 0.5
    return x.clamp(0, 1) if clamp else x


class ImageCodec:
    """`encode_images` / `decode_images` for a model with `encode` / `decode` in the [-0.5, 0.5] scale and a
    `downsampling` factor: images in [0, 1] in, images in [0, 1] out, on the model's device."""

    def encode_images(self, images: Tensor):
        """(B, 3, H, W) float images in [0, 1], H and W multiples of `downsampling` -> the code maps of `encode`."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch of RGB images, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got {images.dtype} (divide 8-bit images by 255)")
        f = self.downsampling
        if images.shape[2] % f or images.shape[3] % f or min(images.shape[2:]) < f:
            raise ValueError(f"expected a height and width that are multiples of {f} (the encoder downsamples by "
                             f"{f}), got {images.shape[2]}x{images.shape[3]}")
        low, high = images.min().item(), images.max().item()
        if low < 0 or high > 1:
            raise ValueError(f"expected images in [0, 1], got values from {low:.4g} to {high:.4g}")
        device = next(self.parameters()).device
        return self.encode(to_model_scale(images.to(device, torch.float32)))

    def decode_images(self, codes) -> Tensor:
        """The code maps of `encode_images` -> (B, 3, H, W) float32 images in [0, 1]."""
        return to_image_scale(self.decode(codes))
