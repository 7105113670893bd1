"""SURGE binary layers (training) and their packed inference counterparts.

A SURGE layer computes, for input `x`, latent weight `W`, bias `b`:

    f_b = op(Q_x(x), Q_w(W)) + b          the binary branch (op: linear or conv2d)
    f_a = op(x, W_a)                      the auxiliary full-precision branch (Dual-Path Gradient Compensator)
    y   = f_b - stopgrad(lam * f_a) + lam * f_a

with `Q_w(W) = alpha * sign(W)` and `Q_x(x) = s * sign(x - tau)` (see `quantizers`). In value `y == f_b` exactly,
so `f_a` is never computed: the auxiliary branch costs only its two backward products,

    g_a  = J_x(op(x, W_a))^T g_y          (sent to the input through the fork, scaled by lam: see `scaler`)
    G_Wa = J_W(op(x, W_a))^T g_y          (the auxiliary weight's gradient)

In eval mode, under `torch.no_grad()`, or with `compensator="ste"` the layer is a pure binary layer. `finalize`
turns each into a `BinaryLinear`/`BinaryConv2d` holding packed sign bits and scales, whose outputs are identical.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configuration_surge import SurgeConfig
from .kernels import available as kernels_available
from .kernels import binary_linear, pack_weight_panels
from .packing import pack_signs, packed_row_bytes, unpack_signs
from .quantizers import (
    ActivationBinarizer,
    WeightBinarizer,
    binarize_activation_values,
    binary_weight,
    weight_scale,
)
from .scaler import DualPathFork, ScalerStats


class AuxiliaryGradient(torch.autograd.Function):
    """Adds the auxiliary branch's gradient without computing its forward value.

    Forward: returns `f_b` (a view, the auxiliary term cancels in value).
    Backward: `g_y` goes to `f_b` unchanged; `g_a = J_x(op(x, W_a))^T g_y` goes to the auxiliary input and
    `G_Wa = J_W(op(x, W_a))^T g_y` to `W_a`, both computed in the dtype of `g_y` (the autocast dtype).
    """

    @staticmethod
    def forward(ctx, binary_output: Tensor, x_aux: Tensor, aux_weight: Tensor, layer: SurgeLayerMixin) -> Tensor:
        ctx.save_for_backward(x_aux, aux_weight)
        ctx.layer = layer
        return binary_output.view_as(binary_output)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x_aux, aux_weight = ctx.saved_tensors
        dtype = grad_output.dtype
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_x = ctx.layer.aux_input_grad(grad_output, aux_weight.to(dtype), x_aux.shape).to(x_aux.dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = ctx.layer.aux_weight_grad(grad_output, x_aux.to(dtype), aux_weight.shape)
            grad_weight = grad_weight.to(aux_weight.dtype)
        return grad_output, grad_x, grad_weight, None


class SurgeLayerMixin(nn.Module):
    """What `SurgeLinear` and `SurgeConv2d` share: binarizers, the DPGC branch and diagnostics.

    Subclasses provide `binary_op(x, w)` (the linear operator without bias), `add_bias`, `aux_input_grad`,
    `aux_weight_grad` and `threshold_shape`/`reshape_threshold` for their input layout.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_surge(self, config: SurgeConfig) -> None:
        self.surge_config = config
        num_inputs = self.threshold_shape()
        if config.binarize_activations and config.activation_binarizer in ("rsign", "elastic"):
            self.input_threshold = nn.Parameter(torch.zeros(num_inputs, dtype=self.weight.dtype))
        else:
            self.register_parameter("input_threshold", None)
        if config.binarize_activations and config.activation_binarizer == "elastic":
            self.input_scale = nn.Parameter(torch.ones(1, dtype=self.weight.dtype))
        else:
            self.register_parameter("input_scale", None)
        if config.has_aux_branch and config.aux_weight == "separate":
            self.aux_weight = nn.Parameter(self.weight.detach().clone())
        else:
            self.register_parameter("aux_weight", None)
        if config.has_aux_branch and config.lambda_placement == "previous":
            self.register_buffer("previous_lambda", torch.zeros((), dtype=torch.float32))
        self.scaler_stats = ScalerStats()
        self.last_aux_loss: Tensor | None = None
        self._sign_snapshot: Tensor | None = None

    @torch.no_grad()
    def reset_surge_parameters(self) -> None:
        """Initialise the SURGE-only state: W_a = W, tau = 0, s = 1, previous lam = 0."""
        if self.aux_weight is not None:
            self.aux_weight.copy_(self.weight)
        if self.input_threshold is not None:
            self.input_threshold.zero_()
        if self.input_scale is not None:
            self.input_scale.fill_(1.0)
        if hasattr(self, "previous_lambda"):
            self.previous_lambda.zero_()

    # -- the binary branch -------------------------------------------------------------------------------------
    def binary_input(self, x: Tensor) -> Tensor:
        """Q_x(x), differentiable through the configured surrogate."""
        if not self.surge_config.binarize_activations:
            return x
        threshold = None if self.input_threshold is None else self.reshape_threshold(self.input_threshold)
        recipe = self.surge_config
        return ActivationBinarizer.apply(x, threshold, self.input_scale, recipe.surrogate, recipe.swish_beta)

    def binary_weight(self) -> Tensor:
        """Q_w(W), differentiable through the clipped straight-through estimator."""
        if not self.surge_config.binarize_weights:
            return self.weight
        return WeightBinarizer.apply(self.weight, self.surge_config.weight_scale)

    def compensated(self) -> bool:
        """Whether this call adds the auxiliary branch (training with gradients and a DPGC recipe)."""
        return self.training and torch.is_grad_enabled() and self.surge_config.has_aux_branch

    def forward(self, x: Tensor) -> Tensor:
        self.last_aux_loss = None
        if not self.compensated():
            return self.add_bias(self.binary_op(self.binary_input(x), self.binary_weight()))
        raw_aux_weight = self.weight if self.aux_weight is None else self.aux_weight
        x_binary, x_aux, aux_weight = DualPathFork.apply(x, raw_aux_weight, self)
        binary_output = self.add_bias(self.binary_op(self.binary_input(x_binary), self.binary_weight()))
        if self.surge_config.aux_loss_weight > 0:
            # Not through the fork: lam scales the task gradient of W_a (scale_aux_grad), never this loss's.
            aux_output = self.binary_op(x.detach(), raw_aux_weight)
            self.last_aux_loss = F.mse_loss(aux_output.float(), binary_output.detach().float())
        return AuxiliaryGradient.apply(binary_output, x_aux, aux_weight, self)

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
        out = {
            name: getattr(self.scaler_stats, name).item()
            for name in ("lam", "grad_norm_binary", "grad_norm_aux")
            if getattr(self.scaler_stats, name) is not None
        }
        out["sign_flip_ratio"] = self.sign_flip_ratio()
        return out

    def extra_repr(self) -> str:
        recipe = self.surge_config
        bits = f"W{1 if recipe.binarize_weights else 32}A{1 if recipe.binarize_activations else 32}"
        return f"{super().extra_repr()}, {bits}, compensator={recipe.compensator}, eta={recipe.eta}"


class SurgeLinear(SurgeLayerMixin, nn.Linear):
    """A binary `nn.Linear` trained with SURGE (see the module docstring for the maths).

    Keeps `weight` (the latent weight) and `bias` under their `nn.Linear` names, so plain checkpoints load. Adds
    `aux_weight` (W_a, separate-weight recipes), `input_threshold` (tau, shape `(in_features,)`) and `input_scale`
    (s, shape `(1,)`) as the recipe asks.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, config: SurgeConfig, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self._init_surge(config)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: SurgeConfig) -> SurgeLinear:
        """Wrap an existing layer, reusing its weight and bias parameters (no copy)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, config=config,
                    device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        layer._init_surge(config)
        return layer

    def threshold_shape(self) -> tuple[int, ...]:
        return (self.in_features,)

    def reshape_threshold(self, threshold: Tensor) -> Tensor:
        return threshold

    def binary_op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight)

    def add_bias(self, output: Tensor) -> Tensor:
        return output if self.bias is None else output + self.bias.to(output.dtype)

    def aux_input_grad(self, grad_output: Tensor, aux_weight: Tensor, input_shape: torch.Size) -> Tensor:
        return grad_output @ aux_weight

    def aux_weight_grad(self, grad_output: Tensor, x: Tensor, weight_shape: torch.Size) -> Tensor:
        return grad_output.reshape(-1, weight_shape[0]).t() @ x.reshape(-1, weight_shape[1])


class SurgeConv2d(SurgeLayerMixin, nn.Conv2d):
    """A binary `nn.Conv2d` trained with SURGE (see the module docstring for the maths).

    The activation threshold tau has one value per input channel. Only `padding_mode="zeros"` is supported.
    """

    def __init__(self, *args, config: SurgeConfig, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(f"SurgeConv2d supports padding_mode='zeros' only, got {self.padding_mode!r}.")
        self._init_surge(config)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, config: SurgeConfig) -> SurgeConv2d:
        """Wrap an existing layer, reusing its weight and bias parameters (no copy)."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"SurgeConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}.")
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, config=config, device="meta",
        )
        layer.weight, layer.bias = conv.weight, conv.bias
        layer._init_surge(config)
        return layer

    def threshold_shape(self) -> tuple[int, ...]:
        return (self.in_channels,)

    def reshape_threshold(self, threshold: Tensor) -> Tensor:
        return threshold.reshape(1, -1, 1, 1)

    def binary_op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def add_bias(self, output: Tensor) -> Tensor:
        return output if self.bias is None else output + self.bias.to(output.dtype).reshape(1, -1, 1, 1)

    def aux_input_grad(self, grad_output: Tensor, aux_weight: Tensor, input_shape: torch.Size) -> Tensor:
        return torch.nn.grad.conv2d_input(
            input_shape, aux_weight, grad_output, self.stride, self.padding, self.dilation, self.groups
        )

    def aux_weight_grad(self, grad_output: Tensor, x: Tensor, weight_shape: torch.Size) -> Tensor:
        return torch.nn.grad.conv2d_weight(
            x, weight_shape, grad_output, self.stride, self.padding, self.dilation, self.groups
        )


class BinaryLayerMixin(nn.Module):
    """Inference-only binary layer: packed sign bits (`weight_packed`, uint8) and per-channel scales
    (`weight_scale`) instead of a latent weight; no auxiliary branch. Outputs equal the SURGE layer's eval outputs
    exactly, because both compute `op(s * sign(x - tau), alpha * sign(W)) + b` with the same operations."""

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

    def _init_binary(self, weight_shape: tuple[int, ...], bias: bool, threshold_size: int, recipe: SurgeConfig):
        self.surge_config = recipe
        self.weight_shape = tuple(weight_shape)
        if recipe.binarize_weights:
            num_columns = math.prod(weight_shape[1:])
            packed = torch.zeros(weight_shape[0], packed_row_bytes(num_columns), dtype=torch.uint8)
            self.register_buffer("weight_packed", packed)
            scale_size = weight_shape[0] if recipe.weight_scale == "channel" else 1
            self.register_buffer("weight_scale", torch.ones(scale_size))
        else:
            self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.zeros(weight_shape[0])) if bias else None
        binarizer = recipe.activation_binarizer if recipe.binarize_activations else None
        self.input_threshold = nn.Parameter(torch.zeros(threshold_size)) if binarizer in ("rsign", "elastic") else None
        self.input_scale = nn.Parameter(torch.ones(1)) if binarizer == "elastic" else None

    @classmethod
    def from_surge(cls, layer: SurgeLayerMixin) -> BinaryLayerMixin:
        """The packed counterpart of a trained SURGE layer, on the layer's device."""
        binary = cls(*cls.layout_of(layer), layer.bias is not None, layer.surge_config)
        binary.to(layer.weight.device)
        binary.load_from_surge(layer)
        return binary

    @torch.no_grad()
    def load_from_surge(self, layer: SurgeLayerMixin) -> None:
        """Pack the trained layer's signs and scales; copy bias, threshold and scale."""
        if self.surge_config.binarize_weights:
            self.weight_packed.copy_(pack_signs(layer.weight))
            self.weight_scale = weight_scale(layer.weight, self.surge_config.weight_scale).reshape(-1).clone()
        else:
            self.weight = nn.Parameter(layer.weight.detach().clone())
        for name in ("bias", "input_threshold", "input_scale"):
            source = getattr(layer, name)
            if source is not None:
                setattr(self, name, nn.Parameter(source.detach().clone(), requires_grad=False))

    def dequantized_weight(self) -> Tensor:
        """alpha * sign(W), unpacked from the bits."""
        if not self.surge_config.binarize_weights:
            return self.weight
        signs = unpack_signs(self.weight_packed, self.weight_shape, dtype=self.weight_scale.dtype)
        alpha = self.weight_scale.reshape([-1] + [1] * (len(self.weight_shape) - 1))
        return binary_weight(signs, alpha)

    def binary_input(self, x: Tensor) -> Tensor:
        if not self.surge_config.binarize_activations:
            return x
        threshold = None if self.input_threshold is None else self.reshape_threshold(self.input_threshold)
        return binarize_activation_values(x, threshold, self.input_scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(
                f"{type(self).__name__} is a packed 1-bit inference layer without latent weights and cannot be "
                "trained. Call `surge_hf.unfinalize(model)` to rebuild trainable SURGE layers from the bits, or "
                "load the train-form checkpoint; call `model.eval()` for inference."
            )
        if self.uses_kernel(x):
            return self.kernel_forward(x)
        return self.add_bias(self.binary_op(self.binary_input(x), self.dequantized_weight()))

    def uses_kernel(self, x: Tensor) -> bool:
        """Whether this call runs on the XNOR-popcount CPU kernel (`surge_hf.kernels`) instead of the reference
        path; the layer kinds that have a kernel override `uses_kernel` and `kernel_forward`."""
        return False

    def kernel_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no CPU kernel.")


class BinaryLinear(BinaryLayerMixin):
    """Packed inference counterpart of `SurgeLinear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, recipe: SurgeConfig):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_binary((out_features, in_features), bias, in_features, recipe)

    @staticmethod
    def layout_of(layer: SurgeLinear) -> tuple:
        return layer.in_features, layer.out_features

    reshape_threshold = SurgeLinear.reshape_threshold
    binary_op = SurgeLinear.binary_op
    add_bias = SurgeLinear.add_bias

    def uses_kernel(self, x: Tensor) -> bool:
        """W1A1 on float32 CPU inputs, when the kernel is built and enabled (see `surge_hf.kernels`); not under
        `torch.compile`, which compiles the reference path."""
        recipe = self.surge_config
        return (
            recipe.binarize_weights and recipe.binarize_activations and x.device.type == "cpu"
            and x.dtype == torch.float32 and self.weight_scale.dtype == torch.float32
            and not torch.compiler.is_compiling() and kernels_available()
        )

    def kernel_forward(self, x: Tensor) -> Tensor:
        """`float(sign(x - tau) . sign(W_j)) * alpha_j * s + b_j` from the packed bits, without unpacking them."""
        return binary_linear(x, self.input_threshold, self.weight_panels(), self.out_features,
                                     self.weight_scale, self.input_scale, self.bias)

    def weight_panels(self) -> Tensor:
        """The packed weight in the kernel's panel layout, rebuilt when `weight_packed` is replaced or changed."""
        packed = self.weight_packed
        key = (packed.data_ptr(), None if packed.is_inference() else packed._version)
        if self.__dict__.get("_panels_key") != key:
            self._panels = pack_weight_panels(packed, self.in_features)
            self._panels_key = key
        return self._panels

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class BinaryConv2d(BinaryLayerMixin):
    """Packed inference counterpart of `SurgeConv2d`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride, padding, dilation,
                 groups: int, bias: bool, recipe: SurgeConfig):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, tuple(kernel_size)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_binary(shape, bias, in_channels, recipe)

    @staticmethod
    def layout_of(layer: SurgeConv2d) -> tuple:
        return (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                layer.dilation, layer.groups)

    reshape_threshold = SurgeConv2d.reshape_threshold
    binary_op = SurgeConv2d.binary_op
    add_bias = SurgeConv2d.add_bias

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")


SURGE_LAYER_TYPES = (SurgeLinear, SurgeConv2d)
BINARY_LAYER_TYPES = (BinaryLinear, BinaryConv2d)
