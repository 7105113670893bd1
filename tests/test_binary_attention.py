"""Binary attention: the {0, alpha} probabilities and their gradients, the attention function against a
hand-computed reference, exact finalize and packed reload (ViT and BERT); the scores on the CPU kernel equal to the
reference path's (hand-computed, every head_dim and token count, NaN, zeros, strided views, every instruction set, two
threads), the attention function and packed models on the kernel equal to the reference path, training and
gradients on the reference path."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForImageClassification, BertConfig, BertModel, ViTConfig, ViTForImageClassification

from surge_hf import (
    SurgeBertConfig,
    SurgeBertForSequenceClassification,
    SurgeConfig,
    SurgeViTConfig,
    SurgeViTForImageClassification,
    binarize,
    binary_attention,
    finalize,
    kernels,
)
from surge_hf.binary_attention import (
    BinaryAttentionProbabilities,
    _sign,
    add_binary_attention,
    attention_modules,
    binary_attention_forward,
)


def test_probabilities_become_zero_or_alpha_with_straight_through_gradients():
    binary = BinaryAttentionProbabilities(num_heads=1, alpha_init=0.2)
    p = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.5]).reshape(1, 1, 1, 5).requires_grad_()
    out = binary(p)
    assert torch.equal(out.detach().flatten(), torch.tensor([0.0, 0.0, 0.2, 0.2, 0.2]))  # 0.1 / 0.2: half to even
    out.backward(torch.ones_like(out))
    assert torch.equal(p.grad.flatten(), torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))
    # round(P/alpha) - P/alpha inside the range, 1 above it: -0.25 - 0.5 + 0.25 + 0 + 1
    torch.testing.assert_close(binary.alpha.grad, torch.tensor([0.5]), rtol=0, atol=1e-6)


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.binary_attention = BinaryAttentionProbabilities(num_heads=2, alpha_init=0.3)
        with torch.no_grad():
            self.binary_attention.alpha.copy_(torch.tensor([0.3, 0.4]))


def test_attention_function_matches_the_formula():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    mask = torch.tensor([0.0, 0.0, -1e9]).reshape(1, 1, 1, 3)
    output, probabilities = binary_attention_forward(Attention(), q, k, v, mask, scaling=0.5)
    p = torch.softmax(torch.sign(q) @ torch.sign(k).transpose(2, 3) * 0.5 + mask, dim=-1)
    alpha = torch.tensor([0.3, 0.4]).reshape(1, 2, 1, 1)
    expected_p = torch.where(p / alpha > 0.5, alpha, torch.zeros(()))
    assert torch.equal(probabilities, expected_p)
    torch.testing.assert_close(output, (expected_p @ v).transpose(1, 2), rtol=0, atol=1e-6)


def tiny_vit(recipe: SurgeConfig) -> SurgeViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4, num_labels=3)
    return SurgeViTForImageClassification(SurgeViTConfig.from_vit_config(config, surge_config=recipe))


def test_vit_trains_and_finalizes_exactly(tmp_path):
    model = tiny_vit(SurgeConfig(binarize_attention=True))
    attention = model.vit.layers[0].attention
    assert model.config._attn_implementation == "surge_binary" and torch.equal(attention.binary_attention.alpha,
                                                                                torch.full((2,), 0.05))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        model(pixel_values=torch.randn(4, 3, 8, 8), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        assert attention.binary_attention.alpha.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
    x = torch.randn(3, 3, 8, 8)
    expected = model.eval()(pixel_values=x).logits
    model.save_pretrained(tmp_path, packed=True)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config._attn_implementation == "surge_binary"
    assert torch.equal(reloaded(pixel_values=x).logits, expected)
    assert torch.equal(model.finalize()(pixel_values=x).logits, expected)


def test_plain_vit_checkpoint_gets_the_initial_alpha(tmp_path):
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, image_size=8, patch_size=4, num_labels=3)
                              ).save_pretrained(tmp_path)
    model = SurgeViTForImageClassification.from_pretrained(
        tmp_path, surge=SurgeConfig(binarize_attention=True, attention_alpha_init=0.125))
    assert torch.equal(model.vit.layers[0].attention.binary_attention.alpha, torch.full((2,), 0.125))


def test_bert_self_attention_is_binarized_and_finalizes_exactly():
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32), add_pooling_layer=False)
    binarize(model, SurgeConfig(binarize_attention=True))
    assert model.encoder.layer[0].attention.self.binary_attention.alpha.shape == (2,)
    ids = torch.tensor([[1, 2, 3, 4]])
    model.train()(input_ids=ids).last_hidden_state.square().sum().backward()
    assert model.encoder.layer[0].attention.self.binary_attention.alpha.grad.abs().sum() > 0  # the path is used
    expected = model.eval()(input_ids=ids).last_hidden_state
    assert torch.equal(finalize(model)(input_ids=ids).last_hidden_state, expected)


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match=r"SurgeConfig.attention_alpha_init=0 must be > 0"):
        SurgeConfig(attention_alpha_init=0)
    with pytest.raises(ValueError, match=r"binarize_attention=True needs transformers attention modules"):
        add_binary_attention(torch.nn.Linear(2, 2), SurgeConfig(binarize_attention=True))


# -- the scores on the CPU kernel (kernels.sign_scores) ---------------------------------------------------------------
def _reference_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """The reference path's scores: the float product of the +-1 signs, then the scale."""
    return torch.matmul(_sign(query), _sign(key).transpose(2, 3)) * scaling


def _assert_identical(out: torch.Tensor, expected: torch.Tensor, message: object = None) -> None:
    """`torch.equal`, NaN where `expected` is NaN (torch.equal counts NaN unequal to itself)."""
    assert out.shape == expected.shape and out.dtype == expected.dtype, message
    assert torch.equal(out.isnan(), expected.isnan()), message
    assert torch.equal(out.nan_to_num(), expected.nan_to_num()), message


def test_hand_computed_scores(isas):
    # signs (0 and -0.0 give +1): q0 = (+ - +), q1 = (- + -); k0 = (+ + -), k1 = (- - +)
    query = torch.tensor([[1.0, -2.0, 0.0], [-0.5, 3.0, -1.0]]).reshape(1, 1, 2, 3)
    key = torch.tensor([[2.0, -0.0, -3.0], [-1.0, -1.0, 4.0]]).reshape(1, 1, 2, 3)
    dots = torch.tensor([[-1.0, 1.0], [1.0, -1.0]]).reshape(1, 1, 2, 2)  # q0.k0 = 1 - 1 - 1, q0.k1 = -1 + 1 + 1, ...
    key_nan = key.clone()
    key_nan[0, 0, 1, 2] = float("nan")
    for isa in isas:
        with kernels.use_isa(isa):
            assert torch.equal(kernels.sign_scores(query, key, 1.0), dots), isa
            assert torch.equal(kernels.sign_scores(query, key, 0.5), dots * 0.5), isa
            _assert_identical(kernels.sign_scores(query, key_nan, 0.5), torch.tensor(
                [[-0.5, float("nan")], [0.5, float("nan")]]).reshape(1, 1, 2, 2), isa)  # the NaN key's column
            assert torch.equal(_reference_scores(query, key, 0.5), dots * 0.5)


def _heads(batch: int, heads: int, tokens: int, head_dim: int, transposed: bool,
           generator: torch.Generator) -> torch.Tensor:
    """(batch, heads, tokens, head_dim): a contiguous tensor, or a transposed view of (batch, tokens, heads, head_dim)
    as transformers passes it; with exact zeros, a -0.0 and an infinity."""
    x = torch.randn(batch, tokens, heads, head_dim, generator=generator)
    x.view(-1)[::7] = 0.0
    x.view(-1)[3::11] = -0.0
    x.view(-1)[-1] = float("inf")
    return x.transpose(1, 2) if transposed else x.transpose(1, 2).contiguous()


def _score_cases(head_dims: tuple[int, ...], tokens: range):
    """(query, key, scaling) for every head_dim and token count: batch 1-3, two heads, as many keys as queries or a
    few more, transposed views and contiguous tensors, a NaN in a query row or a key row of some."""
    generator = torch.Generator().manual_seed(0)
    for head_dim in head_dims:
        for t in tokens:
            batch = 1 + t % 3
            query = _heads(batch, 2, t, head_dim, t % 2 == 0, generator)
            key = _heads(batch, 2, t + t % 4, head_dim, t % 3 == 0, generator)
            if t % 5 == 1:
                query[batch - 1, 1, t // 2, head_dim // 2] = float("nan")
            if t % 5 == 2:
                key[0, 0, t // 3, head_dim - 1] = float("nan")
            yield query, key, head_dim**-0.5


def test_kernel_scores_equal_the_reference_scores(isas):
    for query, key, scaling in _score_cases((1, 63, 64, 65, 128), range(1, 198)):
        expected = _reference_scores(query, key, scaling)
        for isa in isas:
            with kernels.use_isa(isa):
                _assert_identical(kernels.sign_scores(query, key, scaling), expected, (isa, query.shape, key.shape))


def test_kernel_scores_split_over_two_threads_equal_the_reference_scores(isas):
    """Enough work for two threads (see `threads_for` in xnor_ops.cpp): 6 heads of 150-197 tokens."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for query, key, scaling in _score_cases((65, 128), range(150, 198, 47)):
            expected = _reference_scores(query, key, scaling)
            for isa in isas:
                with kernels.use_isa(isa):
                    _assert_identical(kernels.sign_scores(query, key, scaling), expected, (isa, query.shape))
    finally:
        torch.set_num_threads(threads)


def test_bad_score_inputs_are_rejected(isas):
    with pytest.raises(RuntimeError, match=r"query must be a 4-D \(batch, heads, tokens, head_dim\) float32"):
        kernels.sign_scores(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), 1.0)
    with pytest.raises(RuntimeError, match=r"query and key must share batch, heads and a positive head_dim"):
        kernels.sign_scores(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 5), 1.0)
    assert kernels.sign_scores(torch.zeros(1, 2, 0, 4), torch.zeros(1, 2, 3, 4), 1.0).shape == (1, 2, 0, 3)


class CountedScores:
    """Counts the calls of the attention function's kernel scores (`binary_attention.sign_scores`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls = 0
        monkeypatch.setattr(binary_attention, "sign_scores", self)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
        self.calls += 1
        return kernels.sign_scores(query, key, scale)


MASKS = {
    "none": None,
    "padding": torch.tensor([0.0, 0.0, 0.0, -1e9, -1e9]).reshape(1, 1, 1, 5),  # BERT's (batch, 1, 1, keys)
    "causal": torch.full((5, 5), float("-inf")).triu(1).reshape(1, 1, 5, 5),
}


@pytest.mark.parametrize("mask", list(MASKS))
def test_attention_function_on_the_kernel_equals_the_reference_path(monkeypatch, isas, mask):
    counted = CountedScores(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    module = Attention().eval()
    query, key = (_heads(2, 2, 5, 65, True, generator) for _ in range(2))
    value = torch.randn(2, 5, 2, 65, generator=generator).transpose(1, 2)
    query[1, 0, 2, 3] = float("nan")
    for q in (query, query.nan_to_num()):
        with kernels.disabled():
            expected = binary_attention_forward(module, q, key, value, MASKS[mask], scaling=0.125)
        for isa in isas:
            with kernels.use_isa(isa):
                out = binary_attention_forward(module, q, key, value, MASKS[mask], scaling=0.125)
            for tensor, reference in zip(out, expected):
                _assert_identical(tensor, reference, (isa, mask))
    assert counted.calls == 2 * len(isas)


def test_training_and_gradients_take_the_reference_path(monkeypatch, isas):
    counted = CountedScores(monkeypatch)
    module = Attention()
    q, k, v = (torch.randn(1, 2, 3, 4).requires_grad_() for _ in range(3))
    grads = []
    for context in (contextlib.nullcontext(), kernels.disabled()):
        for parameter in (q, k, v, module.binary_attention.alpha):
            parameter.grad = None
        with context:
            output, _ = binary_attention_forward(module.train(), q, k, v, None, scaling=0.5)
            output.square().sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v, module.binary_attention.alpha)])
    assert all(torch.equal(a, b) for a, b in zip(*grads)) and grads[0][0].abs().sum() > 0
    binary_attention_forward(module.eval(), q, k, v, None, scaling=0.5)  # eval mode, but Q and K need gradients
    assert counted.calls == 0
    with torch.no_grad():
        binary_attention_forward(module.eval(), q, k, v, None, scaling=0.5)
    assert counted.calls == 1


def tiny_bert(recipe: SurgeConfig) -> SurgeBertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=70, num_labels=2)
    return SurgeBertForSequenceClassification(SurgeBertConfig.from_bert_config(config, surge_config=recipe))


PACKED_MODELS = {
    "bert": (lambda: tiny_bert(SurgeConfig(binarize_attention=True)),
             lambda: {"input_ids": torch.randint(0, 99, (3, 11), generator=torch.Generator().manual_seed(0)),
                      "attention_mask": torch.tensor([[1] * 11, [1] * 6 + [0] * 5, [1] * 9 + [0] * 2])}),
    "vit": (lambda: tiny_vit(SurgeConfig(binarize_attention=True)),
            lambda: {"pixel_values": torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))}),
}


@pytest.mark.parametrize("name", list(PACKED_MODELS))
def test_packed_models_with_binary_attention_run_the_scores_on_the_kernel_exactly(monkeypatch, tmp_path, isas, name):
    build, inputs = PACKED_MODELS[name]
    model = build().eval()
    model.save_pretrained(tmp_path, packed=True)
    packed = type(model).from_pretrained(tmp_path).eval()
    counted = CountedScores(monkeypatch)
    with torch.no_grad():
        with kernels.disabled():
            expected = model(**inputs()).logits
            assert torch.equal(packed(**inputs()).logits, expected) and counted.calls == 0
        for isa in isas:
            with kernels.use_isa(isa):
                assert torch.equal(packed(**inputs()).logits, expected), isa
    assert counted.calls == len(attention_modules(packed)) * len(isas)
