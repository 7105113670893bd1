"""`summary(model)`: a bit account of a (binarized) model, in the spirit of larq's model summary.

For every module that owns parameters or buffers:
- binary parameters: weights stored at 1 bit (latent weights of SURGE layers, packed bits of finalized layers);
- scale parameters: the per-channel scales alpha of binary weights (stored as full-precision numbers);
- int8 parameters: embedding tables stored in int8 with per-row scales (`Int8Embedding`; the scales count as
  scale parameters);
- int4 parameters: embedding tables stored in 4 bits, two a byte, with per-group scales (`Int4Embedding`; the
  scales count as scale parameters);
- full-precision parameters: everything else needed at inference (biases, thresholds, embeddings, norms, heads);
- training-only parameters: the auxiliary weights W_a, dropped by `finalize`.

Sizes: `packed_bytes = sum over binary layers of out * ceil(n / 8) + int8 + sum over 4-bit tables of rows *
ceil(width / 2) + bytes(scales) + bytes(full precision)` with full-precision numbers at 4 bytes;
`float32_bytes = 4 * (binary + int8 + int4 + full precision)`, the same model with every weight in float32 and no
scales. When example inputs are given, a forward pass counts the multiply-accumulates of every Linear/Conv2d module
(binary or not), so the binary share of those MACs can be reported; matmuls outside modules (attention scores) are
not counted. `summary(model, ..., deployment=measure_deployment(...))` adds the
measured speed and memory of the packed model on this machine (`surge_hf.analysis.deployment`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..embeddings import Int4Embedding, Int8Embedding
from ..kernels import PackedSigns
from ..layers import BINARY_LAYER_TYPES, SURGE_LAYER_TYPES
from ..packing import packed_row_bytes
from .deployment import DeploymentReport

_FLOAT_BYTES = 4


@dataclass
class LayerAccount:
    """The bit account of one module."""

    name: str
    kind: str
    binary_params: int = 0
    scale_params: int = 0
    int8_params: int = 0
    int4_params: int = 0
    int4_bytes: int = 0
    full_precision_params: int = 0
    training_only_params: int = 0
    packed_weight_bytes: int = 0
    macs: int | None = None
    binary_macs: bool = False


@dataclass
class BitAccount:
    """Per-layer rows and totals; `str()` gives a table."""

    layers: list[LayerAccount] = field(default_factory=list)
    deployment: DeploymentReport | None = None

    def total(self, attribute: str) -> int:
        return sum(getattr(layer, attribute) for layer in self.layers)

    @property
    def binary_params(self) -> int:
        return self.total("binary_params")

    @property
    def full_precision_params(self) -> int:
        return self.total("full_precision_params") + self.total("scale_params")

    @property
    def training_only_params(self) -> int:
        return self.total("training_only_params")

    @property
    def int8_params(self) -> int:
        return self.total("int8_params")

    @property
    def int4_params(self) -> int:
        return self.total("int4_params")

    @property
    def packed_bytes(self) -> int:
        """Inference size with binary weights at 1 bit, int8 tables at 1 byte, 4-bit tables at two values a byte and
        every other number at 4 bytes."""
        return (self.total("packed_weight_bytes") + self.int8_params + self.total("int4_bytes")
                + _FLOAT_BYTES * self.full_precision_params)

    @property
    def float32_bytes(self) -> int:
        """Size of the same model with every weight in float32 (no scales)."""
        return _FLOAT_BYTES * (self.binary_params + self.int8_params + self.int4_params
                               + self.total("full_precision_params"))

    @property
    def compression_ratio(self) -> float:
        return self.float32_bytes / self.packed_bytes if self.packed_bytes else math.nan

    @property
    def binarized_layer_compression_ratio(self) -> float:
        """float32 bytes of the binary weights / (their packed bits + their scales)."""
        packed = self.total("packed_weight_bytes") + _FLOAT_BYTES * self.total("scale_params")
        return _FLOAT_BYTES * self.binary_params / packed if packed else math.nan

    @property
    def binary_mac_share(self) -> float | None:
        """Share of the counted multiply-accumulates done by binary layers (None without example inputs)."""
        counted = [layer for layer in self.layers if layer.macs is not None]
        if not counted:
            return None
        total = sum(layer.macs for layer in counted)
        return sum(layer.macs for layer in counted if layer.binary_macs) / total if total else 0.0

    def to_dict(self) -> dict:
        """The totals; with `int8_params` / `int4_params` when the model has such tables and `deployment` when it was
        measured."""
        extra = {key: count for key, count in (("int8_params", self.int8_params), ("int4_params", self.int4_params))
                 if count}
        if self.deployment is not None:
            extra["deployment"] = self.deployment.to_dict()
        return {**extra,
            "binary_params": self.binary_params,
            "full_precision_params": self.full_precision_params,
            "training_only_params": self.training_only_params,
            "packed_bytes": self.packed_bytes,
            "float32_bytes": self.float32_bytes,
            "compression_ratio": self.compression_ratio,
            "binarized_layer_compression_ratio": self.binarized_layer_compression_ratio,
            "binary_mac_share": self.binary_mac_share,
        }

    def __str__(self) -> str:
        header = f"{'layer':<48} {'kind':<14} {'1-bit':>11} {'full prec.':>11} {'train-only':>11} {'MACs':>13}"
        lines = [header, "-" * len(header)]
        for row in self.layers:
            macs = "" if row.macs is None else f"{row.macs:,}"
            lines.append(
                f"{row.name[-48:]:<48} {row.kind:<14} {row.binary_params:>11,} "
                f"{row.full_precision_params + row.scale_params:>11,} {row.training_only_params:>11,} {macs:>13}"
            )
        lines.append("-" * len(header))
        lines.append(
            f"{'total':<48} {'':<14} {self.binary_params:>11,} {self.full_precision_params:>11,} "
            f"{self.training_only_params:>11,}"
        )
        lines.append(f"packed size: {self.packed_bytes / 2**20:.2f} MiB; float32 size: "
                     f"{self.float32_bytes / 2**20:.2f} MiB; compression {self.compression_ratio:.1f}x "
                     f"(binarized layers {self.binarized_layer_compression_ratio:.1f}x)")
        if self.binary_mac_share is not None:
            lines.append(f"binary share of Linear/Conv2d multiply-accumulates: {100 * self.binary_mac_share:.1f}%")
        if self.int8_params:
            lines.append(f"int8 embedding parameters (per-row scales counted as full precision): "
                         f"{self.int8_params:,}")
        if self.int4_params:
            lines.append(f"4-bit embedding parameters (per-group scales counted as full precision): "
                         f"{self.int4_params:,}")
        if self.deployment is not None:
            lines.append(f"deployment: {self.deployment}".replace("\n", "\n  "))
        return "\n".join(lines)


def _account(name: str, module: nn.Module) -> LayerAccount | None:
    """The row of one module from its own parameters (and, for packed layers, its bit and scale buffers)."""
    params = dict(module.named_parameters(recurse=False))
    packed = isinstance(module, BINARY_LAYER_TYPES) and module.surge_config.binarize_weights
    if isinstance(module, Int8Embedding):
        return LayerAccount(name=name, kind=type(module).__name__, int8_params=module.weight_int8.numel(),
                            scale_params=module.weight_scale.numel())
    if isinstance(module, Int4Embedding):
        return LayerAccount(name=name, kind=type(module).__name__, scale_params=module.weight_scale.numel(),
                            int4_params=module.num_embeddings * module.embedding_dim,
                            int4_bytes=module.weight_int4.numel())
    if not params and not packed:
        return None
    row = LayerAccount(name=name or "(root)", kind=type(module).__name__)
    recipe = getattr(module, "surge_config", None)
    if isinstance(module, SURGE_LAYER_TYPES) and recipe.binarize_weights:
        weight = params.pop("weight")
        row.binary_params = weight.numel()
        row.packed_weight_bytes = weight.shape[0] * packed_row_bytes(weight[0].numel())
        row.scale_params = weight.shape[0] if recipe.weight_scale == "channel" else 1
    elif packed:
        row.binary_params = math.prod(module.weight_shape)
        row.packed_weight_bytes = module.weight_packed.numel()
        row.scale_params = module.weight_scale.numel()
    params.pop("aux_weight", None)
    aux = getattr(module, "aux_weight", None) if isinstance(module, SURGE_LAYER_TYPES) else None  # or a buffer
    row.training_only_params = 0 if aux is None else aux.numel()
    row.full_precision_params = sum(p.numel() for p in params.values())
    row.binary_macs = recipe is not None and recipe.binarize_weights and recipe.binarize_activations
    return row


def _count_macs(model: nn.Module, rows: dict[str, LayerAccount], args: tuple, kwargs: dict) -> None:
    counted_types = (nn.Linear, nn.Conv2d) + BINARY_LAYER_TYPES

    def hook(name: str):
        def record(module: nn.Module, inputs, output: torch.Tensor | PackedSigns) -> None:
            if hasattr(module, "kernel_size"):
                in_channels = module.in_channels // module.groups
                per_output = in_channels * math.prod(module.kernel_size)
            else:
                per_output = module.in_features
            rows[name].macs = (rows[name].macs or 0) + output.shape.numel() * per_output  # sign outputs too
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules()
               if isinstance(module, counted_types) and name in rows]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def summary(model: nn.Module, *example_args, deployment: DeploymentReport | None = None,
            **example_kwargs) -> BitAccount:
    """The bit account of `model`; pass example inputs (as for `model(...)`) to also count MACs, and a
    `measure_deployment` report to include the measured speed and memory."""
    rows = {}
    for name, module in model.named_modules():
        row = _account(name, module)
        if row is not None:
            rows[name] = row
    if example_args or example_kwargs:
        _count_macs(model, rows, example_args, example_kwargs)
    return BitAccount(list(rows.values()), deployment)
