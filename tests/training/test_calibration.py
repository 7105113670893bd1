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


def test_multi_bit_unsigned_and_weight_scale_calibration():
    """k-bit step 2 mean|x - tau| / sqrt(Q_p); unsigned inputs keep tau = 0; learned alpha is the least-squares fit
    of the float layer's output from the binary product."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    recipe = surge_hf.SurgeConfig(target_modules=["0", "2"], activation_binarizer="elastic", activation_bits=4,
                                  unsigned_activation_modules=["2"], learnable_weight_scale=True)
    surge_hf.binarize(model, recipe)
    x = torch.randn(3, 7, 6) * 2 + 1
    surge_hf.calibrate(model, x)
    first, second = model[0], model[2]
    rows = x.reshape(-1, 6)
    tau1 = rows.mean(0)
    s1 = 2 * (rows - tau1).abs().mean() / 7**0.5  # signed 4 bits: Q_p = 7
    torch.testing.assert_close(first.input_threshold.detach(), tau1)
    torch.testing.assert_close(first.input_scale.detach(), s1.reshape(1))
    codes = torch.round((rows - tau1) / s1).clamp(-8, 7)
    product = (codes @ sign(first.weight.detach()).t()) * s1
    target = rows @ first.weight.detach().t()
    alpha = (target * product).sum(0) / (product * product).sum(0)
    torch.testing.assert_close(first.weight_scale.detach(), alpha.float())

    hidden = torch.relu(first(x)).reshape(-1, 5)  # what the second layer receives, after calibration of the first
    assert torch.equal(second.input_threshold.detach(), torch.zeros(5))
    s2 = 2 * hidden.abs().mean() / 15**0.5  # unsigned 4 bits: Q_p = 15
    torch.testing.assert_close(second.input_scale.detach(), s2.reshape(1))


def test_weight_scale_kept_where_the_fit_is_not_positive():
    layer = surge_hf.SurgeLinear(2, 2, surge_config=surge_hf.SurgeConfig(learnable_weight_scale=True,
                                                                    activation_binarizer="sign"))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0], [0.5, -0.5]]))
        layer.weight_scale.copy_(torch.tensor([0.25, 0.75]))
    # x = (1, 1): row 1's product sign(x) . sign(W_1) = 0, so its fit is 0/0 and keeps 0.75
    surge_hf.calibrate(layer, torch.ones(1, 2))
    assert layer.weight_scale.tolist() == [1.0, 0.75]
