"""The XNOR-popcount CPU kernel: exact against integer references on every instruction set this CPU runs, on sizes
that are not multiples of the word (64) or panel (16) widths; errors on bad input; the warning and the reference
path where the kernel cannot be built or is turned off."""

from __future__ import annotations

import warnings

import pytest
import torch

from surge_hf import kernels
from surge_hf.packing import pack_signs

# (M rows, K inputs, N outputs): M = 1, K and N not multiples of 64 / 16, a K below one word, a partial row block.
SHAPES = [(1, 384, 384), (3, 65, 17), (9, 100, 33), (17, 64, 16), (8, 1, 1), (2, 200, 40)]


@pytest.fixture(scope="module")
def isas() -> list[str]:
    if not kernels.available():
        pytest.skip("the surge_hf CPU kernel could not be built here")
    return kernels.supported_isas()


def _pm1(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u >= 0, 1, -1).to(torch.int64)


def _operands(m: int, k: int, n: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator)
    weight = torch.randn(n, k, generator=generator)
    threshold = 0.3 * torch.randn(k, generator=generator)
    x[0, 0] = threshold[0]  # x - tau == 0 exactly: sign +1
    return x, weight, threshold


def test_activation_bits_are_the_packed_signs_of_x_minus_tau(isas):
    for isa in isas:
        with kernels.use_isa(isa):
            for m, k, _ in SHAPES:
                x, _, threshold = _operands(m, k, 1)
                bits = kernels.pack_activation_bits(x, threshold)
                assert bits.shape == (m, (k + 63) // 64) and bits.dtype == torch.int64
                assert torch.equal(bits.view(torch.uint8)[:, : (k + 7) // 8], pack_signs(x - threshold)), (isa, k)
                plain = kernels.pack_activation_bits(x)
                assert torch.equal(plain.view(torch.uint8)[:, : (k + 7) // 8], pack_signs(x)), (isa, k)


def test_xnor_gemm_equals_the_integer_product_of_signs(isas):
    for isa in isas:
        with kernels.use_isa(isa):
            for m, k, n in SHAPES:
                x, weight, threshold = _operands(m, k, n)
                panels = kernels.pack_weight_panels(pack_signs(weight), k)
                dots = kernels.xnor_gemm(kernels.pack_activation_bits(x, threshold), panels, n, k)
                expected = (_pm1(x - threshold) @ _pm1(weight).T).to(torch.int32)
                assert dots.dtype == torch.int32 and torch.equal(dots, expected), (isa, m, k, n)


def test_binary_linear_scales_after_the_integer_product(isas):
    m, k, n = 5, 100, 33
    x, weight, threshold = _operands(m, k, n)
    alpha, scale, bias = weight.abs().mean(1), torch.tensor([0.37]), torch.randn(n)
    dots = (_pm1(x - threshold) @ _pm1(weight).T).to(torch.float32)
    panels = kernels.pack_weight_panels(pack_signs(weight), k)
    for isa in isas:
        with kernels.use_isa(isa):
            full = kernels.binary_linear(x, threshold, panels, n, alpha, scale, bias)
            assert torch.equal(full, dots * alpha * scale + bias), isa
            tensor_scale = kernels.binary_linear(x.reshape(1, m, k), threshold, panels, n, alpha[:1], None, None)
            assert torch.equal(tensor_scale, (dots * alpha[:1]).reshape(1, m, n)), isa


def test_padding_bits_of_the_packed_weight_never_count(isas):
    m, k, n = 4, 70, 5
    x, weight, _ = _operands(m, k, n)
    packed = pack_signs(weight)
    dirty = packed.clone()
    dirty[:, -1] |= 0b11000000  # the two bits past column 70 of the last byte
    bits = kernels.pack_activation_bits(x)
    clean_dots = kernels.xnor_gemm(bits, kernels.pack_weight_panels(packed, k), n, k)
    assert torch.equal(kernels.xnor_gemm(bits, kernels.pack_weight_panels(dirty, k), n, k), clean_dots)


def test_empty_batch_gives_an_empty_output(isas):
    panels = kernels.pack_weight_panels(pack_signs(torch.randn(3, 10)), 10)
    out = kernels.binary_linear(torch.empty(0, 10), None, panels, 3, torch.ones(3), None, None)
    assert out.shape == (0, 3)


def test_bad_inputs_are_rejected_with_the_expected_layout(isas):
    panels = kernels.pack_weight_panels(pack_signs(torch.randn(3, 10)), 10)
    with pytest.raises(RuntimeError, match=r"activations must be a contiguous 2-D float32 CPU tensor"):
        kernels.pack_activation_bits(torch.zeros(2, 10, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"do not hold 12 columns \(2 bytes per row\)"):
        kernels.pack_weight_panels(torch.zeros(3, 3, dtype=torch.uint8), 12)
    with pytest.raises(RuntimeError, match=r"weight panels must be contiguous int64 of shape \(1, 1, 16\)"):
        kernels.xnor_gemm(kernels.pack_activation_bits(torch.zeros(2, 10)), panels[:, :, :8].contiguous(), 3, 10)
    with pytest.raises(RuntimeError, match=r"threshold must be a contiguous float32 tensor of 10 values"):
        kernels.pack_activation_bits(torch.zeros(2, 10), torch.zeros(9))
    with pytest.raises(RuntimeError, match=r"alpha must hold 1 or 3 values, got 2"):
        kernels.binary_linear(torch.zeros(2, 10), None, panels, 3, torch.ones(2), None, None)
    with pytest.raises(RuntimeError, match=r"instruction set 'sse9' is not available on this CPU"):
        with kernels.use_isa("sse9"):
            pass


def test_disabling_the_kernel(monkeypatch, isas):
    with kernels.disabled():
        assert not kernels.available()
        with pytest.raises(RuntimeError, match="CPU kernel is not available"):
            kernels.isa()
    assert kernels.available()
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert not kernels.available()


def test_a_failed_build_warns_once_and_reports_unavailable(monkeypatch):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setitem(kernels._state, "loaded", None)
    with pytest.warns(RuntimeWarning, match=r"could not build its CPU kernel \(OSError: no C\+\+ compiler found\)"):
        assert not kernels.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not kernels.available()  # no second warning
