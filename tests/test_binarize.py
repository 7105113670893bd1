"""binarize / finalize / unfinalize / diagnostics on a tiny random BERT and ViT (hidden 32, 2 layers) and on small
hand-built models: exactly the expected modules swapped, parameters reused, no training-only state after
finalize, identical outputs throughout."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

from surge_hf import (
    BinaryConv2d,
    BinaryLinear,
    SurgeConfig,
    SurgeConv2d,
    SurgeLinear,
    binarize,
    diagnostics,
    finalize,
    resolve_targets,
    surge_layers,
    unfinalize,
)
from surge_hf.quantizers import binary_weight_scale, sign

BERT_TARGETS = [
    f"bert.encoder.layer.{i}.{suffix}"
    for i in range(2)
    for suffix in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                   "intermediate.dense", "output.dense")
]
VIT_TARGETS = [
    f"vit.layers.{i}.{suffix}"
    for i in range(2)
    for suffix in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")
]


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(config)


def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=37, num_labels=3)
    return ViTForImageClassification(config)


def _bert_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 50, (2, 6), generator=g),
            "attention_mask": torch.ones(2, 6, dtype=torch.long), "labels": torch.tensor([0, 2])}


def _vit_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g), "labels": torch.tensor([1, 2])}


def _swapped(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, (SurgeLinear, SurgeConv2d))]


def _train(model: nn.Module, batch: dict, steps: int = 2) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()


# -- which modules are swapped ---------------------------------------------------------------------------------------
def test_bert_default_targets() -> None:
    model = tiny_bert()
    before = dict(model.named_parameters())
    before_keys = set(model.state_dict())
    binarize(model, SurgeConfig())
    assert _swapped(model) == BERT_TARGETS
    assert all(type(model.get_submodule(n)) is SurgeLinear for n in BERT_TARGETS)
    # embeddings, pooler and classifier untouched
    assert type(model.bert.embeddings.word_embeddings) is nn.Embedding
    assert type(model.bert.pooler.dense) is nn.Linear
    assert type(model.classifier) is nn.Linear
    # the very same parameter objects under the same names
    after = dict(model.named_parameters())
    assert all(after[name] is param for name, param in before.items())
    added = {f"{n}.{p}" for n in BERT_TARGETS for p in ("aux_weight", "input_threshold", "input_scale")}
    assert set(model.state_dict()) == before_keys | added


def test_plain_checkpoint_loads_into_binarized_model() -> None:
    plain = tiny_bert()
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    model = binarize(tiny_bert(), SurgeConfig())
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    added = [f"{n}.{p}" for n in BERT_TARGETS for p in ("aux_weight", "input_threshold", "input_scale")]
    assert sorted(result.missing_keys) == sorted(added)
    name = "bert.encoder.layer.1.output.dense.weight"
    assert torch.equal(model.get_parameter(name), state[name])


def test_vit_default_targets() -> None:
    model = tiny_vit()
    before = dict(model.named_parameters())
    binarize(model, SurgeConfig(compensator="ste"))
    assert _swapped(model) == VIT_TARGETS
    assert type(model.vit.embeddings.patch_embeddings.projection) is nn.Conv2d
    assert type(model.classifier) is nn.Linear
    after = dict(model.named_parameters())
    assert all(after[name] is param for name, param in before.items())
    assert set(after) == set(before) | {f"{n}.{p}" for n in VIT_TARGETS for p in ("input_threshold", "input_scale")}


def test_vit_patch_embedding_as_conv_target() -> None:
    model = tiny_vit()
    conv = model.vit.embeddings.patch_embeddings.projection
    binarize(model, SurgeConfig(target_modules=["projection"]))
    swapped = model.vit.embeddings.patch_embeddings.projection
    assert _swapped(model) == ["vit.embeddings.patch_embeddings.projection"]
    assert type(swapped) is SurgeConv2d and swapped.weight is conv.weight
    assert (swapped.stride, swapped.kernel_size, swapped.padding) == (conv.stride, conv.kernel_size, conv.padding)


@pytest.mark.parametrize(
    ("target", "exclude", "expected"),
    [
        (["query", "value"], None, [n for n in BERT_TARGETS if n.endswith(("query", "value"))]),
        # a suffix matches whole name components: "output.dense" is the FFN output and the attention output
        (["output.dense"], None, [n for n in BERT_TARGETS if n.endswith("output.dense")]),
        (["classifier", "pooler.dense"], None, ["bert.pooler.dense", "classifier"]),
        (r".*layer\.1\.(intermediate|output)\.dense", None,
         ["bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.output.dense"]),
        (None, ["intermediate.dense"], [n for n in BERT_TARGETS if "intermediate" not in n]),
        (None, r".*\.layer\.0\..*", BERT_TARGETS[6:]),
        (["dense"], ["pooler.dense", "attention.output.dense"],
         ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense",
          "bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.output.dense"]),
    ],
)
def test_target_and_exclude(target, exclude, expected: list[str]) -> None:
    model = tiny_bert()
    cfg = SurgeConfig(target_modules=target, exclude_modules=exclude)
    assert resolve_targets(model, cfg) == expected
    binarize(model, cfg)
    assert _swapped(model) == expected


def test_refuses_to_binarize_twice() -> None:
    message = "This model is already binarized; binarize() applies once. Start from the float model."
    model = binarize(tiny_bert(), SurgeConfig())
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        binarize(model, SurgeConfig())
    finalize(model)
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        binarize(model, SurgeConfig())


def test_pattern_matching_nothing_raises_before_any_swap() -> None:
    model = tiny_bert()
    with pytest.raises(ValueError, match=re.escape("SurgeConfig.target_modules entry 'q_proj' matches no")):
        binarize(model, SurgeConfig(target_modules=["query", "q_proj"]))
    assert _swapped(model) == []


# -- finalize / unfinalize -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [SurgeConfig(lambda_placement="previous", activation_binarizer="elastic"),
     SurgeConfig(aux_weight="shared", compensator="fixed", weight_scale="tensor"),
     SurgeConfig(compensator="ste", activation_binarizer="sign")],
)
def test_bert_finalize_and_unfinalize(cfg: SurgeConfig) -> None:
    model = binarize(tiny_bert(), cfg)
    batch = _bert_batch()
    _train(model, batch)
    model.eval()
    with torch.no_grad():
        reference = model(**batch).logits
    finalize(model)
    assert not model.training
    keys = set(model.state_dict())
    assert not any(k.endswith(("aux_weight", "previous_lambda")) for k in keys)
    assert not any(isinstance(m, (SurgeLinear, SurgeConv2d)) for m in model.modules())
    assert [n for n, m in model.named_modules() if isinstance(m, BinaryLinear)] == BERT_TARGETS
    assert {f"{n}.weight_packed" for n in BERT_TARGETS} <= keys
    assert not any(f"{n}.weight" in keys for n in BERT_TARGETS)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)

    unfinalize(model)
    assert _swapped(model) == BERT_TARGETS
    layer = model.get_submodule(BERT_TARGETS[0])
    assert layer.surge_config == cfg
    assert all(p.requires_grad for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)
    # and it trains again
    model.train()
    model(**batch).loss.backward()
    for name in BERT_TARGETS:
        grad = model.get_submodule(name).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_vit_finalize_and_unfinalize() -> None:
    model = binarize(tiny_vit(), SurgeConfig(lambda_placement="previous"))
    batch = _vit_batch()
    _train(model, batch)
    model.eval()
    with torch.no_grad():
        reference = model(**batch).logits
    finalize(model)
    assert [n for n, m in model.named_modules() if isinstance(m, BinaryLinear)] == VIT_TARGETS
    assert not any(k.endswith(("aux_weight", "previous_lambda")) for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)
    unfinalize(model, SurgeConfig(compensator="ste"))
    assert _swapped(model) == VIT_TARGETS
    assert model.vit.layers[0].mlp.fc1.aux_weight is None
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False), nn.ReLU(),
                                  nn.Conv2d(8, 6, 1))
        self.head = nn.Linear(6 * 2 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).flatten(1))


def test_cnn_finalize_and_unfinalize() -> None:
    torch.manual_seed(0)
    model = binarize(_SmallCNN(), SurgeConfig(target_modules=r"body\.\d+", activation_binarizer="elastic"))
    assert _swapped(model) == ["body.0", "body.2"]
    x = torch.randn(2, 3, 4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        reference = model(x)
    finalize(model)
    assert [type(m) for m in model.body] == [BinaryConv2d, nn.ReLU, BinaryConv2d]
    assert sorted(model.body.state_dict()) == [
        "0.input_scale", "0.input_threshold", "0.weight_packed", "0.weight_scale",
        "2.bias", "2.input_scale", "2.input_threshold", "2.weight_packed", "2.weight_scale",
    ]
    with torch.no_grad():
        assert torch.equal(model(x), reference)
    unfinalize(model)
    assert [type(m) for m in model.body] == [SurgeConv2d, nn.ReLU, SurgeConv2d]
    assert (model.body[0].stride, model.body[0].groups, model.body[0].padding) == ((2, 2), 2, (1, 1))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference)


def test_vit_binarized_patch_embedding_survives_finalize() -> None:
    """HF ViT reads `projection.weight.dtype`: a packed layer answers with its dequantized weight, which is neither
    a parameter nor in the state dict, and outputs stay identical."""
    model = tiny_vit()
    binarize(model, SurgeConfig(target_modules=["projection"]))
    batch = _vit_batch()
    _train(model, batch)
    model.eval()
    with torch.no_grad():
        reference = model(**batch).logits
    finalize(model)
    projection = model.vit.embeddings.patch_embeddings.projection
    assert isinstance(projection, BinaryConv2d)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)
    assert torch.equal(projection.weight, projection.dequantized_weight())
    assert projection.weight.dtype == torch.float32 and projection.weight.shape == (32, 3, 4, 4)
    assert sorted(k for k in model.state_dict() if k.startswith("vit.embeddings.patch_embeddings.")) == [
        "vit.embeddings.patch_embeddings.projection.bias",
        "vit.embeddings.patch_embeddings.projection.input_scale",
        "vit.embeddings.patch_embeddings.projection.input_threshold",
        "vit.embeddings.patch_embeddings.projection.weight_packed",
        "vit.embeddings.patch_embeddings.projection.weight_scale",
    ]
    assert "weight" not in dict(projection.named_parameters())
    with pytest.raises(KeyError, match="attribute 'weight' already exists"):
        projection.weight = nn.Parameter(torch.zeros(32, 3, 4, 4))
    unfinalize(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)


def test_packed_layer_with_float_weights_keeps_its_weight_parameter() -> None:
    layer = SurgeLinear(6, 4, surge_config=SurgeConfig(binarize_weights=False, target_modules=["x"]))
    packed = BinaryLinear.from_surge(layer)
    assert packed.weight is dict(packed.named_parameters())["weight"]
    assert torch.equal(packed.weight, layer.weight)


def test_finalize_and_unfinalize_need_the_right_layers() -> None:
    with pytest.raises(ValueError, match=re.escape("finalize() found no SURGE layer in this model; call "
                                                   "surge_hf.binarize(model) first.")):
        finalize(tiny_bert())
    with pytest.raises(ValueError, match=re.escape("unfinalize() found no packed binary layer in this model.")):
        unfinalize(tiny_bert())


def test_finalized_model_refuses_training_forward() -> None:
    model = finalize(binarize(tiny_bert(), SurgeConfig()))
    model.train()
    with pytest.raises(RuntimeError, match=re.escape("Call `surge_hf.unfinalize(model)`")):
        model(**_bert_batch())


# -- diagnostics -----------------------------------------------------------------------------------------------------
def test_diagnostics_reference_values_and_sign_flips() -> None:
    eta = 0.3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        # |W| in [0.2, 1.4]: no zeros, and signs known
        magnitudes = torch.linspace(0.2, 1.4, 30).reshape(5, 6)
        model[0].weight.copy_(magnitudes * torch.tensor([1.0, -1.0]).repeat(15).reshape(5, 6))
    binarize(model, SurgeConfig(target_modules=["0"], activation_binarizer="sign", eta=eta))
    layer = model[0]
    assert [name for name, _ in surge_layers(model)] == ["0"]
    assert diagnostics(model) == {"0": {"sign_flip_ratio": 0.0}}  # no backward yet; first call snapshots signs

    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3)) * 1.5
    x[0, :3] = 0.0
    g_y = torch.randn(4, 5, generator=torch.Generator().manual_seed(4))
    (layer(x) * g_y).sum().backward()

    W = layer.weight.detach()
    W_q = W.abs().mean(dim=1, keepdim=True) * torch.where(W >= 0, 1.0, -1.0)
    g_b = (g_y @ W_q) * (x.abs() <= 1).float()
    g_a = g_y @ layer.aux_weight.detach()
    norm_b, norm_a = g_b.double().norm().item(), g_a.double().norm().item()
    diag = diagnostics(model)["0"]
    assert set(diag) == {"lam", "grad_norm_binary", "grad_norm_aux", "sign_flip_ratio"}
    assert diag["grad_norm_binary"] == pytest.approx(norm_b, rel=1e-6)
    assert diag["grad_norm_aux"] == pytest.approx(norm_a, rel=1e-6)
    assert diag["lam"] == pytest.approx(eta * norm_b / (norm_a + 1e-8), rel=1e-6)
    assert diag["sign_flip_ratio"] == 0.0

    # An SGD step (lr = 1) with a hand-made gradient: 2 W flips the sign of 4 entries, 0.5 W flips none.
    optimizer = torch.optim.SGD([layer.weight], lr=1.0)
    grad = torch.zeros_like(W)
    for i, j in [(0, 0), (1, 3), (2, 5), (4, 1)]:
        grad[i, j] = 2 * W[i, j]
    for i, j in [(0, 1), (3, 3)]:
        grad[i, j] = 0.5 * W[i, j]
    layer.weight.grad = grad
    optimizer.step()
    assert diagnostics(model)["0"]["sign_flip_ratio"] == pytest.approx(4 / 30, rel=1e-6)
    assert diagnostics(model)["0"]["sign_flip_ratio"] == 0.0  # no change since the last call


# -------------------------------------------------------------------------------------- failures and meta models
def test_binarize_that_fails_half_way_leaves_the_model_unchanged():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    first = model[0]
    with pytest.raises(ValueError, match=re.escape("SurgeConv2d supports padding_mode='zeros' only, got 'reflect'.")):
        binarize(model, SurgeConfig(target_modules=["0", "1"]))
    assert model[0] is first and type(model[1]) is nn.Conv2d


def test_binarize_revalidates_a_recipe_changed_behind_its_back():
    recipe = SurgeConfig(target_modules=["0"])
    object.__setattr__(recipe, "eta", -3.0)  # what `recipe.eta = -3` did before SurgeConfig was frozen
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=re.escape("SurgeConfig.eta=-3.0 must be >= 0.")):
        binarize(model, recipe)
    assert type(model[0]) is nn.Linear


def _float_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def test_binarize_on_meta_then_to_empty_and_load_state_dict_matches_binarize_on_cpu():
    recipe = SurgeConfig(target_modules=["0", "2"], activation_binarizer="elastic", lambda_placement="previous")
    torch.manual_seed(0)
    trained = _float_mlp()
    reference = binarize(_float_mlp(), recipe)
    reference.load_state_dict(trained.state_dict(), strict=False)  # weights and biases only
    for layer in (reference[0], reference[2]):
        layer.reset_surge_parameters()
    with torch.device("meta"):
        model = _float_mlp()
    binarize(model, recipe).to_empty(device="cpu")
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="was binarized on the meta device and its SURGE-only tensors were never "):
        model(x)
    model.load_state_dict(trained.state_dict())  # strict: the SURGE-only tensors are filled from the weights
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert torch.equal(model[0].aux_weight, trained[0].weight)
    assert torch.equal(model(x), reference(x))


def test_two_plane_layers_compute_their_residual_weight_and_refuse_to_pack() -> None:
    recipe = SurgeConfig(weight_planes=2, binarize_activations=False, compensator="ste")
    model = binarize(tiny_bert(), recipe).eval()
    layer = model.bert.encoder.layer[0].output.dense
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    weight = layer.weight.detach()
    alpha = binary_weight_scale(weight, "channel")
    residual = weight - alpha * sign(weight)
    two_planes = alpha * sign(weight) + binary_weight_scale(residual, "channel") * sign(residual)
    torch.testing.assert_close(layer(x), x @ two_planes.T + layer.bias, rtol=1e-5, atol=1e-6)
    assert "W2A32" in repr(layer)
    message = ("bert.encoder.layer.0.attention.self.query has weight_planes=2: a two-plane (2-bit) training stage "
               "cannot be packed to 1 bit.")
    with pytest.raises(ValueError, match=re.escape(message)):
        finalize(model)
    assert isinstance(layer, SurgeLinear)  # nothing was replaced


def test_a_second_plane_weight_steps_a_one_plane_layer_down_from_two_planes() -> None:
    """A 1-bit layer with second_plane_weight g computes W_b = alpha (s_1 + g (alpha_2 / alpha_1) s_2): at g = 1 the
    two-plane layer's output exactly, at g = 0 the 1-bit layer's; packing refuses g != 0."""
    base = tiny_bert()
    one = binarize(copy.deepcopy(base), SurgeConfig(binarize_activations=False, compensator="ste")).eval()
    two = binarize(copy.deepcopy(base), SurgeConfig(weight_planes=2, binarize_activations=False,
                                                    compensator="ste")).eval()
    layer, two_plane_layer = one.bert.encoder.layer[0].output.dense, two.bert.encoder.layer[0].output.dense
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    one_bit = layer(x)
    layer.second_plane_weight = 1.0
    assert torch.equal(layer(x), two_plane_layer(x))
    layer.second_plane_weight = 0.5
    weight = layer.weight.detach()
    alpha = binary_weight_scale(weight, "channel")
    residual = weight - alpha * sign(weight)
    halfway = alpha * sign(weight) + 0.5 * binary_weight_scale(residual, "channel") * sign(residual)
    torch.testing.assert_close(layer(x), x @ halfway.T + layer.bias, rtol=1e-5, atol=1e-6)
    message = ("bert.encoder.layer.0.output.dense still weights its second weight plane by 0.5 (a run stepping "
               "down from two planes, TrainingConfig.plane_anneal_steps, that did not reach its end)")
    with pytest.raises(ValueError, match=re.escape(message)):
        finalize(one)
    layer.second_plane_weight = 0.0
    assert torch.equal(layer(x), one_bit)
    assert "second_plane_weight" not in str(list(one.state_dict()))  # not saved: g is training state
