"""The XNOR-popcount CPU kernel: exact against integer references on every instruction set this CPU runs, on sizes
that are not multiples of the word (64) or panel (16) widths; errors on bad input; the warning and the reference
path where the kernel cannot be built or is turned off."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, pipeline

from conftest import pm1
from surge_hf import SurgeBertConfig, SurgeBertForSequenceClassification, SurgeConfig, SurgeLinear, kernels
from surge_hf.layers import BinaryLayerMixin, BinaryLinear
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
def _packed_linear(in_features: int, out_features: int, bias: bool, **recipe) -> BinaryLinear:
    torch.manual_seed(0)
    unsigned = recipe.get("unsigned_activation_modules") is not None
    layer = SurgeLinear(in_features, out_features, bias=bias, config=SurgeConfig(**recipe), unsigned_input=unsigned)
    with torch.no_grad():
        if layer.input_threshold is not None:
            layer.input_threshold.normal_(0, 0.3)
        if layer.input_scale is not None:
            layer.input_scale.fill_(0.37)
    return BinaryLinear.from_surge(layer).eval()


def _forbid_unpacking(monkeypatch) -> None:
    def unpack(self):
        raise AssertionError("the kernel path unpacked the weight")

    monkeypatch.setattr(BinaryLayerMixin, "weight_signs", unpack)
    monkeypatch.setattr(BinaryLayerMixin, "dequantized_weight", unpack)


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


@pytest.mark.parametrize("binarizer", ["sign", "rsign", "elastic"])
@pytest.mark.parametrize("scale", ["channel", "tensor", "none"])
def test_packed_linear_on_the_kernel_equals_the_reference_path(monkeypatch, isas, binarizer, scale):
    _assert_kernel_equals_reference(monkeypatch, isas, activation_binarizer=binarizer, weight_scale=scale)


@pytest.mark.parametrize("recipe", [{"activation_bits": 2}, {"activation_bits": 4}, {"activation_bits": 8},
                                    {"unsigned_activation_modules": ".*"},
                                    {"activation_bits": 4, "unsigned_activation_modules": ".*"}])
def test_packed_linear_with_codes_on_the_kernel_equals_the_reference_path(monkeypatch, isas, recipe):
    with torch.no_grad():  # codes other than signs take the kernel without gradients only
        _assert_kernel_equals_reference(monkeypatch, isas, activation_binarizer="elastic", **recipe)


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
