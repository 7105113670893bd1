"""Binary attention (BiT / BinaryViT style): both attention matmuls of a transformers attention module run on binary
operands.

For one head with queries Q, keys K, values V (tokens x head_dim), the scale d^-1/2 and an additive mask M:

    S   = sign(Q) sign(K)^T * d^-1/2 + M          Q and K binarized (clipped straight-through gradient)
    P   = softmax(S)                                row-wise, in float32
    P_b = alpha * round(clip(P / alpha, 0, 1))      the probabilities binarized to {0, alpha} (round half to even)
    O   = P_b V

with alpha a learnable scale per head (initialised to `SurgeConfig.attention_alpha_init`). P_b is 0 where
P / alpha < 1/2 and alpha where P / alpha > 1/2, so `P_b V` adds up the selected value rows and scales them once.
Gradients
(straight-through inside the clip range and LSQ for alpha, as BiT's elastic binarizer; both binarizers are the
shared `quantizers.ActivationQuantizer`):

    dP_b/dP     = 1[0 <= P <= alpha]
    dP_b/dalpha = round(P / alpha) - P / alpha   for 0 <= P <= alpha,   1 for P > alpha

The values V stay real-valued (they are the output of the binary `v_proj`). The computation is the same in
training and in eval mode and has no auxiliary branch, so `finalize` keeps it exactly.

`add_binary_attention(model, config)` attaches a `BinaryAttentionProbabilities` (the alphas) to every attention
module (a module with `num_attention_heads`, `scaling` and `config`, e.g. `ViTAttention`, `BertSelfAttention`) and
selects the `surge_binary` attention function (registered with transformers' `AttentionInterface`) in the model
config. That function falls back to eager attention for modules without alphas.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers import initialization as init
from transformers.models.vit.modeling_vit import eager_attention_forward

from .configuration_surge import SurgeConfig
from .quantizers import ActivationQuantizer, ActivationSpec

ATTENTION_IMPLEMENTATION = "surge_binary"
SIGN = ActivationSpec()  # sign(x), clipped straight-through gradient
UNSIGNED_BINARY = ActivationSpec(bits=1, signed=False)  # codes round(clip(x / alpha, 0, 1)), LSQ gradients


class BinaryAttentionProbabilities(nn.Module):
    """P -> alpha * round(clip(P / alpha, 0, 1)) with one learnable alpha per head (see the module docstring)."""

    def __init__(self, num_heads: int, alpha_init: float):
        super().__init__()
        self.alpha_init = float(alpha_init)
        self.alpha = nn.Parameter(torch.full((num_heads,), self.alpha_init))

    def forward(self, probabilities: Tensor) -> Tensor:
        alpha = self.alpha.to(probabilities.dtype).reshape(1, -1, 1, 1)  # (batch, heads, queries, keys)
        return ActivationQuantizer.apply(probabilities, None, alpha, UNSIGNED_BINARY) * alpha

    def extra_repr(self) -> str:
        return f"heads={self.alpha.numel()}, alpha_init={self.alpha_init:g}"


def init_binary_attention_parameters(module: BinaryAttentionProbabilities) -> None:
    """alpha = `alpha_init`, through `transformers.initialization` (loaded values are left untouched)."""
    init.constant_(module.alpha, module.alpha_init)


def _sign(x: Tensor) -> Tensor:
    return ActivationQuantizer.apply(x, None, None, SIGN)


def binary_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs: Any) -> tuple[Tensor, Tensor]:
    """The `surge_binary` attention function (transformers' attention-interface signature; inputs are
    (batch, heads, tokens, head_dim)). Modules without `binary_attention` get eager attention."""
    binary = getattr(module, "binary_attention", None)
    if binary is None:
        return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                       **kwargs)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(_sign(query), _sign(key).transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probabilities = binary(torch.softmax(scores, dim=-1, dtype=torch.float32)).to(value.dtype)
    output = torch.matmul(probabilities, value).transpose(1, 2).contiguous()
    return output, probabilities


AttentionInterface.register(ATTENTION_IMPLEMENTATION, binary_attention_forward)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of the attention modules of a transformers model."""
    return [(name, module) for name, module in model.named_modules()
            if all(hasattr(module, attr) for attr in ("num_attention_heads", "scaling", "config"))]


def add_binary_attention(model: nn.Module, config: SurgeConfig) -> nn.Module:
    """Binarize the attention of every attention module of `model`, in place (see the module docstring)."""
    modules = attention_modules(model)
    if not modules:
        raise ValueError("SurgeConfig.binarize_attention=True needs transformers attention modules (with "
                         "num_attention_heads, scaling and config), but this model has none; set it to False.")
    for _, module in modules:
        if not hasattr(module, "binary_attention"):
            module.binary_attention = BinaryAttentionProbabilities(module.num_attention_heads,
                                                                   config.attention_alpha_init)
        module.config._attn_implementation = ATTENTION_IMPLEMENTATION
    return model
