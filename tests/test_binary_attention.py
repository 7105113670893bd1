"""Binary attention: the {0, alpha} probabilities and their gradients, the attention function against a
hand-computed reference, exact finalize and packed reload (ViT and BERT)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageClassification, BertConfig, BertModel, ViTConfig, ViTForImageClassification

from surge_hf import SurgeConfig, SurgeViTConfig, SurgeViTForImageClassification, binarize, finalize
from surge_hf.binary_attention import BinaryAttentionProbabilities, add_binary_attention, binary_attention_forward


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
