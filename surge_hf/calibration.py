"""Data-dependent initialisation of the activation binarizers ("calibration").

A pretrained network's layer inputs are far from the symmetric, unit-scale inputs that `sign(x)` assumes: a GELU
output is mostly small and negative with a few large positive values, an attention output has mean |x| near 0.1.
With tau = 0 and s = 1 the binary network starts far from the pretrained one. `calibrate` runs one forward pass
and sets, for every SURGE layer, from the input `x` it actually receives (features along the last dim for Linear,
channels for Conv2d; every other dim pooled):

    tau_j = mean(x_j)                     (rsign and elastic binarizers)
    s     = mean(|x - tau|)               (elastic binarizer)

Layers are calibrated in execution order inside the same pass (a forward pre-hook sets a layer's tau and s before
it runs), so each layer sees the inputs that its calibrated predecessors produce.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .binarize import surge_layers
from .layers import layer_kind


def _feature_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input as (samples, features): the layer kind's feature dim moved last, every other dim pooled."""
    features = x.movedim(layer_kind(layer).feature_dim, -1)
    return features.reshape(-1, features.shape[-1])


@torch.no_grad()
def _calibrate_layer(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    rows = _feature_rows(layer, inputs[0]).float()
    threshold = rows.mean(dim=0)
    if layer.input_threshold is not None:
        layer.input_threshold.copy_(threshold)
    if layer.input_scale is not None:
        layer.input_scale.fill_((rows - threshold).abs().mean().item())


@torch.no_grad()
def calibrate(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """Initialise every SURGE layer's activation threshold and scale from one forward pass on example inputs.

    `args`/`kwargs` are the model's inputs (e.g. a tokenized batch without labels). Returns the model, in the
    train/eval mode it had. Layers without learnable activation binarizers are left as they are.
    """
    layers = [layer for _, layer in surge_layers(model)
              if layer.input_threshold is not None or layer.input_scale is not None]
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
