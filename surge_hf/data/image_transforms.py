"""Plain-torch tensor transforms of images (no torchvision) and the training augmentation.

uint8 -> [0, 1], grayscale -> RGB, bilinear resize, per-channel normalisation, random crop with zero padding,
horizontal flip, and batch-level mixup / cutmix (which return soft labels). Randomness comes from the
``torch.Generator`` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .image import MODE_CHANNELS, ImageDataInfo


def to_tensor(image: Any) -> torch.Tensor:
    """PIL image (mode ``L``/``RGB``) or uint8 array (HxW, HxWx1, HxWx3) -> FloatTensor[C, H, W] = pixel / 255."""
    mode = getattr(image, "mode", None)
    if isinstance(mode, str) and mode not in MODE_CHANNELS:
        raise ValueError(f"image mode '{mode}' is not supported: convert the image to 'RGB' or 'L' first")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        out_of_range = array.size > 0 and (array.min() < 0 or array.max() > 255)
        if not np.issubdtype(array.dtype, np.integer) or out_of_range:
            raise ValueError(
                f"pixel values must be integers in [0, 255] (uint8), got dtype {array.dtype}: convert float images "
                "in [0, 1] with (x * 255).round().astype('uint8')"
            )
        array = array.astype(np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"image array must be HxW, HxWx1 or HxWx3, got shape {tuple(array.shape)}")
    return torch.tensor(array).permute(2, 0, 1).float().div(255.0)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a [0, 1] FloatTensor[C, H, W] to ``size`` = (height, width), as a uint8 image resize.

    ``round(interpolate(255 * x, antialias=True)) / 255``: the antialiased bilinear filter of PIL, rounded to grey
    levels like PIL's uint8 output; it agrees with ``PIL.Image.resize(BILINEAR)`` within one grey level (1/255).
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    scaled = F.interpolate(image[None] * 255.0, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return scaled.round().clamp(0.0, 255.0).div(255.0)


def prepare_image(image: Any, info: ImageDataInfo) -> torch.Tensor:
    """The deterministic part shared by train and eval: :func:`to_tensor`, grayscale -> RGB, resize.

    Returns FloatTensor[info.num_channels, *info.image_size] in [0, 1].
    """
    tensor = to_tensor(image)
    if info.convert_rgb and tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1).contiguous()
    if tensor.shape[0] != info.num_channels:
        raise ValueError(
            f"image has {tensor.shape[0]} channel(s) but the dataset was loaded with {info.num_channels}: reload "
            "with convert_rgb=True to convert grayscale images to RGB"
        )
    size = tuple(tensor.shape[-2:])
    if size != info.image_size:
        if not info.resize:
            raise ValueError(
                f"image has size {size} but {info.image_size} was expected (height, width): reload with "
                f"image_size={info.image_size} to resize every image"
            )
        tensor = resize_image(tensor, info.image_size)
    return tensor


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean[c]) / std[c]`` of FloatTensor[B, C, H, W] (or [C, H, W])."""
    shape = (-1, 1, 1)
    mean_t = torch.tensor(mean, dtype=batch.dtype).view(shape)
    std_t = torch.tensor(std, dtype=batch.dtype).view(shape)
    return (batch - mean_t) / std_t


def crop_with_offsets(batch: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Zero-pad FloatTensor[B, C, H, W] by ``padding`` on every side, then cut HxW at ``offsets[b] = (top, left)``.

    Offsets lie in ``[0, 2 * padding]``; ``(padding, padding)`` gives the image back unchanged.
    """
    height, width = batch.shape[-2:]
    padded = F.pad(batch, (padding, padding, padding, padding))
    return torch.stack(
        [padded[b, :, top : top + height, left : left + width] for b, (top, left) in enumerate(offsets.tolist())]
    )


def random_crop(batch: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding: offsets ``(top, left)`` uniform in ``[0, 2 * padding]`` per image."""
    if padding == 0:
        return batch
    offsets = torch.randint(0, 2 * padding + 1, (batch.shape[0], 2), generator=generator)
    return crop_with_offsets(batch, padding, offsets)


def random_horizontal_flip(batch: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image of FloatTensor[B, C, H, W] left-right with probability ``p`` (``torch.rand(B) < p``)."""
    flip = torch.rand(batch.shape[0], generator=generator) < p
    return torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)


def _sample_beta(alpha: float, generator: torch.Generator) -> float:
    """A draw of Beta(alpha, alpha), seeded from ``generator`` (torch has no seeded Beta sampler)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _one_hot(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    return F.one_hot(labels, num_labels).float()


def mixup_batch(
    pixel_values: torch.Tensor, labels: torch.Tensor, num_labels: int, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup: ``lam ~ Beta(alpha, alpha)``, ``pi`` a random permutation of the batch,

        x'_b = lam * x_b + (1 - lam) * x_pi(b),   y'_b = lam * onehot(y_b) + (1 - lam) * onehot(y_pi(b)).

    Returns (mixed pixel values, soft labels FloatTensor[B, num_labels]); each soft row sums to 1.
    """
    lam = _sample_beta(alpha, generator)
    perm = torch.randperm(pixel_values.shape[0], generator=generator)
    mixed = lam * pixel_values + (1.0 - lam) * pixel_values[perm]
    targets = _one_hot(labels, num_labels)
    return mixed, lam * targets + (1.0 - lam) * targets[perm]


def cutmix_batch(
    pixel_values: torch.Tensor, labels: torch.Tensor, num_labels: int, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix: paste one box of ``x_pi(b)`` into every ``x_b`` (``pi`` a random permutation of the batch).

    ``lam ~ Beta(alpha, alpha)``; box sides ``h = int(H * sqrt(1 - lam))``, ``w = int(W * sqrt(1 - lam))`` centred at
    a uniform pixel ``(cy, cx)`` and clipped to the image; the soft labels use the area actually pasted:

        lam' = 1 - box_area / (H * W),   y'_b = lam' * onehot(y_b) + (1 - lam') * onehot(y_pi(b)).

    Returns (mixed pixel values, soft labels FloatTensor[B, num_labels]); each soft row sums to 1.
    """
    height, width = pixel_values.shape[-2:]
    lam = _sample_beta(alpha, generator)
    perm = torch.randperm(pixel_values.shape[0], generator=generator)
    ratio = math.sqrt(1.0 - lam)
    box_h, box_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(0, height, (1,), generator=generator))
    cx = int(torch.randint(0, width, (1,), generator=generator))
    top, bottom = max(cy - box_h // 2, 0), min(cy - box_h // 2 + box_h, height)
    left, right = max(cx - box_w // 2, 0), min(cx - box_w // 2 + box_w, width)
    mixed = pixel_values.clone()
    mixed[:, :, top:bottom, left:right] = pixel_values[perm][:, :, top:bottom, left:right]
    kept = 1.0 - (bottom - top) * (right - left) / (height * width)
    targets = _one_hot(labels, num_labels)
    return mixed, kept * targets + (1.0 - kept) * targets[perm]


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation; the defaults do nothing.

    Attributes:
        crop_padding: zero padding of the random crop, in pixels (0: no crop).
        horizontal_flip: mirror each image with probability 0.5.
        mixup_alpha: Beta parameter of mixup (0: off).
        cutmix_alpha: Beta parameter of cutmix (0: off). With both on, each batch takes one of the two with
            probability 0.5.
    """

    crop_padding: int = 0
    horizontal_flip: bool = False
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(f"AugmentConfig.crop_padding must be >= 0, got {self.crop_padding}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(
                "AugmentConfig.mixup_alpha and cutmix_alpha must be >= 0 (0 turns them off), got "
                f"{self.mixup_alpha} and {self.cutmix_alpha}"
            )

    @property
    def mixes(self) -> bool:
        """Whether batches get mixup or cutmix (and so ``soft_labels``)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0
