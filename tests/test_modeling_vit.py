"""Binary ViT as a transformers model: config, binarized targets, loading plain ViT checkpoints (original key
names on disk), the image-classification loss with the auxiliary term, both checkpoint forms, and `Trainer`."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from surge_hf import (
    BinaryLinear,
    SurgeConfig,
    SurgeLinear,
    SurgeViTConfig,
    SurgeViTForImageClassification,
    SurgeViTModel,
)

LAYER_LINEARS = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")
SURGE_ONLY = ("aux_weight", "input_threshold", "input_scale")


def vit_config(**changes) -> ViTConfig:
    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=8,
                  patch_size=4, num_channels=3, num_labels=3, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    fields.update(changes)
    return ViTConfig(**fields)


def model_for(cls, recipe: SurgeConfig | None = None, **changes):
    torch.manual_seed(0)
    return cls(SurgeViTConfig.from_vit_config(vit_config(**changes), surge_config=recipe))


def pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_config_round_trip_and_rejects_other_architectures(tmp_path):
    config = SurgeViTConfig.from_vit_config(vit_config(), surge_config=SurgeConfig(eta=0.2))
    assert config.model_type == "surge_vit" and config.surge_config == SurgeConfig(eta=0.2)
    config.save_pretrained(tmp_path / "surge")
    loaded = AutoConfig.from_pretrained(tmp_path / "surge")
    assert type(loaded) is SurgeViTConfig and loaded.surge_config == config.surge_config and loaded.image_size == 8
    AutoConfig.for_model("bert").save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=re.escape("SurgeViTConfig builds on a `vit` config, but this config has "
                                                   "model_type `bert`.")):
        SurgeViTConfig.from_pretrained(tmp_path / "bert")


@pytest.mark.parametrize(
    ("cls", "prefix", "full_precision"),
    [(SurgeViTModel, "", {"pooler.dense"}), (SurgeViTForImageClassification, "vit.", {"classifier"})],
)
def test_default_recipe_binarizes_exactly_the_transformer_layer_linears(cls, prefix, full_precision):
    model = model_for(cls)
    expected = {f"{prefix}layers.{i}.{name}" for i in range(2) for name in LAYER_LINEARS}
    assert {name for name, module in model.named_modules() if isinstance(module, SurgeLinear)} == expected
    assert {name for name, module in model.named_modules() if type(module) is nn.Linear} == full_precision
    assert type(model.get_submodule(f"{prefix}embeddings.patch_embeddings.projection")) is nn.Conv2d


def test_plain_vit_checkpoint_becomes_the_latent_weights(tmp_path):
    torch.manual_seed(3)
    plain = ViTForImageClassification(vit_config())
    plain.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:  # the original key names are on disk
        assert "vit.encoder.layer.0.attention.attention.query.weight" in handle.keys()
    model, info = SurgeViTForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {f"vit.layers.{i}.{name}.{param}" for i in range(2) for name in LAYER_LINEARS
                                    for param in SURGE_ONLY}
    assert info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    plain_state = plain.state_dict()
    for key, value in model.state_dict().items():
        if not key.endswith(SURGE_ONLY):
            assert torch.equal(value, plain_state[key]), key
    for name, layer in model.named_modules():
        if isinstance(layer, SurgeLinear):
            assert torch.equal(layer.aux_weight, plain_state[f"{name}.weight"]), name


def test_plain_base_checkpoint_loads_with_a_new_head(tmp_path):
    ViTModel(vit_config(), add_pooling_layer=False).save_pretrained(tmp_path)
    model, info = SurgeViTForImageClassification.from_pretrained(tmp_path, num_labels=4, output_loading_info=True)
    assert {key for key in info["missing_keys"] if not key.endswith(SURGE_ONLY)} == {"classifier.weight",
                                                                                      "classifier.bias"}
    assert model.classifier.out_features == 4
    assert torch.equal(model.vit.layers[1].mlp.fc2.aux_weight, model.vit.layers[1].mlp.fc2.weight)


def test_loss_includes_the_auxiliary_loss_in_training_only():
    model = model_for(SurgeViTForImageClassification, SurgeConfig(aux_loss_weight=0.5))
    labels = torch.tensor([2, 0])
    model.eval()
    evaluated = model(pixel_values=pixels(), labels=labels)
    assert torch.equal(evaluated.loss, F.cross_entropy(evaluated.logits, labels))
    model.train()
    trained = model(pixel_values=pixels(), labels=labels)
    assert evaluated.aux_loss is None and trained.aux_loss.item() > 0
    assert torch.equal(trained.loss, F.cross_entropy(trained.logits, labels) + trained.aux_loss)


def test_outputs_and_auto_classes():
    model = model_for(SurgeViTForImageClassification).eval()
    model.set_attn_implementation("eager")  # sdpa returns no attention weights
    out = model(pixel_values=pixels(), output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (2, 3)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 5, 32)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 2, 5, 5)
    as_tuple = model(pixel_values=pixels(), return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)
    config = model.config
    assert type(AutoModel.from_config(config)) is SurgeViTModel
    assert type(AutoModelForImageClassification.from_config(config)) is SurgeViTForImageClassification


def test_train_and_packed_forms_round_trip(tmp_path):
    model = model_for(SurgeViTForImageClassification, SurgeConfig(activation_binarizer="elastic")).eval()
    with torch.no_grad():  # move away from the init: aux weights and thresholds must load, not be re-derived
        model.vit.layers[0].mlp.fc1.aux_weight.add_(1.0)
        model.vit.layers[0].mlp.fc1.input_threshold.fill_(0.25)
    logits = model(pixel_values=pixels()).logits
    model.save_pretrained(tmp_path / "train")
    model.save_pretrained(tmp_path / "packed", packed=True)
    with safe_open(tmp_path / "packed" / "model.safetensors", "pt") as handle:
        names = set(handle.keys())
    prefix = "vit.encoder.layer.0.intermediate.dense."
    assert {name for name in names if name.startswith(prefix)} == {
        f"{prefix}{param}" for param in ("weight_packed", "weight_scale", "bias", "input_threshold", "input_scale")}

    train = AutoModelForImageClassification.from_pretrained(tmp_path / "train")
    assert type(train) is SurgeViTForImageClassification
    for key, value in model.state_dict().items():
        assert torch.equal(train.state_dict()[key], value), key
    assert torch.equal(train(pixel_values=pixels()).logits, logits)

    packed = AutoModelForImageClassification.from_pretrained(tmp_path / "packed")
    assert isinstance(packed.vit.layers[0].mlp.fc1, BinaryLinear) and packed.config.surge_packed
    finalized = model.finalize()
    assert torch.equal(packed(pixel_values=pixels()).logits, finalized(pixel_values=pixels()).logits)
    assert torch.equal(finalized(pixel_values=pixels()).logits, logits)


class _Images(torch.utils.data.Dataset):
    def __init__(self, count: int):
        generator = torch.Generator().manual_seed(5)
        self.pixels = torch.randn(count, 3, 8, 8, generator=generator)
        self.labels = torch.randint(0, 3, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def test_trainer_trains_it(tmp_path):
    model = model_for(SurgeViTForImageClassification, SurgeConfig(aux_loss_weight=0.1))
    layer = model.vit.layers[1].attention.v_proj
    weight, aux_weight = layer.weight.detach().clone(), layer.aux_weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                             report_to="none", use_cpu=True, logging_strategy="no", save_strategy="no",
                             disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=_Images(12)).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(layer.weight, weight) and not torch.equal(layer.aux_weight, aux_weight)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = model_for(SurgeViTForImageClassification).train()
    labels = torch.tensor([1, 2])

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(pixel_values=pixels(), labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name
