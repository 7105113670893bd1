"""Embedding tables in int8 with one scale per row, for packed inference checkpoints.

Row `r` of a table `E` is stored as `q_r = round(E_r / c_r)` in int8 with the float32 scale `c_r = max_i |E_ri| / 127`
(`c_r = 1` for an all-zero row), so `|E_ri - c_r q_ri| <= c_r / 2`. A lookup gathers the int8 rows of the requested
ids and dequantises only those (`c_r * q_r`, in float32): the table stays int8 in memory, 4x smaller than float32.

`quantize_embeddings(model)` swaps `nn.Embedding` modules for `Int8Embedding` in place; a SURGE model records the
swapped names in `config.surge_int8_embeddings`, so that `from_pretrained` rebuilds them before loading. The tables
are for inference: a model with trainable SURGE layers (which would train around frozen tables), and a transformers
model without a SURGE config (whose `from_pretrained` would not know the int8 tensors and reload random
embeddings), are refused.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from .configuration_utils import SurgeConfigMixin
from .layers import SURGE_LAYER_TYPES

_INT8_MAX = 127


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """`(q, c)`: int8 rows `q_r = round(E_r / c_r)` and float32 scales `c_r = max|E_r| / 127` (1 for a zero row)."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1) / _INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.round(weight / scale.unsqueeze(1)).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return quantized, scale


class Int8Embedding(nn.Module):
    """An inference-only `nn.Embedding` whose table is int8 (`weight_int8`) with per-row float32 scales
    (`weight_scale`); see the module docstring for the maths."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        """The int8 form of `embedding` (on its device)."""
        if embedding.max_norm is not None:
            raise ValueError("Int8Embedding does not support nn.Embedding(max_norm=...): it would rescale rows at "
                             "lookup time; keep this embedding in full precision.")
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx)
        quantized, scale = quantize_rows(embedding.weight)
        layer.weight_int8, layer.weight_scale = quantized, scale
        return layer

    def __getattr__(self, name: str):
        """`weight`: the dequantised table `c_r * q_r`, recomputed on each read (model code may read its dtype or
        device); neither a parameter nor a buffer, and never used by `forward`."""
        if name == "weight" and "weight_int8" in self.__dict__.get("_buffers", {}):
            return self.weight_int8.float() * self.weight_scale.unsqueeze(1)
        return super().__getattr__(name)

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.weight_int8)
        return rows.to(self.weight_scale.dtype) * F.embedding(ids, self.weight_scale.unsqueeze(1))

    def extra_repr(self) -> str:
        padding = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 with per-row scales{padding}"


def embedding_names(model: nn.Module) -> list[str]:
    """Names of the `nn.Embedding` modules of `model`, in model order."""
    return [name for name, module in model.named_modules() if type(module) is nn.Embedding]


def quantize_embeddings(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Swap the `nn.Embedding` modules `names` (default: all of them) for their `Int8Embedding`, in place; returns
    the names swapped, which a SURGE model also records in `config.surge_int8_embeddings`.

    Raises if `model` cannot hold int8 tables (see the module docstring), if a name is not an `nn.Embedding` of
    `model`, or if an embedding shares its weight with another module (tied input/output embeddings)."""
    _check_inference_model(model)
    available = embedding_names(model)
    names = available if names is None else list(names)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not an nn.Embedding of this model; its embeddings are: "
                         f"{', '.join(available) or 'none'}.")
    for name in names:
        embedding = model.get_submodule(name)
        shared = [other for other, param in model.named_parameters(remove_duplicate=False)
                  if param is embedding.weight and not other.startswith(f"{name}.")]
        if shared:
            raise ValueError(f"The embedding {name!r} shares its weight with {shared[0]!r} (tied weights); "
                             "quantizing it would untie them. Leave it out of `names`.")
        model.set_submodule(name, Int8Embedding.from_embedding(embedding))
    if isinstance(model, PreTrainedModel):
        model.config.surge_int8_embeddings = [*(model.config.surge_int8_embeddings or []), *names]
    return names


def _check_inference_model(model: nn.Module) -> None:
    """Raise unless `model` is an inference model that keeps its int8 tables through a save and a load."""
    if any(isinstance(module, SURGE_LAYER_TYPES) for module in model.modules()):
        raise ValueError(
            "quantize_embeddings() applies to a packed (inference) model: this one has trainable SURGE layers, which "
            "would train around frozen int8 tables, and its train-form checkpoint would not load them. Call "
            "model.finalize() (surge_hf.finalize(model)) first."
        )
    if isinstance(model, PreTrainedModel) and not isinstance(model.config, SurgeConfigMixin):
        raise ValueError(
            f"quantize_embeddings() on a {type(model).__name__}: its from_pretrained would not know the int8 tables "
            "that save_pretrained writes and would reload the model with random embeddings. Binarize it with "
            "surge_hf.binarize and finalize it (a SURGE model records its int8 embeddings in its config), or keep "
            "its embeddings in full precision."
        )


def int8_embedding_placeholders(model: nn.Module, names: Iterable[str]) -> None:
    """Swap the `nn.Embedding` modules `names` for empty `Int8Embedding` modules of the same shape (to be filled by
    loading a checkpoint that holds their int8 rows and scales)."""
    for name in names:
        embedding = model.get_submodule(name)
        placeholder = Int8Embedding(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx)
        model.set_submodule(name, placeholder.to(embedding.weight.device))


def dequantize_embeddings(model: nn.Module) -> list[str]:
    """Swap every `Int8Embedding` of `model` for an `nn.Embedding` holding its dequantised rows, in place; returns
    the names swapped."""
    names = [name for name, module in model.named_modules() if isinstance(module, Int8Embedding)]
    for name in names:
        int8 = model.get_submodule(name)
        embedding = nn.Embedding(int8.num_embeddings, int8.embedding_dim, int8.padding_idx,
                                 device=int8.weight_int8.device, dtype=int8.weight_scale.dtype)
        with torch.no_grad():
            embedding.weight.copy_(int8.weight)
        model.set_submodule(name, embedding)
    return names
