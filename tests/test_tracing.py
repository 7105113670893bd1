"""Packed models under `torch.compile` and `torch.export`: the kernel's operators have fake kernels that give the
real kernels' shapes and dtypes (`torch.library.opcheck`), a packed BERT with sign outputs compiles as one graph
(`fullgraph=True`) and exports with the kernel's operators as nodes, and both give the eager outputs exactly, as does
a packed ResNet with its binary convolutions as `binary_conv2d` nodes and a packed BERT with binary attention with its
scores as `sign_scores` nodes; before any eager call the weight panels are computed in the graph and the feed-forward
layers keep float outputs."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_fusion import _tiny_bert
from test_kernels import _packed_conv, _packed_linear
from test_resnet_recipe import tiny_resnet
from torch import nn

import surge_hf
from surge_hf import SurgeConv2d, kernels
from surge_hf.packing import pack_signs


def _operator_calls(graph: torch.fx.Graph) -> Counter:
    """How many times the graph calls each `torch.ops.surge_hf` operator, by name."""
    targets = (str(node.target).split(".") for node in graph.nodes if node.op == "call_function")
    return Counter(target[1] for target in targets if target[0] == "surge_hf")  # `surge_hf.op` or `surge_hf.op.default`


def _kernel_arguments() -> dict[str, tuple]:
    """One call of each tensor operator of the kernel, on sizes that are not multiples of 64 or 16."""
    m, k, n = 5, 100, 33
    generator = torch.Generator().manual_seed(0)
    x, weight, threshold = (torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator),
                            torch.randn(k, generator=generator))
    packed = pack_signs(weight)
    panels, counts = kernels.pack_weight_panels(packed, k), kernels.weight_row_counts(packed)
    bits = kernels.pack_activation_bits(x, threshold)
    planes, plane_counts = kernels.pack_activation_codes(x, threshold, 0.3, -8, 7)
    alpha, scale, bias = weight.abs().mean(1), torch.tensor([0.37]), torch.randn(n, generator=generator)
    bounds = (torch.full((n,), -3, dtype=torch.int32), torch.full((n,), 10, dtype=torch.int32),
              torch.zeros(n, dtype=torch.uint8))
    nan_rows = torch.zeros(m, dtype=torch.uint8)
    images, conv_weight = torch.randn(2, 7, 9, 6, generator=generator), torch.randn(n, 7, 3, 3, generator=generator)
    conv_panels = kernels.pack_conv_weight_panels(pack_signs(conv_weight), conv_weight.shape)
    conv_counts = kernels.weight_row_counts(pack_signs(conv_weight))
    conv_threshold = torch.randn(7, generator=generator)
    geometry = ([3, 3], [2, 1], [1, 1, 2, 0], [1, 2])  # kernel, stride, padding (top, bottom, left, right), dilation
    query = torch.randn(2, 5, 3, 70, generator=generator).transpose(1, 2)  # (batch, heads, tokens, head_dim) view
    return {
        "pack_weight_panels": (packed, k),
        "pack_activation_bits": (x, threshold),
        "weight_row_counts": (packed,),
        "pack_activation_codes": (x, threshold, 0.3, -8, 7),
        "xnor_gemm": (bits, panels, n, k),
        "code_gemm": (planes, plane_counts, panels, counts, n, k, -8, 7),
        "binary_linear": (x, threshold, panels, n, alpha, scale, bias),
        "binary_linear_from_signs": (bits, nan_rows, panels, n, k, alpha, None, bias),
        "binary_linear_signs": (x, None, panels, n, *bounds),
        "quantized_linear": (x, threshold, scale, -8, 7, panels, counts, n, alpha, None),
        "binary_conv2d": (images, conv_threshold, conv_panels, n, *geometry, alpha, scale, bias),
        "quantized_conv2d": (images.contiguous(memory_format=torch.channels_last), conv_threshold, scale, -8, 7,
                             conv_panels, conv_counts, n, *geometry, alpha, None),
        "sign_scores": (query, torch.randn(2, 3, 7, 70, generator=generator), 70**-0.5),
    }


def test_fake_kernels_agree_with_the_kernels(isas):
    arguments = _kernel_arguments()
    assert set(arguments) == set(kernels._FAKES)
    for name, args in arguments.items():
        torch.library.opcheck(getattr(torch.ops.surge_hf, name).default, args)


def _bert_inputs() -> dict[str, torch.Tensor]:
    """A batch of 3 x 11 token ids, the second row padded after 6 tokens."""
    inputs = {"input_ids": torch.randint(0, 99, (3, 11), generator=torch.Generator().manual_seed(0)),
              "attention_mask": torch.ones(3, 11, dtype=torch.long)}
    inputs["attention_mask"][1, 6:] = 0
    return inputs


def _bert_and_inputs() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The tiny packed BERT of the sign-output tests (sign outputs in both feed-forward blocks), padded inputs."""
    return _tiny_bert().finalize(), _bert_inputs()


def _resnet_and_inputs() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The tiny binary ResNet of the recipe tests, packed (its four residual-block convolutions, 3x3 with padding 1,
    one with stride 2), thresholds away from 0, and a batch of odd-sized images."""
    model = surge_hf.binarize(tiny_resnet()).eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, SurgeConv2d):
                torch.nn.init.normal_(layer.input_threshold, 0, 0.2)
    surge_hf.finalize(model)
    return model, {"pixel_values": torch.randn(2, 3, 19, 17, generator=torch.Generator().manual_seed(0))}


class _GraphRecorder:
    """A `torch.compile` backend that keeps each captured graph and runs it as it is (no code generation)."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward


# Per feed-forward block: the intermediate layer writes sign bits and the output layer reads them; the four attention
# projections (query, key, value, output) run `binary_linear`. Two encoder layers.
FOLDED_CALLS = Counter({"binary_linear": 8, "binary_linear_signs": 2, "binary_linear_from_signs": 2})


def _assert_compiles_to_one_kernel_graph(model: nn.Module, inputs: dict[str, torch.Tensor],
                                         calls: Counter) -> torch.Tensor:
    """Eager logits (equal with the kernel off), then `torch.compile(fullgraph=True)`: one graph holding exactly
    `calls` kernel operators, equal to eager, recorded and through the fake kernels (`aot_eager`). Returns the
    eager logits."""
    with torch.no_grad():
        expected = model(**inputs).logits  # the eager call builds the panels and the sign-output bounds
        with kernels.disabled():
            assert torch.equal(model(**inputs).logits, expected)
        torch._dynamo.reset()
        recorder = _GraphRecorder()
        assert torch.equal(torch.compile(model, fullgraph=True, backend=recorder)(**inputs).logits, expected)
        assert len(recorder.graphs) == 1 and _operator_calls(recorder.graphs[0].graph) == calls
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # through the fake kernels
        assert torch.equal(compiled(**inputs).logits, expected)
    return expected


@pytest.mark.filterwarnings("ignore:While compiling, we found certain side effects:UserWarning")  # transformers'
def test_compiled_packed_bert_is_one_graph_on_the_kernel_and_equals_eager(isas):
    _assert_compiles_to_one_kernel_graph(*_bert_and_inputs(), FOLDED_CALLS)


def test_exported_packed_bert_holds_the_kernel_operators_and_equals_eager(isas):
    model, inputs = _bert_and_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
        exported = torch.export.export(model, (), inputs)
    assert _operator_calls(exported.graph) == FOLDED_CALLS
    assert torch.equal(exported.module()(**inputs).logits, expected)
    other = {"input_ids": torch.randint(0, 99, (3, 11)), "attention_mask": torch.ones(3, 11, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(exported.module()(**other).logits, model(**other).logits)


# Traced before any eager call: each binary layer's operator, and its panels computed in the graph. BERT: 6 binary
# layers per encoder layer, float outputs between them; ResNet: 4 residual-block convolutions.
TRACED_BEFORE_EAGER = {
    "bert": (_bert_and_inputs, Counter({"binary_linear": 12, "pack_weight_panels": 12, "weight_row_counts": 12})),
    "resnet": (_resnet_and_inputs, Counter({"binary_conv2d": 4, "pack_weight_panels": 4, "weight_row_counts": 4})),
}


@pytest.mark.filterwarnings("ignore:While compiling, we found certain side effects:UserWarning")
@pytest.mark.parametrize("name", list(TRACED_BEFORE_EAGER))
def test_traced_before_any_eager_call_the_panels_are_computed_in_the_graph(isas, name):
    build, calls = TRACED_BEFORE_EAGER[name]
    model, inputs = build()
    torch._dynamo.reset()
    recorder = _GraphRecorder()
    with torch.no_grad():
        traced = torch.compile(model, fullgraph=True, backend=recorder)(**inputs).logits
        expected = model(**inputs).logits
    assert torch.equal(traced, expected)
    assert _operator_calls(recorder.graphs[0].graph) == calls


def _elastic_layer(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A packed linear or convolution layer of the elastic recipe, with bias; an input and an output gradient."""
    if kind == "linear":
        return _packed_linear(70, 9, True, activation_binarizer="elastic"), torch.randn(4, 70), torch.randn(4, 9)
    layer = _packed_conv(7, 5, 3, True, {"padding": 1, "stride": 2}, activation_binarizer="elastic")
    return layer, torch.randn(3, 7, 6, 5), torch.randn(3, 5, 3, 3)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_compiled_layer_records_the_gradients_of_its_bias_and_scale(isas, kind):
    layer, x, grad = _elastic_layer(kind)
    layer.requires_grad_(True)
    layer(x).backward(grad)
    expected = layer(x).detach(), layer.bias.grad.clone(), layer.input_scale.grad.clone()
    layer.zero_grad()
    torch._dynamo.reset()
    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    out.backward(grad)
    assert torch.equal(out.detach(), expected[0]) and torch.equal(layer.bias.grad, expected[1])
    assert torch.equal(layer.input_scale.grad, expected[2])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_inductor_calls_the_kernel_and_keeps_its_outputs(isas, kind):
    if kind == "linear":
        layer, inputs = _packed_linear(100, 33, True, activation_binarizer="elastic"), [torch.randn(2, 7, 100)]
    else:
        layer = _packed_conv(9, 20, 3, True, {"padding": 2, "dilation": 2}, activation_binarizer="elastic")
        inputs = [torch.randn(2, 9, 7, 8)]
        inputs.append(inputs[0].contiguous(memory_format=torch.channels_last))
    with torch.no_grad():
        expected = layer(inputs[0])
        with kernels.disabled():
            assert torch.equal(layer(inputs[0]), expected)
        torch._dynamo.reset()
        for x in inputs:
            assert torch.equal(torch.compile(layer, fullgraph=True)(x), expected)


# -- packed convolutions ---------------------------------------------------------------------------------------------
def test_compiled_and_exported_packed_resnet_hold_the_conv_kernel_and_equal_eager(isas):
    model, inputs = _resnet_and_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
        with kernels.disabled():
            assert torch.equal(model(**inputs).logits, expected)
        torch._dynamo.reset()
        recorder = _GraphRecorder()
        assert torch.equal(torch.compile(model, fullgraph=True, backend=recorder)(**inputs).logits, expected)
        assert len(recorder.graphs) == 1
        assert _operator_calls(recorder.graphs[0].graph) == Counter({"binary_conv2d": 4})
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # through the fake kernels
        assert torch.equal(compiled(**inputs).logits, expected)
        exported = torch.export.export(model, (), inputs)
    assert _operator_calls(exported.graph) == Counter({"binary_conv2d": 4})
    assert torch.equal(exported.module()(**inputs).logits, expected)
    other = {"pixel_values": torch.randn(2, 3, 19, 17)}
    with torch.no_grad():
        assert torch.equal(exported.module()(**other).logits, model(**other).logits)


# -- binary attention --------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:While compiling, we found certain side effects:UserWarning")
def test_compiled_and_exported_binary_attention_hold_the_score_kernel_and_equal_eager(isas):
    """A tiny packed BERT with binary attention (`SurgeConfig(binarize_attention=True)`), padded inputs."""
    model, inputs = _tiny_bert(binarize_attention=True).finalize(), _bert_inputs()
    calls = FOLDED_CALLS + Counter({"sign_scores": 2})  # one per encoder layer
    expected = _assert_compiles_to_one_kernel_graph(model, inputs, calls)
    with torch.no_grad():
        exported = torch.export.export(model, (), inputs)
    assert _operator_calls(exported.graph) == calls
    assert torch.equal(exported.module()(**inputs).logits, expected)
