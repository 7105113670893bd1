"""Packed models under `torch.compile` and `torch.export`: the kernel's operators have fake kernels that give the
real kernels' shapes and dtypes (`torch.library.opcheck`), a packed BERT with sign outputs compiles as one graph
(`fullgraph=True`) and exports with the kernel's operators as nodes, and both give the eager outputs exactly; before
any eager call the weight panels are computed in the graph and the feed-forward layers keep float outputs."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_fusion import _tiny_bert
from test_kernels import _packed_linear
from torch import nn

from surge_hf import kernels
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
    }


def test_fake_kernels_agree_with_the_kernels(isas):
    arguments = _kernel_arguments()
    assert set(arguments) == set(kernels._FAKES)
    for name, args in arguments.items():
        torch.library.opcheck(getattr(torch.ops.surge_hf, name).default, args)


def _bert_and_inputs() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The tiny packed BERT of the sign-output tests (sign outputs in both feed-forward blocks), padded inputs."""
    model = _tiny_bert().finalize()
    inputs = {"input_ids": torch.randint(0, 99, (3, 11), generator=torch.Generator().manual_seed(0)),
              "attention_mask": torch.ones(3, 11, dtype=torch.long)}
    inputs["attention_mask"][1, 6:] = 0
    return model, inputs


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


@pytest.mark.filterwarnings("ignore:While compiling, we found certain side effects:UserWarning")  # transformers'
def test_compiled_packed_bert_is_one_graph_on_the_kernel_and_equals_eager(isas):
    model, inputs = _bert_and_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits  # the eager call builds the panels and the sign-output bounds
        with kernels.disabled():
            assert torch.equal(model(**inputs).logits, expected)
        torch._dynamo.reset()
        recorder = _GraphRecorder()
        assert torch.equal(torch.compile(model, fullgraph=True, backend=recorder)(**inputs).logits, expected)
        assert len(recorder.graphs) == 1 and _operator_calls(recorder.graphs[0].graph) == FOLDED_CALLS
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # through the fake kernels
        assert torch.equal(compiled(**inputs).logits, expected)


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


@pytest.mark.filterwarnings("ignore:While compiling, we found certain side effects:UserWarning")
def test_traced_before_any_eager_call_the_panels_are_computed_in_the_graph(isas):
    model, inputs = _bert_and_inputs()
    torch._dynamo.reset()
    recorder = _GraphRecorder()
    with torch.no_grad():
        traced = torch.compile(model, fullgraph=True, backend=recorder)(**inputs).logits
        expected = model(**inputs).logits
    assert torch.equal(traced, expected)
    layers = 12  # 6 binary layers per encoder layer
    assert _operator_calls(recorder.graphs[0].graph) == Counter(
        {"binary_linear": layers, "pack_weight_panels": layers, "weight_row_counts": layers})


def test_compiled_layer_records_the_gradients_of_its_bias_and_scale(isas):
    layer = _packed_linear(70, 9, True, activation_binarizer="elastic").requires_grad_(True)
    x, grad = torch.randn(4, 70), torch.randn(4, 9)
    layer(x).backward(grad)
    expected = layer(x).detach(), layer.bias.grad.clone(), layer.input_scale.grad.clone()
    layer.zero_grad()
    torch._dynamo.reset()
    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    out.backward(grad)
    assert torch.equal(out.detach(), expected[0]) and torch.equal(layer.bias.grad, expected[1])
    assert torch.equal(layer.input_scale.grad, expected[2])


def test_inductor_calls_the_kernel_and_keeps_its_outputs(isas):
    layer = _packed_linear(100, 33, True, activation_binarizer="elastic")
    x = torch.randn(2, 7, 100)
    with torch.no_grad():
        expected = layer(x)
        with kernels.disabled():
            assert torch.equal(layer(x), expected)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), expected)
