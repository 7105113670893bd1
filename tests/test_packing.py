"""1-bit packing: exact bytes (LSB first), round trips for every column count, conv shapes, input errors."""

from __future__ import annotations

import re

import pytest
import torch

from surge_hf.packing import pack_signs, packed_row_bytes, unpack_signs


def _reference_signs(weight: torch.Tensor) -> torch.Tensor:
    return torch.where(weight >= 0, 1.0, -1.0)


@pytest.mark.parametrize(("columns", "expected"), [(0, 0), (1, 1), (7, 1), (8, 1), (9, 2), (16, 2), (17, 3)])
def test_packed_row_bytes(columns: int, expected: int) -> None:
    assert packed_row_bytes(columns) == expected


def test_known_pattern_bytes_lsb_first() -> None:
    # Row 0 signs: + - + + - - - + | + -      -> bits 1,0,1,1,0,0,0,1 = 1+4+8+128 = 141 ; bits 1,0 -> 1
    # Row 1: all negative                    -> 0, 0
    # Row 2: all >= 0 (zeros and -0.0 count as +1) -> 255 ; last byte holds 2 bits -> 3 (padding bits stay 0)
    # Row 3: only column 7 and column 9 positive -> 128 ; 2
    weight = torch.tensor(
        [
            [0.5, -1.0, 2.0, 0.1, -0.2, -3.0, -0.5, 1.5, 4.0, -4.0],
            [-1.0] * 10,
            [0.0, -0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 1.0, 0.0, 5.0],
            [-1.0] * 7 + [1.0, -1.0, 1.0],
        ]
    )
    packed = pack_signs(weight)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[141, 1], [0, 0], [255, 3], [128, 2]]
    assert torch.equal(unpack_signs(packed, weight.shape), _reference_signs(weight))


@pytest.mark.parametrize("shape", [(3, 8), (3, 16), (5, 1), (5, 7), (4, 9), (2, 37), (6, 64)])
def test_linear_round_trip(shape: tuple[int, int]) -> None:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    weight[0, 0] = 0.0
    packed = pack_signs(weight)
    assert packed.shape == (shape[0], (shape[1] + 7) // 8)
    signs = unpack_signs(packed, shape)
    assert signs.dtype == torch.float32
    assert torch.equal(signs, _reference_signs(weight))


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (8, 2, 1, 1), (6, 4, 2, 2), (2, 1, 5, 5)])
def test_conv_round_trip(shape: tuple[int, ...]) -> None:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    columns = shape[1] * shape[2] * shape[3]
    packed = pack_signs(weight)
    assert packed.shape == (shape[0], (columns + 7) // 8)
    # the conv kernel is flattened row-major per output channel
    assert torch.equal(packed, pack_signs(weight.reshape(shape[0], columns)))
    signs = unpack_signs(packed, torch.Size(shape), dtype=torch.bfloat16)
    assert signs.dtype == torch.bfloat16 and signs.shape == shape
    assert torch.equal(signs, _reference_signs(weight).to(torch.bfloat16))


def test_pack_ignores_requires_grad_and_dtype() -> None:
    weight = torch.tensor([[1.0, -1.0, 0.0]], requires_grad=True)
    assert pack_signs(weight).tolist() == [[0b101]]
    assert pack_signs(weight.detach().to(torch.bfloat16)).tolist() == [[0b101]]


@pytest.mark.parametrize(
    "packed",
    [torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int8), torch.zeros(4, dtype=torch.uint8),
     torch.zeros(2, 2, 1, dtype=torch.uint8)],
)
def test_unpack_rejects_wrong_dtype_or_rank(packed: torch.Tensor) -> None:
    message = f"Packed signs must be a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}."
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        unpack_signs(packed, (2, 10))


@pytest.mark.parametrize(
    ("packed_shape", "weight_shape", "expected"),
    [((2, 3), (2, 10), (2, 2)), ((3, 2), (2, 10), (2, 2)), ((4, 3), (4, 3, 3, 3), (4, 4))],
)
def test_unpack_rejects_wrong_shape(packed_shape, weight_shape, expected) -> None:
    message = (
        f"Packed signs of shape {packed_shape} do not fit a weight of shape {weight_shape}: expected {expected}."
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        unpack_signs(torch.zeros(packed_shape, dtype=torch.uint8), weight_shape)
