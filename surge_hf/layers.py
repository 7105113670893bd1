"""SURGE binary layers (training) and their packed inference counterparts.

A SURGE layer computes, for input `x`, latent weight `W`, bias `b`:

    f_b = op(q_x, sign(W)) * (s * alpha) + b      the binary branch (op: linear or conv2d), integer product first
    f_a = op(x, W_a)                      the auxiliary full-precision branch (Dual-Path Gradient Compensator)
    y   = f_b - stopgrad(lam * f_a) + lam * f_a

with `Q_w(W) = alpha * sign(W)` and `Q_x(x) = s * q_x`, `q_x` the integer activation codes (`sign(x - tau)` at one
bit, `clamp(round((x - tau) / s), Q_n, Q_p)` at k bits; see `quantizers`). The product of codes and signs is a sum
of integers, exact in float32 below 2^24, so scaling it afterwards makes every path (training, eval, packed, a
popcount kernel) agree bit for bit; in bf16/fp16 sums beyond 256/2048 round. In value `y == f_b` exactly,
so `f_a` is never computed: the auxiliary branch costs only its two backward products,

    g_a  = J_x(op(x, W_a))^T g_y          (sent to the input through the fork, scaled by lam: see `scaler`)
    G_Wa = J_W(op(x, W_a))^T g_y          (the auxiliary weight's gradient)

In eval mode, under `torch.no_grad()`, or with `compensator="ste"` the layer is a pure binary layer. `finalize`
turns each into a `BinaryLinear`/`BinaryConv2d` holding packed sign bits and scales, whose outputs are identical.

What differs between a Linear and a Conv2d layer (`op`, the per-channel views of tau, s, alpha and b, the two backward
products, the layout) is written once per kind, in `LinearOps` and `Conv2dOps`: both layers of a kind (bases
`SurgeLayer`, `BinaryLayer`) hold it as `ops`, and `LAYER_KINDS` lists it with them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .aux_loss import auxiliary_loss_requested, record_auxiliary_loss
from .configuration_surge import SurgeConfig, renamed_module_attributes, renamed_surge_config_keyword
from .kernels import (
    ConvGeometry,
    PackedSigns,
    binary_conv2d,
    binary_linear,
    binary_linear_from_signs,
    binary_linear_signs,
    pack_conv_weight_panels,
    pack_weight_panels,
    quantized_conv2d,
    quantized_linear,
    weight_row_counts,
)
from .kernels import available as kernels_available
from .packing import pack_signs, packed_row_bytes, unpack_signs
from .quantizers import (
    ActivationQuantizer,
    ActivationSpec,
    ResidualWeightCodes,
    WeightSign,
    activation_codes,
    binary_weight,
    binary_weight_scale,
    output_scale,
    sign,
)
from .scaler import AdaptiveGradientScaler, DualPathFork, accumulation_dtype


class SignOutputSource(Protocol):
    """What a packed layer asks before writing sign bits instead of floats (`surge_hf.fusion.SignOutput`): the
    per-channel integer bounds for this input, or None where its output must stay float."""

    def bounds(self, producer: BinaryLinear, x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None: ...


class LayerOps(ABC):
    """The operations of one kind of layer, held by its SURGE training layer, its packed inference layer (as `ops`)
    and its `LAYER_KINDS` entry (as `ops_type`), so that each is written once: `LinearOps`, `Conv2dOps`.

    A kind is a frozen dataclass whose fields are the layer's layout, named and ordered as the leading arguments
    (and the attributes) of its float layer, which its SURGE and packed layers take too. The binary branch of both
    layers is

        f_b = op(q_x, sign(W)) * (s * alpha) + b      `binary_branch`: `product`, then `scaled_output`

    with the scales and the bias broadcast along the output channels (`channel_view`).
    """

    float_type: ClassVar[type[nn.Module]]
    """The float module of this kind (`binarize` replaces exactly this type)."""
    feature_dim: ClassVar[int]
    """The dim of an input (and of an output) that holds its features or channels: each input feature gets its own
    activation threshold, each output channel its own scale and bias."""

    @classmethod
    def of(cls, layer: nn.Module) -> LayerOps:
        """The layout of a float, SURGE or packed layer of this kind, read from its attributes."""
        return cls(*(getattr(layer, field.name) for field in fields(cls)))

    def layout(self) -> tuple:
        """The layout as the leading positional arguments of the kind's float, SURGE and packed layers."""
        return tuple(getattr(self, field.name) for field in fields(self))

    def float_layer(self, bias: bool) -> nn.Module:
        """A float layer of this layout (freshly initialised values)."""
        return self.float_type(*self.layout(), bias=bias)

    @abstractmethod
    def threshold_shape(self) -> tuple[int]:
        """The shape of the activation threshold tau: one value per input feature or channel."""

    @abstractmethod
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the weight W (output channels first)."""

    @abstractmethod
    def channel_view(self, values: Tensor) -> Tensor:
        """A vector of one value per feature or channel (or one value) viewed to broadcast along `feature_dim` of an
        input or output: a threshold, a scale or a bias."""

    @abstractmethod
    def product(self, x: Tensor, weight: Tensor) -> Tensor:
        """op(x, W): the layer's linear operator without bias."""

    @abstractmethod
    def input_grad(self, grad_output: Tensor, weight: Tensor, input_shape: torch.Size) -> Tensor:
        """J_x(op(x, W))^T g: the gradient that `product` sends to its input."""

    @abstractmethod
    def weight_grad(self, grad_output: Tensor, x: Tensor, weight_shape: torch.Size) -> Tensor:
        """J_W(op(x, W))^T g: the gradient that `product` sends to its weight."""

    def apply_output_scale(self, product: Tensor, scale: Tensor | None) -> Tensor:
        """`product * scale` per output channel, in the product's dtype (`product` unchanged without a scale)."""
        return product if scale is None else product * self.channel_view(scale.to(product.dtype))

    def add_bias(self, output: Tensor, bias: Tensor | None) -> Tensor:
        """`output + b` per output channel, in the output's dtype (`output` unchanged without a bias)."""
        return output if bias is None else output + self.channel_view(bias.to(output.dtype))

    def scaled_output(self, product: Tensor, input_scale: Tensor | None, weight_alpha: Tensor | None,
                      bias: Tensor | None) -> Tensor:
        """`product * (s * alpha) + b`, from the integer product of codes and signs: the scales are applied after
        the product, so that every path that computes it exactly gives the same output."""
        return self.add_bias(self.apply_output_scale(product, output_scale(input_scale, weight_alpha)), bias)

    def binary_branch(self, codes: Tensor, signs: Tensor, input_scale: Tensor | None, weight_alpha: Tensor | None,
                      bias: Tensor | None) -> Tensor:
        """f_b = op(q_x, sign(W)) * (s * alpha) + b, from the activation codes q_x and the weight signs."""
        return self.scaled_output(self.product(codes, signs), input_scale, weight_alpha, bias)


@dataclass(frozen=True)
class LinearOps(LayerOps):
    """`nn.Linear`'s kind: `y = x W^T`, features along the last dim, batch dims flattened by the backward products."""

    in_features: int
    out_features: int

    float_type = nn.Linear
    feature_dim = -1

    def threshold_shape(self) -> tuple[int]:
        return (self.in_features,)

    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def channel_view(self, values: Tensor) -> Tensor:
        """`values` as they are (they broadcast along the last dim)."""
        return values

    def product(self, x: Tensor, weight: Tensor) -> Tensor:
        """`x W^T`."""
        return F.linear(x, weight)

    def input_grad(self, grad_output: Tensor, weight: Tensor, input_shape: torch.Size) -> Tensor:
        """`g W`."""
        return grad_output @ weight

    def weight_grad(self, grad_output: Tensor, x: Tensor, weight_shape: torch.Size) -> Tensor:
        """`g^T x`, summed over the batch dims."""
        return grad_output.reshape(-1, weight_shape[0]).t() @ x.reshape(-1, weight_shape[1])


@dataclass(frozen=True)
class Conv2dOps(LayerOps):
    """`nn.Conv2d`'s kind (zero padding): `y = conv2d(x, W)` with this geometry, channels along dim 1 of
    `(B, C, H, W)` inputs and outputs."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int

    float_type = nn.Conv2d
    feature_dim = 1

    def threshold_shape(self) -> tuple[int]:
        return (self.in_channels,)

    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def channel_view(self, values: Tensor) -> Tensor:
        """`values` as `(1, C, 1, 1)`."""
        return values.reshape(1, -1, 1, 1)

    def product(self, x: Tensor, weight: Tensor) -> Tensor:
        """`conv2d(x, W)`, no bias."""
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def input_grad(self, grad_output: Tensor, weight: Tensor, input_shape: torch.Size) -> Tensor:
        """The transposed convolution of `g` with `W`."""
        return torch.nn.grad.conv2d_input(
            input_shape, weight, grad_output, self.stride, self.padding, self.dilation, self.groups
        )

    def weight_grad(self, grad_output: Tensor, x: Tensor, weight_shape: torch.Size) -> Tensor:
        """The correlation of `x` with `g`, summed over the batch."""
        return torch.nn.grad.conv2d_weight(
            x, weight_shape, grad_output, self.stride, self.padding, self.dilation, self.groups
        )


def activation_spec(surge_config: SurgeConfig, unsigned_input: bool = False) -> ActivationSpec:
    """The activation quantizer of a layer: the recipe's bits and surrogate; unsigned for non-negative inputs."""
    return ActivationSpec(bits=surge_config.activation_bits, signed=not unsigned_input,
                          surrogate=surge_config.surrogate, beta=surge_config.swish_beta)


def bit_widths(layer: nn.Module) -> str:
    """`W1A1`, `W1A8`, `W32A1`, `W2A1` (two weight planes), ...: the weight and activation bits of a binary layer."""
    recipe = layer.surge_config
    activation_bits = recipe.activation_bits if recipe.binarize_activations else 32
    return f"W{recipe.weight_planes if recipe.binarize_weights else 32}A{activation_bits}"


@dataclass(frozen=True)
class SurgeOnlyTensor:
    """A tensor that a SURGE layer adds to the float layer it replaces (so a plain checkpoint lacks it), and its
    initial value: every place that creates, initialises, lists or describes these tensors reads `SURGE_ONLY_TENSORS`.

    Args:
        name: its name in the layer (and the last part of its state-dict key).
        initial: its initial value in words (the loading report says it).
        kind: for a recipe, whether the layer holds it as a "parameter" or a "buffer", or None (then the layer's
            attribute is None).
        initial_value: its initial value in a layer whose latent weight is `weight`, on `weight`'s device and in its
            dtype (except `previous_lambda`, float32); it may share `weight`'s memory (copy it to keep it).
        binarizer: a threshold or scale of a binarizer: the packed layer keeps it, and it is not weight-decayed
            (the others belong to the auxiliary branch, which training alone uses).
    """

    name: str
    initial: str
    kind: Callable[[SurgeConfig], Literal["parameter", "buffer"] | None]
    initial_value: Callable[[SurgeLayer, Tensor], Tensor]
    binarizer: bool


SURGE_ONLY_TENSORS = (
    SurgeOnlyTensor(
        "input_threshold", "input_threshold = 0",
        lambda c: "parameter" if c.binarize_activations and c.activation_binarizer in ("rsign", "elastic") else None,
        lambda layer, weight: weight.new_zeros(layer.ops.threshold_shape()), binarizer=True),
    SurgeOnlyTensor(
        "input_scale", "input_scale = 1",
        lambda c: "parameter" if c.binarize_activations and c.activation_binarizer == "elastic" else None,
        lambda layer, weight: weight.new_ones(1), binarizer=True),
    SurgeOnlyTensor(
        "weight_scale", "weight_scale = mean |weight|",
        lambda c: "parameter" if c.binarize_weights and c.learnable_weight_scale else None,
        lambda layer, weight: binary_weight_scale(weight, layer.surge_config.weight_scale).reshape(-1),
        binarizer=True),
    SurgeOnlyTensor(
        "aux_weight", "aux_weight = weight",
        lambda c: {"separate": "parameter", "frozen": "buffer"}.get(c.aux_weight) if c.has_aux_branch else None,
        lambda layer, weight: weight.detach(), binarizer=False),
    SurgeOnlyTensor(
        "previous_lambda", "previous_lambda = 0",
        lambda c: "buffer" if c.has_aux_branch and c.lambda_placement == "previous" else None,
        lambda layer, weight: torch.zeros((), dtype=torch.float32, device=weight.device), binarizer=False),
)
"""The SURGE-only tensors of `SurgeLinear` and `SurgeConv2d`, in the order the layers register them (the order of
`parameters()`, which an optimizer's saved state follows)."""


class AuxiliaryGradient(torch.autograd.Function):
    """Adds the auxiliary branch's gradient without computing its forward value.

    Forward: returns `f_b` (a view, the auxiliary term cancels in value).
    Backward: `g_y` goes to `f_b` unchanged; `g_a = J_x(op(x, W_a))^T g_y` goes to the auxiliary input and
    `G_Wa = J_W(op(x, W_a))^T g_y` to `W_a`, both computed by the layer kind's `ops` in the dtype of `g_y` (the
    autocast dtype).
    A `W_a` without gradient (`aux_weight="frozen"`) skips `G_Wa`, and `x` is then not kept for the backward pass.
    """

    @staticmethod
    def forward(ctx, binary_output: Tensor, x_aux: Tensor, aux_weight: Tensor,
                ops: LayerOps) -> Tensor:
        ctx.save_for_backward(x_aux if ctx.needs_input_grad[2] else None, aux_weight)
        ctx.input_shape, ctx.input_dtype = x_aux.shape, x_aux.dtype
        ctx.ops = ops
        return binary_output.view_as(binary_output)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x_aux, aux_weight = ctx.saved_tensors
        dtype = grad_output.dtype
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_x = ctx.ops.input_grad(grad_output, aux_weight.to(dtype), ctx.input_shape).to(ctx.input_dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = ctx.ops.weight_grad(grad_output, x_aux.to(dtype), aux_weight.shape)
            grad_weight = grad_weight.to(aux_weight.dtype)
        return grad_output, grad_x, grad_weight, None


class SurgeLayer(nn.Module):
    """The base class of the SURGE training layers `SurgeLinear` and `SurgeConv2d`: binarizers, the DPGC branch and
    diagnostics.

    Subclasses name their kind's operations (`ops_type`, a `LayerOps`); the layer holds them for its layout as
    `ops`: the linear operator, the scales and bias per output channel, the threshold's shape and the auxiliary
    branch's backward products.

    SURGE-only tensors (`SURGE_ONLY_TENSORS`; None where the recipe has none) are created on the device and in the
    dtype of the latent weight. When `binarize` meets a model on the meta device they cannot be initialised: after
    `to_empty()`, `load_state_dict` fills the ones the state dict lacks from the loaded weight (as `binarize` would),
    and a forward pass before that is an error.
    """

    ops_type: ClassVar[type[LayerOps]]
    ops: LayerOps
    weight: nn.Parameter
    bias: nn.Parameter | None
    # With one weight plane: the weight g of the latent weight's residual second plane in training, codes
    # s_1 + g (alpha_2 / alpha_1) s_2 (`quantizers.residual_weight_codes`); 0, the 1-bit weight, unless a training
    # run steps down from two planes (`TrainingConfig.plane_anneal_steps`). Not saved: a model is 1-bit at g = 0.
    second_plane_weight: float = 0.0

    def _init_surge(self, surge_config: SurgeConfig, unsigned_input: bool = False) -> None:
        self.ops = self.ops_type.of(self)
        self.surge_config = surge_config
        self.activation_spec = activation_spec(surge_config, unsigned_input)
        for tensor in SURGE_ONLY_TENSORS:
            kind = tensor.kind(surge_config)
            value = None if kind is None else tensor.initial_value(self, self.weight).clone()
            if kind == "buffer":
                self.register_buffer(tensor.name, value)
            else:
                self.register_parameter(tensor.name, None if value is None else nn.Parameter(value))
        self.scaler = AdaptiveGradientScaler.from_config(surge_config)
        self._sign_snapshot: Tensor | None = None
        self._surge_state_pending = False  # set by `binarize` for a model on the meta device

    @torch.no_grad()
    def reset_surge_parameters(self) -> None:
        """Initialise the SURGE-only tensors (`SURGE_ONLY_TENSORS`): W_a = W, tau = 0, s = 1, learned alpha =
        mean |W|, previous lam = 0."""
        for tensor in self.surge_only_tensors():
            getattr(self, tensor.name).copy_(tensor.initial_value(self, self.weight))
        self._surge_state_pending = False

    def surge_only_tensors(self) -> list[SurgeOnlyTensor]:
        """The entries of `SURGE_ONLY_TENSORS` that this layer holds (its recipe's)."""
        return [tensor for tensor in SURGE_ONLY_TENSORS if getattr(self, tensor.name) is not None]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Loading after `to_empty()` of a layer built on the meta device: SURGE-only tensors missing from
        `state_dict` get their initial values (`SURGE_ONLY_TENSORS`), computed from the loaded weight."""
        if self._surge_state_pending and prefix + "weight" in state_dict:
            weight = state_dict[prefix + "weight"]
            for tensor in self.surge_only_tensors():
                if prefix + tensor.name not in state_dict:
                    state_dict[prefix + tensor.name] = tensor.initial_value(self, weight)
            self._surge_state_pending = False
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -- the binary branch -------------------------------------------------------------------------------------
    def input_codes(self, x: Tensor) -> Tensor:
        """The activation codes q_x, differentiable through the configured surrogate (x itself at full precision)."""
        if not self.surge_config.binarize_activations:
            return x
        threshold = None if self.input_threshold is None else self.ops.channel_view(self.input_threshold)
        return ActivationQuantizer.apply(x, threshold, self.input_scale, self.activation_spec)

    def weight_signs(self) -> Tensor:
        """sign(W) with the clipped straight-through estimator (the latent weight at full precision; with two
        weight planes, the codes s_1 + (alpha_2 / alpha_1) s_2 of `quantizers.residual_weight_codes`, and with one
        plane and a `second_plane_weight` g > 0, s_1 + g (alpha_2 / alpha_1) s_2)."""
        if not self.surge_config.binarize_weights:
            return self.weight
        if self.surge_config.weight_planes == 2:
            return ResidualWeightCodes.apply(self.weight, self.surge_config.weight_scale)
        if self.second_plane_weight:
            return ResidualWeightCodes.apply(self.weight, self.surge_config.weight_scale, self.second_plane_weight)
        return WeightSign.apply(self.weight)

    def weight_alpha(self) -> Tensor | None:
        """alpha per output channel (or one value): learned, or mean |W| of the latent weight (a constant)."""
        if not self.surge_config.binarize_weights:
            return None
        if self.weight_scale is not None:
            return self.weight_scale
        return binary_weight_scale(self.weight, self.surge_config.weight_scale).reshape(-1)

    def binary_branch(self, x: Tensor) -> Tensor:
        """f_b = op(q_x, sign(W)) * (s * alpha) + b."""
        return self.ops.binary_branch(self.input_codes(x), self.weight_signs(), self.input_scale, self.weight_alpha(),
                                      self.bias)

    def compensated(self) -> bool:
        """Whether this call adds the auxiliary branch (training with gradients and a DPGC recipe)."""
        return self.training and torch.is_grad_enabled() and self.surge_config.has_aux_branch

    def forward(self, x: Tensor) -> Tensor:
        if self._surge_state_pending:
            raise RuntimeError(
                f"This {type(self).__name__} was binarized on the meta device and its SURGE-only tensors were never "
                "initialised. After model.to_empty(...), load the weights with model.load_state_dict(...) (missing "
                "auxiliary weights and thresholds are then set from the loaded weights), or call "
                "reset_surge_parameters() on each SURGE layer."
            )
        if not self.compensated():
            output = binary_output = self.binary_branch(x)
        else:
            x_binary, x_aux, aux_weight = DualPathFork.apply(x, self.raw_aux_weight(), self.scaler,
                                                             self.previous_lambda)
            binary_output = self.binary_branch(x_binary)
            output = AuxiliaryGradient.apply(binary_output, x_aux, aux_weight, self.ops)
        if self.computes_auxiliary_loss():
            record_auxiliary_loss(self.auxiliary_loss(x, binary_output))
        return output

    def computes_auxiliary_loss(self) -> bool:
        """Whether this call computes the auxiliary-loss term: in training with an auxiliary-loss recipe, when
        gradients are enabled or an open collector asks for it (reentrant checkpointing, see `surge_hf.aux_loss`).
        With gradients it is computed even when nobody collects it, so that a non-reentrant checkpoint's
        recomputation repeats the forward pass operation for operation."""
        return (self.training and self.surge_config.aux_loss_weight > 0
                and (torch.is_grad_enabled() or auxiliary_loss_requested()))

    def raw_aux_weight(self) -> Tensor:
        """W_a: the auxiliary weight, or the latent weight itself with `aux_weight="shared"`."""
        return self.weight if self.aux_weight is None else self.aux_weight

    def auxiliary_loss(self, x: Tensor, binary_output: Tensor) -> Tensor:
        """`w * mean((op(x, W_a) - f_b)^2)` with `x` and `f_b` detached, so only W_a is trained by it.

        Built with gradients even when the forward pass runs without them: reentrant gradient checkpointing runs
        the layer under `torch.no_grad()` inside a loss computation that needs the term (see `surge_hf.aux_loss`).
        Not through the fork: lam scales the task gradient of W_a (`scale_aux_grad`), never this loss's."""
        with torch.enable_grad():
            aux_output = self.ops.product(x.detach(), self.raw_aux_weight())
            dtype = accumulation_dtype(aux_output.dtype)  # float32, or float64 for a float64 layer
            mismatch = F.mse_loss(aux_output.to(dtype), binary_output.detach().to(dtype))
            return self.surge_config.aux_loss_weight * mismatch

    # -- diagnostics -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sign_flip_ratio(self) -> float:
        """Share of latent-weight signs that changed since the previous call (0.0 at the first call)."""
        signs = self.weight >= 0
        previous, self._sign_snapshot = self._sign_snapshot, signs
        if previous is None or previous.shape != signs.shape:
            return 0.0
        return (signs != previous).float().mean().item()

    def diagnostics(self) -> dict[str, float]:
        """lam, ||g_b||, ||g_a|| of the last backward pass (when there was one) and the sign-flip ratio."""
        stats = self.scaler.stats
        out = {
            name: getattr(stats, name).item()
            for name in ("lam", "grad_norm_binary", "grad_norm_aux")
            if getattr(stats, name) is not None
        }
        out["sign_flip_ratio"] = self.sign_flip_ratio()
        return out

    def extra_repr(self) -> str:
        recipe = self.surge_config
        return f"{super().extra_repr()}, {bit_widths(self)}, compensator={recipe.compensator}, eta={recipe.eta}"


def _renamed_constructor(old: str) -> classmethod:
    """A classmethod `old` that names `from_float`, its new name (for one release)."""

    def renamed(cls, *args, **kwargs):
        raise AttributeError(f"{cls.__name__}.{old}() was renamed {cls.__name__}.from_float() (same arguments). "
                             "See CHANGELOG.md.")

    return classmethod(renamed)


class SurgeLinear(SurgeLayer, nn.Linear):
    """A binary `nn.Linear` trained with SURGE (see the module docstring for the maths).

    Keeps `weight` (the latent weight) and `bias` under their `nn.Linear` names, so plain checkpoints load. Adds
    `aux_weight` (W_a, separate-weight recipes), `input_threshold` (tau, shape `(in_features,)`) and `input_scale`
    (s, shape `(1,)`) as the recipe asks.
    """

    ops_type = LinearOps

    @renamed_surge_config_keyword("config")
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, surge_config: SurgeConfig,
                 unsigned_input: bool = False, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self._init_surge(surge_config, unsigned_input)

    @classmethod
    @renamed_surge_config_keyword("config")
    def from_float(cls, linear: nn.Linear, surge_config: SurgeConfig, unsigned_input: bool = False) -> SurgeLinear:
        """Wrap an existing layer, reusing its weight and bias parameters (no copy)."""
        layer = cls(*cls.ops_type.of(linear).layout(), bias=linear.bias is not None, surge_config=surge_config,
                    device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        layer._init_surge(surge_config, unsigned_input)
        return layer

    from_linear = _renamed_constructor("from_linear")


class SurgeConv2d(SurgeLayer, nn.Conv2d):
    """A binary `nn.Conv2d` trained with SURGE (see the module docstring for the maths).

    The activation threshold tau has one value per input channel. Only `padding_mode="zeros"` is supported.
    """

    ops_type = Conv2dOps

    @renamed_surge_config_keyword("config")
    def __init__(self, *args, surge_config: SurgeConfig, unsigned_input: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(f"SurgeConv2d supports padding_mode='zeros' only, got {self.padding_mode!r}.")
        self._init_surge(surge_config, unsigned_input)

    @classmethod
    @renamed_surge_config_keyword("config")
    def from_float(cls, conv: nn.Conv2d, surge_config: SurgeConfig, unsigned_input: bool = False) -> SurgeConv2d:
        """Wrap an existing layer, reusing its weight and bias parameters (no copy)."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"SurgeConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}.")
        layer = cls(*cls.ops_type.of(conv).layout(), bias=conv.bias is not None, surge_config=surge_config,
                    device="meta")
        layer.weight, layer.bias = conv.weight, conv.bias
        layer._init_surge(surge_config, unsigned_input)
        return layer

    from_conv = _renamed_constructor("from_conv")


class BinaryLayer(nn.Module):
    """The base class of the packed inference layers `BinaryLinear` and `BinaryConv2d`: packed sign bits
    (`weight_packed`, uint8) and per-channel scales (`weight_scale`) instead of a latent weight; no auxiliary branch.
    Outputs equal the SURGE layer's eval outputs exactly, because both compute `op(q_x, sign(W)) * (s * alpha) + b`
    with the same operations (their kind's `ops`, a `LayerOps`) in the same order."""

    ops_type: ClassVar[type[LayerOps]]
    ops: LayerOps
    weight_shape: tuple[int, ...]

    def __getattr__(self, name: str):
        """`weight` of a packed layer: the dequantized weight alpha * sign(W), recomputed on each read.

        Model code reads `layer.weight.dtype` / `.device` to cast its inputs (transformers' ViT does it on the patch
        embedding projection), so a packed layer answers with the tensor it actually computes with: right dtype,
        device, shape and values. It is neither a parameter nor a buffer (so it is not in `state_dict()` and not
        trained) and cannot be replaced by assigning a Parameter. Only reached when normal lookup fails, so a layer
        with full-precision weights (`binarize_weights=False`) keeps its real `weight` parameter.
        """
        if name == "weight" and "weight_packed" in self.__dict__.get("_buffers", {}):
            return self.dequantized_weight()
        return super().__getattr__(name)

    def _init_binary(self, bias: bool, surge_config: SurgeConfig, unsigned_input: bool) -> None:
        """The tensors of a layer whose layout attributes are set (those of `ops_type`'s fields)."""
        self.ops = self.ops_type.of(self)
        self.surge_config = surge_config
        self.activation_spec = activation_spec(surge_config, unsigned_input)
        self.weight_shape = weight_shape = self.ops.weight_shape()
        if surge_config.binarize_weights:
            num_columns = math.prod(weight_shape[1:])
            packed = torch.zeros(weight_shape[0], packed_row_bytes(num_columns), dtype=torch.uint8)
            self.register_buffer("weight_packed", packed)
            scale_size = weight_shape[0] if surge_config.weight_scale == "channel" else 1
            self.register_buffer("weight_scale", torch.ones(scale_size))
        else:
            self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.zeros(weight_shape[0])) if bias else None
        binarizer = surge_config.activation_binarizer if surge_config.binarize_activations else None
        thresholded = binarizer in ("rsign", "elastic")
        self.input_threshold = nn.Parameter(torch.zeros(self.ops.threshold_shape())) if thresholded else None
        self.input_scale = nn.Parameter(torch.ones(1)) if binarizer == "elastic" else None

    @classmethod
    def from_surge(cls, layer: SurgeLayer) -> BinaryLayer:
        """The packed counterpart of a trained SURGE layer, on the layer's device."""
        binary = cls(*layer.ops.layout(), layer.bias is not None, layer.surge_config,
                     unsigned_input=not layer.activation_spec.signed)
        binary.to(layer.weight.device)
        binary.load_from_surge(layer)
        return binary

    @torch.no_grad()
    def load_from_surge(self, layer: SurgeLayer) -> None:
        """Pack the trained layer's signs and scales; copy bias, threshold and scale.

        A learned alpha that went negative is folded into the signs of its output channel (stored: -sign(W), |alpha|),
        which is exact: op(q, -s) * |alpha| == op(q, s) * alpha in floating point too (negation is exact)."""
        if self.surge_config.binarize_weights:
            alpha = layer.weight_alpha().detach()
            flip = torch.where(alpha < 0, -1.0, 1.0).to(layer.weight.dtype)
            signs = sign(layer.weight.detach()) * flip.reshape(-1, *[1] * (layer.weight.ndim - 1))
            self.weight_packed.copy_(pack_signs(signs))
            self.weight_scale = alpha.abs().clone()
        else:
            self.weight = nn.Parameter(layer.weight.detach().clone())
        for name in ("bias", "input_threshold", "input_scale"):
            source = getattr(layer, name)
            if source is not None:
                setattr(self, name, nn.Parameter(source.detach().clone(), requires_grad=False))

    def weight_signs(self) -> Tensor:
        """sign(W) unpacked from the bits (the full-precision weight when weights are not binarized)."""
        if not self.surge_config.binarize_weights:
            return self.weight
        return unpack_signs(self.weight_packed, self.weight_shape, dtype=self.weight_scale.dtype)

    def dequantized_weight(self) -> Tensor:
        """alpha * sign(W), unpacked from the bits."""
        if not self.surge_config.binarize_weights:
            return self.weight
        alpha = self.weight_scale.reshape([-1] + [1] * (len(self.weight_shape) - 1))
        return binary_weight(self.weight_signs(), alpha)

    def input_codes(self, x: Tensor) -> Tensor:
        if not self.surge_config.binarize_activations:
            return x
        threshold = None if self.input_threshold is None else self.ops.channel_view(self.input_threshold)
        return activation_codes(x, threshold, self.input_scale, self.activation_spec)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(
                f"{type(self).__name__} is a packed 1-bit inference layer without latent weights and cannot be "
                "trained. Call `surge_hf.unfinalize(model)` to rebuild trainable SURGE layers from the bits, or "
                "load the train-form checkpoint; call `model.eval()` for inference."
            )
        if self.uses_kernel(x):
            return self.kernel_forward(x)
        return self.binary_branch(x)

    def weight_alpha(self) -> Tensor | None:
        """The stored alpha (None when weights are not binarized)."""
        return self.weight_scale if self.surge_config.binarize_weights else None

    def binary_branch(self, x: Tensor) -> Tensor:
        """f_b = op(q_x, sign(W)) * (s * alpha) + b: the very operations of the SURGE layer's binary branch (its
        kind's `ops.binary_branch`), so packed outputs equal eval outputs."""
        return self.ops.binary_branch(self.input_codes(x), self.weight_signs(), self.input_scale, self.weight_alpha(),
                                      self.bias)

    def float_layer(self) -> nn.Module:
        """A float layer of this layout (freshly initialised values)."""
        return self.ops.float_layer(bias=self.bias is not None)

    def uses_kernel(self, x: Tensor) -> bool:
        """Whether this call runs on the XNOR-popcount CPU kernel (`surge_hf.kernels`) instead of the reference path:
        binary weights and activations (sign, k-bit or unsigned codes) on float32 CPU inputs that the layer's kernel
        takes (`kernel_takes`), when the kernel is built and enabled; not under CPU autocast (the reference path
        computes in its dtype). Codes other than signs only without gradients (the kernel has none for their step).
        Traced by `torch.compile` or `torch.export`, the kernel's operators become nodes of the graph."""
        recipe = self.surge_config
        return (
            recipe.binarize_weights and recipe.binarize_activations and x.device.type == "cpu"
            and x.dtype == torch.float32 and self.weight_scale.dtype == torch.float32
            and (self.activation_spec.is_sign or not torch.is_grad_enabled())
            and not torch.is_autocast_enabled("cpu") and self.kernel_takes(x) and kernels_available()
        )

    def kernel_takes(self, x: Tensor) -> bool:
        """Whether the layer's kernel computes this input (the layer kinds with a kernel override this and
        `kernel_forward`, `_pack_panels`)."""
        return False

    def kernel_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no CPU kernel.")

    def weight_panels(self) -> tuple[Tensor, Tensor]:
        """The packed weight in the kernel's panel layout and the +1 count of each row, rebuilt when
        `weight_packed` is replaced or changed.

        Traced (`torch.compile`, `torch.export`), where a tensor's storage cannot be read, the ones the last eager
        call built are taken as they are, or, before any eager call, computed in the graph on every call."""
        if torch.compiler.is_compiling():
            return self.held_panels() or self._pack_panels()
        key = tensor_state(self.weight_packed)
        if self.__dict__.get("_panels_key") != key:
            self._panels = self._pack_panels()
            self._panels_key = key
        return self._panels

    def held_panels(self) -> tuple[Tensor, ...]:
        """The kernel panels this layer holds now (built by its first kernel call; empty before): memory that the
        state dict does not count."""
        return self.__dict__.get("_panels", ())

    def _pack_panels(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no CPU kernel.")


def tensor_state(*tensors: Tensor | None) -> tuple:
    """What identifies the values of `tensors` for a cache: storage and version (an inference tensor has no version
    counter, and cannot be changed in place outside inference mode)."""
    return tuple(None if t is None else (t.data_ptr(), None if t.is_inference() else t._version) for t in tensors)


class BinaryLinear(BinaryLayer):
    """Packed inference counterpart of `SurgeLinear`.

    With a `sign_output` (`surge_hf.fusion`, set by `finalize` where the next layer only binarizes this layer's
    activated output) the kernel path returns `PackedSigns` instead of floats; the layer that reads them takes
    `PackedSigns` as its input."""

    ops_type = LinearOps

    @renamed_surge_config_keyword("recipe")
    def __init__(self, in_features: int, out_features: int, bias: bool, surge_config: SurgeConfig, *,
                 unsigned_input: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_binary(bias, surge_config, unsigned_input)
        self.sign_output: SignOutputSource | None = None

    def kernel_takes(self, x: Tensor) -> bool:
        """Any input (see `uses_kernel`)."""
        return True

    def forward(self, x: Tensor | PackedSigns) -> Tensor | PackedSigns:
        if isinstance(x, PackedSigns):
            return binary_linear_from_signs(x, self.weight_panels()[0], self.out_features, self.weight_scale,
                                            self.input_scale, self.bias)
        return super().forward(x)

    def kernel_forward(self, x: Tensor) -> Tensor | PackedSigns:
        """`float(q_x . sign(W_j)) * (alpha_j * s) + b_j` from the packed bits, without unpacking them: the reference
        path's operations in the reference path's order; or, with a `sign_output` that applies, the next layer's
        sign codes of its activated values, as `PackedSigns`."""
        panels, weight_counts = self.weight_panels()
        if not self.activation_spec.is_sign:
            return quantized_linear(x, self.input_threshold, self.input_scale, self.activation_spec.levels, panels,
                                    weight_counts, self.out_features, self.weight_scale, self.bias)
        bounds = None if self.sign_output is None else self.sign_output.bounds(self, x)
        if bounds is not None:
            return binary_linear_signs(x, self.input_threshold, panels, self.out_features, *bounds)
        return binary_linear(x, self.input_threshold, panels, self.out_features, self.weight_scale, self.input_scale,
                             self.bias)

    def _pack_panels(self) -> tuple[Tensor, Tensor]:
        return pack_weight_panels(self.weight_packed, self.in_features), weight_row_counts(self.weight_packed)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{bit_widths(self)}")


class BinaryConv2d(BinaryLayer):
    """Packed inference counterpart of `SurgeConv2d`.

    With `groups=1` it runs on the XNOR-popcount kernel (`kernels.binary_conv2d`, `kernels.quantized_conv2d`: im2col
    over the packed input signs, the zero padding counted exactly); grouped convolutions take the reference path."""

    ops_type = Conv2dOps

    @renamed_surge_config_keyword("recipe")
    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride, padding, dilation,
                 groups: int, bias: bool, surge_config: SurgeConfig, *, unsigned_input: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, tuple(kernel_size)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.geometry = ConvGeometry.of(self.kernel_size, stride, padding, dilation)  # what the kernel reads
        self._init_binary(bias, surge_config, unsigned_input)

    def kernel_takes(self, x: Tensor) -> bool:
        """Batches of images `(B, C, H, W)` with this layer's channels, groups 1; other inputs take the reference
        path, which computes grouped convolutions and single images `(C, H, W)` (returning `(1, N, OH, OW)`: the
        scale broadcasts over a batch dim), and reports wrong shapes."""
        return self.groups == 1 and x.dim() == 4 and x.shape[1] == self.in_channels

    def kernel_forward(self, x: Tensor) -> Tensor:
        """`float(conv2d(q_x, sign(W))_j) * (alpha_j * s) + b_j` from the packed bits, without unpacking them, the
        padded taps counted as the reference path's zeros (see `surge_hf.kernels`), the scales and the bias applied
        in the reference path's order."""
        panels, weight_counts = self.weight_panels()
        if not self.activation_spec.is_sign:
            return quantized_conv2d(x, self.input_threshold, self.input_scale, self.activation_spec.levels, panels,
                                    weight_counts, self.out_channels, self.geometry, self.weight_scale, self.bias)
        return binary_conv2d(x, self.input_threshold, panels, self.out_channels, self.geometry, self.weight_scale,
                             self.input_scale, self.bias)

    def _pack_panels(self) -> tuple[Tensor, Tensor]:
        return pack_conv_weight_panels(self.weight_packed, self.weight_shape), weight_row_counts(self.weight_packed)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, {bit_widths(self)}")


@dataclass(frozen=True)
class LayerKind:
    """One kind of binarizable layer: its operations (`ops_type`, with the float module `ops_type.float_type` that
    `binarize` replaces), its SURGE training layer (`surge_type.from_float`) and its packed inference layer
    (`packed_type.from_surge`, back with `float_layer`); both layers hold the kind's operations as `ops`."""

    ops_type: type[LayerOps]
    surge_type: type[SurgeLayer]
    packed_type: type[BinaryLayer]


LAYER_KINDS = (
    LayerKind(LinearOps, SurgeLinear, BinaryLinear),
    LayerKind(Conv2dOps, SurgeConv2d, BinaryConv2d),
)
SURGE_LAYER_TYPES = tuple(kind.surge_type for kind in LAYER_KINDS)
BINARY_LAYER_TYPES = tuple(kind.packed_type for kind in LAYER_KINDS)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of a float layer (exactly `nn.Linear`/`nn.Conv2d`, not subclasses), a SURGE or a packed layer."""
    for kind in LAYER_KINDS:
        if type(module) is kind.ops_type.float_type or isinstance(module, (kind.surge_type, kind.packed_type)):
            return kind
    return None


# The previous release's names (until the next release): the base classes were called mixins, but they are the
# `nn.Module`s that the layers derive from.
__getattr__ = renamed_module_attributes(__name__, {"SurgeLayerMixin": "SurgeLayer", "BinaryLayerMixin": "BinaryLayer"})
