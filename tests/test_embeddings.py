"""int8 embeddings with per-row scales: the quantisation maths, lookups that dequantise only the requested rows,
the exact round trip through a packed checkpoint, strict loading, and the errors."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig

from surge_hf import SurgeBertConfig, SurgeBertForSequenceClassification, SurgeConfig
from surge_hf.embeddings import Int8Embedding, quantize_embeddings, quantize_rows

WORD = "bert.embeddings.word_embeddings"
ALL_EMBEDDINGS = [WORD, "bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings"]


def tiny_packed_model() -> SurgeBertForSequenceClassification:
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    surge_config = SurgeBertConfig.from_bert_config(config, surge_config=SurgeConfig(activation_binarizer="elastic"))
    return SurgeBertForSequenceClassification(surge_config).finalize()


def input_ids() -> torch.Tensor:
    return torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(3))


def test_quantize_rows_values_and_error_bound():
    quantized, scale = quantize_rows(torch.tensor([[0.5, -1.27, 0.0, 0.004], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(scale, torch.tensor([1.27 / 127, 1.0]))
    assert torch.equal(quantized, torch.tensor([[50, -127, 0, 0], [0, 0, 0, 0]], dtype=torch.int8))
    table = torch.randn(50, 16)
    quantized, scale = quantize_rows(table)
    assert quantized.abs().amax(dim=1).eq(127).all()
    error = (table - quantized.float() * scale.unsqueeze(1)).abs()
    assert (error <= scale.unsqueeze(1) / 2 + 1e-7).all()


def test_lookup_dequantises_the_requested_rows():
    embedding = nn.Embedding(20, 8, padding_idx=0)
    int8 = Int8Embedding.from_embedding(embedding)
    ids = torch.tensor([[3, 0, 19], [3, 5, 5]])
    expected = int8.weight_int8[ids].float() * int8.weight_scale[ids].unsqueeze(-1)
    assert torch.equal(int8(ids), expected)
    assert torch.equal(int8.weight[ids], expected)
    assert {name: buffer.dtype for name, buffer in int8.named_buffers()} == {"weight_int8": torch.int8,
                                                                            "weight_scale": torch.float32}
    assert list(int8.parameters()) == [] and int8.padding_idx == 0


def test_packed_checkpoint_round_trip_is_exact(tmp_path):
    model = tiny_packed_model().quantize_embeddings()
    assert model.config.surge_int8_embeddings == ALL_EMBEDDINGS
    with torch.no_grad():
        expected = model(input_ids()).logits
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert stored[f"{WORD}.weight_int8"].dtype == torch.int8 and f"{WORD}.weight" not in stored
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert isinstance(loaded.get_submodule(WORD), Int8Embedding)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(loaded(input_ids()).logits, expected)


def test_missing_int8_rows_are_an_error(tmp_path):
    tiny_packed_model().quantize_embeddings([WORD]).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors[f"{WORD}.weight_int8"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    message = f"is incomplete: 1 tensor(s) of binarized layers are missing or have the wrong shape ({WORD}.weight_int8)"
    with pytest.raises(ValueError, match=re.escape(message)):
        SurgeBertForSequenceClassification.from_pretrained(tmp_path)


def test_unfinalize_restores_float_embeddings_with_the_dequantised_rows():
    model = tiny_packed_model().quantize_embeddings([WORD])
    rows = model.get_submodule(WORD).weight
    model.unfinalize()
    assert type(model.get_submodule(WORD)) is nn.Embedding
    assert torch.equal(model.get_submodule(WORD).weight, rows)
    assert model.config.surge_int8_embeddings is None


def test_quantize_embeddings_errors():
    model = tiny_packed_model()
    with pytest.raises(ValueError, match=r"'bert.nope' is not an nn.Embedding of this model; its embeddings are: "
                                         r"bert.embeddings.word_embeddings, "):
        model.quantize_embeddings(["bert.nope"])
    trainable = SurgeBertForSequenceClassification(model.config.__class__.from_base_config(model.config))
    with pytest.raises(ValueError, match=re.escape(
            "quantize_embeddings() applies to a packed (inference) model: this one has trainable SURGE layers, which "
            "would train around frozen quantized tables, and its train-form checkpoint would not load them. Call "
            "model.finalize() (surge_hf.finalize(model)) first.")):
        trainable.quantize_embeddings()
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match=r"The embedding '0' shares its weight with '1.weight' \(tied weights\)"):
        quantize_embeddings(tied)
    with pytest.raises(ValueError, match=r"surge_int8_embeddings must be a list of module names or None"):
        model.config.surge_int8_embeddings = "bert.embeddings.word_embeddings"
