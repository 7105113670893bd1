"""Sign outputs (`surge_hf.fusion`): the kernel writes the bits the bounds say, on every instruction set; the bounds
reproduce the float path's codes exactly in every threshold regime (tau > 0, GELU's minimum < tau <= 0, tau at or
below the minimum) and for negative, zero and tensor scales; whole packed BERT and ViT models with sign outputs are
`torch.equal` to the same models without them, to the kernel-free reference path and to the train-form model; the
cases where outputs must stay float do."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, ViTConfig
from transformers.activations import GELUActivation

from conftest import pm1
from surge_hf import (
    SurgeBertConfig,
    SurgeBertForSequenceClassification,
    SurgeConfig,
    SurgeLinear,
    SurgeViTConfig,
    SurgeViTForImageClassification,
    kernels,
)
from surge_hf.fusion import FoldedActivation, SignOutput, sign_output_bounds, unfold_sign_outputs
from surge_hf.kernels import PackedSigns
from surge_hf.layers import BinaryLinear
from surge_hf.packing import pack_signs

GELU_MINIMUM = -0.16997120  # about GELU's minimum, at -0.75179


def _packed_bits(signs: torch.Tensor) -> torch.Tensor:
    """Words of the kernel's activation layout from +-1 entries `(M, N)` (bits past N are 0)."""
    m, n = signs.shape
    words = torch.zeros(m, (n + 63) // 64, dtype=torch.int64)
    words.view(torch.uint8)[:, : (n + 7) // 8] = pack_signs(signs.to(torch.float32))
    return words


# -- the kernel ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("m", "k", "n"), [(1, 384, 384), (3, 65, 17), (9, 100, 33), (17, 64, 16), (2, 200, 130)])
def test_sign_outputs_are_the_bits_of_the_bounds(isas, m, k, n):
    generator = torch.Generator().manual_seed(0)
    x, weight, threshold = torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator), None
    dots = pm1(x) @ pm1(weight).T
    low = torch.randint(-k, k + 3, (n,), generator=generator, dtype=torch.int32)
    width = torch.randint(0, k, (n,), generator=generator, dtype=torch.int32)
    low[:2], width[:2] = dots[0, :2].to(torch.int32), 0  # intervals holding exactly one value of the first row
    flip = torch.randint(0, 2, (n,), generator=generator, dtype=torch.uint8)
    inside = (dots >= low) & (dots <= low + width)
    expected = _packed_bits(torch.where(inside ^ flip.bool(), 1, -1))
    panels = kernels.pack_weight_panels(pack_signs(weight), k)
    for isa in isas:
        with kernels.use_isa(isa):
            signs = kernels.binary_linear_signs(x, threshold, panels, n, low, width, flip)
            assert torch.equal(signs.bits, expected), isa
            assert signs.shape == (m, n) and not signs.nan_rows.any()


def test_sign_outputs_split_over_threads_are_exact(isas):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for m, k, n in [(64, 640, 256), (8, 1024, 1040)]:  # split by row blocks, by panels
            test_sign_outputs_are_the_bits_of_the_bounds(isas, m, k, n)
    finally:
        torch.set_num_threads(threads)


def test_a_layer_reads_sign_outputs_as_it_reads_the_floats_they_stand_for(isas):
    m, k, n = 5, 100, 33
    generator = torch.Generator().manual_seed(1)
    x, weight = torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator)
    x[3, 7] = float("nan")
    bits, nan_rows = kernels.pack_activation_bits(x), torch.isnan(x).any(1).to(torch.uint8)
    alpha, scale, bias = weight.abs().mean(1), torch.tensor([0.37]), torch.randn(n, generator=generator)
    panels = kernels.pack_weight_panels(pack_signs(weight), k)
    expected = kernels.binary_linear(x, None, panels, n, alpha, scale, bias)
    for isa in isas:
        with kernels.use_isa(isa):
            out = kernels.binary_linear_from_signs(PackedSigns(bits, nan_rows, torch.Size((m, k))), panels, n, alpha,
                                                   scale, bias)
            torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True, msg=isa)
    assert expected[3].isnan().all() and not expected[[0, 1, 2, 4]].isnan().any()


# -- the bounds, layer by layer -----------------------------------------------------------------------------------
def _pair(in_features: int, hidden: int, thresholds: torch.Tensor, input_scale: float = 0.37, **recipe
          ) -> tuple[BinaryLinear, BinaryLinear]:
    """An intermediate and an output `BinaryLinear` (random weights and biases, elastic binarizers), the output
    layer's thresholds `thresholds`."""
    torch.manual_seed(0)
    config = SurgeConfig(activation_binarizer="elastic", **recipe)
    producer = SurgeLinear(in_features, hidden, surge_config=config)
    consumer = SurgeLinear(hidden, 7, surge_config=config)
    with torch.no_grad():
        producer.input_threshold.normal_(0, 0.3)
        producer.input_scale.fill_(input_scale)
        producer.bias.normal_(0, 2.0)
        consumer.input_threshold.copy_(thresholds)
    return BinaryLinear.from_surge(producer).eval(), BinaryLinear.from_surge(consumer).eval()


def _thresholds(hidden: int) -> torch.Tensor:
    """Every regime, channel by channel: tau > 0, tau = 0, GELU's minimum < tau < 0, tau at and below the minimum."""
    regimes = torch.tensor([0.5, 2.0, 0.0, -0.05, -0.1, -0.16, GELU_MINIMUM, -0.17, -0.2, -1.0])
    return regimes.repeat(hidden // len(regimes) + 1)[:hidden]


def _assert_folded_equals_float(producer: BinaryLinear, consumer: BinaryLinear, isas: list[str]) -> None:
    """consumer(GELU(producer(x))) with sign outputs equals the float path (kernel and reference), NaN rows too."""
    gelu = GELUActivation()
    x = 3 * torch.randn(4, 6, producer.in_features)
    x[2, 3, 5] = float("nan")
    with torch.inference_mode():
        with kernels.disabled():
            expected = consumer(gelu(producer(x)))
        assert torch.equal(consumer(gelu(producer(x))).isnan(), expected.isnan())
        producer.sign_output = SignOutput(gelu, consumer)
        for isa in isas:
            with kernels.use_isa(isa):
                signs = producer(x)
                assert isinstance(signs, PackedSigns) and signs.shape == (4, 6, producer.out_features)
                out = consumer(FoldedActivation(gelu)(signs))
                torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True, msg=isa)
    assert expected[2, 3].isnan().all() and expected.isnan().sum() == consumer.out_features


@pytest.mark.parametrize("input_scale", [0.37, 5.0, -0.37, 0.0])
@pytest.mark.parametrize("weight_scale", ["channel", "tensor"])
def test_sign_outputs_equal_the_float_path_in_every_regime(isas, input_scale, weight_scale):
    hidden = 70
    producer, consumer = _pair(100, hidden, _thresholds(hidden), input_scale, weight_scale=weight_scale)
    _assert_folded_equals_float(producer, consumer, isas)


def _table(producer: BinaryLinear, consumer: BinaryLinear) -> torch.Tensor:
    """The consumer's codes at every producer dot product -K, ..., K: `(K + 1, N)`, evaluated as the float path."""
    k = producer.in_features
    dots = torch.arange(-k, k + 1, 2, dtype=torch.float32).unsqueeze(1).expand(k + 1, producer.out_features)
    scale = producer.weight_scale * producer.input_scale
    return consumer.input_codes(GELUActivation()(dots.contiguous() * scale + producer.bias))


def test_bounds_take_the_shape_of_each_regime():
    k, regimes = 100, torch.tensor([0.5, -0.1, -0.2, 0.0])
    producer, consumer = _pair(k, 4, regimes, input_scale=8.0)
    with torch.no_grad():
        producer.bias.zero_()  # outputs from about -40 (where GELU is -0) to 40 (alpha is about 0.05)
    low, width, flip = sign_output_bounds(producer, GELUActivation(), consumer)
    high = low + width
    assert flip[0] == 0 and high[0] == k and low[0] > 0  # tau > 0: one bound, +1 for d >= low
    assert flip[1] == 1 and -k < low[1] <= high[1] < 0  # GELU's minimum < tau < 0: -1 only between two bounds
    assert flip[2] == 1 and low[2] > k  # tau below the minimum: +1 everywhere (an empty interval, flipped)
    assert flip[3] == 1 and -k < low[3] and high[3] < 0  # tau = 0: GELU is -0 far left, so two bounds again
    dots = torch.arange(-k, k + 1, 2).unsqueeze(1)
    folded = torch.where(((dots >= low) & (dots <= high)) ^ flip.bool(), 1.0, -1.0)
    assert torch.equal(folded, _table(producer, consumer))


def test_a_table_that_is_not_an_interval_leaves_the_layer_on_floats(isas):
    producer, consumer = _pair(20, 16, torch.full((16,), 0.3), input_scale=50.0)
    wave = nn.Module()
    wave.forward = torch.sin  # two crossings of 0.3 and more: no interval
    assert sign_output_bounds(producer, wave, consumer) is None
    producer.sign_output = SignOutput(wave, consumer)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="outputs stay float"):
        assert isinstance(producer(torch.randn(3, 20)), torch.Tensor)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_outputs_stay_float_where_the_float_path_would_differ(isas):
    producer, consumer = _pair(20, 16, _thresholds(16))
    producer.sign_output = SignOutput(GELUActivation(), consumer)
    x = torch.randn(3, 20)
    with torch.no_grad():
        assert isinstance(producer(x), PackedSigns)
        with kernels.disabled():
            assert isinstance(producer(x), torch.Tensor)
    producer.bias.requires_grad_(True)
    assert isinstance(producer(x), torch.Tensor)  # a gradient to record
    single, single_consumer = _pair(20, 1, torch.zeros(1))
    single.sign_output = SignOutput(GELUActivation(), single_consumer)
    with torch.no_grad():
        assert isinstance(single(torch.randn(1, 20)), torch.Tensor)  # one element: ATen's GELU, not oneDNN's
        assert isinstance(single(torch.randn(2, 20)), PackedSigns)
        with torch.backends.mkldnn.flags(enabled=False):
            assert isinstance(producer(x), torch.Tensor)  # ATen's GELU depends on the position
        relu, relu_consumer = _pair(20, 1, torch.zeros(1))
        relu.sign_output = SignOutput(nn.ReLU(), relu_consumer)
        with torch.backends.mkldnn.flags(enabled=False):
            assert isinstance(relu(torch.randn(1, 20)), PackedSigns)  # ReLU is exact everywhere


def test_bounds_follow_the_thresholds(isas):
    producer, consumer = _pair(50, 40, _thresholds(40))
    fold = SignOutput(GELUActivation(), consumer)
    x = torch.randn(2, 50)
    first = fold.bounds(producer, x)
    assert fold.bounds(producer, x) is first  # cached
    with torch.no_grad():
        consumer.input_threshold.add_(0.05)
    moved = fold.bounds(producer, x)
    assert moved is not first and torch.equal(moved[0], sign_output_bounds(producer, GELUActivation(), consumer)[0])


# -- whole models -------------------------------------------------------------------------------------------------
def _tiny_bert(**recipe) -> SurgeBertForSequenceClassification:
    config = BertConfig(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=70, num_labels=2)
    torch.manual_seed(0)
    model = SurgeBertForSequenceClassification(SurgeBertConfig.from_bert_config(
        config, surge_config=SurgeConfig(activation_binarizer="elastic", **recipe))).eval()
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, SurgeLinear):
                layer.input_threshold.normal_(0, 0.2)
                if name.endswith("output.dense") and "attention" not in name:  # the feed-forward output layers
                    layer.input_threshold.copy_(_thresholds(layer.in_features))
    return model


def _assert_models_equal(model: nn.Module, inputs: dict[str, torch.Tensor], isas: list[str]) -> None:
    """The model packed with sign outputs equals the train-form model in eval mode, the packed model without sign
    outputs and the kernel-free reference path, on every instruction set."""
    with torch.no_grad():
        train_form = model(**inputs).logits
        model.finalize()
        assert any(isinstance(module, FoldedActivation) for module in model.modules())
        unfolded = copy.deepcopy(model)
        unfold_sign_outputs(unfolded)
        assert not any(isinstance(module, FoldedActivation) for module in unfolded.modules())
        assert list(unfolded.state_dict()) == list(model.state_dict())
        with kernels.disabled():
            assert torch.equal(model(**inputs).logits, train_form)
        assert torch.equal(unfolded(**inputs).logits, train_form)
        for isa in isas:
            with kernels.use_isa(isa):
                assert torch.equal(model(**inputs).logits, train_form), isa


def _writes_signs(model: nn.Module, name: str, inputs: dict[str, torch.Tensor]) -> bool:
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return all(isinstance(out, PackedSigns) for out in seen) and bool(seen)


@pytest.mark.parametrize("recipe", [{}, {"weight_scale": "tensor"}, {"learnable_weight_scale": True}])
def test_packed_bert_with_sign_outputs_equals_the_reference(isas, recipe):
    model = _tiny_bert(**recipe)
    inputs = {"input_ids": torch.randint(0, 99, (3, 11), generator=torch.Generator().manual_seed(0)),
              "attention_mask": torch.ones(3, 11, dtype=torch.long)}
    inputs["attention_mask"][1, 6:] = 0
    _assert_models_equal(model, inputs, isas)
    assert _writes_signs(model, "bert.encoder.layer.1.intermediate.dense", inputs)


def test_packed_vit_with_sign_outputs_equals_the_reference(isas):
    torch.manual_seed(0)
    model = SurgeViTForImageClassification(SurgeViTConfig.from_vit_config(
        ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=8,
                  patch_size=4, num_labels=3), surge_config=SurgeConfig(activation_binarizer="elastic"))).eval()
    inputs = {"pixel_values": torch.randn(2, 3, 8, 8)}
    _assert_models_equal(model, inputs, isas)
    assert _writes_signs(model, "vit.layers.1.mlp.fc1", inputs)


def test_loaded_packed_model_writes_sign_outputs_and_unfinalize_removes_them(isas, tmp_path):
    model = _tiny_bert()
    model.save_pretrained(tmp_path, packed=True)
    inputs = {"input_ids": torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        expected = model(**inputs).logits
    loaded = SurgeBertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert _writes_signs(loaded, "bert.encoder.layer.0.intermediate.dense", inputs)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
    loaded.unfinalize()
    assert not any(isinstance(module, FoldedActivation) for module in loaded.modules())
    without = _tiny_bert().finalize(sign_outputs=False)
    assert not any(isinstance(module, FoldedActivation) for module in without.modules())
    assert all(module.sign_output is None for module in without.modules() if isinstance(module, BinaryLinear))


def test_only_sign_binarizers_fold():
    codes = _tiny_bert(activation_bits=2).finalize()
    assert not any(isinstance(module, FoldedActivation) for module in codes.modules())
    unsigned = _tiny_bert(unsigned_activation_modules=r".*\.output\.dense").finalize()
    assert not any(isinstance(module, FoldedActivation) for module in unsigned.modules())
