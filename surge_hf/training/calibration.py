"""Data-dependent initialisation of the activation quantizers and weight scales ("calibration").

A pretrained network's layer inputs are far from the symmetric, unit-scale inputs that `sign(x)` assumes: a GELU
output is mostly small and negative with a few large positive values, an attention output has mean |x| near 0.1.
With tau = 0 and s = 1 the binary network starts far from the pretrained one. `calibrate` runs one forward pass
and sets, for every SURGE layer, from the input `x` it actually receives (features along the last dim for Linear,
channels for Conv2d; every other dim pooled):

    tau_j = mean(x_j)                                  (rsign and elastic; 0 for unsigned inputs)
    s     = mean(|x - tau|)                            (elastic, 1 bit signed: the L1-optimal scale of sign)
    s     = 2 * mean(|x - tau|) / sqrt(Q_p)            (k-bit and unsigned codes in [Q_n, Q_p]: LSQ's step init)

and, with `learnable_weight_scale`, the per-output-channel scale that best reproduces the float layer's output
from the binary product p = op(q_x, sign(W)) * s (least squares, bias excluded):

    alpha_o = sum(y_o * p_o) / sum(p_o^2),   y = op(x, W)     (kept at mean |W_o| where that is not > 0)

Layers are calibrated in execution order inside the same pass (a forward pre-hook sets a layer's values before it
runs), so each layer sees the inputs that its calibrated predecessors produce.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..binarize import surge_layers
from ..layers import BINARY_LAYER_TYPES


def _feature_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input as (samples, features): the layer kind's feature dim moved last, every other dim pooled."""
    features = x.movedim(layer.ops.feature_dim, -1)
    return features.reshape(-1, features.shape[-1])


@torch.no_grad()
def _calibrate_layer(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    x = inputs[0]
    rows = _feature_rows(layer, x).float()
    spec = layer.activation_spec
    threshold = rows.mean(dim=0) if spec.signed else torch.zeros_like(rows[0])
    if layer.input_threshold is not None:
        layer.input_threshold.copy_(threshold)
    if layer.input_scale is not None:
        spread = (rows - threshold).abs().mean().item()
        layer.input_scale.fill_(spread if spec.is_sign else 2 * spread / spec.levels[1] ** 0.5)
    if layer.weight_scale is not None:
        _fit_weight_scale(layer, x)


def _fit_weight_scale(layer: nn.Module, x: torch.Tensor) -> None:
    """alpha_o = <y_o, p_o> / <p_o, p_o> (see the module docstring)."""
    ops = layer.ops
    product = ops.apply_output_scale(ops.product(layer.input_codes(x), layer.weight_signs()), layer.input_scale)
    # The output channels, as (samples, channels) like the inputs; one column for a per-tensor scale.
    target = _feature_rows(layer, ops.product(x, layer.weight)).double()
    product = _feature_rows(layer, product).double()
    if layer.weight_scale.numel() == 1:
        target, product = target.reshape(-1, 1), product.reshape(-1, 1)
    fitted = (target * product).sum(0) / (product * product).sum(0)
    current = layer.weight_scale.double().expand_as(fitted)
    layer.weight_scale.copy_(torch.where(fitted > 0, fitted, current).to(layer.weight_scale.dtype))


@torch.no_grad()
def calibrate(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """Initialise every SURGE layer's activation threshold and scale (and learned weight scale) from one forward
    pass on example inputs.

    `args`/`kwargs` are the model's inputs (e.g. a tokenized batch without labels). Returns the model, in the
    train/eval mode it had. Layers without learnable quantizer parameters are left as they are. Raises `ValueError`
    for a packed model: its thresholds and scales are part of what it was trained with.
    """
    if any(isinstance(module, BINARY_LAYER_TYPES) for module in model.modules()):
        raise ValueError(
            "calibrate() sets the quantizers of trainable SURGE layers, but this model holds packed (finalized) "
            "binary layers, whose thresholds and scales are fixed parts of the trained model. Calibrate before "
            "finalize(), or rebuild trainable layers first with surge_hf.unfinalize(model) (model.unfinalize() for a "
            "SURGE model)."
        )
    layers = [layer for _, layer in surge_layers(model)
              if any(p is not None for p in (layer.input_threshold, layer.input_scale, layer.weight_scale))]
    if not layers:
        return model
    handles = [layer.register_forward_pre_hook(_calibrate_layer) for layer in layers]
    was_training = model.training
    try:
        model.eval()
        model(*args, **kwargs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return model
