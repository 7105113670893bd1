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

Inference on the CPU kernel: where no gradient is needed (see `uses_score_kernel`), the scores come from
`kernels.sign_scores`, which packs the signs of each query and key row once into 64-bit words and computes each
score as `float(d - 2 * popcount(q xor k)) * scaling`. The reference `torch.matmul(sign(Q), sign(K)^T)` sums +-1
terms, integers of magnitude at most d, exact in float32, and `* scaling` rounds the Python float to float32 and
multiplies once, as the kernel does, so the scores are bit for bit the reference path's (NaN rows and columns
included), and so is everything computed from them. The kernel pays at every size measured, down to one token (one
call instead of a dozen elementwise passes; 6-14x on the scores at BERT-base and ViT-small shapes on one thread,
`benchmarks/README.md`), so no size threshold applies.

`P_b V` stays `torch.matmul(P_b, V)`. The maths allows more: the entries of P_b are 0 or alpha, so
`O = alpha * (B V)` with `B = round(clip(P / alpha, 0, 1))` a 0/1 matrix, each output row the sum of the selected
value rows scaled once, with no multiplication (and B packable to bits). But V is real-valued: a float sum in
another order, or alpha applied once after the sum rather than to every term, rounds differently from the float
matmul, whose summation order is the BLAS library's own, so no other form is provably bitwise equal to it.

`add_binary_attention(model, surge_config)` attaches a `BinaryAttentionProbabilities` (the alphas) to every attention
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

from .configuration_surge import SurgeConfig, renamed_surge_config_keyword
from .kernels import available as kernels_available
from .kernels import sign_scores
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


def uses_score_kernel(module: nn.Module, query: Tensor, key: Tensor, scaling: Any) -> bool:
    """Whether the scores `sign(Q) sign(K)^T * scaling` of this call come from the CPU kernel (`kernels.sign_scores`,
    equal to the reference product bit for bit) rather than the reference float product: at inference (the module in
    eval mode, no gradient needed by Q or K: a packed model's projections have parameters, biases for one, so Q and K
    need none under `torch.no_grad()` or `torch.inference_mode()`), on float32 CPU inputs of one batch and head
    count, a Python number as the scale, not under CPU autocast (the reference path computes in the autocast dtype
    there), when the kernel is built and enabled; at any size (module docstring). Traced by `torch.compile` or
    `torch.export`, the kernel's operator becomes a node of the graph."""
    return (
        not module.training and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad))
        and query.device.type == "cpu" and query.dtype == torch.float32 and key.dtype == torch.float32
        and query.shape[:2] == key.shape[:2] and isinstance(scaling, (int, float))
        and not torch.is_autocast_enabled("cpu") and kernels_available()
    )


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
    if uses_score_kernel(module, query, key, scaling):
        scores = sign_scores(query, key, scaling)
    else:
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


@renamed_surge_config_keyword("config")
def add_binary_attention(model: nn.Module, surge_config: SurgeConfig) -> nn.Module:
    """Binarize the attention of every attention module of `model`, in place (see the module docstring)."""
    modules = attention_modules(model)
    if not modules:
        raise ValueError("SurgeConfig.binarize_attention=True needs transformers attention modules (with "
                         "num_attention_heads, scaling and config), but this model has none; set it to False.")
    for _, module in modules:
        if not hasattr(module, "binary_attention"):
            module.binary_attention = BinaryAttentionProbabilities(module.num_attention_heads,
                                                                   surge_config.attention_alpha_init)
        module.config._attn_implementation = ATTENTION_IMPLEMENTATION
    return model
