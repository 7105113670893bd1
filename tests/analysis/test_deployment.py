"""Deployment numbers: the float32 twin, the bytes a packed model holds, the speed report in `summary()` and in the
model card, and the bit account of int8 embeddings."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig

from model_card_contexts import text_context
from surge_hf import (
    BinaryLinear,
    Int8Embedding,
    SurgeBertConfig,
    SurgeBertForSequenceClassification,
    SurgeConfig,
    measure_deployment,
    summary,
)
from surge_hf.analysis.deployment import float32_twin
from surge_hf.hub.model_card import render_model_card

VOCAB, HIDDEN, POSITIONS, INTERMEDIATE = 99, 32, 64, 37


def packed_model() -> SurgeBertForSequenceClassification:
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS, num_labels=2)
    torch.manual_seed(0)
    surge_config = SurgeBertConfig.from_bert_config(config, surge_config=SurgeConfig())
    return SurgeBertForSequenceClassification(surge_config).finalize()


def inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))}


def test_float32_twin_holds_the_dequantized_weights_and_leaves_the_model_packed():
    model = packed_model().quantize_embeddings(["bert.embeddings.word_embeddings"])
    twin = float32_twin(model)
    for name, module in model.named_modules():
        if isinstance(module, BinaryLinear):
            plain = twin.get_submodule(name)
            assert type(plain) is nn.Linear and torch.equal(plain.weight, module.dequantized_weight())
            assert torch.equal(plain.bias, module.bias)
    word = twin.get_submodule("bert.embeddings.word_embeddings")
    assert type(word) is nn.Embedding
    assert torch.equal(word.weight, model.get_submodule("bert.embeddings.word_embeddings").weight)
    assert isinstance(model.get_submodule("bert.embeddings.word_embeddings"), Int8Embedding) and model.is_packed


def test_report_counts_the_bytes_held_and_times_both_forms():
    model = packed_model()
    report = measure_deployment(model, inputs(), file_bytes=1234, rounds=2)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    layers = [m for m in model.modules() if isinstance(m, BinaryLinear)]
    # kernel panels: ceil(N / 16) * ceil(K / 64) * 16 int64 words, plus one int32 +1-count per output
    panel_bytes = sum(-(-m.out_features // 16) * -(-m.in_features // 64) * 16 * 8 + 4 * m.out_features
                      for m in layers)
    assert report.packed_tensor_bytes == state_bytes + panel_bytes
    twin_bytes = sum(t.numel() * t.element_size() for t in float32_twin(model).state_dict().values())
    assert report.float32_tensor_bytes == twin_bytes
    assert report.packed_ms > 0 and report.float32_ms > 0 and report.speedup == report.float32_ms / report.packed_ms
    assert report.input_shapes == {"input_ids": [2, 9]} and report.file_bytes == 1234 and report.rounds == 2
    assert report.threads == torch.get_num_threads()


def test_summary_and_model_card_show_the_report():
    model = packed_model()
    report = measure_deployment(model, inputs(), rounds=1)
    account = summary(model, deployment=report)
    assert account.to_dict()["deployment"] == report.to_dict()
    assert f"({report.speedup:.1f}x faster)" in str(account)
    card = render_model_card("text", text_context(deployment=report.to_dict()))
    assert "## Speed and memory on a CPU" in card
    assert f"| ms per forward | {report.packed_ms:.2f} | {report.float32_ms:.2f} |" in card
    assert "`input_ids` 2 x 9," in card
    assert "## Speed and memory on a CPU" not in render_model_card("text", text_context())
    assert "deployment" not in summary(model).to_dict()


def test_bit_account_of_int8_embeddings():
    model = packed_model()
    before = summary(model)
    model.quantize_embeddings()
    account = summary(model)
    int8 = (VOCAB + POSITIONS + 2) * HIDDEN
    rows = VOCAB + POSITIONS + 2
    assert account.int8_params == int8 and account.to_dict()["int8_params"] == int8
    assert account.float32_bytes == before.float32_bytes
    assert account.packed_bytes == before.packed_bytes - 4 * int8 + int8 + 4 * rows
    assert "int8 embedding parameters" in str(account)


def test_measure_deployment_errors():
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=INTERMEDIATE)
    trainable = SurgeBertForSequenceClassification(SurgeBertConfig.from_bert_config(config))
    with pytest.raises(ValueError, match=r"needs a packed model; call model.finalize\(\)"):
        measure_deployment(trainable, inputs())
    with pytest.raises(ValueError, match=r"rounds must be >= 1, got 0"):
        measure_deployment(packed_model(), inputs(), rounds=0)
