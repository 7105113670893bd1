"""summary(): the bit account against hand counts, for a small hand-built model and for a tiny random BERT."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from surge_hf import SurgeConfig, binarize, finalize, summary


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(128, 10)
        self.head = nn.Linear(10, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc1(self.norm(self.conv2(self.conv(x))).flatten(1)))


def _rows(account) -> list[tuple]:
    return [(r.name, r.kind, r.binary_params, r.scale_params, r.full_precision_params, r.training_only_params,
             r.packed_weight_bytes, r.macs, r.binary_macs) for r in account.layers]


# Hand counts for _Small with conv2 and fc1 binarized (rsign, channel scales, separate W_a), input (2, 3, 4, 4):
#   conv  : 3*8*9 + 8 = 224 full precision;                     MACs 2*8*16 outputs * 27 = 6912
#   conv2 : 8*4*9 = 288 binary, 8 scales, 8 thresholds, 288 W_a; 8 rows * ceil(36/8)=5 -> 40 bytes;
#           MACs 2*8*16 * 36 = 9216 (binary)
#   norm  : 16 full precision (running stats are buffers, not counted)
#   fc1   : 10*128 = 1280 binary, 10 scales, 128 thresholds + 10 bias, 1280 W_a; 10 * 16 -> 160 bytes;
#           MACs 2*10 * 128 = 2560 (binary)
#   head  : 10*5 + 5 = 55 full precision;                        MACs 2*5 * 10 = 100
SMALL_TRAIN_ROWS = [
    ("conv", "Conv2d", 0, 0, 224, 0, 0, 6912, False),
    ("conv2", "SurgeConv2d", 288, 8, 8, 288, 40, 9216, True),
    ("norm", "BatchNorm2d", 0, 0, 16, 0, 0, None, False),
    ("fc1", "SurgeLinear", 1280, 10, 138, 1280, 160, 2560, True),
    ("head", "Linear", 0, 0, 55, 0, 0, 100, False),
]


def _check_small_totals(account, training_only: int) -> None:
    assert account.binary_params == 288 + 1280
    assert account.full_precision_params == (224 + 8 + 16 + 138 + 55) + (8 + 10)  # scales are stored numbers
    assert account.training_only_params == training_only
    assert account.packed_bytes == 40 + 160 + 4 * 459
    assert account.float32_bytes == 4 * (1568 + 441)
    assert account.compression_ratio == 8036 / 2036
    assert account.binarized_layer_compression_ratio == 4 * 1568 / (200 + 4 * 18)
    assert account.binary_mac_share == (9216 + 2560) / (6912 + 9216 + 2560 + 100)


def test_small_model_training_form() -> None:
    model = binarize(_Small(), SurgeConfig(target_modules=["conv2", "fc1"], activation_binarizer="rsign"))
    model.train()
    account = summary(model, torch.randn(2, 3, 4, 4))
    assert model.training  # summary restores the mode
    assert _rows(account) == SMALL_TRAIN_ROWS
    _check_small_totals(account, training_only=288 + 1280)
    assert account.to_dict() == {
        "binary_params": 1568, "full_precision_params": 459, "training_only_params": 1568, "packed_bytes": 2036,
        "float32_bytes": 8036, "compression_ratio": 8036 / 2036, "binarized_layer_compression_ratio": 6272 / 272,
        "binary_mac_share": 11776 / 18788,
    }
    text = str(account)
    assert "SurgeConv2d" in text and "total" in text and "binary share" in text


def test_small_model_finalized_form() -> None:
    model = finalize(binarize(_Small(), SurgeConfig(target_modules=["conv2", "fc1"], activation_binarizer="rsign")))
    account = summary(model, torch.randn(2, 3, 4, 4))
    expected = [
        (name, {"SurgeConv2d": "BinaryConv2d", "SurgeLinear": "BinaryLinear"}.get(kind, kind), b, s, fp, 0, packed,
         macs, binary)
        for name, kind, b, s, fp, _, packed, macs, binary in SMALL_TRAIN_ROWS
    ]
    assert _rows(account) == expected
    _check_small_totals(account, training_only=0)


def test_small_model_without_example_input() -> None:
    account = summary(binarize(_Small(), SurgeConfig(target_modules=["conv2", "fc1"], compensator="ste")))
    assert [r.macs for r in account.layers] == [None] * 5
    assert account.binary_mac_share is None
    assert account.training_only_params == 0
    assert "binary share" not in str(account)


def test_variants_shared_elastic_and_full_precision_weights() -> None:
    shared = summary(binarize(_Small(), SurgeConfig(target_modules=["fc1"], aux_weight="shared",
                                                    activation_binarizer="elastic", weight_scale="tensor")))
    fc1 = next(r for r in shared.layers if r.name == "fc1")
    assert (fc1.binary_params, fc1.scale_params, fc1.full_precision_params, fc1.training_only_params) == (
        1280, 1, 128 + 10 + 1, 0)
    # W32A1: the weight stays full precision, its MACs are not binary
    w32 = summary(binarize(_Small(), SurgeConfig(target_modules=["fc1"], binarize_weights=False,
                                                                  activation_binarizer="rsign")),
                  torch.randn(1, 3, 4, 4))
    fc1 = next(r for r in w32.layers if r.name == "fc1")
    assert (fc1.binary_params, fc1.scale_params, fc1.full_precision_params, fc1.training_only_params,
            fc1.packed_weight_bytes, fc1.binary_macs) == (0, 0, 1280 + 10 + 128, 1280, 0, False)
    assert w32.binary_mac_share == 0.0
    assert math.isnan(w32.binarized_layer_compression_ratio)


def _tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=16, num_labels=3))


# Tiny BERT (hidden 32, FFN 37, 2 layers), default targets (12 Linear layers):
#   binary weights per layer: q, k, v, o 4 * 32*32 + 37*32 + 32*37 = 6464  -> 12928
#   scales per layer: 4*32 + 37 + 32 = 197 -> 394;  thresholds per layer: 4*32 + 32 + 37 = 197 -> 394
#   full precision without thresholds: embeddings 50*32 + 16*32 + 2*32 + 2*32 = 2240; per layer biases 197 and two
#       LayerNorms 128 -> 650; pooler 32*32 + 32 = 1056; classifier 32*3 + 3 = 99   -> 2240 + 650 + 1056 + 99 = 4045
#   packed bytes per layer: 4 * 32 * 4 + 37 * 4 + 32 * ceil(37/8)=5 = 820 -> 1640
#   MACs for 1 x 5 tokens: 5 * 6464 per layer (binary) -> 64640; pooler 1 * 32 * 32 = 1024; classifier 3 * 32 = 96
BERT_BINARY, BERT_SCALES, BERT_FP = 12928, 394, 4045 + 394


def test_tiny_bert_hand_counts() -> None:
    model = _tiny_bert()
    assert sum(p.numel() for p in model.parameters()) == BERT_BINARY + 4045
    binarize(model, SurgeConfig(activation_binarizer="rsign"))  # thresholds, no activation scales
    account = summary(model, input_ids=torch.tensor([[1, 5, 7, 9, 2]]))
    assert account.binary_params == BERT_BINARY
    assert account.total("scale_params") == BERT_SCALES
    assert account.full_precision_params == BERT_FP + BERT_SCALES
    assert account.training_only_params == BERT_BINARY
    assert account.packed_bytes == 1640 + 4 * (BERT_FP + BERT_SCALES)
    assert account.float32_bytes == 4 * (BERT_BINARY + BERT_FP)
    macs = {r.name: r.macs for r in account.layers if r.macs is not None}
    assert macs["bert.encoder.layer.0.attention.self.query"] == 5 * 32 * 32
    assert macs["bert.encoder.layer.1.output.dense"] == 5 * 37 * 32
    assert macs["bert.pooler.dense"] == 1024 and macs["classifier"] == 96
    assert sum(macs.values()) == 64640 + 1024 + 96
    assert account.binary_mac_share == 64640 / (64640 + 1024 + 96)

    finalized = summary(finalize(model), input_ids=torch.tensor([[1, 5, 7, 9, 2]]))
    for name in ("binary_params", "full_precision_params", "packed_bytes", "float32_bytes", "binary_mac_share"):
        assert getattr(finalized, name) == getattr(account, name), name
    assert finalized.training_only_params == 0
