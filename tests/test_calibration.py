"""`surge_hf.calibrate`: data-dependent thresholds and scales, set layer by layer in execution order."""

from __future__ import annotations

import torch
from torch import nn

import surge_hf
from surge_hf.quantizers import sign


def two_layer_model(binarizer: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 4))
    return surge_hf.binarize(model, surge_hf.SurgeConfig(target_modules=["0", "2"], activation_binarizer=binarizer))


def test_elastic_thresholds_and_scales_follow_the_calibrated_inputs():
    model = two_layer_model("elastic").train()
    x = torch.randn(3, 7, 6) * 2 + 1
    surge_hf.calibrate(model, x)
    assert model.training  # mode restored

    first, second = model[0], model[2]
    rows = x.reshape(-1, 6)
    tau1 = rows.mean(0)
    s1 = (rows - tau1).abs().mean()
    assert torch.allclose(first.input_threshold, tau1, atol=1e-6)
    assert torch.allclose(first.input_scale, s1.reshape(1), atol=1e-6)

    # The second layer is calibrated on what the calibrated first layer outputs.
    alpha = first.weight.abs().mean(dim=1, keepdim=True)
    hidden = nn.functional.gelu(s1 * sign(x - tau1) @ (alpha * sign(first.weight)).t() + first.bias)
    rows2 = hidden.reshape(-1, 5)
    tau2 = rows2.mean(0)
    assert torch.allclose(second.input_threshold, tau2, atol=1e-5)
    assert torch.allclose(second.input_scale, (rows2 - tau2).abs().mean().reshape(1), atol=1e-5)


def test_rsign_calibrates_thresholds_only_and_sign_is_left_alone():
    model = two_layer_model("rsign")
    x = torch.randn(10, 6) + 3
    surge_hf.calibrate(model, x)
    assert torch.allclose(model[0].input_threshold, x.mean(0), atol=1e-6)
    assert model[0].input_scale is None

    plain = two_layer_model("sign")
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    surge_hf.calibrate(plain, x)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_conv_thresholds_are_per_channel():
    torch.manual_seed(0)
    model = surge_hf.binarize(nn.Sequential(nn.Conv2d(3, 4, 3)),
                              surge_hf.SurgeConfig(target_modules=["0"], activation_binarizer="elastic"))
    x = torch.randn(2, 3, 5, 5) + torch.tensor([1.0, -2.0, 0.5]).reshape(1, 3, 1, 1)
    surge_hf.calibrate(model, x)
    tau = x.mean(dim=(0, 2, 3))
    assert torch.allclose(model[0].input_threshold, tau, atol=1e-6)
    assert torch.allclose(model[0].input_scale, (x - tau.reshape(1, 3, 1, 1)).abs().mean().reshape(1), atol=1e-6)
