"""Binarizers: `sign` never returns 0, each surrogate derivative against its formula, the weight and activation
binarizers' forward values and gradients against hand-computed references (exact zeros and exact threshold ties
included)."""

from __future__ import annotations

import re

import pytest
import torch

from surge_hf.quantizers import (
    ActivationQuantizer,
    ActivationSpec,
    ResidualWeightCodes,
    WeightSign,
    activation_codes,
    binary_weight_scale,
    output_scale,
    residual_weight_codes,
    sign,
    surrogate_derivative,
)

# Points that hit every branch of the surrogates: u = 0, the |u| = 1 boundaries, inside and outside.
POINTS = torch.tensor([-3.0, -1.5, -1.0, -0.75, -0.5, -0.125, 0.0, 0.125, 0.5, 0.75, 1.0, 1.5, 3.0])


def _ref_sign(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u >= 0, torch.ones_like(u), -torch.ones_like(u))


def _ref_surrogate(name: str, u: torch.Tensor, beta: float) -> torch.Tensor:
    """The surrogate derivatives written out point by point (plain Python arithmetic)."""
    values = []
    for v in u.tolist():
        if name == "identity":
            values.append(1.0)
        elif name == "clipped_ste":
            values.append(1.0 if abs(v) <= 1 else 0.0)
        elif name == "approx_sign":
            values.append(2 - 2 * abs(v) if abs(v) <= 1 else 0.0)
        else:
            raise AssertionError(name)
    return torch.tensor(values, dtype=u.dtype)


def _swish_sign(u: torch.Tensor, beta: float) -> torch.Tensor:
    """The SwishSign function of BNN+: 2 * sigmoid(b u) * (1 + b u (1 - sigmoid(b u))) - 1."""
    s = torch.sigmoid(beta * u)
    return 2 * s * (1 + beta * u * (1 - s)) - 1


def _swish_derivative_autograd(u: torch.Tensor, beta: float) -> torch.Tensor:
    leaf = u.detach().double().requires_grad_(True)
    (grad,) = torch.autograd.grad(_swish_sign(leaf, beta).sum(), leaf)
    return grad


# -- sign ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_sign_never_zero(dtype: torch.dtype) -> None:
    u = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2.5, -2.5, 1.0, -1.0]).to(dtype)
    out = sign(u)
    assert out.dtype == dtype
    # 1e-30 underflows to +-0 in bf16/fp16; +-0 maps to +1 whatever the dtype
    tiny = [1.0, 1.0] if dtype in (torch.float16,) else [1.0, -1.0]
    assert out.tolist() == [1.0, 1.0, *tiny, 1.0, -1.0, 1.0, -1.0]
    assert not (out == 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sign_propagates_nan(dtype: torch.dtype) -> None:
    out = sign(torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0], dtype=dtype))
    assert out[0].isnan() and out[1:].tolist() == [1.0, -1.0, 1.0]


# -- surrogates ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["identity", "clipped_ste", "approx_sign"])
def test_piecewise_surrogates(name: str) -> None:
    got = surrogate_derivative(name, POINTS)
    assert torch.equal(got, _ref_surrogate(name, POINTS, 5.0))


def test_surrogate_boundaries_by_hand() -> None:
    u = torch.tensor([-1.0, 0.0, 1.0, 1.0000001])
    assert surrogate_derivative("clipped_ste", u).tolist() == [1.0, 1.0, 1.0, 0.0]
    assert surrogate_derivative("approx_sign", u).tolist() == [0.0, 2.0, 0.0, 0.0]
    assert surrogate_derivative("identity", u).tolist() == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("beta", [1.0, 2.5, 5.0, 10.0])
def test_swish_sign_matches_autograd_of_closed_form(beta: float) -> None:
    got = surrogate_derivative("swish_sign", POINTS.double(), beta)
    torch.testing.assert_close(got, _swish_derivative_autograd(POINTS, beta), rtol=1e-10, atol=1e-12)
    # at u = 0 the derivative is beta (= beta * (2 - 0) / (1 + cosh 0))
    assert surrogate_derivative("swish_sign", torch.zeros(1, dtype=torch.float64), beta).item() == beta


def test_swish_sign_matches_finite_difference() -> None:
    beta, h = 5.0, 1e-6
    u = POINTS.double()
    finite = (_swish_sign(u + h, beta) - _swish_sign(u - h, beta)) / (2 * h)
    torch.testing.assert_close(surrogate_derivative("swish_sign", u, beta), finite, rtol=1e-7, atol=1e-8)
    # float32 evaluation agrees with float64
    torch.testing.assert_close(surrogate_derivative("swish_sign", POINTS, beta),
                               finite.float(), rtol=1e-5, atol=1e-6)


def test_unknown_surrogate() -> None:
    message = "Unknown surrogate 'tanh'; allowed values: identity, clipped_ste, approx_sign, swish_sign."
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        surrogate_derivative("tanh", POINTS)


# -- weight binarizer ------------------------------------------------------------------------------------------------
# |W| row means: row 0 (0.5 + 1.5 + 0.25 + 0.25) / 4 = 0.625 ; row 1 (2 + 0 + 1 + 3) / 4 = 1.5 ; all: 8.5 / 8 = 1.0625
W = torch.tensor([[0.5, -1.5, 0.25, -0.25], [2.0, 0.0, -1.0, 3.0]])
W_SIGNS = torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, 1.0]])
W_MASK = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])  # 1[|W| <= 1], |W| = 1 included


@pytest.mark.parametrize(
    ("mode", "alpha"),
    [("channel", torch.tensor([[0.625], [1.5]])), ("tensor", torch.tensor([[1.0625]])), ("none", torch.ones(1, 1))],
)
def test_weight_sign_forward_backward(mode: str, alpha: torch.Tensor) -> None:
    weight = W.clone().requires_grad_(True)
    out = WeightSign.apply(weight)
    assert torch.equal(out, W_SIGNS)
    assert torch.equal(binary_weight_scale(W, mode), alpha)
    grad = torch.arange(1.0, 9.0).reshape(2, 4)
    out.backward(grad)
    # clipped straight-through
    assert torch.equal(weight.grad, grad * W_MASK)


def test_weight_scale_conv_channel() -> None:
    weight = torch.arange(-12.0, 12.0).reshape(2, 3, 2, 2)
    alpha = binary_weight_scale(weight, "channel")
    assert alpha.shape == (2, 1, 1, 1)
    # row 0: |-12..-1| mean = 6.5 ; row 1: |0..11| mean = 5.5
    assert alpha.flatten().tolist() == [6.5, 5.5]
    assert binary_weight_scale(weight, "tensor").shape == (1, 1, 1, 1)
    assert binary_weight_scale(weight, "tensor").item() == 6.0


def test_unknown_weight_scale() -> None:
    message = "Unknown weight_scale 'row'; allowed values: channel, tensor, none."
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        binary_weight_scale(W, "row")


# -- activation binarizer --------------------------------------------------------------------------------------------
TAU = torch.tensor([0.0, 0.5, -0.25, 1.0])


def _activation_input() -> torch.Tensor:
    """(2, 3, 4) input with exact zeros, exact ties x == tau, and exact |x - tau| = 1 boundaries."""
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3)) * 1.5
    x[0, 0] = torch.tensor([0.0, 0.5, -0.25, 1.0])  # ties with tau (u = 0)
    x[0, 1] = torch.tensor([1.0, 1.5, 0.75, 0.0])  # u = +1, +1, +1, -1
    x[0, 2] = torch.tensor([-1.0, -0.5, -1.25, 2.0])  # u = -1, -1, -1, +1
    x[1, 0] = torch.tensor([0.0, 0.0, 0.0, 0.0])  # exact zeros
    return x


@pytest.mark.parametrize("surrogate", ["identity", "clipped_ste", "approx_sign", "swish_sign"])
@pytest.mark.parametrize("kind", ["sign", "rsign"])
def test_sign_activation_quantizer(kind: str, surrogate: str) -> None:
    beta = 3.0
    spec = ActivationSpec(surrogate=surrogate, beta=beta)
    x_value = _activation_input()
    x = x_value.clone().requires_grad_(True)
    tau = TAU.clone().requires_grad_(True) if kind != "sign" else None
    out = ActivationQuantizer.apply(x, tau, None, spec)
    grad = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(11))
    out.backward(grad)

    u = x_value - (TAU if kind != "sign" else 0.0)
    if surrogate == "swish_sign":
        d = _swish_derivative_autograd(u.flatten(), beta).float().reshape(u.shape)
    else:
        d = _ref_surrogate(surrogate, u.flatten(), beta).reshape(u.shape)
    assert torch.equal(out, _ref_sign(u))
    assert (out[1, 0] == 1).all() if kind == "sign" else (out[0, 0] == 1).all()  # zeros and ties give +1
    torch.testing.assert_close(x.grad, grad * d, rtol=1e-6, atol=1e-6)
    if tau is not None:
        torch.testing.assert_close(tau.grad, -(grad * d).sum(dim=(0, 1)), rtol=1e-5, atol=1e-5)


def test_sign_quantizer_conv_layout() -> None:
    """tau broadcast as (1, C, 1, 1): its gradient sums over batch and space."""
    x_value = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    x_value[0, :, 0, 0] = torch.tensor([0.0, 0.25, 1.25])  # ties (u = 0), u = 0, u = 1
    tau_value = torch.tensor([0.0, 0.25, 0.25])
    x = x_value.clone().requires_grad_(True)
    tau = tau_value.clone().requires_grad_(True)
    out = ActivationQuantizer.apply(x, tau.reshape(1, 3, 1, 1), None, ActivationSpec())
    grad = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(6))
    out.backward(grad)
    u = x_value - tau_value.reshape(1, 3, 1, 1)
    mask = (u.abs() <= 1).float()
    assert torch.equal(out, _ref_sign(u))
    assert torch.equal(x.grad, grad * mask)
    torch.testing.assert_close(tau.grad, -(grad * mask).sum(dim=(0, 2, 3)), rtol=1e-6, atol=1e-6)


def test_sign_quantizer_only_needed_grads() -> None:
    """A frozen input still lets tau learn."""
    x = _activation_input()
    tau = TAU.clone().requires_grad_(True)
    out = ActivationQuantizer.apply(x, tau, None, ActivationSpec())
    out.sum().backward()
    u = x - TAU
    assert torch.equal(tau.grad, -((u.abs() <= 1).float()).sum(dim=(0, 1)))


# -- uniform (multi-bit and unsigned) quantizers -----------------------------------------------------------------------
# u = (x - tau) / s with tau = 0.25, s = 0.5: x = [-2, -0.75, -0.125, 0.25, 0.5, 0.625, 0.875, 1.25, 3]
UNIFORM_X = torch.tensor([-2.0, -0.75, -0.125, 0.25, 0.5, 0.625, 0.875, 1.25, 3.0])
UNIFORM_U = torch.tensor([-4.5, -2.0, -0.75, 0.0, 0.5, 0.75, 1.25, 2.0, 5.5])


@pytest.mark.parametrize(
    ("bits", "signed", "codes"),
    [
        # round half to even: 0.5 -> 0, -0.75 -> -1, 1.25 -> 1
        (2, True, [-2.0, -2.0, -1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]),
        (4, True, [-4.0, -2.0, -1.0, 0.0, 0.0, 1.0, 1.0, 2.0, 6.0]),
        (1, False, [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]),
        (2, False, [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 3.0]),
    ],
)
def test_uniform_quantizer_codes_and_gradients(bits: int, signed: bool, codes: list[float]) -> None:
    spec = ActivationSpec(bits=bits, signed=signed)
    q_n, q_p = spec.levels
    assert (q_n, q_p) == ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1))
    x = UNIFORM_X.clone().requires_grad_(True)
    tau = torch.tensor([0.25], requires_grad=True)
    s = torch.tensor([0.5], requires_grad=True)
    out = ActivationQuantizer.apply(x, tau, s, spec)
    assert out.tolist() == codes
    assert torch.equal(activation_codes(UNIFORM_X, torch.tensor([0.25]), torch.tensor([0.5]), spec), out.detach())
    g = torch.arange(1.0, 10.0)
    out.backward(g)
    inside = ((UNIFORM_U >= q_n) & (UNIFORM_U <= q_p)).float()
    assert torch.equal(x.grad, g * inside / 0.5)
    assert torch.equal(tau.grad, -(g * inside / 0.5).sum().reshape(1))
    torch.testing.assert_close(s.grad, (g * inside * -UNIFORM_U / 0.5).sum().reshape(1))


def test_uniform_quantizer_step_gets_lsq_gradient_through_the_value() -> None:
    """With the value s * q formed afterwards, ds = sum(g_v * (q - u * 1[inside])) (LSQ)."""
    spec = ActivationSpec(bits=2)
    s = torch.tensor([0.5], requires_grad=True)
    value = ActivationQuantizer.apply(UNIFORM_X, torch.tensor([0.25]), s, spec) * s
    g_v = torch.arange(1.0, 10.0)
    value.backward(g_v)
    q = activation_codes(UNIFORM_X, torch.tensor([0.25]), torch.tensor([0.5]), spec)
    inside = ((UNIFORM_U >= -2) & (UNIFORM_U <= 1)).float()
    torch.testing.assert_close(s.grad, (g_v * (q - UNIFORM_U * inside)).sum().reshape(1))


def test_output_scale_order() -> None:
    alpha, s = torch.tensor([0.5, 2.0]), torch.tensor([3.0])
    assert output_scale(None, None) is None
    assert output_scale(s, None) is s and output_scale(None, alpha) is alpha
    assert output_scale(s, alpha).tolist() == [1.5, 6.0]


@pytest.mark.parametrize("mode", ["channel", "tensor"])
@pytest.mark.parametrize("shape", [(64, 37), (32, 768), (8, 3, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_scale_of_rebuilt_weight_is_exact(mode: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """A latent weight rebuilt as alpha * sign(W) (what `unfinalize` does) has exactly the scale alpha again."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    alpha = binary_weight_scale(weight, mode)
    assert alpha.dtype == dtype
    rebuilt = alpha * _ref_sign(weight)
    assert torch.equal(binary_weight_scale(rebuilt, mode), alpha)


def test_residual_weight_codes_forward_backward() -> None:
    # row 0: alpha_1 = 0.5, R = [0.25, 0.25, -0.25, -0.25], alpha_2 = 0.25 -> ratio 0.5
    # row 1: all zero -> alpha_1 = 0 -> ratio 0, codes = sign(0) = +1
    # row 2: alpha_1 = 2, R = [1, 1, -1, -1], alpha_2 = 1 -> ratio 0.5; |W| > 1 clips the gradient
    weight = torch.tensor([[0.75, -0.25, 0.25, -0.75], [0.0, 0.0, 0.0, 0.0], [3.0, -1.0, 1.0, -3.0]])
    expected = torch.tensor([[1.5, -0.5, 0.5, -1.5], [1.0, 1.0, 1.0, 1.0], [1.5, -0.5, 0.5, -1.5]])
    assert torch.equal(residual_weight_codes(weight, "channel"), expected)
    # two planes represent these rows exactly: alpha_1 * codes == W
    assert torch.equal(binary_weight_scale(weight, "channel") * expected, weight)
    latent = weight.clone().requires_grad_(True)
    codes = ResidualWeightCodes.apply(latent, "channel")
    grad = torch.arange(1.0, 13.0).reshape(3, 4)
    codes.backward(grad)
    assert torch.equal(latent.grad, grad * (weight.abs() <= 1))


def test_two_planes_approximate_a_gaussian_weight_better_than_one() -> None:
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    alpha = binary_weight_scale(weight, "channel")
    one_plane = (weight - alpha * sign(weight)).norm() / weight.norm()
    two_planes = (weight - alpha * residual_weight_codes(weight, "channel")).norm() / weight.norm()
    # Gaussian rows: 1 - 2/pi of the energy is left by one plane (0.60 relative error), about a third of it by two
    assert 0.59 < one_plane < 0.61 and two_planes < 0.7 * one_plane


def test_residual_weight_codes_weight_the_second_plane() -> None:
    # the rows of the test above: s_1 = sign(W), ratio 0.5 (rows 0 and 2), 0 (row 1)
    weight = torch.tensor([[0.75, -0.25, 0.25, -0.75], [0.0, 0.0, 0.0, 0.0], [3.0, -1.0, 1.0, -3.0]])
    # g = 0.25: s_1 + 0.125 s_2, with s_2 = [+, +, -, -] in rows 0 and 2
    expected = torch.tensor([[1.125, -0.875, 0.875, -1.125], [1.0, 1.0, 1.0, 1.0], [1.125, -0.875, 0.875, -1.125]])
    assert torch.equal(residual_weight_codes(weight, "channel", 0.25), expected)
    assert torch.equal(residual_weight_codes(weight, "channel", 0.0), torch.where(weight >= 0, 1.0, -1.0))
    latent = weight.clone().requires_grad_(True)
    ResidualWeightCodes.apply(latent, "channel", 0.25).backward(torch.ones(3, 4))
    assert torch.equal(latent.grad, (weight.abs() <= 1).float())
