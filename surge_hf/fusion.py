"""Sign outputs: a binary layer whose output the next layer only binarizes writes packed sign bits instead of floats
(Larq Compute Engine's binary convolution with bit-packed output). `finalize` sets it up for the feed-forward blocks
it recognises (`FEED_FORWARD_PATTERNS`: BERT, ViT).

In a W1A1 feed-forward block the output layer's input codes are its binarizer applied to the activated output of the
intermediate layer:

    y_j = float(d_j) * (alpha_j * s) + b_j      the intermediate layer, d_j = sign(x - tau') . sign(W_j), an integer
    q_j = sign(g(y_j) - tau_j)                  g the activation (GELU), tau_j the output layer's threshold, j its
                                                input channel (the intermediate layer's output channel)

`d_j` takes the K + 1 values -K, -K + 2, ..., K (K: the intermediate layer's inputs), so `q_j` is a function of `d_j`
alone: a table per channel. `sign_output_bounds` evaluates the table with the reference path's own operations (the
layer's `ops.scaled_output`, the model's activation module, the output layer's `input_codes`) at every candidate, so
the bits are the float path's, rounding included, and encodes each channel as

    q_j = +1  <=>  (low_j <= d_j <= low_j + width_j) xor flip_j

which holds whenever the +1 entries of the table are an interval of `d` (flip 0) or the complement of one (flip 1).
With `c_j = alpha_j * s > 0` and GELU, whose minimum is about -0.17 (at -0.75) and which tends to 0 from below:
  - tau_j > 0: one bound, q = +1 for d >= t_j;
  - GELU's minimum < tau_j <= 0: two bounds, q = +1 for d <= t'_j or d >= t_j (in float32 also at tau_j = 0, since
    GELU underflows to -0 far to the left);
  - tau_j <= GELU's minimum: q = +1 for every d;
  - c_j < 0 mirrors the table in d, c_j = 0 makes it constant: still an interval or the complement of one.
A channel whose table is neither (a NaN, or an activation with more than one valley) leaves its layer on floats.
Only sign binarizers fold (`sign`, `rsign`, `elastic`: sign(x - tau), the scale s applied after the product); k-bit
and unsigned codes do not.

The bits replace floats only where the float path computes exactly what the table holds: no gradient to record
(autograd off, or no bias or scale that requires one), the kernel on both layers (`BinaryLinear.uses_kernel`), and an
activation whose value at an element depends on that element's value alone. ReLU is exact. torch computes exact GELU
on a contiguous float32 tensor of more than one element with oneDNN, elementwise, and otherwise (one element, or
`torch.backends.mkldnn.enabled = False`) with ATen's kernel, whose vectorised body and scalar tail round differently,
so that a value depends on its position in the tensor: there the outputs stay float. The table is a contiguous
`(K + 1, N)` tensor, on oneDNN, built at the first forward and again when the scales, bias or thresholds change
(not when `torch.set_flush_denormal` does: GELU's far left tail is denormal, so keep that mode as it was then).
A row of the input holding a NaN makes the float path's whole row NaN: the bits carry such rows
(`PackedSigns.nan_rows`) and the next layer writes NaN there.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.activations import GELUActivation
from transformers.models.bert.modeling_bert import BertIntermediate, BertLayer, BertOutput
from transformers.models.vit.modeling_vit import ViTMLP

from .kernels import PackedSigns
from .layers import BinaryLinear, tensor_state

_ONEDNN_BUILT = torch.backends.mkldnn.is_available()  # a constant of the torch build (a constant to tracing too)


@dataclass(frozen=True)
class FeedForwardPattern:
    """A module that feeds `producer`'s output through `activation` into `consumer` and nowhere else (module names
    relative to it), recognised by the exact types of itself and of the submodules on the way (`module_types`)."""

    module_types: tuple[tuple[str, type[nn.Module]], ...]
    producer: str
    activation: str
    consumer: str

    def matches(self, module: nn.Module) -> bool:
        return all(type(module.get_submodule(name)) is kind for name, kind in self.module_types)


FEED_FORWARD_PATTERNS = (
    # BertLayer.feed_forward_chunk: output(intermediate(x), x); intermediate = act(dense(.)), output = LN(dense(.) + x)
    FeedForwardPattern((("", BertLayer), ("intermediate", BertIntermediate), ("output", BertOutput)),
                       "intermediate.dense", "intermediate.intermediate_act_fn", "output.dense"),
    FeedForwardPattern((("", ViTMLP),), "fc1", "activation_fn", "fc2"),  # fc2(act(fc1(x)))
)


def _is_exact_gelu(activation: nn.Module) -> bool:
    """transformers' `GELUActivation` on `F.gelu`, or `nn.GELU()` (the erf form, which torch runs on oneDNN)."""
    if type(activation) is GELUActivation:
        return activation.act is nn.functional.gelu
    return type(activation) is nn.GELU and activation.approximate == "none"


def _foldable_activation(activation: nn.Module) -> bool:
    return _is_exact_gelu(activation) or type(activation) is nn.ReLU


def _records_gradients(layer: BinaryLinear) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (layer.input_scale, layer.bias))


@torch.no_grad()
def sign_output_bounds(producer: BinaryLinear, activation: nn.Module, consumer: BinaryLinear
                       ) -> tuple[Tensor, Tensor, Tensor] | None:
    """`(low, width, flip)` (int32, int32, uint8, one per output channel of `producer`) such that the consumer's sign
    code of channel j is +1 exactly where `(low_j <= d <= low_j + width_j) xor flip_j` for the producer's dot product
    `d` (see the module docstring); None where some channel's table is not of that form."""
    k, n = producer.in_features, producer.out_features
    dots = torch.arange(-k, k + 1, 2, dtype=torch.float32).unsqueeze(1).expand(k + 1, n).contiguous()
    outputs = producer.ops.scaled_output(dots, producer.input_scale, producer.weight_alpha(), producer.bias)
    codes = consumer.input_codes(activation(outputs))
    if codes.isnan().any():
        return None
    table = codes > 0
    flip = table[0]  # the first entry is outside the interval
    inside = table ^ flip
    if ((inside[1:] & ~inside[:-1]).sum(0) > 1).any():  # more than one run of entries inside
        return None
    count = inside.sum(0, dtype=torch.int32)
    first = inside.to(torch.uint8).argmax(0).to(torch.int32)
    low = torch.where(count > 0, 2 * first - k, k + 2)  # an empty interval starts past K
    width = (2 * (count - 1)).clamp_(min=0)
    return low.to(torch.int32).contiguous(), width.contiguous(), flip.to(torch.uint8).contiguous()


class SignOutput:
    """What a `BinaryLinear` needs to write sign outputs: the activation after it and the layer whose binarizer reads
    them. Builds `sign_output_bounds` once and again when the tensors they come from change."""

    def __init__(self, activation: nn.Module, consumer: BinaryLinear):
        self.activation = activation
        self.consumer = consumer
        self._needs_onednn = _is_exact_gelu(activation)
        self._key: tuple | None = None
        self._bounds: tuple[Tensor, Tensor, Tensor] | None = None

    def bounds(self, producer: BinaryLinear, x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """The bounds for `producer(x)` (on the kernel), or None where its output must stay float (module docstring).

        Traced (`torch.compile`, `torch.export`), the bounds the last eager call built are taken as they are (tracing
        cannot read the tensors' state), None before any; oneDNN's switch is not read there (`torch.export` turns it
        off while it traces), since an eager call builds the bounds only with oneDNN on."""
        consumer = self.consumer
        tracing = torch.compiler.is_compiling()
        onednn = tracing or (_ONEDNN_BUILT and torch.backends.mkldnn.enabled)
        elementwise = not self._needs_onednn or (
            onednn and x.numel() // producer.in_features * producer.out_features > 1)
        if (not elementwise or consumer.weight_scale.dtype != torch.float32
                or _records_gradients(producer) or _records_gradients(consumer)):
            return None
        if tracing:
            return self._bounds
        key = tensor_state(producer.weight_scale, producer.input_scale, producer.bias, consumer.input_threshold)
        if key != self._key:
            self._bounds = sign_output_bounds(producer, self.activation, consumer)
            self._key = key
            if self._bounds is None:
                warnings.warn(f"{type(self.activation).__name__} followed by the next layer's binarizer is not an "
                              "interval of the integer products in some channel: this layer's outputs stay float.",
                              RuntimeWarning, stacklevel=2)
        return self._bounds


class FoldedActivation(nn.Module):
    """The activation between a layer that writes sign outputs and the layer that reads them: `activation(x)` on a
    float tensor; `PackedSigns`, into which the activation is folded, pass through."""

    def __init__(self, activation: nn.Module):
        super().__init__()
        self.activation = activation

    def forward(self, x: Tensor | PackedSigns) -> Tensor | PackedSigns:
        return x if isinstance(x, PackedSigns) else self.activation(x)


def _can_fold(producer: nn.Module, activation: nn.Module, consumer: nn.Module) -> bool:
    layers_fit = all(
        type(layer) is BinaryLinear and layer.surge_config.binarize_weights
        and layer.surge_config.binarize_activations and layer.activation_spec.is_sign
        for layer in (producer, consumer)
    )
    return layers_fit and _foldable_activation(activation) and consumer.in_features == producer.out_features


def fold_sign_outputs(model: nn.Module) -> list[str]:
    """Set up sign outputs in every feed-forward block of packed layers that `FEED_FORWARD_PATTERNS` recognises, in
    place: the intermediate layer gets a `SignOutput`, the activation is wrapped in a `FoldedActivation`. Returns the
    names of the intermediate layers. State dict and outputs stay the same."""
    matches = [(name, module, pattern) for name, module in model.named_modules()
               for pattern in FEED_FORWARD_PATTERNS if pattern.matches(module)]
    folded = []
    for name, module, pattern in matches:
        producer, activation, consumer = (module.get_submodule(part)
                                          for part in (pattern.producer, pattern.activation, pattern.consumer))
        if _can_fold(producer, activation, consumer):
            module.set_submodule(pattern.activation, FoldedActivation(activation))
            producer.sign_output = SignOutput(activation, consumer)
            folded.append(f"{name}.{pattern.producer}" if name else pattern.producer)
    return folded


def unfold_sign_outputs(model: nn.Module) -> None:
    """Undo `fold_sign_outputs`, in place: every layer writes floats and the activations are unwrapped."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FoldedActivation):
            model.set_submodule(name, module.activation)
        elif isinstance(module, BinaryLinear):
            module.sign_output = None
