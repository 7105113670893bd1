"""The default recipe for transformers' ResNet: a binary CNN (W1A1 residual-block convolutions)."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification

import surge_hf


def tiny_resnet() -> ResNetForImageClassification:
    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                     layer_type="basic", num_labels=3))


def test_residual_block_convolutions_are_binarized_and_the_rest_stays_full_precision():
    model = surge_hf.binarize(tiny_resnet())
    binary = sorted(name for name, _ in surge_hf.surge_layers(model))
    assert binary == [
        "resnet.encoder.stages.0.layers.0.layer.0.convolution",
        "resnet.encoder.stages.0.layers.0.layer.1.convolution",
        "resnet.encoder.stages.1.layers.0.layer.0.convolution",
        "resnet.encoder.stages.1.layers.0.layer.1.convolution",
    ]
    assert type(model.resnet.embedder.embedder.convolution) is torch.nn.Conv2d
    assert type(model.resnet.encoder.stages[1].layers[0].shortcut.convolution) is torch.nn.Conv2d


def test_binary_resnet_trains_and_finalizes_exactly():
    model = surge_hf.binarize(tiny_resnet()).train()
    pixels, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.resnet.encoder.stages[0].layers[0].layer[0].convolution.weight.detach().clone()
    loss = model(pixel_values=pixels, labels=labels).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.resnet.encoder.stages[0].layers[0].layer[0].convolution.weight)
    assert all(stats["lam"] > 0 for stats in surge_hf.diagnostics(model).values())

    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
        surge_hf.finalize(model)
        assert torch.equal(model(pixel_values=pixels).logits, expected)


def test_save_pretrained_of_a_binarized_model_without_surge_class_refuses(tmp_path):
    model = surge_hf.binarize(tiny_resnet(), surge_hf.SurgeConfig())
    with pytest.raises(ValueError, match=re.escape(
            "This ResNetForImageClassification was binarized with surge_hf.binarize, and surge_hf has no SURGE model "
            "class for it (it has them for BERT and ViT): save_pretrained would write a checkpoint that loads back as "
            "the float model, without its binary layers.")):
        model.save_pretrained(tmp_path, packed=True)
    assert not any(tmp_path.iterdir())
