"""Per-linear shortcuts around binary linears (Bi-Real Net / ReActNet / BinaryViT style).

`ShortcutLinear` wraps a binary linear `B: R^n -> R^m` (a `SurgeLinear`, or the packed `BinaryLinear` after
`finalize`) and computes, for an input `x`,

    z = B(x)                                      the binary linear; its RSign threshold is the learnable input shift
    u = LN(z) + S(x)                              LayerNorm over the m output features, plus the shortcut S
    v = z + g * (u - z)                           gate g, one per output feature (LayerScale-like)
    y = PReLU_beta(v - gamma) + zeta              RPReLU: slope beta, shifts gamma and zeta, one per output feature

The shortcut `S` changes the width when needed: `S(x) = x` when `m == n`; when `m = k * n` it repeats `x` k times
(`[x, x, ..., x]`, the FFN expansion); when `n = k * m` it averages each group of k consecutive features (the FFN
contraction). Other ratios are an error.

Initial values: beta = 1, gamma = zeta = 0 (RPReLU is the identity) and g = `SurgeConfig.shortcut_gate_init`.
With g = 1 the layer is BinaryViT's `RPReLU(LN(B(x)) + S(x))` (training from scratch). With g = 0 it computes
`y = B(x)` exactly, so adding shortcuts to a trained binary model keeps its function at step 0 and the gate learns
how much of the normalised, shortcut path to take.

Everything but `B` stays in full precision in the packed model (`finalize` packs only the wrapped layer), and
`surge_hf.summary` counts it as full-precision parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import initialization as init

from .configuration_surge import SurgeConfig, renamed_surge_config_keyword
from .layers import BinaryLinear, SurgeLinear


def _shortcut_kind(in_features: int, out_features: int) -> tuple[str, int]:
    """("identity" | "repeat" | "average", k) for a shortcut from n = `in_features` to m = `out_features`."""
    if in_features == out_features:
        return "identity", 1
    if out_features % in_features == 0:
        return "repeat", out_features // in_features
    if in_features % out_features == 0:
        return "average", in_features // out_features
    raise ValueError(
        f"A shortcut from {in_features} to {out_features} features needs one width to be a multiple of the other "
        "(repeat for expansion, average-pool for contraction); exclude this layer from the recipe "
        "(SurgeConfig.exclude_modules) or set shortcuts=False."
    )


def shortcut(x: Tensor, kind: str, factor: int) -> Tensor:
    """S(x): x, x repeated `factor` times along the last dimension, or the mean of groups of `factor` features."""
    if kind == "repeat":
        return x.repeat(*([1] * (x.dim() - 1)), factor)
    if kind == "average":
        return x.unflatten(-1, (-1, factor)).mean(dim=-1)
    return x


class ShortcutLinear(nn.Module):
    """A binary linear with a LayerNorm, a (width-changing) shortcut, a gate and an RPReLU (see the module docs).

    Args:
        layer: the binary linear (`SurgeLinear` or `BinaryLinear`); kept as the child `layer`.
        gate_init: the initial gate g (1: BinaryViT block; 0: exactly the wrapped layer).
    """

    def __init__(self, layer: nn.Module, gate_init: float = 1.0):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.shortcut_kind, self.shortcut_factor = _shortcut_kind(self.in_features, self.out_features)
        self.gate_init = float(gate_init)
        self.layer = layer
        # The layer's device and dtype: from its latent weight, bias or threshold, else its weight scales.
        reference = next(iter(layer.parameters()), None)
        reference = layer.weight_scale if reference is None else reference
        factory = {"device": reference.device, "dtype": reference.dtype}
        self.norm = nn.LayerNorm(self.out_features, **factory)
        self.gate = nn.Parameter(torch.full((self.out_features,), self.gate_init, **factory))
        self.prelu_slope = nn.Parameter(torch.ones(self.out_features, **factory))
        self.shift_in = nn.Parameter(torch.zeros(self.out_features, **factory))
        self.shift_out = nn.Parameter(torch.zeros(self.out_features, **factory))

    def forward(self, x: Tensor) -> Tensor:
        z = self.layer(x)
        u = self.norm(z) + shortcut(x, self.shortcut_kind, self.shortcut_factor).to(z.dtype)
        v = z + self.gate.to(z.dtype) * (u - z)
        t = v - self.shift_in.to(z.dtype)
        return torch.where(t > 0, t, self.prelu_slope.to(z.dtype) * t) + self.shift_out.to(z.dtype)

    def extra_repr(self) -> str:
        return f"shortcut={self.shortcut_kind}x{self.shortcut_factor}, gate_init={self.gate_init:g}"


def init_shortcut_parameters(module: ShortcutLinear) -> None:
    """The initial values (see the module docstring), through `transformers.initialization` so that tensors
    loaded by `from_pretrained` are left untouched."""
    init.ones_(module.norm.weight)
    init.zeros_(module.norm.bias)
    init.constant_(module.gate, module.gate_init)
    init.ones_(module.prelu_slope)
    init.zeros_(module.shift_in)
    init.zeros_(module.shift_out)


@renamed_surge_config_keyword("config")
def add_shortcuts(model: nn.Module, surge_config: SurgeConfig) -> nn.Module:
    """Wrap every binary linear of `model` (trainable or packed) in a `ShortcutLinear`, in place.

    Convolutions are left as they are (residual CNNs have their own shortcuts). Raises `ValueError` when the model
    has no binary linear or already has shortcuts.
    """
    if any(isinstance(module, ShortcutLinear) for module in model.modules()):
        raise ValueError("This model already has shortcuts around its binary linears; add_shortcuts() applies once.")
    names = [name for name, module in model.named_modules() if isinstance(module, (SurgeLinear, BinaryLinear))]
    if not names:
        raise ValueError("SurgeConfig.shortcuts=True needs binarized Linear layers, but the recipe binarizes none; "
                         "target Linear modules or set shortcuts=False.")
    for name in names:
        model.set_submodule(name, ShortcutLinear(model.get_submodule(name), surge_config.shortcut_gate_init))
    return model
