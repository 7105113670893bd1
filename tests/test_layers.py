"""SURGE layers: forward bit-exactness (training vs eval vs finalized), gradients of every tensor against a
hand-written reference for every compensator mode, the auxiliary forward product never computed, bf16 autocast
and fp16 safety.

The reference (`_reference_step`) recomputes everything with plain torch ops on detached tensors:

    u = x - tau,  x_q = s * sign(u),  W_q = alpha * sign(W),  y = op(x_q, W_q) + b
    (k-bit: v = u / s, q = clamp(round(v), Q_n, Q_p), x_q = s * q, m = 1[Q_n <= v <= Q_p])
    (g_xq, g_Wq) = vjp of op at (x_q, W_q) with g_y
    g_b   = g_xq * s * d(u)                       d: the surrogate derivative (k-bit: g_xq * m)
    dtau  = -sum(g_b),  ds = sum(g_xq * sign(u))  (k-bit: sum(g_xq * (q - v * m)))
    dW    = alpha * g_Wq * 1[|W| <= 1],  dalpha = sum(g_Wq * sign(W)) (learned alpha),  db = sum(g_y)
    (g_a, G_a) = vjp of op at (x, W_a) with g_y     (W_a = W for aux_weight="shared")
    lam   = eta * ||g_b|| / (||g_a|| + 1e-8)  (surge, fork) | eta (fixed) | lam of the previous step (previous)
    dx    = g_b + lam * g_a,   dW_a = G_a (* lam when scale_aux_grad), added to dW when W_a is W,
                                 none for aux_weight="frozen" (a buffer).
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from surge_hf import SurgeConfig, SurgeConv2d, SurgeLinear, binarize, collect_auxiliary_loss, finalize
from surge_hf.layers import LAYER_KINDS, SURGE_ONLY_TENSORS, BinaryConv2d, BinaryLinear, layer_kind
from surge_hf.modeling_utils import added_tensors, init_surge_parameters, initial_values
from surge_hf.scaler import gradient_norm, scaled

ETA = 0.3
CONV_KWARGS = {"stride": 2, "padding": 1, "dilation": 1, "groups": 2}


# -- reference maths -------------------------------------------------------------------------------------------------
def _sgn(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u >= 0, torch.ones_like(u), -torch.ones_like(u))


def _surrogate(name: str, u: torch.Tensor, beta: float) -> torch.Tensor:
    if name == "identity":
        return torch.ones_like(u)
    if name == "clipped_ste":
        return (u.abs() <= 1).to(u.dtype)
    if name == "approx_sign":
        return torch.where(u.abs() <= 1, 2 - 2 * u.abs(), torch.zeros_like(u))
    # swish_sign: autograd of SS(u) = 2 sigmoid(b u) (1 + b u (1 - sigmoid(b u))) - 1, in float64
    leaf = u.detach().double().requires_grad_(True)
    s = torch.sigmoid(beta * leaf)
    (grad,) = torch.autograd.grad((2 * s * (1 + beta * leaf * (1 - s)) - 1).sum(), leaf)
    return grad.to(u.dtype)


def _vjp(kind: str, inp: torch.Tensor, weight: torch.Tensor, g: torch.Tensor):
    """(d/d inp, d/d weight) of <g, op(inp, weight)>."""
    if kind == "linear":
        return g @ weight, g.reshape(-1, weight.shape[0]).t() @ inp.reshape(-1, weight.shape[1])
    inp = inp.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    return torch.autograd.grad(F.conv2d(inp, weight, None, **CONV_KWARGS), (inp, weight), g)


def _op(kind: str, inp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(inp, weight) if kind == "linear" else F.conv2d(inp, weight, None, **CONV_KWARGS)


def _channel(kind: str, t: torch.Tensor) -> torch.Tensor:
    return t if kind == "linear" else t.reshape(1, -1, 1, 1)


def _non_channel_dims(kind: str, t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(t.ndim - 1)) if kind == "linear" else (0, 2, 3)


def _norm32(g: torch.Tensor) -> torch.Tensor:
    return g.double().pow(2).sum().sqrt().float()


def _reference_step(kind: str, params: dict[str, torch.Tensor], cfg: SurgeConfig, x: torch.Tensor,
                    g_y: torch.Tensor, previous_lam: float, bounds: dict[str, torch.Tensor] | None = None,
                    unsigned: bool = False):
    """Expected output, parameter/input gradients and (lam, ||g_b||, ||g_a||, this step's ratio).

    `bounds`, when given, receives for the summed gradients (bias, tau, s) the sum of the absolute values of their
    terms: the scale of their rounding error in reduced precision.
    """
    bounds = {} if bounds is None else bounds
    params = {k: v.detach().clone() for k, v in params.items()}
    W = params["weight"]
    tau, s = params.get("input_threshold"), params.get("input_scale")
    multi_bit = cfg.activation_bits > 1 or unsigned
    if cfg.binarize_activations:
        u = x - _channel(kind, tau) if tau is not None else x
        s_value = s if s is not None else torch.ones(1)
        if multi_bit:
            q_n, q_p = (0, 2**cfg.activation_bits - 1) if unsigned else (
                -(2 ** (cfg.activation_bits - 1)), 2 ** (cfg.activation_bits - 1) - 1)
            v = u / s_value
            q = torch.round(v).clamp(q_n, q_p)
            x_q, d = s_value * q, ((v >= q_n) & (v <= q_p)).float()
        else:
            x_q = s_value * _sgn(u)
            d = _surrogate(cfg.surrogate, u, cfg.swish_beta)
    else:
        x_q = x
    if cfg.binarize_weights:
        if "weight_scale" in params:
            alpha = params["weight_scale"].reshape(-1, *[1] * (W.ndim - 1))
        else:
            alpha = {
                "channel": W.abs().flatten(1).mean(1).reshape(-1, *[1] * (W.ndim - 1)),
                "tensor": W.abs().mean(),
                "none": torch.tensor(1.0),
            }[cfg.weight_scale]
        W_q, w_mask = alpha * _sgn(W), alpha * (W.abs() <= 1).float()
    else:
        W_q, w_mask = W, torch.ones_like(W)
    y = _op(kind, x_q, W_q)
    if "bias" in params:
        y = y + _channel(kind, params["bias"])

    g_xq, g_wq = _vjp(kind, x_q, W_q, g_y)
    grads: dict[str, torch.Tensor] = {"weight": g_wq * w_mask}
    if "weight_scale" in params:
        grads["weight_scale"] = (g_wq * _sgn(W)).sum_to_size(alpha.shape).reshape(params["weight_scale"].shape)
    if "bias" in params:
        grads["bias"] = g_y.sum(dim=_non_channel_dims(kind, g_y))
        bounds["bias"] = g_y.abs().sum(dim=_non_channel_dims(kind, g_y))
    if cfg.binarize_activations:
        g_b = g_xq * d if multi_bit else g_xq * s_value * d
        if tau is not None:
            grads["input_threshold"] = -g_b.sum(dim=_non_channel_dims(kind, g_b))
            bounds["input_threshold"] = g_b.abs().sum(dim=_non_channel_dims(kind, g_b))
        if s is not None:
            grads["input_scale"] = (g_xq * (q - v * d if multi_bit else _sgn(u))).sum().reshape(1)
            bounds["input_scale"] = g_xq.abs().sum().reshape(1)
    else:
        g_b = g_xq
    stats = None
    if cfg.compensator == "ste":
        grads["x"] = g_b
    else:
        W_a = W if cfg.aux_weight == "shared" else params["aux_weight"]
        g_a, G_a = _vjp(kind, x, W_a, g_y)
        norm_b, norm_a = _norm32(g_b), _norm32(g_a)
        current = cfg.eta * norm_b / (norm_a + 1e-8)
        if cfg.compensator == "fixed":
            lam = torch.tensor(cfg.eta)
        elif cfg.lambda_placement == "previous":
            lam = torch.tensor(previous_lam)
        else:
            lam = current
        grads["x"] = g_b + lam * g_a
        dWa = G_a * lam if cfg.scale_aux_grad else G_a
        if cfg.aux_weight == "separate":
            grads["aux_weight"] = dWa
        elif cfg.aux_weight == "shared":
            grads["weight"] = grads["weight"] + dWa
        stats = (lam.item(), norm_b.item(), norm_a.item(), current.item())
    return y, grads, stats


# -- fixtures --------------------------------------------------------------------------------------------------------
LINEAR_TAU = torch.tensor([0.0, 0.5, -0.25, 1.0, 0.125, -1.0])
CONV_TAU = torch.tensor([0.0, 0.5, -0.25, 1.0])


def _make_layer(kind: str, cfg: SurgeConfig, seed: int = 0, unsigned: bool = False) -> SurgeLinear | SurgeConv2d:
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        layer = SurgeLinear(6, 5, surge_config=cfg, unsigned_input=unsigned)
        tau = LINEAR_TAU
    else:
        layer = SurgeConv2d(4, 6, 3, surge_config=cfg, unsigned_input=unsigned, **CONV_KWARGS)
        tau = CONV_TAU
    with torch.no_grad():
        w = torch.randn(layer.weight.shape, generator=g) * 0.9
        flat = w.view(w.shape[0], -1)
        flat[0, 0], flat[1, 1], flat[2, 2], flat[3, 3], flat[4, 4] = 0.0, 1.0, -1.0, 1.7, -2.2  # zero, |W|=1, |W|>1
        layer.weight.copy_(w)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
        if layer.aux_weight is not None:  # distinct from W so that mixing them up is caught
            layer.aux_weight.copy_(w + 0.5 * torch.randn(w.shape, generator=g))
        if layer.input_threshold is not None:
            layer.input_threshold.copy_(tau)
        if layer.input_scale is not None:
            layer.input_scale.fill_(1.25)
        if layer.weight_scale is not None:  # learned alpha, away from mean |W|
            layer.weight_scale.copy_(torch.rand(layer.weight_scale.shape, generator=g) + 0.5)
    return layer


def _tensors(layer: SurgeLinear | SurgeConv2d) -> dict[str, torch.Tensor]:
    """The layer's parameters, and its auxiliary weight also when it is a buffer (`aux_weight="frozen"`)."""
    tensors = dict(layer.named_parameters())
    if layer.aux_weight is not None:
        tensors["aux_weight"] = layer.aux_weight
    return tensors


def _make_input(kind: str, seed: int) -> torch.Tensor:
    """Random input with exact zeros, exact ties x == tau and exact |x - tau| = 1 boundaries."""
    g = torch.Generator().manual_seed(100 + seed)
    if kind == "linear":
        x = torch.randn(2, 3, 6, generator=g) * 1.2
        x[0, 0] = LINEAR_TAU
        x[0, 1] = LINEAR_TAU + 1
        x[1, 0] = 0.0
        x[1, 2, ::2] = LINEAR_TAU[::2] - 1
    else:
        x = torch.randn(2, 4, 5, 5, generator=g) * 1.2
        x[0, :, 0, :] = CONV_TAU.reshape(4, 1)
        x[0, :, 1, :] = CONV_TAU.reshape(4, 1) + 1
        x[1, :, 2, :] = 0.0
        x[1, :, 3, ::2] = CONV_TAU.reshape(4, 1) - 1
    return x


def _output_grad(kind: str, seed: int) -> torch.Tensor:
    shape = (2, 3, 5) if kind == "linear" else (2, 6, 3, 3)
    return torch.randn(shape, generator=torch.Generator().manual_seed(200 + seed))


def _train_step(layer, x_value: torch.Tensor, g_y: torch.Tensor):
    layer.zero_grad(set_to_none=True)
    x = x_value.clone().requires_grad_(True)
    y = layer(x)
    y.backward(g_y)
    grads = {name: p.grad for name, p in layer.named_parameters()}
    grads["x"] = x.grad
    return y, grads


def _assert_grads(actual: dict, expected: dict, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name] is not None, name
        assert torch.isfinite(actual[name]).all(), name
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=name)


MODES = (
    [{"compensator": "surge", "aux_weight": a, "lambda_placement": p, "scale_aux_grad": s}
     for a, p, s in itertools.product(("separate", "shared"), ("fork", "previous"), (False, True))]
    + [{"compensator": "fixed", "aux_weight": a, "scale_aux_grad": s}
       for a, s in itertools.product(("separate", "shared"), (False, True))]
    + [{"compensator": c, "aux_weight": "frozen", "lambda_placement": p}
       for c, p in (("surge", "fork"), ("surge", "previous"), ("fixed", "fork"))]
    + [{"compensator": "fixed", "lambda_placement": "previous"}, {"compensator": "ste"},
       {"compensator": "ste", "aux_weight": "shared", "lambda_placement": "previous"}]
)


def _mode_id(mode: dict) -> str:
    return "-".join(str(v) for v in mode.values())


# -- gradients -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("binarizer", ["sign", "rsign", "elastic"])
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradients_match_reference(kind: str, mode: dict, binarizer: str) -> None:
    cfg = SurgeConfig(eta=ETA, activation_binarizer=binarizer, **mode)
    layer = _make_layer(kind, cfg)
    previous = 0.0
    for step in range(2):  # two steps: "previous" applies 0 first, then the ratio of step one
        x, g_y = _make_input(kind, step), _output_grad(kind, step)
        y, grads = _train_step(layer, x, g_y)
        y_ref, expected, stats = _reference_step(kind, _tensors(layer), cfg, x, g_y, previous)
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
        _assert_grads(grads, expected)
        if stats is None:
            assert layer.scaler.stats.lam is None
            continue
        lam, norm_b, norm_a, current = stats
        if cfg.compensator == "surge" and cfg.lambda_placement == "previous":
            assert lam == (0.0 if step == 0 else previous)
            assert layer.previous_lambda.item() == pytest.approx(current, rel=1e-6)
        assert layer.scaler.stats.lam.item() == pytest.approx(lam, rel=1e-6)
        assert layer.scaler.stats.grad_norm_binary.item() == pytest.approx(norm_b, rel=1e-6)
        assert layer.scaler.stats.grad_norm_aux.item() == pytest.approx(norm_a, rel=1e-6)
        assert norm_b > 0 and norm_a > 0
        previous = current


VARIANTS = [
    {"surrogate": "identity"},
    {"surrogate": "approx_sign"},
    {"surrogate": "swish_sign", "swish_beta": 2.0},
    {"weight_scale": "tensor"},
    {"weight_scale": "none"},
    {"binarize_weights": False},
    {"binarize_activations": False},
    {"binarize_activations": False, "compensator": "ste"},
    {"aux_weight": "shared", "scale_aux_grad": True, "activation_binarizer": "elastic", "surrogate": "approx_sign"},
    {"learnable_weight_scale": True},
    {"learnable_weight_scale": True, "weight_scale": "tensor", "compensator": "ste"},
]
QUANTIZER_VARIANTS = [
    ({"activation_bits": bits, "activation_binarizer": "elastic", **extra}, unsigned)
    for bits in (1, 2, 4, 8) for unsigned in (False, True) for extra in ({}, {"compensator": "ste"})
    if bits > 1 or unsigned
] + [({"activation_bits": 4, "activation_binarizer": "elastic", "learnable_weight_scale": True}, False)]


@pytest.mark.parametrize("variant", VARIANTS, ids=_mode_id)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradients_match_reference_variants(kind: str, variant: dict) -> None:
    cfg = SurgeConfig(eta=ETA, **variant)
    layer = _make_layer(kind, cfg)
    x, g_y = _make_input(kind, 0), _output_grad(kind, 0)
    y, grads = _train_step(layer, x, g_y)
    y_ref, expected, _ = _reference_step(kind, _tensors(layer), cfg, x, g_y, 0.0)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    _assert_grads(grads, expected)


@pytest.mark.parametrize(("variant", "unsigned"), QUANTIZER_VARIANTS,
                         ids=[f"{_mode_id(v)}-{'unsigned' if u else 'signed'}" for v, u in QUANTIZER_VARIANTS])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_multi_bit_and_unsigned_activations(kind: str, variant: dict, unsigned: bool) -> None:
    """k-bit and unsigned inputs: gradients against the reference, and train == eval == packed bit for bit."""
    cfg = SurgeConfig(eta=ETA, **variant)
    layer = _make_layer(kind, cfg, unsigned=unsigned)
    with torch.no_grad():  # a step that puts inputs on both sides of the clamp range
        layer.input_scale.fill_(0.3)
    x, g_y = _make_input(kind, 0), _output_grad(kind, 0)
    y, grads = _train_step(layer, x, g_y)
    params = dict(layer.named_parameters())
    y_ref, expected, _ = _reference_step(kind, params, cfg, x, g_y, 0.0, unsigned=unsigned)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    _assert_grads(grads, expected)
    y_eval = layer.eval()(x)
    assert torch.equal(y, y_eval)
    packed = _finalized(layer)
    assert torch.equal(packed(x), y_eval)
    assert f"W1A{cfg.activation_bits}" in repr(layer) and f"W1A{cfg.activation_bits}" in repr(packed)
    assert packed.activation_spec.signed is not unsigned


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("placement", ["fork", "previous"])
@pytest.mark.parametrize("scale_aux_grad", [False, True])
def test_zero_upstream_gradient_gives_zero_lambda(kind: str, placement: str, scale_aux_grad: bool) -> None:
    cfg = SurgeConfig(eta=ETA, lambda_placement=placement, scale_aux_grad=scale_aux_grad)
    layer = _make_layer(kind, cfg)
    x = _make_input(kind, 0)
    _, grads = _train_step(layer, x, torch.zeros_like(_output_grad(kind, 0)))
    assert layer.scaler.stats.lam.item() == 0.0
    assert layer.scaler.stats.grad_norm_binary.item() == 0.0
    assert layer.scaler.stats.grad_norm_aux.item() == 0.0
    if placement == "previous":
        assert layer.previous_lambda.item() == 0.0
    for name, grad in grads.items():
        assert torch.equal(grad, torch.zeros_like(grad)), name


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_no_binary_gradient_gives_zero_lambda(kind: str) -> None:
    """Every input outside the clip range: g_b = 0, so lam = 0 and the input gets no gradient at all."""
    cfg = SurgeConfig(eta=ETA, activation_binarizer="sign")
    layer = _make_layer(kind, cfg)
    x = _make_input(kind, 0).sign() * 3.0
    x[x == 0] = 3.0
    _, grads = _train_step(layer, x, _output_grad(kind, 0))
    assert layer.scaler.stats.grad_norm_binary.item() == 0.0
    assert layer.scaler.stats.grad_norm_aux.item() > 0
    assert layer.scaler.stats.lam.item() == 0.0
    assert torch.equal(grads["x"], torch.zeros_like(x))


def test_ste_has_no_auxiliary_state() -> None:
    for kind in ("linear", "conv"):
        layer = _make_layer(kind, SurgeConfig(compensator="ste", lambda_placement="previous"))
        assert layer.aux_weight is None
        assert layer.previous_lambda is None
        assert set(dict(layer.named_parameters())) == {"weight", "bias", "input_threshold", "input_scale"}
        assert set(layer.state_dict()) == {"weight", "bias", "input_threshold", "input_scale"}


def test_surge_state_names() -> None:
    layer = _make_layer("linear", SurgeConfig(activation_binarizer="elastic", lambda_placement="previous"))
    assert set(layer.state_dict()) == {"weight", "bias", "aux_weight", "input_threshold", "input_scale",
                                       "previous_lambda"}
    shared = _make_layer("linear", SurgeConfig(aux_weight="shared", activation_binarizer="sign"))
    assert set(shared.state_dict()) == {"weight", "bias"}
    frozen = _make_layer("linear", SurgeConfig(aux_weight="frozen", activation_binarizer="sign"))
    assert set(frozen.state_dict()) == {"weight", "bias", "aux_weight"}
    assert set(dict(frozen.named_parameters())) == {"weight", "bias"}  # W_a is a buffer: no gradient, no optimizer


def test_from_float_reuses_parameters_and_copies_aux() -> None:
    linear = nn.Linear(6, 5)
    layer = SurgeLinear.from_float(linear, SurgeConfig())
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert layer.aux_weight is not linear.weight
    assert torch.equal(layer.aux_weight, linear.weight)
    assert torch.equal(layer.input_threshold, torch.zeros(6))
    conv = nn.Conv2d(4, 6, 3, bias=False, **CONV_KWARGS)
    surge_conv = SurgeConv2d.from_float(conv, SurgeConfig(activation_binarizer="elastic"))
    assert surge_conv.weight is conv.weight and surge_conv.bias is None
    assert torch.equal(surge_conv.aux_weight, conv.weight)
    assert surge_conv.input_threshold.shape == (4,) and surge_conv.input_scale.tolist() == [1.0]


def test_reset_surge_parameters() -> None:
    layer = _make_layer("conv", SurgeConfig(activation_binarizer="elastic", lambda_placement="previous"))
    _train_step(layer, _make_input("conv", 0), _output_grad("conv", 0))
    assert layer.previous_lambda.item() > 0
    layer.reset_surge_parameters()
    assert torch.equal(layer.aux_weight, layer.weight)
    assert torch.equal(layer.input_threshold, torch.zeros(4))
    assert layer.input_scale.tolist() == [1.0]
    assert layer.previous_lambda.item() == 0.0


def test_conv_padding_mode_rejected() -> None:
    message = "SurgeConv2d supports padding_mode='zeros' only, got 'reflect'."
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        SurgeConv2d(2, 2, 3, padding=1, padding_mode="reflect", surge_config=SurgeConfig())
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        SurgeConv2d.from_float(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), SurgeConfig())


# -- forward bit-exactness -------------------------------------------------------------------------------------------
FORWARD_MODES = [
    {"compensator": "surge"},
    {"compensator": "surge", "aux_weight": "shared"},
    {"compensator": "surge", "aux_weight": "shared", "lambda_placement": "previous"},
    {"compensator": "surge", "lambda_placement": "previous", "scale_aux_grad": True},
    {"compensator": "fixed", "aux_weight": "shared"},
    {"compensator": "fixed", "aux_loss_weight": 0.5},
    {"compensator": "ste"},
    {"compensator": "surge", "weight_scale": "tensor"},
    {"compensator": "surge", "weight_scale": "none", "surrogate": "swish_sign"},
    {"compensator": "surge", "binarize_weights": False},
    {"compensator": "surge", "binarize_activations": False},
    {"compensator": "surge", "learnable_weight_scale": True},
]


def _finalized(layer):
    packed = (BinaryLinear if isinstance(layer, SurgeLinear) else BinaryConv2d).from_surge(layer)
    return packed.eval()


@pytest.mark.parametrize("binarizer", ["sign", "rsign", "elastic"])
@pytest.mark.parametrize("mode", FORWARD_MODES, ids=_mode_id)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_forward_bit_exact(kind: str, mode: dict, binarizer: str) -> None:
    cfg = SurgeConfig(activation_binarizer=binarizer, **mode)
    layer = _make_layer(kind, cfg)
    x = _make_input(kind, 1).requires_grad_(True)
    y_train = layer.train()(x)
    assert y_train.requires_grad
    with torch.no_grad():
        y_train_no_grad = layer(x)
    y_eval = layer.eval()(x)
    packed = _finalized(layer)
    y_final = packed(x)
    y_ref, _, _ = _reference_step(kind, _tensors(layer), cfg, x.detach(), _output_grad(kind, 0), 0.0)
    assert torch.equal(y_train, y_eval)
    assert torch.equal(y_train_no_grad, y_eval)
    assert torch.equal(y_final, y_eval)
    torch.testing.assert_close(y_eval, y_ref, rtol=1e-6, atol=1e-6)
    expected = {"bias", "input_threshold", "input_scale"} & set(dict(layer.named_parameters()))
    expected |= {"weight_packed", "weight_scale"} if cfg.binarize_weights else {"weight"}
    assert set(packed.state_dict()) == expected


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_layer_kind_has_one_operations_object(kind: str) -> None:
    """The training layer, the packed layer and `LAYER_KINDS` hold their kind's operations (`LinearOps`,
    `Conv2dOps`): equal objects, for the layout of the float layer, which `float_layer` rebuilds."""
    for entry in LAYER_KINDS:
        assert entry.surge_type.ops_type is entry.packed_type.ops_type is entry.ops_type
    layer = _make_layer(kind, SurgeConfig())
    packed = _finalized(layer)
    ops_type = layer_kind(layer).ops_type
    assert layer_kind(packed) is layer_kind(layer)
    assert type(layer.ops) is type(packed.ops) is ops_type
    assert packed.ops == layer.ops
    assert layer.ops.weight_shape() == tuple(layer.weight.shape) == packed.weight_shape
    assert layer.ops.threshold_shape() == tuple(layer.input_threshold.shape)
    float_layer = packed.float_layer()
    assert type(float_layer) is ops_type.float_type
    assert ops_type.of(float_layer) == layer.ops
    assert layer_kind(float_layer) is layer_kind(layer)


def test_auxiliary_weight_value_never_reaches_the_output() -> None:
    """W_a filled with NaN: the training-mode forward is still the finite binary output."""
    for kind in ("linear", "conv"):
        layer = _make_layer(kind, SurgeConfig())
        x = _make_input(kind, 0).requires_grad_(True)
        expected = layer.eval()(x)
        with torch.no_grad():
            layer.aux_weight.fill_(float("nan"))
        y = layer.train()(x)
        assert torch.equal(y, expected)


def test_packed_layer_refuses_training() -> None:
    packed = _finalized(_make_layer("linear", SurgeConfig()))
    packed.train()
    with pytest.raises(RuntimeError, match=re.escape("BinaryLinear is a packed 1-bit inference layer")):
        packed(_make_input("linear", 0))
    with torch.no_grad():
        packed(_make_input("linear", 0))


# -- the auxiliary forward product is never computed -----------------------------------------------------------------
_PRODUCTS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.matmul.default",
             "aten.linear.default", "aten.convolution.default", "aten.convolution_backward.default"}


class _ProductCounter(TorchDispatchMode):
    """Records every matrix-product / convolution kernel that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in _PRODUCTS:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("kind", "cfg", "forward", "backward"),
    [
        # linear: forward x_q W_q^T only; backward dx_b, dW_b (binary) and g_a, G_a (auxiliary)
        ("linear", SurgeConfig(), ["aten.mm.default"], ["aten.mm.default"] * 4),
        ("linear", SurgeConfig(aux_weight="shared", lambda_placement="previous"), ["aten.mm.default"],
         ["aten.mm.default"] * 4),
        ("linear", SurgeConfig(compensator="ste"), ["aten.mm.default"], ["aten.mm.default"] * 2),
        # a frozen W_a: no G_a
        ("linear", SurgeConfig(aux_weight="frozen"), ["aten.mm.default"], ["aten.mm.default"] * 3),
        ("conv", SurgeConfig(aux_weight="frozen"), ["aten.convolution.default"],
         ["aten.convolution_backward.default"] * 2),
        # with the auxiliary loss: one more forward product x W_a^T, and its gradient w.r.t. W_a
        ("linear", SurgeConfig(aux_loss_weight=0.5), ["aten.mm.default"] * 2, ["aten.mm.default"] * 5),
        # conv: one convolution_backward for the binary branch (input + weight), one each for g_a and G_a
        ("conv", SurgeConfig(), ["aten.convolution.default"], ["aten.convolution_backward.default"] * 3),
        ("conv", SurgeConfig(aux_loss_weight=0.5), ["aten.convolution.default"] * 2,
         ["aten.convolution_backward.default"] * 4),
    ],
)
def test_product_count(kind: str, cfg: SurgeConfig, forward: list[str], backward: list[str]) -> None:
    layer = _make_layer(kind, cfg)
    x = _make_input(kind, 0).requires_grad_(True)
    with _ProductCounter() as counter, collect_auxiliary_loss() as collected:
        y = layer(x)
    assert counter.calls == forward
    with _ProductCounter() as counter:
        loss = (y * _output_grad(kind, 0)).sum()
        aux = collected.total()
        if cfg.aux_loss_weight > 0:
            loss = loss + aux
        else:
            assert aux is None
        loss.backward()
    assert counter.calls == backward


def test_eval_and_no_grad_compute_one_product() -> None:
    layer = _make_layer("linear", SurgeConfig())
    x = _make_input("linear", 0)
    with _ProductCounter() as counter:
        with torch.no_grad():
            layer(x)
        layer.eval()(x)
    assert counter.calls == ["aten.mm.default"] * 2


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("scale_aux_grad", [False, True])
def test_auxiliary_loss_value_and_gradient(kind: str, scale_aux_grad: bool) -> None:
    """L_aux = mean((op(x, W_a) - f_b)^2); its gradient reaches W_a only, never scaled by lam."""
    weight = 0.5
    cfg = SurgeConfig(eta=ETA, aux_loss_weight=weight, scale_aux_grad=scale_aux_grad)
    layer = _make_layer(kind, cfg)
    x_value, g_y = _make_input(kind, 0), _output_grad(kind, 0)
    x = x_value.clone().requires_grad_(True)
    with collect_auxiliary_loss() as collected:
        y = layer(x)
    f_a = _op(kind, x_value, layer.aux_weight.detach())
    expected_loss = (f_a - y.detach()).pow(2).mean()
    torch.testing.assert_close(collected.total(), weight * expected_loss, rtol=1e-6, atol=1e-7)
    ((y * g_y).sum() + collected.total()).backward()

    _, expected, _ = _reference_step(kind, _tensors(layer), cfg, x_value, g_y, 0.0)
    # d/dW_a of w * mean((op(x, W_a) - f_b)^2) = vjp of op at (x, W_a) with 2 w (f_a - f_b) / N
    residual = 2 * weight * (f_a - y.detach()) / f_a.numel()
    _, aux_loss_grad = _vjp(kind, x_value, layer.aux_weight.detach(), residual)
    torch.testing.assert_close(layer.aux_weight.grad, expected["aux_weight"] + aux_loss_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, expected["x"], rtol=1e-5, atol=1e-6)  # x is detached in L_aux
    torch.testing.assert_close(layer.weight.grad, expected["weight"], rtol=1e-5, atol=1e-6)


def test_auxiliary_loss_only_in_training_with_gradients_and_a_collector() -> None:
    layer = _make_layer("linear", SurgeConfig(aux_loss_weight=1.0))
    x = _make_input("linear", 0)
    with collect_auxiliary_loss() as outer, collect_auxiliary_loss() as inner:
        layer(x)
    assert outer.total() is not None and torch.equal(outer.total(), inner.total())
    for mode in ("eval", "no_grad"):
        with torch.set_grad_enabled(mode != "no_grad"), collect_auxiliary_loss() as collected:
            layer.train(mode != "eval")(x)
        assert collected.total() is None, mode


def test_auxiliary_loss_keeps_its_gradient_when_the_layer_runs_without_gradients_inside_a_collector() -> None:
    """Reentrant gradient checkpointing runs layers under no_grad inside a loss computation: the term is the same,
    and its gradient reaches W_a."""
    layer = _make_layer("linear", SurgeConfig(aux_loss_weight=0.5))
    x = _make_input("linear", 0)
    with collect_auxiliary_loss() as reference:
        layer(x)
    with collect_auxiliary_loss() as collected, torch.no_grad():
        layer(x)
    assert torch.equal(collected.total(), reference.total())
    expected = torch.autograd.grad(reference.total(), layer.aux_weight)[0]
    assert torch.equal(torch.autograd.grad(collected.total(), layer.aux_weight)[0], expected)


# -- reduced precision -----------------------------------------------------------------------------------------------
def _assert_close_bf16(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor | None, name: str) -> None:
    """Within 3% of the largest entry (bf16 keeps 8 significant bits), and for sums within 1% of the sum of the
    absolute terms (their rounding errors add up, and the terms can cancel)."""
    assert actual.dtype == expected.dtype == torch.float32, name
    assert torch.isfinite(actual).all(), name
    tolerance = 3e-2 * expected.abs().max() + (0 if bound is None else 1e-2 * bound)
    assert ((actual - expected).abs() <= tolerance).all(), (name, actual, expected)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("mode", [{}, {"aux_weight": "shared", "scale_aux_grad": True},
                                  {"lambda_placement": "previous"}, {"compensator": "ste"}], ids=_mode_id)
def test_bf16_autocast(kind: str, mode: dict) -> None:
    cfg = SurgeConfig(eta=ETA, activation_binarizer="elastic", **mode)
    layer = _make_layer(kind, cfg)
    previous = 0.0
    for step in range(2):
        x_value, g_y = _make_input(kind, step), _output_grad(kind, step).to(torch.bfloat16)
        layer.zero_grad(set_to_none=True)
        x = x_value.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer.train()(x)
            y_eval = layer.eval()(x)
            y_final = _finalized(layer)(x)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, y_eval) and torch.equal(y, y_final)
        y.backward(g_y)
        layer.train()
        bounds: dict[str, torch.Tensor] = {}
        _, expected, stats = _reference_step(kind, _tensors(layer), cfg, x_value, g_y.float(),
                                             previous, bounds)
        actual = {name: p.grad for name, p in layer.named_parameters()} | {"x": x.grad}
        assert set(actual) == set(expected)
        for name in expected:
            _assert_close_bf16(actual[name], expected[name], bounds.get(name), name)
        if stats is not None:
            assert layer.scaler.stats.lam.dtype == torch.float32
            assert layer.scaler.stats.lam.item() == pytest.approx(stats[0], rel=3e-2)
            previous = layer.scaler.stats.lam.item() if cfg.lambda_placement == "fork" else stats[3]


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bf16_zero_gradient(kind: str) -> None:
    layer = _make_layer(kind, SurgeConfig(eta=ETA))
    x = _make_input(kind, 0).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(torch.zeros_like(y))
    assert layer.scaler.stats.lam.item() == 0.0
    for grad in [x.grad] + [p.grad for p in layer.parameters()]:
        assert torch.equal(grad, torch.zeros_like(grad))


def test_fp16_scaled_with_huge_lambda_stays_finite() -> None:
    grad = torch.tensor([0.0, -0.0, 1e-4, -2e-3, 6e-8, 0.5], dtype=torch.float16)
    out = scaled(grad, torch.tensor(1e30))
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    assert out[:2].tolist() == [0.0, 0.0]  # lam * 0 stays 0, not NaN
    assert torch.equal(out, grad * torch.tensor(65504.0, dtype=torch.float16))
    assert torch.equal(scaled(torch.zeros(3, dtype=torch.float16), torch.tensor(float("inf"))),
                       torch.zeros(3, dtype=torch.float16))


def test_gradient_norm_in_float32() -> None:
    # 300^2 overflows float16; the norm is taken in float32
    norm = gradient_norm(torch.full((4,), 300.0, dtype=torch.float16), torch.device("cpu"))
    assert norm.dtype == torch.float32 and norm.item() == 600.0
    assert gradient_norm(None, torch.device("cpu")).item() == 0.0


# -- float64, gradcheck and the inactive branch ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", [MODES[0], MODES[2], MODES[8]], ids=_mode_id)  # fork, previous, fixed
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_float64_training_matches_the_reference(kind: str, mode: dict) -> None:
    cfg = SurgeConfig(eta=ETA, **mode)
    layer = _make_layer(kind, cfg).double()
    previous = 0.0
    for step in range(2):
        x, g_y = _make_input(kind, step).double(), _output_grad(kind, step).double()
        y, grads = _train_step(layer, x, g_y)
        y_ref, expected, (lam, _, _, current) = _reference_step(kind, _tensors(layer), cfg, x, g_y,
                                                                previous)
        assert y.dtype == torch.float64 and all(g.dtype == torch.float64 for g in grads.values())
        torch.testing.assert_close(y, y_ref)
        _assert_grads(grads, expected)
        assert layer.scaler.stats.lam.dtype == torch.float64
        assert layer.scaler.stats.lam.item() == pytest.approx(float(lam), rel=1e-6)
        previous = current


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradcheck_accepts_the_eval_gradient_and_rejects_the_compensated_one(kind: str) -> None:
    """With binary weights and real activations, the input gradient in eval mode is the true derivative
    (alpha * sign(W) is constant in x), which `gradcheck` confirms in float64. In training the compensator adds
    lam * g_a, which is no derivative of the output value (the auxiliary term cancels), so gradcheck rejects it."""
    layer = _make_layer(kind, SurgeConfig(binarize_activations=False, compensator="fixed", eta=ETA)).double()
    x = _make_input(kind, 0).double().requires_grad_(True)
    assert torch.autograd.gradcheck(layer.eval(), (x,))
    assert not torch.autograd.gradcheck(layer.train(), (x,), raise_exception=False)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_eval_mode_gradient_has_no_auxiliary_branch(kind: str) -> None:
    """In eval mode a SURGE layer back-propagates exactly what the same layer without compensator does."""
    x, g_y = _make_input(kind, 0), _output_grad(kind, 0)
    _, surge = _train_step(_make_layer(kind, SurgeConfig(eta=ETA)).eval(), x, g_y)
    _, ste = _train_step(_make_layer(kind, SurgeConfig(eta=ETA, compensator="ste")).eval(), x, g_y)
    assert surge.pop("aux_weight") is None
    assert surge.keys() == ste.keys()
    for name in ste:
        assert torch.equal(surge[name], ste[name]), name


# -- devices -----------------------------------------------------------------------------------------------------------
DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_surge_tensors_follow_the_device_and_dtype_of_the_weight(device: str) -> None:
    cfg = SurgeConfig(activation_binarizer="elastic", lambda_placement="previous")
    for layer in (SurgeLinear(4, 3, surge_config=cfg, device=device, dtype=torch.float64),
                  SurgeConv2d(2, 3, 3, surge_config=cfg, device=device, dtype=torch.float64)):
        for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
            assert tensor.device.type == device, name
            assert tensor.dtype == (torch.float32 if name == "previous_lambda" else torch.float64), name


def test_nan_input_gives_nan_outputs_where_the_float_model_does() -> None:
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    expected = float_model(x).isnan()
    assert expected[1].all() and not expected[[0, 2]].any()
    model = binarize(float_model, SurgeConfig(target_modules=["0", "1"]))
    assert torch.equal(model.train()(x).isnan(), expected)
    assert torch.equal(model.eval()(x).isnan(), expected)
    assert torch.equal(finalize(model)(x).isnan(), expected)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("mode", ["channel", "tensor"])
def test_negative_learned_weight_scale_is_folded_into_the_signs(kind: str, mode: str) -> None:
    """A learned alpha < 0 packs as (-sign(W), |alpha|): packed outputs stay exact and the scales stay positive."""
    layer = _make_layer(kind, SurgeConfig(learnable_weight_scale=True, weight_scale=mode))
    with torch.no_grad():
        layer.weight_scale.mul_(-1 if mode == "tensor" else torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0][
            :layer.weight_scale.numel()]))
    x = _make_input(kind, 1)
    y_eval = layer.eval()(x)
    packed = _finalized(layer)
    assert (packed.weight_scale > 0).all()
    assert torch.equal(packed.weight_scale, layer.weight_scale.detach().abs())
    assert torch.equal(packed(x), y_eval)
    assert torch.equal(packed.dequantized_weight(),
                       layer.weight_scale.detach().reshape(-1, *[1] * (layer.weight.ndim - 1)) * _sgn(layer.weight))


ALL_SURGE_ONLY = SurgeConfig(activation_binarizer="elastic", learnable_weight_scale=True, lambda_placement="previous")


def _scrambled(layer: SurgeLinear | SurgeConv2d) -> None:
    with torch.no_grad():
        for tensor in layer.surge_only_tensors():
            getattr(layer, tensor.name).fill_(7.0)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_surge_only_tensors_come_from_one_table(kind: str) -> None:
    """`SURGE_ONLY_TENSORS` is the one list of the tensors a SURGE layer adds and their initial values: the layer
    creates them from it, `reset_surge_parameters`, transformers' `_init_weights` and loading after `to_empty()` set
    them from it, and the loading report lists and describes them from it."""
    layer = _make_layer(kind, ALL_SURGE_ONLY)
    assert [tensor.name for tensor in layer.surge_only_tensors()] == [t.name for t in SURGE_ONLY_TENSORS]
    # in the order of the previous release (an optimizer's saved state follows the order of `parameters()`)
    assert list(layer.state_dict()) == ["weight", "bias", "input_threshold", "input_scale", "weight_scale",
                                        "aux_weight", "previous_lambda"]
    assert added_tensors(layer) == [tensor.name for tensor in SURGE_ONLY_TENSORS]
    assert {name: initial_values(ALL_SURGE_ONLY)[name] for name in added_tensors(layer)} == {
        tensor.name: tensor.initial for tensor in SURGE_ONLY_TENSORS}

    def assert_initial(layer: SurgeLinear | SurgeConv2d) -> None:
        for tensor in SURGE_ONLY_TENSORS:
            assert torch.equal(getattr(layer, tensor.name), tensor.initial_value(layer, layer.weight)), tensor.name

    _scrambled(layer)
    layer.reset_surge_parameters()
    assert_initial(layer)
    _scrambled(layer)
    init_surge_parameters(layer)
    assert_initial(layer)
    with torch.device("meta"):
        empty = _make_layer(kind, ALL_SURGE_ONLY)
    empty._surge_state_pending = True
    empty.to_empty(device="cpu").load_state_dict({"weight": layer.weight, "bias": layer.bias}, strict=False)
    assert_initial(empty)


def test_an_absent_surge_only_tensor_is_none() -> None:
    layer = _make_layer("linear", SurgeConfig(compensator="ste", activation_binarizer="sign"))
    assert layer.surge_only_tensors() == []
    assert all(getattr(layer, tensor.name) is None for tensor in SURGE_ONLY_TENSORS)
    assert added_tensors(layer) == []
