"""The auxiliary-branch loss: an optional term that keeps each auxiliary branch a faithful stand-in for its
binary branch.

For every SURGE layer whose recipe has `aux_loss_weight = w > 0`, the forward pass in training records

    L_aux(layer) = mean((W_a x - f_b)^2)      (x and f_b detached: only W_a is trained by this term)

and `auxiliary_loss(model) = sum over layers of w * L_aux(layer)`. The HF models add it to their `loss` when they
are trained with labels, so `transformers.Trainer` needs no change. Computing it costs the auxiliary forward
product that SURGE otherwise skips.
"""

from __future__ import annotations

import torch
from torch import nn

from .binarize import surge_layers


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """The weighted sum of the auxiliary-branch losses of the last training forward pass (None if there is none)."""
    terms = [
        layer.surge_config.aux_loss_weight * layer.last_aux_loss
        for _, layer in surge_layers(model)
        if layer.last_aux_loss is not None
    ]
    return torch.stack(terms).sum() if terms else None
