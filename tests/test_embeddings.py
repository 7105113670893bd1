"""int8 embeddings with per-row scales and 4-bit embeddings with per-group scales: the quantisation maths, the
nibble packing, lookups that dequantise only the requested rows, the exact round trip through a packed checkpoint
(and the config of an int8 checkpoint saved before 4-bit tables existed), strict loading, and the errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig

from surge_hf import SurgeBertConfig, SurgeBertForSequenceClassification, SurgeConfig, summary
from surge_hf.embeddings import (
    Int4Embedding,
    Int8Embedding,
    pack_nibbles,
    quantize_embeddings,
    quantize_groups,
    quantize_rows,
    unpack_nibbles,
)

WORD = "bert.embeddings.word_embeddings"
OTHER_EMBEDDINGS = ["bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings"]
ALL_EMBEDDINGS = [WORD, *OTHER_EMBEDDINGS]
GROUP_SIZES = {8: None, 4: 16}  # the tiny model's tables are 32 wide


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


@pytest.mark.parametrize(("bits", "codes"), [(8, "weight_int8"), (4, "weight_int4")])
def test_missing_codes_are_an_error(tmp_path, bits, codes):
    tiny_packed_model().quantize_embeddings([WORD], bits=bits, group_size=GROUP_SIZES[bits]).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors[f"{WORD}.{codes}"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    message = f"is incomplete: 1 tensor(s) of binarized layers are missing or have the wrong shape ({WORD}.{codes})"
    with pytest.raises(ValueError, match=re.escape(message)):
        SurgeBertForSequenceClassification.from_pretrained(tmp_path)


@pytest.mark.parametrize("bits", [8, 4])
def test_unfinalize_restores_float_embeddings_with_the_dequantised_rows(bits):
    model = tiny_packed_model().quantize_embeddings([WORD], bits=bits, group_size=GROUP_SIZES[bits])
    rows = model.get_submodule(WORD).weight
    model.unfinalize()
    assert type(model.get_submodule(WORD)) is nn.Embedding
    assert torch.equal(model.get_submodule(WORD).weight, rows)
    assert model.config.surge_int8_embeddings is None and model.config.surge_int4_embeddings is None


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


# ---------------------------------------------------------------------------------------------- 4-bit tables
def test_quantize_groups_codes_and_scales_of_a_hand_made_table():
    table = torch.tensor([[3.5, -1.2, 0.3, 0.0, 1.4, 0.2, -1.4, 0.6], [0.0] * 8])
    codes, scale = quantize_groups(table, group_size=4)
    assert torch.equal(scale, torch.tensor([[3.5, 1.4], [7.0, 7.0]]) / 7)
    assert torch.equal(codes, torch.tensor([[7, -2, 1, 0, 7, 1, -7, 3], [0] * 8], dtype=torch.int8))
    # nibble = code + 8; byte k = column 2k (low nibble) | column 2k + 1 (high nibble)
    assert torch.equal(pack_nibbles(codes), torch.tensor([[15 | 6 << 4, 9 | 8 << 4, 15 | 9 << 4, 1 | 11 << 4],
                                                          [8 | 8 << 4] * 4], dtype=torch.uint8))


def test_nibble_packing_of_an_odd_width_pads_the_last_high_nibble():
    codes = torch.tensor([[-7, 7, 0, 1, -1]], dtype=torch.int8)
    packed = pack_nibbles(codes)
    assert torch.equal(packed, torch.tensor([[1 | 15 << 4, 8 | 9 << 4, 7]], dtype=torch.uint8))
    assert torch.equal(unpack_nibbles(packed, 5), codes)
    embedding = nn.Embedding(3, 5)
    int4 = Int4Embedding.from_embedding(embedding, group_size=5)
    codes, scale = quantize_groups(embedding.weight, 5)
    assert int4.weight_int4.shape == (3, 3) and torch.equal(int4.weight_int4, pack_nibbles(codes))
    assert torch.equal(int4(torch.tensor([2, 0])), codes[[2, 0]].float() * scale[[2, 0]])


@pytest.mark.parametrize("group_size", [4, 8, 16])
def test_quantize_groups_error_bound(group_size):
    table = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    codes, scale = quantize_groups(table, group_size)
    assert scale.shape == (50, 16 // group_size)
    assert codes.reshape(50, -1, group_size).abs().amax(dim=2).eq(7).all()
    columns_scale = scale.repeat_interleave(group_size, dim=1)
    error = (table - codes.float() * columns_scale).abs()
    assert (error <= columns_scale / 2 + 1e-7).all()


def test_int4_lookup_dequantises_the_requested_rows():
    embedding = nn.Embedding(20, 8, padding_idx=0)
    int4 = Int4Embedding.from_embedding(embedding, group_size=4)
    codes, scale = quantize_groups(embedding.weight, 4)
    ids = torch.tensor([[3, 0, 19], [3, 5, 5]])
    expected = codes[ids].float() * scale[ids].repeat_interleave(4, dim=-1)
    assert torch.equal(int4(ids), expected)
    assert torch.equal(int4.weight[ids], expected)
    assert {name: (buffer.dtype, tuple(buffer.shape)) for name, buffer in int4.named_buffers()} == {
        "weight_int4": (torch.uint8, (20, 4)), "weight_scale": (torch.float32, (20, 2))}
    assert list(int4.parameters()) == [] and int4.padding_idx == 0
    assert repr(int4) == "Int4Embedding(20, 8, 4-bit with a scale per 4 columns, padding_idx=0)"


def test_int4_and_int8_tables_round_trip_exactly_through_a_packed_checkpoint(tmp_path):
    model = tiny_packed_model().quantize_embeddings([WORD], bits=4, group_size=16).quantize_embeddings()
    assert model.config.surge_int4_embeddings == {WORD: 16}
    assert model.config.surge_int8_embeddings == OTHER_EMBEDDINGS
    with torch.no_grad():
        expected = model(input_ids()).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["surge_int4_embeddings"] == {WORD: 16}
    stored = load_file(tmp_path / "model.safetensors")
    assert stored[f"{WORD}.weight_int4"].dtype == torch.uint8 and f"{WORD}.weight" not in stored
    assert stored[f"{WORD}.weight_scale"].shape == (99, 2)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(loaded.get_submodule(WORD)) is Int4Embedding and loaded.get_submodule(WORD).group_size == 16
    assert all(type(loaded.get_submodule(name)) is Int8Embedding for name in OTHER_EMBEDDINGS)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(loaded(input_ids()).logits, expected)


def test_an_int8_checkpoint_whose_config_predates_4_bit_tables_loads(tmp_path):
    model = tiny_packed_model().quantize_embeddings()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["surge_int4_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert loaded.config.surge_int4_embeddings is None and loaded.config.surge_int8_embeddings == ALL_EMBEDDINGS
    with torch.no_grad():
        assert torch.equal(loaded(input_ids()).logits, model(input_ids()).logits)


def test_bit_account_of_4_bit_tables():
    model = tiny_packed_model()
    before = summary(model)
    model.quantize_embeddings([WORD], bits=4, group_size=8)
    account = summary(model)
    values = 99 * 32
    assert account.int4_params == values and account.to_dict()["int4_params"] == values
    assert account.float32_bytes == before.float32_bytes
    assert account.packed_bytes == before.packed_bytes - 4 * values + values // 2 + 4 * 99 * 4
    assert "4-bit embedding parameters" in str(account)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bits": 3}, "bits must be 8 (int8 codes, one scale per row) or 4 (4-bit codes, one scale per group of "
                  "group_size columns), got 3."),
    ({"bits": 8, "group_size": 16}, "group_size applies to bits=4 only (an int8 table has one scale per row); got "
                                    "group_size=16 with bits=8. Drop group_size, or pass bits=4."),
    ({"bits": 4, "group_size": 0}, "group_size must be a positive integer that divides the embedding width (e.g. "
                                   "128), or None for 128; got 0."),
    ({"bits": 4, "group_size": 12}, "group_size=12 does not divide the width 32 of the embedding "
                                    "'bert.embeddings.word_embeddings'; pass a divisor of 32, e.g. 8 "
                                    "(group_size=32 is one scale per row)."),
])
def test_bad_bits_or_group_size_are_refused_before_any_change(kwargs, message):
    model = tiny_packed_model()
    with pytest.raises(ValueError, match=re.escape(message)):
        model.quantize_embeddings(**kwargs)
    assert all(type(model.get_submodule(name)) is nn.Embedding for name in ALL_EMBEDDINGS)
    assert model.config.surge_int8_embeddings is None and model.config.surge_int4_embeddings is None


def test_a_tied_embedding_is_refused_before_any_table_is_swapped():
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    tied[2].weight = tied[1].weight
    with pytest.raises(ValueError, match=r"The embedding '1' shares its weight with '2.weight' \(tied weights\)"):
        quantize_embeddings(tied, bits=4, group_size=2)
    assert type(tied[0]) is nn.Embedding


def test_surge_int4_embeddings_config_values():
    config = tiny_packed_model().config
    with pytest.raises(ValueError, match=re.escape(
            "surge_int4_embeddings must map module names to group sizes (positive integers) or be None, got "
            "{'bert.embeddings.word_embeddings': 0}.")):
        config.surge_int4_embeddings = {WORD: 0}
    with pytest.raises(ValueError, match=r"surge_int4_embeddings must map module names to group sizes"):
        config.surge_int4_embeddings = [WORD]


def test_resize_token_embeddings_refuses_4_bit_tables():
    model = tiny_packed_model().quantize_embeddings([WORD], bits=4, group_size=16)
    with pytest.raises(ValueError, match=re.escape(
            "resize_token_embeddings() cannot resize the 4-bit input embedding table of this packed model "
            "(config.surge_int4_embeddings): its new rows would need training, which a quantized table cannot get.")):
        model.resize_token_embeddings(120)
