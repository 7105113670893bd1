"""The Adaptive Gradient Scaler (AGS) and the identity fork where SURGE combines the two gradient paths.

For a binarized layer with input `x`, the binary branch gives `g_b` (the straight-through gradient at `x`, taken
after the activation binarizer's surrogate mask) and the auxiliary full-precision branch gives `g_a`. The layer
input receives

    dL/dx = g_b + lam * g_a,      lam = eta * ||g_b||_2 / (||g_a||_2 + eps)        (per layer, per step)

Norms are computed in float32 whatever the gradient dtype, so bf16/fp16 gradients neither overflow nor underflow
the ratio, and `lam * g_a` stays finite: its norm is at most `eta * ||g_b||`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .layers import SurgeLayerMixin


def ags_lambda(norm_binary: Tensor, norm_aux: Tensor, eta: float, eps: float) -> Tensor:
    """lam = eta * ||g_b|| / (||g_a|| + eps), in float32."""
    return eta * norm_binary / (norm_aux + eps)


def gradient_norm(grad: Tensor | None, device: torch.device) -> Tensor:
    """The float32 L2 norm of `grad` (0 when the branch sent no gradient)."""
    if grad is None:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.linalg.vector_norm(grad, dtype=torch.float32)


def scaled(grad: Tensor, lam: Tensor) -> Tensor:
    """`lam * grad` in `grad`'s dtype, with lam clamped to that dtype's range (lam * 0 must stay 0, not NaN)."""
    return grad * lam.clamp(max=torch.finfo(grad.dtype).max).to(grad.dtype)


@dataclass
class ScalerStats:
    """The last backward pass of one layer: lam applied, ||g_b||, ||g_a|| (detached 0-dim float32 tensors)."""

    lam: Tensor | None = None
    grad_norm_binary: Tensor | None = None
    grad_norm_aux: Tensor | None = None


class DualPathFork(torch.autograd.Function):
    """Identity fork of the layer input (and of the auxiliary weight) into the binary and auxiliary paths.

    Forward: returns `x` twice (views, no copy) and the auxiliary weight `W_a` once.
    Backward: receives `g_b` (binary path), `g_a` (auxiliary path) and `G_a` (gradient of `W_a`); returns
    `g_b + lam * g_a` for `x` and `G_a` (or `lam * G_a` when the recipe scales the auxiliary weight's gradient) for
    `W_a`. `lam` is chosen by the layer's recipe:
      - `compensator="surge"`, `lambda_placement="fork"`: lam from this step's norms (AGS);
      - `compensator="surge"`, `lambda_placement="previous"`: lam computed at the previous step (0 at the first);
      - `compensator="fixed"`: lam = eta.
    """

    @staticmethod
    def forward(ctx, x: Tensor, aux_weight: Tensor, layer: SurgeLayerMixin) -> tuple[Tensor, Tensor, Tensor]:
        ctx.layer = layer
        ctx.device = x.device
        return x.view_as(x), x.view_as(x), aux_weight.view_as(aux_weight)

    @staticmethod
    def backward(ctx, grad_binary: Tensor | None, grad_aux: Tensor | None, grad_aux_weight: Tensor | None):
        layer = ctx.layer
        recipe = layer.surge_config
        norm_binary = gradient_norm(grad_binary, ctx.device)
        norm_aux = gradient_norm(grad_aux, ctx.device)
        current = ags_lambda(norm_binary, norm_aux, recipe.eta, recipe.eps)
        if recipe.compensator == "fixed":
            lam = torch.full_like(current, recipe.eta)
        elif recipe.lambda_placement == "previous":
            lam = layer.previous_lambda.clone()
            layer.previous_lambda.copy_(current)
        else:
            lam = current
        layer.scaler_stats = ScalerStats(lam=lam.detach(), grad_norm_binary=norm_binary, grad_norm_aux=norm_aux)

        grad_x = grad_binary
        if grad_aux is not None:
            grad_x = scaled(grad_aux, lam) if grad_x is None else grad_x + scaled(grad_aux, lam)
        if grad_aux_weight is not None and recipe.scale_aux_grad:
            grad_aux_weight = scaled(grad_aux_weight, lam)
        return grad_x, grad_aux_weight, None
