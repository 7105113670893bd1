"""Model inputs from image examples: the batch collator, the normalisation statistics, and the image processor
saved with the model (which reproduces the eval transform, so ``AutoImageProcessor`` gives the inputs evaluated).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .image import ImageDataInfo
from .image_transforms import (
    AugmentConfig,
    cutmix_batch,
    mixup_batch,
    normalize,
    prepare_image,
    random_crop,
    random_horizontal_flip,
)

if TYPE_CHECKING:
    import datasets
    from transformers import ViTImageProcessor

PIL_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, the resize our torch resize mirrors


class ImageCollator:
    """Collate examples ``{image_column: image, label_column: int}`` into model inputs.

    Output: ``{"pixel_values": FloatTensor[B, C, H, W], "labels": LongTensor[B]}``, plus
    ``"soft_labels": FloatTensor[B, K]`` when ``augment`` mixes batches (the training loss then takes the
    soft-target cross-entropy; ``labels`` keeps each row's own class). Order: :func:`prepare_image`, random crop,
    flip (train), :func:`normalize`, mixup/cutmix (train). Without ``augment`` it is the eval transform that
    :func:`build_image_processor` reproduces.

    Randomness: each batch draws from its own ``torch.Generator``, seeded from ``(seed, epoch, batch index)``, so the
    augmentation does not depend on ``num_workers``, and a run resumed mid-epoch (whose loader skips the first batches
    without collating them) draws what the uninterrupted run drew, given the index of its first batch through
    :meth:`set_epoch`. Each collator copy counts its calls: the batch index is ``first_batch + calls`` in the main
    process and ``first_batch + w + calls * n`` in DataLoader worker ``w`` of ``n`` (a map-style DataLoader hands
    batches to its workers in turn). Call :meth:`set_epoch` at each epoch (non-persistent workers get a fresh copy of
    the collator each epoch); in multi-process training pass ``seed + process_index``.
    """

    def __init__(
        self,
        info: ImageDataInfo,
        mean: Sequence[float],
        std: Sequence[float],
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        if len(mean) != info.num_channels or len(std) != info.num_channels:
            raise ValueError(
                f"mean and std need one value per channel ({info.num_channels}), got {len(mean)} and {len(std)}"
            )
        if min(std) <= 0:
            raise ValueError(f"std must be > 0 for every channel, got {list(std)}")
        self.info = info
        self.mean = tuple(float(value) for value in mean)
        self.std = tuple(float(value) for value in std)
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.first_batch = 0
        self._calls = 0

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """Start epoch ``epoch`` at batch ``first_batch`` (> 0 when a resumed run skips the batches before it).

        The augmentation of batch ``b`` of epoch ``e`` depends only on (seed, e, b).
        """
        if first_batch < 0:
            raise ValueError(f"first_batch must be >= 0, got {first_batch}")
        self.epoch = epoch
        self.first_batch = first_batch
        self._calls = 0

    def _generator(self) -> torch.Generator:
        """A generator for the next batch, seeded from (seed, epoch, batch index); see the class docstring."""
        worker = torch.utils.data.get_worker_info()
        offset, stride = (0, 1) if worker is None else (worker.id, worker.num_workers)
        batch_index = self.first_batch + offset + self._calls * stride
        self._calls += 1
        state = np.random.SeedSequence([self.seed, self.epoch, batch_index]).generate_state(1, dtype=np.uint64)
        return torch.Generator().manual_seed(int(state[0]) >> 1)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        info = self.info
        pixel_values = torch.stack([prepare_image(example[info.image_column], info) for example in examples])
        labels = torch.tensor([int(example[info.label_column]) for example in examples], dtype=torch.long)
        augment = self.augment
        if augment is None:
            return {"pixel_values": normalize(pixel_values, self.mean, self.std), "labels": labels}
        generator = self._generator()
        pixel_values = random_crop(pixel_values, augment.crop_padding, generator)
        if augment.horizontal_flip:
            pixel_values = random_horizontal_flip(pixel_values, generator)
        pixel_values = normalize(pixel_values, self.mean, self.std)
        batch = {"pixel_values": pixel_values, "labels": labels}
        if augment.mixes:
            use_cutmix = augment.cutmix_alpha > 0 and (
                augment.mixup_alpha == 0 or float(torch.rand(1, generator=generator)) < 0.5
            )
            mix = cutmix_batch if use_cutmix else mixup_batch
            alpha = augment.cutmix_alpha if use_cutmix else augment.mixup_alpha
            batch["pixel_values"], batch["soft_labels"] = mix(pixel_values, labels, info.num_labels, alpha, generator)
        return batch


def compute_mean_std(
    dataset: datasets.Dataset | Sequence[Mapping[str, Any]],
    info: ImageDataInfo,
    max_images: int | None = 10_000,
    seed: int = 0,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of :func:`prepare_image` outputs (values in [0, 1]).

    ``mean_c = E[x_c]``, ``std_c = sqrt(E[x_c^2] - mean_c^2)`` over all pixels of ``max_images`` rows drawn at
    random with ``seed`` (all rows when ``max_images`` is None or the dataset is smaller), accumulated in float64.
    """
    if len(dataset) == 0:
        raise ValueError("cannot compute mean/std of an empty dataset")
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    if count < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    rows = np.sort(np.random.default_rng(seed).choice(len(dataset), size=count, replace=False))
    total = torch.zeros(info.num_channels, dtype=torch.float64)
    squares = torch.zeros(info.num_channels, dtype=torch.float64)
    pixels = 0
    for row in rows.tolist():
        tensor = prepare_image(dataset[row][info.image_column], info).double()
        total += tensor.sum(dim=(1, 2))
        squares += tensor.square().sum(dim=(1, 2))
        pixels += tensor.shape[1] * tensor.shape[2]
    mean = total / pixels
    std = (squares / pixels - mean.square()).clamp_min(0.0).sqrt()
    if float(std.min()) == 0.0:
        raise ValueError(
            f"pixel values have zero variance in some channel (std {std.tolist()}): pass mean and std to "
            "ImageCollator yourself"
        )
    return tuple(mean.tolist()), tuple(std.tolist())


def build_image_processor(info: ImageDataInfo, mean: Sequence[float], std: Sequence[float]) -> ViTImageProcessor:
    """A ``ViTImageProcessor`` that reproduces the eval transform of :class:`ImageCollator` (``augment=None``).

    Settings: ``do_convert_rgb = info.convert_rgb``; ``do_resize = info.resize`` to ``info.image_size`` with
    bilinear resampling; ``do_rescale`` by 1/255; ``do_normalize`` with ``mean``/``std``. Without resizing the
    outputs equal the eval transform up to float rounding (1e-6); with resizing, within one grey level before
    normalisation (see :func:`resize_image`). Save it with ``save_pretrained(folder)`` next to the model.
    """
    from transformers import ViTImageProcessor

    height, width = info.image_size
    return ViTImageProcessor(
        do_convert_rgb=info.convert_rgb,
        do_resize=info.resize,
        size={"height": height, "width": width},
        resample=PIL_BILINEAR,
        do_rescale=True,
        rescale_factor=1.0 / 255.0,
        do_normalize=True,
        image_mean=[float(value) for value in mean],
        image_std=[float(value) for value in std],
    )
