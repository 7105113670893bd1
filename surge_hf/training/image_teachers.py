"""Distillation teachers for image students: any transformers image classifier, on the student's inputs.

A teacher need not share the student's architecture, image size, channels or normalisation: logit distillation only
needs its logits for the same images. `TeacherInputAdapter` maps the student's normalised `pixel_values` `x`
(channels C_s, size H_s x W_s, per-channel mean m_s and std s_s) to what the teacher was trained on:

    r   = x * s_s + m_s                              back to [0, 1] pixel values
    r'  = r repeated to 3 channels (C_s = 1, C_t = 3), or the luminance 0.299 R + 0.587 G + 0.114 B (C_s = 3,
          C_t = 1), as PIL's RGB/L conversion does
    r'' = bilinear resize of r' to the teacher's `config.image_size` (when it has one and it differs)
    x_t = (r'' - m_t) / s_t                          the teacher's normalisation (its image processor's mean/std)

When the teacher shares the student's channels, size and normalisation, `x_t = x` exactly (no step is applied).
`small_resnet_config` describes the small full-precision ResNet that `scripts/vit.py --train_teacher resnet` trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, ResNetConfig

from ..data.image import ImageDataInfo
from .compatibility import check_image_teacher

LUMINANCE = (0.299, 0.587, 0.114)


def _side_pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def _per_channel(values: Sequence[float]) -> Tensor:
    return torch.tensor(list(values), dtype=torch.float32).reshape(1, -1, 1, 1)


class TeacherInputAdapter(nn.Module):
    """Calls `teacher` on the student's `pixel_values` converted to the teacher's inputs (see the module docstring).

    Args:
        teacher: a transformers image classifier (its output has `logits`).
        student_mean, student_std: the student's per-channel normalisation (C_s values each).
        teacher_mean, teacher_std: the teacher's (C_t values each).
        teacher_image_size: the teacher's (height, width), or None when it takes any size (CNNs).
    """

    def __init__(self, teacher: nn.Module, student_mean: Sequence[float], student_std: Sequence[float],
                 teacher_mean: Sequence[float], teacher_std: Sequence[float],
                 teacher_image_size: tuple[int, int] | None = None):
        super().__init__()
        channels = (len(student_mean), len(teacher_mean))
        if channels[0] != channels[1] and channels not in ((1, 3), (3, 1)):
            raise ValueError(f"Cannot feed {channels[0]}-channel images to a teacher that takes {channels[1]} "
                             "channels; only 1 <-> 3 channel conversions are defined.")
        self.teacher = teacher
        self.teacher_image_size = teacher_image_size
        self.same_normalisation = (list(student_mean), list(student_std)) == (list(teacher_mean), list(teacher_std))
        self.register_buffer("student_mean", _per_channel(student_mean), persistent=False)
        self.register_buffer("student_std", _per_channel(student_std), persistent=False)
        self.register_buffer("teacher_mean", _per_channel(teacher_mean), persistent=False)
        self.register_buffer("teacher_std", _per_channel(teacher_std), persistent=False)
        self.register_buffer("luminance", _per_channel(LUMINANCE), persistent=False)

    def teacher_inputs(self, pixel_values: Tensor) -> Tensor:
        """x_t from the student's x (the module docstring's four steps, each only when needed)."""
        same_channels = pixel_values.shape[1] == self.teacher_mean.shape[1]
        same_size = self.teacher_image_size in (None, tuple(pixel_values.shape[-2:]))
        if same_channels and same_size and self.same_normalisation:
            return pixel_values
        pixels = pixel_values * self.student_std + self.student_mean
        if not same_channels:
            pixels = pixels.repeat(1, 3, 1, 1) if pixels.shape[1] == 1 else (pixels * self.luminance).sum(1, True)
        if not same_size:
            pixels = F.interpolate(pixels, size=self.teacher_image_size, mode="bilinear", align_corners=False)
        return (pixels - self.teacher_mean) / self.teacher_std

    def forward(self, pixel_values: Tensor, **kwargs: Any) -> Any:
        return self.teacher(pixel_values=self.teacher_inputs(pixel_values), **kwargs)


def load_image_teacher(name_or_path: str, info: ImageDataInfo, mean: Sequence[float],
                       std: Sequence[float]) -> TeacherInputAdapter:
    """The teacher at `name_or_path` (checked), behind an adapter from the student's inputs (normalised with
    `mean`/`std`). The teacher's normalisation comes from its image processor, else it is the student's."""
    source = f"--teacher_model_name_or_path {name_or_path}"
    config = AutoConfig.from_pretrained(name_or_path)
    check_image_teacher(config, info, source)
    channels = getattr(config, "num_channels", info.num_channels)
    teacher_mean, teacher_std = list(mean), list(std)
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
    except OSError:  # no preprocessor_config.json
        processor = None
    processor_mean, processor_std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if processor_mean is not None and processor_std is not None:
        teacher_mean, teacher_std = list(processor_mean), list(processor_std)
    if len(teacher_mean) == 1:
        teacher_mean, teacher_std = teacher_mean * channels, teacher_std * channels
    if len(teacher_mean) != channels or len(teacher_std) != channels:
        raise ValueError(f"{source}: its image processor normalises {len(teacher_mean)} channel(s) but the model "
                         f"takes {channels}; fix the teacher's preprocessor_config.json.")
    size = getattr(config, "image_size", None)
    teacher = AutoModelForImageClassification.from_pretrained(name_or_path, dtype=torch.float32)
    return TeacherInputAdapter(teacher, mean, std, teacher_mean, teacher_std,
                               None if size is None else _side_pair(size))


def small_resnet_config(info: ImageDataInfo) -> ResNetConfig:
    """A small full-precision ResNet (basic blocks, widths 64/128/256, one block per stage, about 1.2 M
    parameters) for the data's channels and classes: a teacher that trains in minutes on a CPU."""
    return ResNetConfig(num_channels=info.num_channels, embedding_size=32, hidden_sizes=[64, 128, 256],
                        depths=[1, 1, 1], layer_type="basic", downsample_in_first_stage=False,
                        num_labels=info.num_labels, id2label=info.id2label, label2id=info.label2id)
