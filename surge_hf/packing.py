"""1-bit packing of sign weights.

A binary weight matrix of shape `(out, n)` (a conv kernel is flattened to `n = in/groups * kh * kw`) is stored as
`uint8` of shape `(out, ceil(n / 8))`: bit `j` (least significant first) of byte `k` in row `o` is 1 when
`W[o, 8k + j] >= 0` (sign +1) and 0 when the sign is -1. Padding bits of the last byte are 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

_BIT_WEIGHTS = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)


def packed_row_bytes(num_columns: int) -> int:
    """Bytes per packed row of `num_columns` signs."""
    return (num_columns + 7) // 8


def pack_signs(weight: Tensor) -> Tensor:
    """Pack the signs of `weight` (any shape with a leading output dim) into `uint8` of shape `(out, ceil(n/8))`."""
    bits = (weight.detach().reshape(weight.shape[0], -1) >= 0).to(torch.uint8)
    num_columns = bits.shape[1]
    pad = packed_row_bytes(num_columns) * 8 - num_columns
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(bits.shape[0], -1, 8)
    return (bits * _BIT_WEIGHTS.to(bits.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of `pack_signs`: a tensor of `shape` holding +1 / -1 in `dtype`."""
    shape = tuple(shape)
    num_columns = 1
    for dim in shape[1:]:
        num_columns *= dim
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise ValueError(f"Packed signs must be a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}.")
    expected = (shape[0], packed_row_bytes(num_columns))
    if tuple(packed.shape) != expected:
        raise ValueError(
            f"Packed signs of shape {tuple(packed.shape)} do not fit a weight of shape {shape}: expected {expected}."
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    bits = bits.reshape(shape[0], -1)[:, :num_columns]
    return bits.to(dtype).mul_(2).sub_(1).reshape(shape)
