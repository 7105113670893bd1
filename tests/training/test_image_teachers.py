"""Distillation teachers for image students: the input adapter's conversions, and the teacher checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig, ResNetConfig, ResNetForImageClassification, ViTImageProcessor

from surge_hf.data.image import ImageDataInfo
from surge_hf.training.compatibility import check_image_teacher
from surge_hf.training.image_teachers import (
    TeacherInputAdapter,
    load_image_teacher,
    small_resnet_config,
)

INFO = ImageDataInfo("image", "label", 1, (8, 8), ("a", "b", "c"))


class Recorder(nn.Module):
    """A stand-in teacher that records its input."""

    def forward(self, pixel_values):
        self.seen = pixel_values
        return pixel_values


def test_same_inputs_pass_through_unchanged():
    x = torch.randn(2, 1, 8, 8)
    adapter = TeacherInputAdapter(Recorder(), [0.5], [0.25], [0.5], [0.25], (8, 8))
    assert adapter.teacher_inputs(x) is x


def test_grayscale_to_rgb_resize_and_renormalise():
    x = torch.randn(2, 1, 8, 8)
    adapter = TeacherInputAdapter(Recorder(), [0.5], [0.25], [0.1, 0.2, 0.3], [0.5, 0.5, 0.5], (16, 16))
    pixels = F.interpolate((x * 0.25 + 0.5).repeat(1, 3, 1, 1), size=(16, 16), mode="bilinear", align_corners=False)
    expected = (pixels - torch.tensor([0.1, 0.2, 0.3]).reshape(1, 3, 1, 1)) / 0.5
    torch.testing.assert_close(adapter(pixel_values=x), expected, rtol=0, atol=1e-6)


def test_rgb_to_grayscale_uses_luminance():
    x = torch.rand(1, 3, 2, 2)
    adapter = TeacherInputAdapter(Recorder(), [0.0] * 3, [1.0] * 3, [0.0], [1.0])
    expected = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
    torch.testing.assert_close(adapter(pixel_values=x), expected, rtol=0, atol=1e-6)


def test_unsupported_channel_counts_are_an_error():
    with pytest.raises(ValueError, match=r"Cannot feed 2-channel images to a teacher that takes 3 channels"):
        TeacherInputAdapter(Recorder(), [0.0] * 2, [1.0] * 2, [0.0] * 3, [1.0] * 3)


def test_teacher_must_be_an_image_classifier_of_the_same_classes():
    check_image_teacher(small_resnet_config(INFO), INFO, "t")  # accepted
    with pytest.raises(ValueError, match=r"t is a 'bert' model, not an image classifier"):
        check_image_teacher(BertConfig(), INFO, "t")
    with pytest.raises(ValueError, match=r"t predicts 4 classes"):
        check_image_teacher(ResNetConfig(num_labels=4), INFO, "t")


def test_loaded_resnet_teacher_takes_rgb_with_its_processor_normalisation(tmp_path):
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=3)
    ResNetForImageClassification(config).save_pretrained(tmp_path)
    ViTImageProcessor(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]).save_pretrained(tmp_path)
    adapter = load_image_teacher(str(tmp_path), INFO, [0.5], [0.25])
    x = torch.randn(2, 1, 8, 8)
    expected = adapter.teacher(pixel_values=((x * 0.25 + 0.5).repeat(1, 3, 1, 1)
                                             - torch.tensor([0.4, 0.5, 0.6]).reshape(1, 3, 1, 1))
                               / torch.tensor([0.2, 0.3, 0.4]).reshape(1, 3, 1, 1)).logits
    torch.testing.assert_close(adapter.eval()(pixel_values=x).logits, expected, rtol=0, atol=1e-6)
