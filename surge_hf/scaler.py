"""The Adaptive Gradient Scaler (AGS) and the identity fork where SURGE combines the two gradient paths.

For a binarized layer with input `x`, the binary branch gives `g_b` (the straight-through gradient at `x`, taken
after the activation binarizer's surrogate mask) and the auxiliary full-precision branch gives `g_a`. The layer
input receives

    dL/dx = g_b + lam * g_a,      lam = eta * ||g_b||_2 / (||g_a||_2 + eps)        (per layer, per step)

Norms are computed in float32 (float64 for float64 gradients) whatever the gradient dtype, so bf16/fp16 gradients
neither overflow nor underflow the ratio, and `lam * g_a` stays finite: its norm is at most `eta * ||g_b||`.

The autograd functions get only what they need: an `AdaptiveGradientScaler` (the recipe's knobs and the statistics
of the last backward pass) and, for `lambda_placement="previous"`, the layer's `previous_lambda` buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .configuration_surge import SurgeConfig


def ags_lambda(norm_binary: Tensor, norm_aux: Tensor, eta: float, eps: float) -> Tensor:
    """lam = eta * ||g_b|| / (||g_a|| + eps), in the dtype of the norms."""
    return eta * norm_binary / (norm_aux + eps)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that norms and losses of `dtype` tensors are accumulated in: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def gradient_norm(grad: Tensor | None, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """The L2 norm of `grad` in `accumulation_dtype(grad.dtype)` (a zero of `dtype` when the branch sent none)."""
    if grad is None:
        return torch.zeros((), dtype=dtype, device=device)
    return torch.linalg.vector_norm(grad, dtype=accumulation_dtype(grad.dtype))


def scaled(grad: Tensor, lam: Tensor) -> Tensor:
    """`lam * grad` in `grad`'s dtype, with lam clamped to that dtype's range (lam * 0 must stay 0, not NaN)."""
    return grad * lam.clamp(max=torch.finfo(grad.dtype).max).to(grad.dtype)


@dataclass
class ScalerStats:
    """The last backward pass of one layer: lam applied, ||g_b||, ||g_a|| (detached 0-dim tensors)."""

    lam: Tensor | None = None
    grad_norm_binary: Tensor | None = None
    grad_norm_aux: Tensor | None = None


@dataclass
class AdaptiveGradientScaler:
    """The recipe knobs that choose lam, and the statistics of the last backward pass (see `DualPathFork`)."""

    compensator: str
    lambda_placement: str
    eta: float
    eps: float
    scale_aux_grad: bool
    stats: ScalerStats = field(default_factory=ScalerStats)

    @classmethod
    def from_config(cls, surge_config: SurgeConfig) -> AdaptiveGradientScaler:
        return cls(surge_config.compensator, surge_config.lambda_placement, surge_config.eta, surge_config.eps,
                   surge_config.scale_aux_grad)

    def choose_lambda(self, norm_binary: Tensor, norm_aux: Tensor, previous_lambda: Tensor | None) -> Tensor:
        """lam for this backward pass; stores this step's AGS lam in `previous_lambda` when the recipe defers it."""
        current = ags_lambda(norm_binary, norm_aux, self.eta, self.eps)
        if self.compensator == "fixed":
            return torch.full_like(current, self.eta)
        if self.lambda_placement == "previous":
            lam = previous_lambda.to(current.dtype, copy=True)
            previous_lambda.copy_(current)
            return lam
        return current


class DualPathFork(torch.autograd.Function):
    """Identity fork of the layer input (and of the auxiliary weight) into the binary and auxiliary paths.

    Forward: returns `x` twice (views, no copy) and the auxiliary weight `W_a` once (non-differentiable when `W_a`
    needs no gradient, so that nothing downstream computes one).
    Backward: receives `g_b` (binary path), `g_a` (auxiliary path) and `G_a` (gradient of `W_a`); returns
    `g_b + lam * g_a` for `x` and `G_a` (or `lam * G_a` when the recipe scales the auxiliary weight's gradient) for
    `W_a`. `lam` is chosen by the scaler from the recipe:
      - `compensator="surge"`, `lambda_placement="fork"`: lam from this step's norms (AGS);
      - `compensator="surge"`, `lambda_placement="previous"`: lam computed at the previous step (0 at the first);
      - `compensator="fixed"`: lam = eta.
    """

    @staticmethod
    def forward(ctx, x: Tensor, aux_weight: Tensor, scaler: AdaptiveGradientScaler,
                previous_lambda: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        ctx.scaler = scaler
        ctx.previous_lambda = previous_lambda
        ctx.device, ctx.accumulation_dtype = x.device, accumulation_dtype(x.dtype)
        aux_weight_out = aux_weight.view_as(aux_weight)
        if not aux_weight.requires_grad:  # a frozen W_a: no gradient G_a is asked for downstream
            ctx.mark_non_differentiable(aux_weight_out)
        return x.view_as(x), x.view_as(x), aux_weight_out

    @staticmethod
    def backward(ctx, grad_binary: Tensor | None, grad_aux: Tensor | None, grad_aux_weight: Tensor | None):
        scaler = ctx.scaler
        norm_binary = gradient_norm(grad_binary, ctx.device, ctx.accumulation_dtype)
        norm_aux = gradient_norm(grad_aux, ctx.device, ctx.accumulation_dtype)
        lam = scaler.choose_lambda(norm_binary, norm_aux, ctx.previous_lambda)
        scaler.stats = ScalerStats(lam=lam.detach(), grad_norm_binary=norm_binary, grad_norm_aux=norm_aux)

        grad_x = grad_binary
        if grad_aux is not None:
            grad_x = scaled(grad_aux, lam) if grad_x is None else grad_x + scaled(grad_aux, lam)
        if grad_aux_weight is not None and scaler.scale_aux_grad:
            grad_aux_weight = scaled(grad_aux_weight, lam)
        return grad_x, grad_aux_weight, None, None
