"""Embedding tables in int8 (one scale per row) or in 4 bits (one scale per group of columns), for packed inference
checkpoints.

int8 (`Int8Embedding`): row `r` of a table `E` is stored as `q_r = round(E_r / c_r)` in int8 with the float32 scale
`c_r = max_i |E_ri| / 127` (`c_r = 1` for an all-zero row), so `|E_ri - c_r q_ri| <= c_r / 2`; 4x smaller than
float32.

4-bit (`Int4Embedding`): each row is cut into groups of `G` consecutive columns (`G` divides the width; `G` = the
width is one scale per row). Column `i` of row `r` lies in group `g = i // G`, stored as the code
`q_ri = round(E_ri / c_rg)` in the symmetric levels -7..7 with the float32 scale `c_rg = max_{i in g} |E_ri| / 7`
(`c_rg = 1` for an all-zero group), so `|E_ri - c_rg q_ri| <= c_rg / 2`. Codes are stored offset by 8 (nibbles
1..15; 0 only pads), two per uint8 byte: byte `k` of a row holds column `2k` in its low nibble and column `2k + 1` in
its high nibble (an odd width pads the last high nibble with 0). A table of `R x D` takes `R * ceil(D / 2)` bytes of
codes and `4 * R * D / G` bytes of scales: `4 + 32 / G` bits a value (4.25 at `G = 128`) against float32's 32.

A lookup gathers the codes and scales of the requested ids and dequantises only those rows (`c * q`, in float32):
the table stays int8 or 4-bit in memory.

`quantize_embeddings(model, bits=8 | 4)` swaps `nn.Embedding` modules for these modules in place; a SURGE model
records the swapped names in `config.surge_int8_embeddings` (a list) or `config.surge_int4_embeddings` (name ->
`G`), so that `from_pretrained` rebuilds them before loading. The tables are for inference: a model with trainable
SURGE layers (which would train around frozen tables), and a transformers model without a SURGE config (whose
`from_pretrained` would not know the quantized tensors and reload random embeddings), are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from .configuration_utils import SurgeConfigMixin
from .layers import SURGE_LAYER_TYPES

_INT8_MAX = 127
_INT4_MAX = 7
_INT4_OFFSET = 8  # stored nibble = code + 8, in 1..15
INT4_GROUP_SIZE = 128
"""The default number of columns that share one scale in a 4-bit table (chosen on a trained W1A1 MiniLM:
`benchmarks/README.md`)."""


def _symmetric_codes(weight: Tensor, group_size: int, max_code: int) -> tuple[Tensor, Tensor]:
    """`(q, c)`: int8 codes `q = round(E / c)` in `-max_code..max_code` of shape `(rows, columns)` and float32
    scales `c = max |E| / max_code` over each group of `group_size` columns, of shape `(rows, columns / group_size)`
    (1 for an all-zero group)."""
    weight = weight.detach().float()
    groups = weight.reshape(weight.shape[0], -1, group_size)
    scale = groups.abs().amax(dim=2) / max_code
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(groups / scale.unsqueeze(2)).clamp_(-max_code, max_code).to(torch.int8)
    return codes.reshape(weight.shape), scale


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """`(q, c)`: int8 rows `q_r = round(E_r / c_r)` and float32 scales `c_r = max|E_r| / 127` (1 for a zero row)."""
    codes, scale = _symmetric_codes(weight, weight.shape[1], _INT8_MAX)
    return codes, scale.squeeze(1)


def quantize_groups(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """`(q, c)`: 4-bit codes `q_ri = round(E_ri / c_rg)` in -7..7 (as int8, one per column) and float32 scales
    `c_rg = max_{i in g} |E_ri| / 7` of shape `(rows, columns / group_size)` (1 for a zero group)."""
    check_group_size(group_size, weight.shape[1])
    return _symmetric_codes(weight, group_size, _INT4_MAX)


def pack_nibbles(codes: Tensor) -> Tensor:
    """Codes in -7..7 of shape `(..., D)` as uint8 of shape `(..., ceil(D / 2))`: column `2k` + 8 in the low nibble
    of byte `k`, column `2k + 1` + 8 in its high nibble (0 pads an odd `D`)."""
    nibbles = (codes.to(torch.int16) + _INT4_OFFSET).to(torch.uint8)
    if codes.shape[-1] % 2:
        nibbles = F.pad(nibbles, (0, 1))
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor, num_columns: int) -> Tensor:
    """Inverse of `pack_nibbles`: the int8 codes of shape `(..., num_columns)`."""
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)[..., :num_columns]
    return nibbles.to(torch.int8) - _INT4_OFFSET


def check_group_size(group_size: object, embedding_dim: int | None = None, name: str | None = None) -> None:
    """Raise unless `group_size` is a positive integer that divides `embedding_dim` (the width of the embedding
    `name`; None: any width)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer that divides the embedding width (e.g. "
                         f"{INT4_GROUP_SIZE}), or None for {INT4_GROUP_SIZE}; got {group_size!r}.")
    if embedding_dim is not None and embedding_dim % group_size:
        divisor = max(d for d in range(1, group_size + 1) if embedding_dim % d == 0)
        table = "" if name is None else f" of the embedding {name!r}"
        raise ValueError(f"group_size={group_size} does not divide the width {embedding_dim}{table}; pass a divisor "
                         f"of {embedding_dim}, e.g. {divisor} (group_size={embedding_dim} is one scale per row).")


class QuantizedEmbedding(nn.Module):
    """An inference-only `nn.Embedding` whose table holds integer codes (the buffer `codes_name`) and float32 scales
    (`weight_scale`); subclasses define the codes (see the module docstring for the maths)."""

    format_name: str  # e.g. "int8", in messages
    config_field: str  # the config field of a SURGE model that lists these tables
    codes_name: str

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, **layout: int):
        """The quantized form of `embedding` (on its device); `layout`: the subclass's extra arguments."""
        if embedding.max_norm is not None:
            raise ValueError(f"{cls.__name__} does not support nn.Embedding(max_norm=...): it would rescale rows at "
                             "lookup time; keep this embedding in full precision.")
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, **layout)
        layer.store(embedding.weight)
        return layer

    def store(self, weight: Tensor) -> None:
        """Quantize the float table `weight` into the codes and scales."""
        raise NotImplementedError

    def scale_table(self) -> Tensor:
        """The scales as a 2-D table, one row per embedding row (what a lookup gathers)."""
        raise NotImplementedError

    def dequantize(self, codes: Tensor, scale: Tensor) -> Tensor:
        """Float rows from gathered `codes` and `scale` rows (any leading shape)."""
        raise NotImplementedError

    def __getattr__(self, name: str):
        """`weight`: the dequantised table, recomputed on each read (model code may read its dtype or device);
        neither a parameter nor a buffer, and never used by `forward`."""
        if name == "weight" and self.codes_name in self.__dict__.get("_buffers", {}):
            return self.dequantize(self._buffers[self.codes_name], self.scale_table())
        return super().__getattr__(name)

    def forward(self, ids: Tensor) -> Tensor:
        return self.dequantize(F.embedding(ids, self._buffers[self.codes_name]), F.embedding(ids, self.scale_table()))

    def extra_repr(self) -> str:
        padding = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.format_name} with {self._scales_repr()}{padding}"

    def _scales_repr(self) -> str:
        raise NotImplementedError


class Int8Embedding(QuantizedEmbedding):
    """Codes in int8 (`weight_int8`, one per column) with per-row float32 scales (`weight_scale`)."""

    format_name, config_field, codes_name = "int8", "surge_int8_embeddings", "weight_int8"

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    def store(self, weight: Tensor) -> None:
        self.weight_int8, self.weight_scale = quantize_rows(weight)

    def scale_table(self) -> Tensor:
        return self.weight_scale.unsqueeze(1)

    def dequantize(self, codes: Tensor, scale: Tensor) -> Tensor:
        return codes.to(scale.dtype) * scale

    def _scales_repr(self) -> str:
        return "per-row scales"


class Int4Embedding(QuantizedEmbedding):
    """4-bit codes packed two per byte (`weight_int4`, `ceil(D / 2)` bytes a row) with one float32 scale per group
    of `group_size` columns of a row (`weight_scale`, `D / group_size` a row)."""

    format_name, config_field, codes_name = "4-bit", "surge_int4_embeddings", "weight_int4"

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 group_size: int = INT4_GROUP_SIZE):
        check_group_size(group_size, embedding_dim)
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.group_size = group_size
        empty = torch.full((num_embeddings, (embedding_dim + 1) // 2), _INT4_OFFSET * 0x11, dtype=torch.uint8)
        self.register_buffer("weight_int4", empty)
        self.register_buffer("weight_scale", torch.ones(num_embeddings, embedding_dim // group_size))

    def store(self, weight: Tensor) -> None:
        codes, self.weight_scale = quantize_groups(weight, self.group_size)
        self.weight_int4 = pack_nibbles(codes)

    def scale_table(self) -> Tensor:
        return self.weight_scale

    def dequantize(self, codes: Tensor, scale: Tensor) -> Tensor:
        values = unpack_nibbles(codes, self.embedding_dim).to(scale.dtype)
        return values * scale.repeat_interleave(self.group_size, dim=-1)

    def _scales_repr(self) -> str:
        return f"a scale per {self.group_size} columns"


def embedding_names(model: nn.Module) -> list[str]:
    """Names of the `nn.Embedding` modules of `model`, in model order."""
    return [name for name, module in model.named_modules() if type(module) is nn.Embedding]


def quantize_embeddings(model: nn.Module, names: Iterable[str] | None = None, bits: int = 8,
                        group_size: int | None = None) -> list[str]:
    """Swap the `nn.Embedding` modules `names` (default: all of them) for their `Int8Embedding` (`bits=8`) or
    `Int4Embedding` (`bits=4`, one scale per `group_size` columns; None: `INT4_GROUP_SIZE`) in place; returns the
    names swapped, which a SURGE model also records in `config.surge_int8_embeddings` or
    `config.surge_int4_embeddings`.

    Raises, before changing anything, for other `bits`, a `group_size` with `bits=8` or one that does not divide
    the width of every table, if `model` cannot hold quantized tables (see the module docstring), if a name is not
    an `nn.Embedding` of `model`, or if an embedding shares its weight with another module (tied input/output
    embeddings)."""
    layout = _layout(bits, group_size)
    _check_inference_model(model)
    available = embedding_names(model)
    names = available if names is None else list(names)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not an nn.Embedding of this model; its embeddings are: "
                         f"{', '.join(available) or 'none'}.")
    for name in names:
        _check_quantizable(model, name, layout)
    table_type = Int4Embedding if bits == 4 else Int8Embedding
    quantized = {name: table_type.from_embedding(model.get_submodule(name), **layout) for name in names}
    for name, table in quantized.items():
        model.set_submodule(name, table)
    if isinstance(model, PreTrainedModel) and names:
        _record(model.config, names, layout)
    return names


def _layout(bits: int, group_size: int | None) -> dict[str, int]:
    """The extra constructor arguments of the table type for `bits` (`{}` for int8, `{"group_size": G}` for 4-bit)."""
    if not isinstance(bits, int) or bits not in (4, 8):
        raise ValueError(f"bits must be 8 (int8 codes, one scale per row) or 4 (4-bit codes, one scale per group of "
                         f"group_size columns), got {bits!r}.")
    if bits == 8:
        if group_size is not None:
            raise ValueError(f"group_size applies to bits=4 only (an int8 table has one scale per row); got "
                             f"group_size={group_size!r} with bits=8. Drop group_size, or pass bits=4.")
        return {}
    group_size = INT4_GROUP_SIZE if group_size is None else group_size
    check_group_size(group_size)
    return {"group_size": group_size}


def _check_quantizable(model: nn.Module, name: str, layout: dict[str, int]) -> None:
    """Raise if the embedding `name` of `model` shares its weight or does not fit `layout`."""
    embedding = model.get_submodule(name)
    shared = [other for other, param in model.named_parameters(remove_duplicate=False)
              if param is embedding.weight and not other.startswith(f"{name}.")]
    if shared:
        raise ValueError(f"The embedding {name!r} shares its weight with {shared[0]!r} (tied weights); "
                         "quantizing it would untie them. Leave it out of `names`.")
    if "group_size" in layout:
        check_group_size(layout["group_size"], embedding.embedding_dim, name)


def _record(config: SurgeConfigMixin, names: list[str], layout: dict[str, int]) -> None:
    """Add the quantized tables `names` to the config field that lets `from_pretrained` rebuild them."""
    if "group_size" in layout:
        config.surge_int4_embeddings = {**(config.surge_int4_embeddings or {}),
                                        **dict.fromkeys(names, layout["group_size"])}
    else:
        config.surge_int8_embeddings = [*(config.surge_int8_embeddings or []), *names]


def _check_inference_model(model: nn.Module) -> None:
    """Raise unless `model` is an inference model that keeps its quantized tables through a save and a load."""
    if any(isinstance(module, SURGE_LAYER_TYPES) for module in model.modules()):
        raise ValueError(
            "quantize_embeddings() applies to a packed (inference) model: this one has trainable SURGE layers, which "
            "would train around frozen quantized tables, and its train-form checkpoint would not load them. Call "
            "model.finalize() (surge_hf.finalize(model)) first."
        )
    if isinstance(model, PreTrainedModel) and not isinstance(model.config, SurgeConfigMixin):
        raise ValueError(
            f"quantize_embeddings() on a {type(model).__name__}: its from_pretrained would not know the quantized "
            "tables that save_pretrained writes and would reload the model with random embeddings. Binarize it with "
            "surge_hf.binarize and finalize it (a SURGE model records its quantized embeddings in its config), or "
            "keep its embeddings in full precision."
        )


def quantized_embedding_placeholders(model: nn.Module, int8_names: Iterable[str] = (),
                                     int4_group_sizes: Mapping[str, int] | None = None) -> None:
    """Swap the `nn.Embedding` modules `int8_names` for empty `Int8Embedding` modules, and those of
    `int4_group_sizes` for empty `Int4Embedding` modules with their group sizes, of the same shapes (to be filled by
    loading a checkpoint that holds their codes and scales)."""
    layouts = {name: (Int8Embedding, {}) for name in int8_names}
    layouts.update({name: (Int4Embedding, {"group_size": size}) for name, size in (int4_group_sizes or {}).items()})
    for name, (table_type, layout) in layouts.items():
        embedding = model.get_submodule(name)
        placeholder = table_type(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, **layout)
        model.set_submodule(name, placeholder.to(embedding.weight.device))


def dequantize_embeddings(model: nn.Module) -> list[str]:
    """Swap every `QuantizedEmbedding` of `model` for an `nn.Embedding` holding its dequantised rows, in place;
    returns the names swapped."""
    names = [name for name, module in model.named_modules() if isinstance(module, QuantizedEmbedding)]
    for name in names:
        table = model.get_submodule(name)
        rows = table.weight
        embedding = nn.Embedding(table.num_embeddings, table.embedding_dim, table.padding_idx, device=rows.device,
                                 dtype=rows.dtype)
        with torch.no_grad():
            embedding.weight.copy_(rows)
        model.set_submodule(name, embedding)
    return names
