"""Upgrading from the previous release: every renamed or removed API names its replacement, and checkpoints whose
config.json holds the recipe under the previous key (`surge`) load as they are."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

import surge_hf
from model_card_contexts import text_context
from surge_hf import (
    SurgeBertConfig,
    SurgeBertForSequenceClassification,
    SurgeConfig,
    SurgeConv2d,
    SurgeLinear,
    binarize_modules,
    configuration_surge,
    layers,
    quantizers,
    resolve_targets,
)
from surge_hf.auto import adopt_surge_classes
from surge_hf.binary_attention import add_binary_attention
from surge_hf.hub.model_card import ModelCardContext, render_model_card
from surge_hf.layers import BinaryConv2d, BinaryLinear
from surge_hf.shortcuts import add_shortcuts
from surge_hf.training.export import export_run

# The recipe fields of the previous release (SurgeConfig gained the others since, with defaults that do what that
# release did); its config.json held them under `surge`, without `surge_int8_embeddings`.
PREVIOUS_RECIPE_FIELDS = ("target_modules", "exclude_modules", "binarize_weights", "binarize_activations",
                          "weight_scale", "activation_binarizer", "surrogate", "swish_beta", "compensator", "eta",
                          "aux_weight", "lambda_placement", "scale_aux_grad", "aux_loss_weight", "eps", "version")
PREVIOUS_RECIPE = SurgeConfig(activation_binarizer="rsign")  # that release's default


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def test_removed_functions_and_modules_name_their_replacements():
    auxiliary_loss = (
        "surge_hf.auxiliary_loss(model) was removed: the auxiliary loss is collected during the forward pass. Use "
        "`with surge_hf.collect_auxiliary_loss() as aux: outputs = model(**batch)` and add aux.total() to the loss; a "
        "SURGE model also returns it as outputs.aux_loss, included in outputs.loss. See CHANGELOG.md.")
    with pytest.raises(ImportError, match=exact(auxiliary_loss)):
        from surge_hf import auxiliary_loss  # noqa: F401
    with pytest.raises(ImportError, match=exact(auxiliary_loss)):
        surge_hf.auxiliary_loss  # noqa: B018
    with pytest.raises(AttributeError, match=exact("module 'surge_hf' has no attribute 'nothing'")):
        surge_hf.nothing  # noqa: B018
    with pytest.raises(ImportError, match=exact(
            "surge_hf.distillation was merged into surge_hf.training.objective: import DistillationConfig, "
            "compute_loss, logits_distillation_loss, layerwise_mse and soft_cross_entropy from "
            "surge_hf.training.objective (DistillationConfig and compute_loss also from surge_hf). See CHANGELOG.md.")):
        importlib.import_module("surge_hf.distillation")
    with pytest.raises(ImportError, match=exact(
            "surge_hf.losses was removed, and auxiliary_loss(model) with it: the auxiliary loss is collected during "
            "the forward pass. Use `with surge_hf.collect_auxiliary_loss() as aux: outputs = model(**batch)` and add "
            "aux.total() to the loss; a SURGE model also returns it as outputs.aux_loss, included in outputs.loss, "
            "and surge_hf.training.objective.compute_loss counts it once. See CHANGELOG.md.")):
        importlib.import_module("surge_hf.losses")
    with pytest.raises(ImportError, match=exact(
            "surge_hf.binarize.binarize moved: import the public function as `from surge_hf import binarize` (it "
            "also gives a transformers BERT / ViT its SURGE class), or use surge_hf.binarize.binarize_modules to swap "
            "the layers only.")):
        importlib.import_module("surge_hf.binarize").binarize  # noqa: B018


def test_moved_names_keep_their_old_import_locations():
    from surge_hf import aux_loss
    from surge_hf.training import objective

    for name in ("AuxiliaryLossCollector", "collect_auxiliary_loss", "record_auxiliary_loss"):
        assert getattr(objective, name) is getattr(aux_loss, name)
    assert surge_hf.collect_auxiliary_loss is aux_loss.collect_auxiliary_loss


# Modules of the previous release that moved into a subpackage: old name -> new name (CHANGELOG.md's table).
MOVED_MODULES = {
    "surge_hf.accounting": "surge_hf.analysis.accounting",
    "surge_hf.deployment": "surge_hf.analysis.deployment",
    "surge_hf.demo": "surge_hf.data.demo",
    "surge_hf.glue_metric": "surge_hf.data.glue_metric",
    "surge_hf.image_data": "surge_hf.data.image",
    "surge_hf.image_processing": "surge_hf.data.image_processing",
    "surge_hf.image_transforms": "surge_hf.data.image_transforms",
    "surge_hf.metrics": "surge_hf.data.metrics",
    "surge_hf.text_augmentation": "surge_hf.data.text_augmentation",
    "surge_hf.text_data": "surge_hf.data.text",
    "surge_hf.calibration": "surge_hf.training.calibration",
    "surge_hf.checkpointing": "surge_hf.training.checkpointing",
    "surge_hf.cli": "surge_hf.training.cli",
    "surge_hf.compatibility": "surge_hf.training.compatibility",
    "surge_hf.export": "surge_hf.training.export",
    "surge_hf.image_teachers": "surge_hf.training.image_teachers",
    "surge_hf.objective": "surge_hf.training.objective",
    "surge_hf.output_dir": "surge_hf.training.output_dir",
    "surge_hf.stages": "surge_hf.training.stages",
    "surge_hf.teacher_cache": "surge_hf.training.teacher_cache",
    "surge_hf.trainer": "surge_hf.training.trainer",
}


def moved_message(old: str, new: str) -> str:
    return f"{old} moved to {new}: import it from there (the old name works until the next release). See CHANGELOG.md."


def forget(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """Make the next import of `module` (a name of surge_hf) run the import system again."""
    monkeypatch.delitem(sys.modules, module, raising=False)
    if module.removeprefix("surge_hf.") in vars(surge_hf):  # (hasattr would import it)
        monkeypatch.delattr(surge_hf, module.removeprefix("surge_hf."))


@pytest.mark.parametrize(("old", "new"), sorted(MOVED_MODULES.items()))
def test_a_moved_module_imports_from_its_old_name_as_the_new_module_with_a_warning(old, new, monkeypatch):
    forget(monkeypatch, old)
    with pytest.warns(FutureWarning, match=exact(moved_message(old, new))):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert sys.modules[old] is module and getattr(surge_hf, old.removeprefix("surge_hf.")) is module


def test_old_module_paths_work_in_every_form_of_import(monkeypatch):
    for old in [*MOVED_MODULES, "surge_hf.glue_metric.glue_metric"]:
        forget(monkeypatch, old)
    with pytest.warns(FutureWarning, match=exact(moved_message("surge_hf.accounting", "surge_hf.analysis.accounting"))):
        from surge_hf.accounting import summary
    assert summary is surge_hf.summary
    with pytest.warns(FutureWarning, match=exact(moved_message("surge_hf.deployment", "surge_hf.analysis.deployment"))):
        assert surge_hf.deployment is importlib.import_module("surge_hf.analysis.deployment")
    with pytest.warns(FutureWarning) as caught:
        import surge_hf.glue_metric.glue_metric as glue_metric
    assert [str(warning.message) for warning in caught] == [
        moved_message("surge_hf.glue_metric", "surge_hf.data.glue_metric"),
        moved_message("surge_hf.glue_metric.glue_metric", "surge_hf.data.glue_metric.glue_metric")]
    assert glue_metric is importlib.import_module("surge_hf.data.glue_metric.glue_metric")
    with pytest.warns(FutureWarning, match=exact(moved_message("surge_hf.objective", "surge_hf.training.objective"))):
        from surge_hf.objective import compute_loss
    assert compute_loss is surge_hf.compute_loss


def test_the_names_of_a_module_that_became_a_subpackage_are_found_in_its_modules(monkeypatch):
    import surge_hf.hub
    import surge_hf.training
    from surge_hf.hub import model_card, upload
    from surge_hf.training import loop

    for package, name in [(surge_hf.training, "train"), (surge_hf.training, "TrainingConfig"),
                          (surge_hf.hub, "push_to_hub"), (surge_hf.hub, "render_model_card")]:
        if name in vars(package):  # kept there by an earlier lookup (hasattr would look it up)
            monkeypatch.delattr(package, name)
    with pytest.warns(FutureWarning, match=exact(moved_message("surge_hf.training.train",
                                                               "surge_hf.training.loop.train"))):
        from surge_hf.training import train
    assert train is loop.train
    with pytest.warns(FutureWarning, match=exact(moved_message("surge_hf.training.TrainingConfig",
                                                               "surge_hf.training.loop.TrainingConfig"))):
        assert surge_hf.training.TrainingConfig is loop.TrainingConfig
    with pytest.raises(AttributeError, match=exact("module 'surge_hf.training' has no attribute 'nothing'")):
        surge_hf.training.nothing  # noqa: B018
    with pytest.warns(FutureWarning, match=exact(moved_message("surge_hf.hub.push_to_hub",
                                                               "surge_hf.hub.upload.push_to_hub"))):
        from surge_hf.hub import push_to_hub
    assert push_to_hub is upload.push_to_hub is surge_hf.push_to_hub
    with pytest.warns(FutureWarning, match=exact(moved_message("surge_hf.hub.render_model_card",
                                                               "surge_hf.hub.model_card.render_model_card"))):
        assert surge_hf.hub.render_model_card is model_card.render_model_card


def test_renamed_layer_constructors_name_from_float():
    with pytest.raises(AttributeError, match=exact(
            "SurgeLinear.from_linear() was renamed SurgeLinear.from_float() (same arguments). See CHANGELOG.md.")):
        SurgeLinear.from_linear(nn.Linear(2, 2), SurgeConfig())
    with pytest.raises(AttributeError, match=exact(
            "SurgeConv2d.from_conv() was renamed SurgeConv2d.from_float() (same arguments). See CHANGELOG.md.")):
        SurgeConv2d.from_conv(nn.Conv2d(2, 2, 1), SurgeConfig())


def test_renamed_config_attributes_name_surge_config():
    config = SurgeBertConfig(hidden_size=32, num_attention_heads=2)
    with pytest.raises(AttributeError, match=exact(
            "config.surge was renamed config.surge_config, which holds the SurgeConfig itself (its to_dict() gives "
            "the dict that config.surge held). See CHANGELOG.md.")):
        config.surge  # noqa: B018
    with pytest.raises(AttributeError, match=exact("config.surge_recipe was renamed config.surge_config. See "
                                                   "CHANGELOG.md.")):
        config.surge_recipe  # noqa: B018
    with pytest.raises(ValueError, match=exact(
            "The SURGE recipe of a SurgeBertConfig is `surge_config` (`surge=` is only the keyword of "
            "from_pretrained); set config.surge_config, or pass surge_config=.")):
        config.surge = SurgeConfig().to_dict()


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory) -> dict:
    """Checkpoints in both forms written as the previous release wrote them (its tensors are the current ones; its
    config.json held the recipe under `surge`), and the logits they give."""
    root = tmp_path_factory.mktemp("previous")
    torch.manual_seed(0)
    config = SurgeBertConfig.from_bert_config(
        BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                   max_position_embeddings=64, num_labels=2), surge_config=PREVIOUS_RECIPE)
    model = SurgeBertForSequenceClassification(config).eval()
    ids = torch.randint(1, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    for form in ("train", "packed"):
        model.save_pretrained(root / form, packed=form == "packed")
        path = root / form / "config.json"
        saved = json.loads(path.read_text())
        recipe = saved.pop("surge_config")
        del saved["surge_int8_embeddings"]
        saved["surge"] = {field: recipe[field] for field in PREVIOUS_RECIPE_FIELDS}
        saved["auto_map"] = {key: value for key, value in saved["auto_map"].items()
                             if key in ("AutoConfig", "AutoModelForSequenceClassification")}
        path.write_text(json.dumps(saved))
    return {"root": root, "ids": ids, "logits": model(input_ids=ids).logits.detach()}


@pytest.mark.parametrize("form", ["train", "packed"])
def test_a_checkpoint_of_the_previous_release_loads_and_saves_in_the_current_form(previous_release, form, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(previous_release["root"] / form)
    assert model.config.surge_config == PREVIOUS_RECIPE
    assert model.is_packed is (form == "packed")
    assert torch.equal(model(input_ids=previous_release["ids"]).logits, previous_release["logits"])
    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert "surge" not in saved and saved["surge_config"] == PREVIOUS_RECIPE.to_dict()


def test_a_config_with_both_recipe_keys_is_an_error(previous_release, tmp_path):
    shutil.copytree(previous_release["root"] / "train", tmp_path / "both")
    path = tmp_path / "both" / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "surge_config": saved["surge"]}))
    with pytest.raises(ValueError, match=exact(
            "This config has both `surge` (the recipe key of the previous release) and `surge_config`; remove "
            "`surge` from config.json.")):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "both")


def renamed_keyword_message(function: str, old: str) -> str:
    return (f"{function}({old}=...) was renamed {function}(surge_config=...); {old}= works until the next release. "
            "See CHANGELOG.md.")


def tiny_bert() -> nn.Module:
    config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    return BertForSequenceClassification(config)


def test_renamed_recipe_keywords_warn_and_work():
    """Every public function and class that took the `SurgeConfig` under another keyword takes `surge_config`; the
    previous keyword works until the next release, with a FutureWarning naming the new one."""
    recipe = SurgeConfig(target_modules=["intermediate.dense"])
    with pytest.warns(FutureWarning, match=exact(renamed_keyword_message("binarize", "config"))):
        model = surge_hf.binarize(tiny_bert(), config=recipe)
    assert model.config.surge_config == recipe and isinstance(model, SurgeBertForSequenceClassification)
    with pytest.warns(FutureWarning, match=exact(renamed_keyword_message("binarize_modules", "config"))):
        assert isinstance(binarize_modules(tiny_bert(), config=recipe).bert.encoder.layer[0].intermediate.dense,
                          SurgeLinear)
    with pytest.warns(FutureWarning, match=exact(renamed_keyword_message("resolve_targets", "config"))):
        assert resolve_targets(tiny_bert(), config=recipe) == ["bert.encoder.layer.0.intermediate.dense"]
    model.finalize()
    other = recipe.replace(eta=0.3)
    with pytest.warns(FutureWarning, match=exact(renamed_keyword_message("unfinalize", "config"))):
        surge_hf.unfinalize(model, config=other)
    assert model.bert.encoder.layer[0].intermediate.dense.surge_config == other
    with pytest.warns(FutureWarning, match=exact(renamed_keyword_message("add_shortcuts", "config"))):
        add_shortcuts(model, config=other)
    bert = tiny_bert()
    with pytest.warns(FutureWarning, match=exact(renamed_keyword_message("add_binary_attention", "config"))):
        add_binary_attention(bert, config=SurgeConfig(binarize_attention=True))
    with pytest.warns(FutureWarning, match=exact(renamed_keyword_message("adopt_surge_classes", "recipe"))):
        adopt_surge_classes(bert, recipe=recipe)
    assert bert.config.surge_config == recipe
    with pytest.warns(FutureWarning, match=exact(renamed_keyword_message("SurgeLinear", "config"))):
        assert SurgeLinear(3, 2, config=recipe).surge_config == recipe
    with pytest.warns(FutureWarning, match=exact(renamed_keyword_message("SurgeConv2d", "config"))):
        assert SurgeConv2d(3, 2, 1, config=recipe).surge_config == recipe
    with pytest.warns(FutureWarning, match=exact(renamed_keyword_message("SurgeLinear.from_float", "config"))):
        assert SurgeLinear.from_float(nn.Linear(3, 2), config=recipe).surge_config == recipe
    with pytest.warns(FutureWarning, match=exact(renamed_keyword_message("SurgeConv2d.from_float", "config"))):
        assert SurgeConv2d.from_float(nn.Conv2d(3, 2, 1), config=recipe).surge_config == recipe
    with pytest.warns(FutureWarning, match=exact(renamed_keyword_message("BinaryLinear", "recipe"))):
        assert BinaryLinear(3, 2, True, recipe=recipe).surge_config == recipe
    with pytest.warns(FutureWarning, match=exact(renamed_keyword_message("BinaryConv2d", "recipe"))):
        assert BinaryConv2d(3, 2, (1, 1), 1, 0, 1, 1, True, recipe=recipe).surge_config == recipe


@pytest.mark.parametrize(("function", "old"), [
    (surge_hf.binarize, "config"), (binarize_modules, "config"), (resolve_targets, "config"),
    (surge_hf.unfinalize, "config"), (add_shortcuts, "config"), (add_binary_attention, "config"),
    (adopt_surge_classes, "recipe"), (SurgeLinear, "config"), (SurgeConv2d, "config"),
    (SurgeLinear.from_float, "config"), (SurgeConv2d.from_float, "config"), (BinaryLinear, "recipe"),
    (BinaryConv2d, "recipe"), (export_run, "recipe"), (ModelCardContext, "surge_recipe"),
])
def test_the_old_and_the_new_recipe_keyword_together_are_an_error(function, old):
    name = function.__qualname__.removesuffix(".__init__") if not isinstance(function, type) else function.__name__
    with pytest.raises(TypeError, match=exact(f"{name}() got both surge_config= and {old}= (its previous name); "
                                              "pass surge_config= only.")):
        function(surge_config=SurgeConfig(), **{old: SurgeConfig()})


def test_the_model_card_context_takes_its_recipe_as_surge_config():
    context = text_context()
    recipe = context.pop("surge_config")
    message = renamed_keyword_message("ModelCardContext", "surge_recipe")
    with pytest.warns(FutureWarning, match=exact(message)):
        built = ModelCardContext(**context, surge_recipe=recipe)
    assert built.surge_config == recipe
    with pytest.warns(FutureWarning, match=exact(message)):
        assert ModelCardContext.from_dict({**context, "surge_recipe": recipe}) == built
    with pytest.warns(FutureWarning, match=exact(message)):
        assert render_model_card("text", {**context, "surge_recipe": recipe}) == render_model_card("text", built)
    with pytest.warns(FutureWarning, match=exact("ModelCardContext.surge_recipe was renamed "
                                                 "ModelCardContext.surge_config; surge_recipe works until the next "
                                                 "release. See CHANGELOG.md.")):
        assert built.surge_recipe == recipe


def test_renamed_quantizer_names_warn_and_work():
    """The function `weight_scale` is `binary_weight_scale` (the recipe field `SurgeConfig.weight_scale` and the
    layers' tensor `weight_scale` keep their names: checkpoints hold them); the dict `SURROGATES` is
    `SURROGATE_FUNCTIONS` (`configuration_surge.SURROGATES`, the tuple of surrogate names, keeps its name)."""
    for old, new in (("weight_scale", "binary_weight_scale"), ("SURROGATES", "SURROGATE_FUNCTIONS")):
        with pytest.warns(FutureWarning, match=exact(f"surge_hf.quantizers.{old} was renamed "
                                                     f"surge_hf.quantizers.{new}; the old name works until the next "
                                                     "release. See CHANGELOG.md.")):
            assert getattr(quantizers, old) is getattr(quantizers, new)
    with pytest.warns(FutureWarning):
        from surge_hf.quantizers import weight_scale
    assert weight_scale is quantizers.binary_weight_scale
    assert set(quantizers.SURROGATE_FUNCTIONS) == set(configuration_surge.SURROGATES)
    with pytest.raises(AttributeError, match=exact("module 'surge_hf.quantizers' has no attribute 'nothing'")):
        quantizers.nothing  # noqa: B018


def test_renamed_layer_base_classes_warn_and_are_the_new_classes():
    """`layers.SurgeLayerMixin` and `layers.BinaryLayerMixin`, the `nn.Module` base classes of the SURGE and the
    packed layers, are `SurgeLayer` and `BinaryLayer`: the same classes, so `isinstance` checks keep working."""
    layer = SurgeLinear(4, 3, surge_config=SurgeConfig())
    packed = BinaryLinear.from_surge(layer)
    for old, new, instance in (("SurgeLayerMixin", "SurgeLayer", layer), ("BinaryLayerMixin", "BinaryLayer", packed)):
        with pytest.warns(FutureWarning, match=exact(f"surge_hf.layers.{old} was renamed surge_hf.layers.{new}; the "
                                                     "old name works until the next release. See CHANGELOG.md.")):
            renamed = getattr(layers, old)
        assert renamed is getattr(layers, new)
        assert isinstance(instance, renamed)
    with pytest.warns(FutureWarning):
        from surge_hf.layers import BinaryLayerMixin
    assert BinaryLayerMixin is layers.BinaryLayer
    with pytest.raises(AttributeError, match=exact("module 'surge_hf.layers' has no attribute 'LayerMixin'")):
        layers.LayerMixin  # noqa: B018
