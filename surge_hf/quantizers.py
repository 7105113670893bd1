"""Binarizers with surrogate gradients.

Every binarizer computes `sign` in the forward pass and replaces its zero-almost-everywhere derivative by a surrogate
`d(u)` in the backward pass. `sign` here never returns 0: `sign(u) = +1 if u >= 0 else -1` (NaN stays NaN, so a
NaN input gives NaN outputs, as in the float model).

Surrogate derivatives of sign at `u` (the binarizer's pre-sign input):

| name          | d(u)                                                          | source                      |
| ------------- | ------------------------------------------------------------- | --------------------------- |
| `identity`    | 1                                                             | straight-through estimator  |
| `clipped_ste` | 1[|u| <= 1]                                                   | BinaryNet                   |
| `approx_sign` | (2 - 2|u|) * 1[|u| <= 1]                                       | Bi-Real Net (ApproxSign)    |
| `swish_sign`  | beta * (2 - beta*u*tanh(beta*u/2)) / (1 + cosh(beta*u))       | BNN+ (SwishSign)            |

The functions here are shared by the training layers and by the inference layers, so both compute the forward
values with the very same operations (which makes a finalized model exact, not merely close).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def sign(u: Tensor) -> Tensor:
    """`+1` where `u >= 0`, `-1` where `u < 0`, NaN where `u` is NaN, in `u`'s dtype (never 0, unlike `torch.sign`)."""
    signs = (u >= 0).to(u.dtype).mul_(2).sub_(1)
    return torch.where(u.isnan(), u, signs)


def _identity(u: Tensor, beta: float) -> Tensor:
    return torch.ones_like(u)


def _clipped_ste(u: Tensor, beta: float) -> Tensor:
    return (u.abs() <= 1).to(u.dtype)


def _approx_sign(u: Tensor, beta: float) -> Tensor:
    return (2 - 2 * u.abs()).clamp_(min=0)


def _swish_sign(u: Tensor, beta: float) -> Tensor:
    bu = beta * u
    return beta * (2 - bu * torch.tanh(bu / 2)) / (1 + torch.cosh(bu))


SURROGATES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "identity": _identity,
    "clipped_ste": _clipped_ste,
    "approx_sign": _approx_sign,
    "swish_sign": _swish_sign,
}


def surrogate_derivative(name: str, u: Tensor, beta: float = 5.0) -> Tensor:
    """The surrogate derivative `d(u)` of `sign`, by registry name (see the module docstring)."""
    if name not in SURROGATES:
        raise ValueError(f"Unknown surrogate {name!r}; allowed values: {', '.join(SURROGATES)}.")
    return SURROGATES[name](u, beta)


def weight_scale(weight: Tensor, mode: str) -> Tensor:
    """The scale alpha of binary weights, shaped to broadcast against `weight`.

    `"channel"`: alpha_o = mean_i |W_oi| per output channel (all dims but the first are averaged);
    `"tensor"`: one alpha = mean |W|; `"none"`: alpha = 1.
    The mean is accumulated in float64 and rounded once to `weight`'s dtype, so a weight rebuilt as
    alpha * sign(W) (`unfinalize`) gives back exactly alpha (a float32 sum of n copies of alpha does not).
    """
    if mode == "channel":
        dims = tuple(range(1, weight.ndim))
        return weight.detach().abs().mean(dim=dims, keepdim=True, dtype=torch.float64).to(weight.dtype)
    if mode == "tensor":
        return weight.detach().abs().mean(dtype=torch.float64).to(weight.dtype).reshape([1] * weight.ndim)
    if mode == "none":
        return torch.ones([1] * weight.ndim, dtype=weight.dtype, device=weight.device)
    raise ValueError(f"Unknown weight_scale {mode!r}; allowed values: channel, tensor, none.")


def binary_weight(signs: Tensor, alpha: Tensor) -> Tensor:
    """The binary weight alpha * sign(W) from its signs (+-1) and its scale."""
    return signs * alpha


def binarize_activation_values(x: Tensor, threshold: Tensor | None, scale: Tensor | None) -> Tensor:
    """Forward value of the activation binarizer: `s * sign(x - tau)` (tau = 0 and s = 1 when absent)."""
    u = x if threshold is None else x - threshold
    out = sign(u)
    return out if scale is None else out * scale


class WeightBinarizer(torch.autograd.Function):
    """Q_w(W) = alpha * sign(W).

    Forward: `alpha * sign(W)` with alpha from `weight_scale` (treated as a constant, as in BiT and ReActNet).
    Backward: `dL/dW = dL/dQ * 1[|W| <= 1]` (clipped straight-through, no alpha factor).
    """

    @staticmethod
    def forward(ctx, weight: Tensor, scale_mode: str) -> Tensor:
        ctx.save_for_backward(weight)
        return binary_weight(sign(weight.detach()), weight_scale(weight, scale_mode))

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad_output * (weight.abs() <= 1).to(grad_output.dtype), None


class ActivationBinarizer(torch.autograd.Function):
    """Q_x(x) = s * sign(x - tau) with a surrogate gradient.

    Forward: `s * sign(u)`, `u = x - tau` (tau: threshold broadcast over x, s: scalar scale; each optional).
    Backward, with `d` the surrogate derivative at `u` and `g = dL/dQ`:
        dL/dx   = g * s * d(u)
        dL/dtau = -sum(g * s * d(u))     (summed over the dims that tau is broadcast along)
        dL/ds   = sum(g * sign(u))
    Only `x`, `tau` and `s` are saved; `u` is recomputed in the backward pass.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, threshold: Tensor | None, scale: Tensor | None, surrogate: str, beta: float
    ) -> Tensor:
        ctx.save_for_backward(x, threshold, scale)
        ctx.surrogate, ctx.beta = surrogate, beta
        return binarize_activation_values(x.detach(), threshold, scale)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, threshold, scale = ctx.saved_tensors
        u = x if threshold is None else x - threshold
        grad_u = grad_output * surrogate_derivative(ctx.surrogate, u, ctx.beta)
        if scale is not None:
            grad_u = grad_u * scale
        grad_x = grad_u.to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if threshold is not None and ctx.needs_input_grad[1]:
            grad_threshold = (-grad_u).sum_to_size(threshold.shape).to(threshold.dtype)
        grad_scale = None
        if scale is not None and ctx.needs_input_grad[2]:
            grad_scale = (grad_output * sign(u)).sum_to_size(scale.shape).to(scale.dtype)
        return grad_x, grad_threshold, grad_scale, None, None
