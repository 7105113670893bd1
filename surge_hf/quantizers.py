"""Binarizers and activation quantizers with surrogate gradients.

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

Activations can also be quantized to k bits (`ActivationSpec`): uniform integer codes clamp(round((x - tau) / s),
Q_n, Q_p) with a straight-through gradient inside the range and LSQ's gradient for the step s. Every quantizer here
returns integer codes (signs or levels); the layers multiply the integer product by the scales afterwards
(`output_scale`).

The functions here are shared by the training layers and by the inference layers, so both compute the forward
values with the very same operations (which makes a finalized model exact, not merely close).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .configuration_surge import renamed_module_attributes


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


SURROGATE_FUNCTIONS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "identity": _identity,
    "clipped_ste": _clipped_ste,
    "approx_sign": _approx_sign,
    "swish_sign": _swish_sign,
}


def surrogate_derivative(name: str, u: Tensor, beta: float = 5.0) -> Tensor:
    """The surrogate derivative `d(u)` of `sign`, by registry name (see the module docstring)."""
    if name not in SURROGATE_FUNCTIONS:
        raise ValueError(f"Unknown surrogate {name!r}; allowed values: {', '.join(SURROGATE_FUNCTIONS)}.")
    return SURROGATE_FUNCTIONS[name](u, beta)


def binary_weight_scale(weight: Tensor, mode: str) -> Tensor:
    """The scale alpha of binary weights, shaped to broadcast against `weight`: what a layer with
    `SurgeConfig.weight_scale == mode` multiplies sign(W) by (held as its `weight_scale` when learned or packed).

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


@dataclass(frozen=True)
class ActivationSpec:
    """What an activation quantizer needs to know: its bit width, its range and its surrogate.

    `bits = 1, signed`: codes sign(x - tau) in {-1, +1} (the classic binary activation, surrogate gradient);
    otherwise uniform codes clamp(round((x - tau) / s), Q_n, Q_p) with Q_n = -2^(k-1), Q_p = 2^(k-1) - 1 (signed)
    or Q_n = 0, Q_p = 2^k - 1 (unsigned: inputs after ReLU/GELU; k = 1 gives BiT's {0, s} binarizer).
    """

    bits: int = 1
    signed: bool = True
    surrogate: str = "clipped_ste"
    beta: float = 5.0

    @property
    def is_sign(self) -> bool:
        return self.bits == 1 and self.signed

    @property
    def levels(self) -> tuple[int, int]:
        """(Q_n, Q_p), the smallest and largest code."""
        if self.signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1


def activation_codes(x: Tensor, threshold: Tensor | None, scale: Tensor | None, spec: ActivationSpec) -> Tensor:
    """The integer codes q of the activation quantizer, as floats (the value it stands for is q * s).

    Sign: `q = sign(x - tau)`. Uniform: `q = clamp(round((x - tau) / s), Q_n, Q_p)` (round half to even).
    tau = 0 when absent; the uniform quantizer needs its step `s`.
    """
    u = x if threshold is None else x - threshold
    if spec.is_sign:
        return sign(u)
    q_n, q_p = spec.levels
    return torch.round(u / scale).clamp_(q_n, q_p)


def output_scale(activation_scale: Tensor | None, weight_alpha: Tensor | None) -> Tensor | None:
    """The scale that multiplies the integer product: s * alpha (a vector over output channels, or one number).

    Every path (training, eval, packed, kernel) forms it in this order and applies it after the product, so their
    outputs agree bit for bit."""
    if activation_scale is None:
        return weight_alpha
    if weight_alpha is None:
        return activation_scale
    return weight_alpha * activation_scale


class WeightSign(torch.autograd.Function):
    """sign(W) with the clipped straight-through estimator.

    Forward: `sign(W)` (+-1, never 0). Backward: `dL/dW = dL/dsign(W) * 1[|W| <= 1]`. The layer multiplies the
    product by alpha afterwards, so the latent weight receives `alpha * dL/dQ_w * 1[|W| <= 1]` for
    `Q_w = alpha * sign(W)` (alpha treated as a constant unless it is a learned parameter).
    """

    @staticmethod
    def forward(ctx, weight: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        return sign(weight.detach())

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        (weight,) = ctx.saved_tensors
        return clipped_straight_through(grad_output, weight)


def clipped_straight_through(grad_output: Tensor, weight: Tensor) -> Tensor:
    """`dL/dW = dL/dQ * 1[|W| <= 1]`: the clipped straight-through gradient of a weight binarizer."""
    return grad_output * (weight.abs() <= 1).to(grad_output.dtype)


def residual_weight_codes(weight: Tensor, mode: str, second_plane_weight: float = 1.0) -> Tensor:
    """Two binary weight planes, relative to the first plane's scale: `s_1 + g * (alpha_2 / alpha_1) * s_2`.

    `s_1 = sign(W)`, `alpha_1 = binary_weight_scale(W, mode)`, `R = W - alpha_1 s_1`, `s_2 = sign(R)`,
    `alpha_2 = binary_weight_scale(R, mode)`, so with `g = second_plane_weight = 1`, `alpha_1 * codes = alpha_1 s_1 +
    alpha_2 s_2` is the residual two-plane approximation of W (ABC-Net, ReBNN); `0 < g < 1` weights the second plane
    down (a step from two planes to one, `SurgeLayer.second_plane_weight`). A row whose alpha_1 is 0 (an
    all-zero row) gets ratio 0.
    """
    weight = weight.detach()
    alpha = binary_weight_scale(weight, mode)
    signs = sign(weight)
    residual = weight - alpha * signs
    ratio = torch.where(alpha > 0, binary_weight_scale(residual, mode) / alpha, torch.zeros_like(alpha))
    return signs + (second_plane_weight * ratio) * sign(residual)


class ResidualWeightCodes(torch.autograd.Function):
    """`residual_weight_codes(W)` with the clipped straight-through estimator of `WeightSign`.

    Forward: `s_1 + g (alpha_2 / alpha_1) s_2`. Backward: `dL/dW = dL/dcodes * 1[|W| <= 1]` (the weighted plane
    ratio is treated as a constant).
    """

    @staticmethod
    def forward(ctx, weight: Tensor, mode: str, second_plane_weight: float = 1.0) -> Tensor:
        ctx.save_for_backward(weight)
        return residual_weight_codes(weight, mode, second_plane_weight)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (weight,) = ctx.saved_tensors
        return clipped_straight_through(grad_output, weight), None, None


class ActivationQuantizer(torch.autograd.Function):
    """The codes q of `activation_codes` with a surrogate gradient (the value q * s is formed after the product).

    With `g = dL/dq`:
      sign (1 bit, signed), `u = x - tau`, `d` the surrogate derivative of sign at u:
        dL/dx = g * d(u),   dL/dtau = -sum(g * d(u)),   no gradient to s through q
      uniform, `u = (x - tau) / s`, `m = 1[Q_n <= u <= Q_p]` (straight-through inside the range, LSQ):
        dL/dx = g * m / s,  dL/dtau = -sum(g * m / s),  dL/ds = sum(g * (-u / s) * m)
    Together with the explicit factor s after the product (`dL/ds += sum(g_v * q)`, `g_v = g / s`), the step
    gets the LSQ gradient `sum(g_v * (q - u * m))`; the scale of the sign quantizer gets `sum(g_v * q)`.
    Sums run over the dims that tau and s are broadcast along.
    """

    @staticmethod
    def forward(ctx, x: Tensor, threshold: Tensor | None, scale: Tensor | None, spec: ActivationSpec) -> Tensor:
        ctx.save_for_backward(x, threshold, scale)
        ctx.spec = spec
        return activation_codes(x.detach(), threshold, scale, spec)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, threshold, scale = ctx.saved_tensors
        spec: ActivationSpec = ctx.spec
        u = x if threshold is None else x - threshold
        grad_scale = None
        if spec.is_sign:
            grad_u = grad_output * surrogate_derivative(spec.surrogate, u, spec.beta)
        else:
            u = u / scale
            q_n, q_p = spec.levels
            inside = ((u >= q_n) & (u <= q_p)).to(grad_output.dtype)
            grad_u = grad_output * inside / scale
            if ctx.needs_input_grad[2]:
                grad_scale = (-grad_u * u).sum_to_size(scale.shape).to(scale.dtype)
        grad_x = grad_u.to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if threshold is not None and ctx.needs_input_grad[1]:
            grad_threshold = (-grad_u).sum_to_size(threshold.shape).to(threshold.dtype)
        return grad_x, grad_threshold, grad_scale, None


# The previous release's names (until the next release): the function `weight_scale` shared its name with the recipe
# field `SurgeConfig.weight_scale` (its `mode`) and the layers' parameter `weight_scale` (the alpha it computes), and
# `SURROGATES` with the tuple of surrogate names in `configuration_surge`.
__getattr__ = renamed_module_attributes(__name__, {"weight_scale": "binary_weight_scale",
                                                   "SURROGATES": "SURROGATE_FUNCTIONS"})
