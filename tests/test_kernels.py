"""The XNOR-popcount CPU kernel: exact against integer references on every instruction set this CPU runs, on sizes
that are not multiples of the word (64) or panel (16) widths; binary convolutions exact against hand-computed cases,
explicit loops and float convolutions of the signs, the zero padding counting 0; packed linear and convolution layers
equal to their reference paths; errors on bad input; the warning and the reference path where the kernel cannot be
built or is turned off."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, pipeline

from conftest import pm1
from surge_hf import (
    SurgeBertConfig,
    SurgeBertForSequenceClassification,
    SurgeConfig,
    SurgeConv2d,
    SurgeLinear,
    kernels,
)
from surge_hf.layers import BinaryConv2d, BinaryLayer, BinaryLinear
from surge_hf.packing import pack_signs
from surge_hf.quantizers import ActivationSpec, activation_codes

MINILM = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "all-MiniLM-L6-v2"

# (M rows, K inputs, N outputs): M = 1, K and N not multiples of 64 / 16, a K below one word, a partial row block.
SHAPES = [(1, 384, 384), (3, 65, 17), (9, 100, 33), (17, 64, 16), (8, 1, 1), (2, 200, 40)]


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
                expected = (pm1(x - threshold) @ pm1(weight).T).to(torch.int32)
                assert dots.dtype == torch.int32 and torch.equal(dots, expected), (isa, m, k, n)


# (q_min, q_max): unsigned 1 bit (BiT's {0, 1}), signed 2, 4 and 8 bits, unsigned 4 bits.
LEVELS = [(0, 1), (-2, 1), (-8, 7), (-128, 127), (0, 15)]


def _codes(x: torch.Tensor, threshold: torch.Tensor, step: float, levels: tuple[int, int]) -> torch.Tensor:
    spec = ActivationSpec(bits=(levels[1] - levels[0] + 1).bit_length() - 1, signed=levels[0] < 0)
    return activation_codes(x, threshold, torch.tensor([step]), spec).to(torch.int64)


def test_code_planes_hold_the_quantizer_codes(isas):
    m, k = 5, 100
    x, _, threshold = _operands(m, k, 1)
    for isa in isas:
        with kernels.use_isa(isa):
            for levels in LEVELS:
                planes, counts = kernels.pack_activation_codes(x, threshold, 0.37, *levels)
                num_planes = planes.shape[0] // m
                bits = torch.stack([(planes.view(torch.uint8)[:, : (k + 7) // 8] >> j) & 1 for j in range(8)], -1)
                bits = bits.reshape(m, num_planes, -1)[:, :, :k].to(torch.int64)
                codes = levels[0] + sum(bits[:, b] << b for b in range(num_planes))
                assert torch.equal(codes, _codes(x, threshold, 0.37, levels)), (isa, levels)
                assert torch.equal(counts, bits.sum(-1).reshape(-1).to(torch.int32)), (isa, levels)


def test_code_gemm_equals_the_integer_product_of_codes_and_signs(isas):
    for isa in isas:
        with kernels.use_isa(isa):
            for (m, k, n), levels in zip(SHAPES * 2, LEVELS * 3):
                x, weight, threshold = _operands(m, k, n)
                packed = pack_signs(weight)
                planes, counts = kernels.pack_activation_codes(x, threshold, 0.21, *levels)
                dots = kernels.code_gemm(planes, counts, kernels.pack_weight_panels(packed, k),
                                         kernels.weight_row_counts(packed), n, k, *levels)
                expected = (_codes(x, threshold, 0.21, levels) @ pm1(weight).T).to(torch.int32)
                assert torch.equal(dots, expected), (isa, m, k, n, levels)


def test_binary_linear_scales_after_the_integer_product(isas):
    m, k, n = 5, 100, 33
    x, weight, threshold = _operands(m, k, n)
    alpha, scale, bias = weight.abs().mean(1), torch.tensor([0.37]), torch.randn(n)
    dots = (pm1(x - threshold) @ pm1(weight).T).to(torch.float32)
    panels = kernels.pack_weight_panels(pack_signs(weight), k)
    for isa in isas:
        with kernels.use_isa(isa):
            full = kernels.binary_linear(x, threshold, panels, n, alpha, scale, bias)
            assert torch.equal(full, dots * (alpha * scale) + bias), isa
            tensor_scale = kernels.binary_linear(x.reshape(1, m, k), threshold, panels, n, alpha[:1], None, None)
            assert torch.equal(tensor_scale, (dots * alpha[:1]).reshape(1, m, n)), isa


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


# (M, K, N) with enough work for two threads: split by row blocks, by panels (one row block), a partial row block.
PARALLEL_SHAPES = [(64, 640, 256), (8, 1024, 1040), (200, 100, 700)]


def test_products_split_over_threads_are_exact(isas, two_threads):
    for m, k, n in PARALLEL_SHAPES:
        x, weight, threshold = _operands(m, k, n)
        x[m // 2, 1] = float("nan")
        alpha, bias = weight.abs().mean(1), torch.randn(n)
        packed = pack_signs(weight)
        panels, weight_counts = kernels.pack_weight_panels(packed, k), kernels.weight_row_counts(packed)
        dots = pm1(x - threshold) @ pm1(weight).T
        expected = (dots.to(torch.float32) * alpha + bias).index_fill_(0, torch.tensor([m // 2]), float("nan"))
        codes = _codes(x.nan_to_num(), threshold, 0.21, (-8, 7)) @ pm1(weight).T
        expected_codes = codes.to(torch.float32) * (alpha * 0.21)
        for isa in isas:
            with kernels.use_isa(isa):
                bits = kernels.pack_activation_bits(x, threshold)
                assert torch.equal(kernels.xnor_gemm(bits, panels, n, k), dots.to(torch.int32)), (isa, m, k, n)
                out = kernels.binary_linear(x, threshold, panels, n, alpha, None, bias)
                torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True, msg=f"{isa} {m} {k} {n}")
                quantized = kernels.quantized_linear(x.nan_to_num(), threshold, torch.tensor([0.21]), (-8, 7), panels,
                                                     weight_counts, n, alpha, None)
                assert torch.equal(quantized, expected_codes), (isa, m, k, n)


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


# -- packed layers and models on the kernel ------------------------------------------------------------------------
def _packed(layer: SurgeLinear | SurgeConv2d) -> BinaryLinear | BinaryConv2d:
    """The packed counterpart of `layer` in eval mode, its thresholds drawn from N(0, 0.3^2), its input scale 0.37."""
    with torch.no_grad():
        if layer.input_threshold is not None:
            layer.input_threshold.normal_(0, 0.3)
        if layer.input_scale is not None:
            layer.input_scale.fill_(0.37)
    return (BinaryLinear if isinstance(layer, SurgeLinear) else BinaryConv2d).from_surge(layer).eval()


def _packed_linear(in_features: int, out_features: int, bias: bool, **recipe) -> BinaryLinear:
    torch.manual_seed(0)
    unsigned = recipe.get("unsigned_activation_modules") is not None
    return _packed(SurgeLinear(in_features, out_features, bias=bias, surge_config=SurgeConfig(**recipe),
                               unsigned_input=unsigned))


def _forbid_unpacking(monkeypatch) -> None:
    def unpack(self):
        raise AssertionError("the kernel path unpacked the weight")

    monkeypatch.setattr(BinaryLayer, "weight_signs", unpack)
    monkeypatch.setattr(BinaryLayer, "dequantized_weight", unpack)


def _assert_kernel_equals_reference(monkeypatch, isas, **recipe) -> None:
    """Packed layers of `recipe`, with and without bias, on 2-D and 3-D inputs (one with a NaN): every instruction
    set gives the reference path's output exactly (NaN rows where it has them), without unpacking the weight."""
    with_nan = torch.randn(3, 100)
    with_nan[1, 70] = float("nan")
    for bias in (True, False):
        layer = _packed_linear(100, 33, bias, **recipe)
        for x in (torch.randn(1, 100), torch.randn(2, 5, 100), with_nan):
            with kernels.disabled():
                expected = layer(x)
            with monkeypatch.context() as patch:
                _forbid_unpacking(patch)
                for isa in isas:
                    with kernels.use_isa(isa):
                        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0, equal_nan=True,
                                                   msg=f"{isa}, bias={bias}, shape {tuple(x.shape)}")
    assert expected[1].isnan().all() and not expected[[0, 2]].isnan().any()


def _assert_layer_kernel_equals_reference(kind: str, monkeypatch, isas, **recipe) -> None:
    check = _assert_kernel_equals_reference if kind == "linear" else _assert_conv_kernel_equals_reference
    check(monkeypatch, isas, **recipe)


# The reference path's F.conv2d with padding="same" and an even kernel warns that it copies the input.
SAME_PADDING_COPY = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


@SAME_PADDING_COPY
@pytest.mark.parametrize("binarizer", ["sign", "rsign", "elastic"])
@pytest.mark.parametrize("scale", ["channel", "tensor", "none"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_packed_layer_on_the_kernel_equals_the_reference_path(monkeypatch, isas, kind, binarizer, scale):
    _assert_layer_kernel_equals_reference(kind, monkeypatch, isas, activation_binarizer=binarizer, weight_scale=scale)


@SAME_PADDING_COPY
@pytest.mark.parametrize("recipe", [{"activation_bits": 2}, {"activation_bits": 4}, {"activation_bits": 8},
                                    {"unsigned_activation_modules": ".*"},
                                    {"activation_bits": 4, "unsigned_activation_modules": ".*"}])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_packed_layer_with_codes_on_the_kernel_equals_the_reference_path(monkeypatch, isas, kind, recipe):
    with torch.no_grad():  # codes other than signs take the kernel without gradients only
        _assert_layer_kernel_equals_reference(kind, monkeypatch, isas, activation_binarizer="elastic", **recipe)


def test_gradients_through_the_kernel_path_match_the_reference_path(isas):
    layer = _packed_linear(70, 9, True, activation_binarizer="elastic")
    layer.requires_grad_(True)
    x, grad = torch.randn(4, 70), torch.randn(4, 9)
    grads = []
    for use_kernel in (True, False):
        layer.zero_grad()
        kernels.set_enabled(use_kernel)
        try:
            layer(x).backward(grad)
        finally:
            kernels.set_enabled(True)
        grads.append((layer.bias.grad.clone(), layer.input_scale.grad.clone(), layer.input_threshold.grad))
    (bias, scale, threshold), (bias_ref, scale_ref, threshold_ref) = grads
    assert torch.equal(bias, bias_ref)
    assert threshold is None and (threshold_ref is None or not threshold_ref.any())  # sign(x - tau): no gradient
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=1e-6)


def test_other_inputs_take_the_reference_path(isas):
    layer = _packed_linear(20, 7, True)
    x = torch.randn(3, 20)
    assert layer.uses_kernel(x)
    assert not layer.uses_kernel(x.double()) and not layer.uses_kernel(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.uses_kernel(x)
    with kernels.disabled():
        assert not layer.uses_kernel(x)
    uniform = _packed_linear(20, 7, True, activation_binarizer="elastic", activation_bits=4)
    assert not uniform.uses_kernel(x)  # the reference path gives its step a gradient
    with torch.no_grad():
        assert uniform.uses_kernel(x)


def test_weight_panels_follow_the_loaded_bits(isas):
    layer = _packed_linear(20, 7, False)
    x = torch.randn(3, 20)
    before = layer(x)
    other = _packed_linear(20, 7, False, weight_scale="tensor")
    with torch.no_grad():
        layer.weight_packed.copy_(other.weight_packed.flip(0))  # in place: the cached panels must be rebuilt
    with kernels.disabled():
        expected = layer(x)
    assert torch.equal(layer(x), expected) and not torch.equal(expected, before)


@pytest.fixture(scope="module")
def packed_bert_dir(tmp_path_factory, isas) -> Path:
    """A tiny packed BERT classifier with the MiniLM tokenizer's vocabulary, saved with that tokenizer."""
    if not MINILM.is_dir():
        pytest.skip(f"{MINILM} is absent")
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=70, num_labels=2)
    torch.manual_seed(0)
    model = SurgeBertForSequenceClassification(SurgeBertConfig.from_bert_config(
        config, surge_config=SurgeConfig(activation_binarizer="elastic")))
    for layer in model.modules():
        if isinstance(layer, SurgeLinear):
            torch.nn.init.normal_(layer.input_threshold, 0, 0.2)
    path = tmp_path_factory.mktemp("packed-bert")
    model.save_pretrained(path, packed=True)
    tokenizer.save_pretrained(path)
    return path


def test_packed_bert_from_pretrained_and_pipeline_run_on_the_kernel(monkeypatch, packed_bert_dir):
    model = AutoModelForSequenceClassification.from_pretrained(packed_bert_dir)
    tokenizer = AutoTokenizer.from_pretrained(packed_bert_dir)
    texts = ["a gripping, beautifully shot film", "dull", "neither here nor there, but with a long tail of words"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # padded rows
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None)
    with torch.no_grad(), kernels.disabled():
        expected_logits = model(**batch).logits
        expected_scores = classifier(texts)
    with monkeypatch.context() as patch:
        _forbid_unpacking(patch)
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, expected_logits)
        assert classifier(texts) == expected_scores


# -- binary convolutions on the kernel -----------------------------------------------------------------------------
def _conv_operands(batch: int, channels: int, out_channels: int, kernel: int, height: int, width: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=generator)
    weight = torch.randn(out_channels, channels, kernel, kernel, generator=generator)
    threshold = 0.3 * torch.randn(channels, generator=generator)
    x[0, 0, 0, 0] = threshold[0]  # x - tau == 0 exactly: sign +1
    return x, weight, threshold


def _conv_panels(weight: torch.Tensor) -> torch.Tensor:
    return kernels.pack_conv_weight_panels(pack_signs(weight), weight.shape)


def _loop_conv(codes: torch.Tensor, weight_signs: torch.Tensor, geometry: kernels.ConvGeometry) -> torch.Tensor:
    """The integer convolution by explicit loops: each output sums code * sign over the taps inside the input only
    (a tap on the zero padding adds nothing)."""
    (kh, kw), (sh, sw), (top, _, left, _), (dh, dw) = geometry
    batch, channels, height, width = codes.shape
    out_h, out_w = geometry.output_size(height, width)
    out = torch.zeros(batch, weight_signs.shape[0], out_h, out_w, dtype=torch.int64)
    for b, j, oh, ow in itertools.product(range(batch), range(weight_signs.shape[0]), range(out_h), range(out_w)):
        for c, i, tap_j in itertools.product(range(channels), range(kh), range(kw)):
            ih, iw = oh * sh - top + i * dh, ow * sw - left + tap_j * dw
            if 0 <= ih < height and 0 <= iw < width:
                out[b, j, oh, ow] += int(codes[b, c, ih, iw]) * int(weight_signs[j, c, i, tap_j])
    return out


def test_a_padded_tap_counts_zero_not_a_sign(isas):
    """A 1-channel 3x3 convolution of a 4x4 input of +1 signs with padding 1: each output counts the taps inside the
    input (4 at a corner, 6 on an edge, 9 inside), as `F.conv2d` of the signs, whose padding is 0."""
    inside = torch.tensor([[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]], dtype=torch.float32)
    geometry = kernels.ConvGeometry.of(3, padding=1)
    x = torch.ones(1, 1, 4, 4)
    # Signs -1 but in column 1, a kernel of +1 with a -1 centre, scale 0.5, bias 1. A window row over columns
    # (ow - 1, ow, ow + 1) sees the signs (0 pad, -1, +1), (-1, +1, -1), (+1, -1, -1), (-1, -1, 0 pad) for ow = 0..3:
    # 0, -1, -1, -2 against the kernel's outer rows (+1 +1 +1), 2, -3, 1, 0 against its centre row (+1 -1 +1). Output
    # rows 0 and 3 have the centre row and one outer row inside the input, rows 1 and 2 all three.
    signs = -torch.ones(1, 1, 4, 4)
    signs[..., 1] = 1.0
    weight = torch.ones(1, 1, 3, 3)
    weight[0, 0, 1, 1] = -1.0
    dots = torch.tensor([[2, -4, 0, -2], [2, -5, -1, -4], [2, -5, -1, -4], [2, -4, 0, -2]], dtype=torch.float32)
    assert torch.equal(_loop_conv(signs, weight, geometry)[0, 0].to(torch.float32), dots)
    for isa in isas:
        with kernels.use_isa(isa):
            ones = kernels.binary_conv2d(x, None, _conv_panels(torch.ones(1, 1, 3, 3)), 1, geometry, torch.ones(1),
                                         None, None)
            assert torch.equal(ones, inside.reshape(1, 1, 4, 4)), isa
            negative = kernels.binary_conv2d(x, None, _conv_panels(-torch.ones(1, 1, 3, 3)), 1, geometry,
                                             torch.ones(1), None, None)
            assert torch.equal(negative, -inside.reshape(1, 1, 4, 4)), isa
            out = kernels.binary_conv2d(signs, None, _conv_panels(weight), 1, geometry, torch.tensor([0.5]), None,
                                        torch.tensor([1.0]))
            assert torch.equal(out, (dots * 0.5 + 1.0).reshape(1, 1, 4, 4)), isa


def test_small_convolutions_equal_an_explicit_loop(isas):
    """Random signs and codes, per-channel thresholds, every padding side: the kernel's integer products (unit scale)
    are the loop's sums over the taps inside the input."""
    cases = [(1, 1, 4, 4, 1, 3, 1, 1, 1), (2, 3, 5, 6, 4, 3, 2, (1, 2), 1), (1, 2, 7, 5, 3, 3, 1, 2, 2),
             (1, 2, 5, 5, 2, 2, 1, "same", 1), (2, 70, 3, 4, 17, 1, 2, 1, 1)]
    for batch, channels, height, width, n, kernel, stride, padding, dilation in cases:
        x, weight, threshold = _conv_operands(batch, channels, n, kernel, height, width)
        geometry = kernels.ConvGeometry.of(kernel, stride, padding, dilation)
        packed = pack_signs(weight)
        signs = _loop_conv(pm1(x - threshold.reshape(1, -1, 1, 1)), pm1(weight), geometry)
        codes = _loop_conv(_codes(x, threshold.reshape(1, -1, 1, 1), 0.4, (-8, 7)), pm1(weight), geometry)
        for isa in isas:
            with kernels.use_isa(isa):
                out = kernels.binary_conv2d(x, threshold, _conv_panels(weight), n, geometry, torch.ones(1), None, None)
                assert torch.equal(out, signs.to(torch.float32)), (isa, geometry)
                out = kernels.quantized_conv2d(x, threshold, torch.tensor([1.0]), (-8, 7), _conv_panels(weight),
                                               kernels.weight_row_counts(packed), n, geometry, torch.ones(1), None)
                expected = _loop_conv(_codes(x, threshold.reshape(1, -1, 1, 1), 1.0, (-8, 7)), pm1(weight), geometry)
                assert torch.equal(out, expected.to(torch.float32)), (isa, geometry)
        assert codes.abs().max() > 0  # (the codes at step 0.4 are not all zero)


def _reference_conv(x: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor, geometry: kernels.ConvGeometry,
                    alpha: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.conv2d` of the +-1 signs in float64 (exact), then the scale and the bias in float32, in the reference path's
    order."""
    (top, bottom, left, right) = geometry.padding
    signs = torch.nn.functional.pad(pm1(x - threshold.reshape(1, -1, 1, 1)).double(), (left, right, top, bottom))
    dots = torch.nn.functional.conv2d(signs, pm1(weight).double(), None, geometry.stride, 0, geometry.dilation)
    out = dots.to(torch.float32) * alpha.reshape(1, -1, 1, 1)
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


# Kernel 1x1, 3x3, 7x7; padding 0, 1, 2; stride 1, 2; dilation 1, 2; odd sizes; channels below, at and past a word.
CONV_GEOMETRIES = [(kernel, stride, padding, dilation) for kernel in (1, 3, 7) for padding in (0, 1, 2)
                   for stride in (1, 2) for dilation in (1, 2)]


@pytest.mark.parametrize(("batch", "channels", "out_channels"), [(1, 3, 5), (2, 64, 16), (3, 70, 33)])
def test_binary_conv2d_equals_the_float_convolution_of_the_signs(isas, batch, channels, out_channels):
    for kernel, stride, padding, dilation in CONV_GEOMETRIES:
        x, weight, threshold = _conv_operands(batch, channels, out_channels, kernel, 15, 13, seed=kernel + padding)
        geometry = kernels.ConvGeometry.of(kernel, stride, padding, dilation)
        alpha, bias = weight.abs().mean((1, 2, 3)), torch.randn(out_channels)
        expected = _reference_conv(x, weight, threshold, geometry, alpha, bias)
        panels = _conv_panels(weight)
        for isa in isas:
            with kernels.use_isa(isa):
                out = kernels.binary_conv2d(x, threshold, panels, out_channels, geometry, alpha, None, bias)
                assert out.shape == expected.shape and torch.equal(out, expected), (isa, geometry)


def test_conv_weight_panels_hold_each_tap_in_its_own_words():
    weight = torch.randn(18, 70, 3, 2, generator=torch.Generator().manual_seed(3))
    panels = _conv_panels(weight)
    assert panels.shape == (2, 3 * 2 * 2, 16) and panels.dtype == torch.int64
    rows = panels.permute(0, 2, 1).reshape(32, 12)[:18]  # (channel, word)
    bits = torch.stack([(rows >> b) & 1 for b in range(64)], -1).reshape(18, 3, 2, 128)  # (channel, i, j, 2 words)
    assert torch.equal(bits[..., :70], (weight >= 0).permute(0, 2, 3, 1).to(torch.int64))
    assert not bits[..., 70:].any()  # bits past the channels: 0
    assert not panels.permute(0, 2, 1).reshape(32, 12)[18:].any()  # rows past N: 0


def test_conv_outputs_follow_the_input_memory_format(isas):
    x, weight, threshold = _conv_operands(2, 5, 6, 3, 7, 6)
    geometry = kernels.ConvGeometry.of(3, 2, 1, 1)
    panels, alpha = _conv_panels(weight), weight.abs().mean((1, 2, 3))
    expected = _reference_conv(x, weight, threshold, geometry, alpha, None)
    channels_last = kernels.binary_conv2d(x.contiguous(memory_format=torch.channels_last), threshold, panels, 6,
                                          geometry, alpha, None, None)
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and torch.equal(channels_last, expected)
    plain = kernels.binary_conv2d(x, threshold, panels, 6, geometry, alpha, None, None)
    assert plain.is_contiguous() and torch.equal(plain, expected)
    strided = kernels.binary_conv2d(x.repeat_interleave(2, dim=3)[..., ::2], threshold, panels, 6,
                                    geometry, alpha, None, None)
    assert torch.equal(strided, expected)


def test_conv_products_split_over_threads_are_exact(isas, two_threads):
    """Enough work for two threads: split by row blocks (many output positions), by panels (few positions, many
    channels); a NaN in the input makes exactly the outputs whose window holds it NaN."""
    for batch, channels, n, size, padding in [(2, 64, 64, 20, 1), (1, 200, 520, 4, 1), (3, 70, 40, 9, 2)]:
        x, weight, threshold = _conv_operands(batch, channels, n, 3, size, size)
        x[batch - 1, 1, 2, 3] = float("nan")
        geometry = kernels.ConvGeometry.of(3, 1, padding, 1)
        alpha, bias = weight.abs().mean((1, 2, 3)), torch.randn(n)
        expected = _reference_conv(x.nan_to_num(), weight, threshold, geometry, alpha, bias)
        window = torch.nn.functional.conv2d(x.isnan().any(1, keepdim=True).double(), torch.ones(1, 1, 3, 3).double(),
                                            None, 1, padding)
        expected = expected.masked_fill(window.bool(), float("nan"))
        panels = _conv_panels(weight)
        codes = _loop_free_codes_reference(x.nan_to_num(), weight, threshold, geometry, alpha)
        for isa in isas:
            with kernels.use_isa(isa):
                out = kernels.binary_conv2d(x, threshold, panels, n, geometry, alpha, None, bias)
                torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True, msg=f"{isa} {batch} {n}")
                quantized = kernels.quantized_conv2d(x.nan_to_num(), threshold, torch.tensor([0.21]), (-8, 7), panels,
                                                     kernels.weight_row_counts(pack_signs(weight)), n, geometry,
                                                     alpha, None)
                assert torch.equal(quantized, codes), (isa, batch, n)
        assert expected.isnan().any() and not expected.isnan().all()


def _loop_free_codes_reference(x: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor,
                               geometry: kernels.ConvGeometry, alpha: torch.Tensor) -> torch.Tensor:
    """The reference of `quantized_conv2d` with 4-bit signed codes at step 0.21: `F.conv2d` of the codes in float64
    (exact; zero padding), scaled by alpha * step in float32."""
    codes = _codes(x, threshold.reshape(1, -1, 1, 1), 0.21, (-8, 7)).double()
    top, bottom, left, right = geometry.padding
    dots = torch.nn.functional.conv2d(torch.nn.functional.pad(codes, (left, right, top, bottom)), pm1(weight).double(),
                                      None, geometry.stride, 0, geometry.dilation)
    return dots.to(torch.float32) * (alpha * 0.21).reshape(1, -1, 1, 1)


def test_conv_empty_batch_and_bad_inputs(isas):
    weight = torch.randn(3, 10, 3, 3)
    panels, geometry = _conv_panels(weight), kernels.ConvGeometry.of(3, padding=1)
    one = torch.ones(1)
    assert kernels.binary_conv2d(torch.empty(0, 10, 5, 5), None, panels, 3, geometry, one, None, None).shape == (
        0, 3, 5, 5)
    with pytest.raises(RuntimeError, match=r"input of a binary convolution must be a 4-D .* float32 CPU tensor, got "
                                           r"Double"):
        kernels.binary_conv2d(torch.zeros(1, 10, 5, 5, dtype=torch.float64), None, panels, 3, geometry, one, None, None)
    with pytest.raises(ValueError, match=r"takes a batch of images \(batch, channels, height, width\), got shape "
                                         r"\(10, 5, 5\); add the batch dim of a single image with x.unsqueeze\(0\)"):
        kernels.binary_conv2d(torch.zeros(10, 5, 5), None, panels, 3, geometry, one, None, None)
    linear_panels = kernels.pack_weight_panels(pack_signs(weight), 90)
    with pytest.raises(RuntimeError, match=r"weight panels of a convolution with 3 output channels, 10 input channels "
                                           r"and a 3x3 kernel must be contiguous int64 of shape \(1, 9, 16\), got Long "
                                           r"of shape \[1, 2, 16\]: build them with "
                                           r"surge_hf.kernels.pack_conv_weight_panels"):
        kernels.binary_conv2d(torch.zeros(1, 10, 5, 5), None, linear_panels, 3, geometry, one, None, None)
    with pytest.raises(RuntimeError, match=r"threshold must be a contiguous float32 tensor of 10 values"):
        kernels.binary_conv2d(torch.zeros(1, 10, 5, 5), torch.zeros(9), panels, 3, geometry, one, None, None)
    with pytest.raises(RuntimeError, match=r"the padded input \(2 x 2\) is smaller than the dilated kernel \(3 x 3\)"):
        kernels.binary_conv2d(torch.zeros(1, 10, 2, 2), None, panels, 3, kernels.ConvGeometry.of(3), one, None, None)
    with pytest.raises(RuntimeError, match=r"kernel_size, stride and dilation must be positive"):
        kernels.binary_conv2d(torch.zeros(1, 10, 5, 5), None, panels, 3, kernels.ConvGeometry.of(3, stride=0), one,
                              None, None)
    with pytest.raises(ValueError, match=r"padding must be an int, 2 or 4 ints, 'valid' or 'same', got \(1, 1, 1\)"):
        kernels.ConvGeometry.of(3, padding=(1, 1, 1))
    with pytest.raises(ValueError, match=r"padding='same' needs stride 1, got stride=\(2, 2\)"):
        kernels.ConvGeometry.of(3, stride=2, padding="same")
    with pytest.raises(RuntimeError, match=r"codes \[-3, 7\] must span 2, 4, 16 or 256 levels"):
        kernels.quantized_conv2d(torch.zeros(1, 10, 5, 5), None, torch.ones(1), (-3, 7), panels,
                                 kernels.weight_row_counts(pack_signs(weight)), 3, geometry, one, None)


def _packed_conv(in_channels: int, out_channels: int, kernel: int, bias: bool, geometry: dict,
                 **recipe) -> BinaryConv2d:
    torch.manual_seed(0)
    unsigned = recipe.get("unsigned_activation_modules") is not None
    return _packed(SurgeConv2d(in_channels, out_channels, kernel, bias=bias, surge_config=SurgeConfig(**recipe),
                               unsigned_input=unsigned, **geometry))


# (kernel, stride, padding, dilation): ResNet's 3x3 and 1x1 (strided), a 7x7 stem, dilation, asymmetric "same".
LAYER_GEOMETRIES = [(3, 1, 1, 1), (1, 2, 0, 1), (7, 2, 3, 1), (3, 2, 2, 2), (4, 1, "same", 1), (3, 1, "valid", 2)]


def _assert_conv_kernel_equals_reference(monkeypatch, isas, **recipe) -> None:
    """Packed convolutions of `recipe`, with and without bias, over `LAYER_GEOMETRIES`, on batches of 1 and 2
    images, channels_last and NaN-holding inputs of odd sizes, with 1 and 2 threads: every instruction set gives the
    reference path's output exactly (NaN where it has them), without unpacking the weight."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 67, 11, 9, generator=generator)
    with_nan = x.clone()
    with_nan[1, 3, 4, 4] = float("nan")  # read by every geometry (even coordinates: stride 2)
    inputs = [x, x[:1], x.contiguous(memory_format=torch.channels_last), with_nan]
    threads = torch.get_num_threads()
    for (kernel, stride, padding, dilation), bias in itertools.product(LAYER_GEOMETRIES, (True, False)):
        geometry = {"stride": stride, "padding": padding, "dilation": dilation}
        layer = _packed_conv(67, 70, kernel, bias, geometry, **recipe)  # enough work for two threads
        for inp in inputs:
            with kernels.disabled():
                expected = layer(inp)
            with monkeypatch.context() as patch:
                _forbid_unpacking(patch)
                for isa, num_threads in itertools.product(isas, (1, 2)):
                    torch.set_num_threads(num_threads)
                    try:
                        with kernels.use_isa(isa):
                            out = layer(inp)
                    finally:
                        torch.set_num_threads(threads)
                    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True,
                                               msg=f"{isa}, {num_threads} threads, {geometry}, kernel {kernel}, "
                                                   f"bias={bias}, shape {tuple(inp.shape)}")
        assert expected.isnan().any() and not expected.isnan().all()


def test_other_conv_inputs_take_the_reference_path(isas):
    layer = _packed_conv(6, 4, 3, True, {"padding": 1})
    x = torch.randn(2, 6, 5, 5)
    assert layer.uses_kernel(x)
    assert not layer.uses_kernel(x.double()) and not layer.uses_kernel(torch.randn(2, 5, 5, 5))
    assert not layer.uses_kernel(x[0])  # a single image: the reference path, which returns (1, N, OH, OW)
    with kernels.disabled():
        single = layer(x[0])
    assert single.shape == (1, 4, 5, 5) and torch.equal(layer(x[0]), single)
    grouped = _packed_conv(6, 4, 3, True, {"padding": 1, "groups": 2})
    assert not grouped.uses_kernel(x)  # grouped convolutions: the reference path
    with kernels.disabled():
        expected = grouped(x)
    assert torch.equal(grouped(x), expected)
    with pytest.raises(RuntimeError):  # torch's own error, from the reference path
        layer(torch.randn(2, 5, 5, 5))


def test_conv_gradients_through_the_kernel_path_match_the_reference_path(isas):
    layer = _packed_conv(7, 5, 3, True, {"padding": 1, "stride": 2}, activation_binarizer="elastic")
    layer.requires_grad_(True)
    x = torch.randn(3, 7, 6, 5)
    grad = torch.randn(3, 5, 3, 3)
    grads = []
    for use_kernel in (True, False):
        layer.zero_grad()
        kernels.set_enabled(use_kernel)
        try:
            assert layer.uses_kernel(x) == use_kernel
            layer(x).backward(grad)
        finally:
            kernels.set_enabled(True)
        grads.append((layer.bias.grad.clone(), layer.input_scale.grad.clone()))
    (bias, scale), (bias_ref, scale_ref) = grads
    torch.testing.assert_close(bias, bias_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=1e-6)


def test_conv_weight_panels_follow_the_loaded_bits(isas):
    layer = _packed_conv(6, 4, 3, False, {"padding": 1})
    x = torch.randn(2, 6, 5, 5)
    before = layer(x)
    other = _packed_conv(6, 4, 3, False, {"padding": 1}, weight_scale="tensor")
    with torch.no_grad():
        layer.weight_packed.copy_(other.weight_packed.flip(0))  # in place: the cached panels must be rebuilt
    with kernels.disabled():
        expected = layer(x)
    assert torch.equal(layer(x), expected) and not torch.equal(expected, before)
