"""Flags derived from config dataclasses (`surge_hf.training.config_flags`), and the scripts' flags built that way:
each setting is declared once, as a config field whose docstring entry is the flag's help."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import load_script
from surge_hf.configuration_surge import SURROGATES, SurgeConfig
from surge_hf.data.text_augmentation import TextAugmentationConfig
from surge_hf.hub.upload import HubConfig
from surge_hf.training import cli
from surge_hf.training.config_flags import add_config_flags, config_from_flags, field_docs, flag_values
from surge_hf.training.loop import TrainingConfig
from surge_hf.training.objective import DistillationConfig

glue_script = load_script("glue")
vit_script = load_script("vit")


@dataclass
class Example:
    """An example config.

    Args:
        rate: the rate,
            over two lines.
        mode: one of the modes.
        switch: a switch.
        limit: an optional limit.
        pattern: a regular expression or a list.
        folder: where it goes.
    Returns:
        not_a_field: ignored.
    """

    rate: float = 0.5
    mode: str = field(default="a", metadata={"choices": ("a", "b")})
    switch: bool = False
    limit: int | None = None
    pattern: str | list[str] | None = None
    folder: str = field(default="out", metadata={"flag_type": Path})


def parser_for(**options) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_flags(parser, Example, **options)
    return parser


def test_field_docs_reads_each_fields_entry_with_its_continuation_lines():
    assert field_docs(Example) == {"rate": "the rate, over two lines.", "mode": "one of the modes.",
                                   "switch": "a switch.", "limit": "an optional limit.",
                                   "pattern": "a regular expression or a list.", "folder": "where it goes."}


def test_flags_are_typed_by_the_annotation_and_documented_by_the_docstring():
    parser = parser_for()
    args = parser.parse_args(["--rate", "2", "--mode", "b", "--switch", "--limit", "7", "--pattern", "x.*",
                              "--folder", "f"])
    assert vars(args) == {"rate": 2.0, "mode": "b", "switch": True, "limit": 7, "pattern": "x.*",
                          "folder": Path("f")}
    assert config_from_flags(Example, args) == Example(2.0, "b", True, 7, "x.*", Path("f"))
    assert vars(parser.parse_args([])) == {"rate": 0.5, "mode": "a", "switch": False, "limit": None,
                                           "pattern": None, "folder": Path("out")}  # string defaults are typed too
    assert parser.parse_args(["--no-switch"]).switch is False
    helps = {action.dest: action.help for action in parser._actions}
    assert helps["rate"] == "the rate, over two lines." and helps["switch"] == "a switch."
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'c'"):
        parser.parse_args(["--mode", "c"])
    with pytest.raises(argparse.ArgumentError, match="invalid int value: '1.5'"):
        parser.parse_args(["--limit", "1.5"])


def test_prefix_rename_selection_defaults_and_unset():
    parser = parser_for(prefix="ex_", rename={"rate": "speed"}, only=("rate", "mode", "switch"),
                        defaults={"mode": "b"})
    args = parser.parse_args(["--speed", "3", "--ex_switch"])
    assert vars(args) == {"speed": 3.0, "ex_mode": "b", "ex_switch": True}
    assert flag_values(args, Example, prefix="ex_", rename={"rate": "speed"}) == {
        "rate": 3.0, "mode": "b", "switch": True}
    # fields without a flag keep their defaults; overrides win over flags
    assert config_from_flags(Example, args, prefix="ex_", rename={"rate": "speed"}, limit=4) == Example(
        rate=3.0, mode="b", switch=True, limit=4)
    assert vars(parser_for(unset=True, skip=("folder",)).parse_args([])) == dict.fromkeys(
        ("rate", "mode", "switch", "limit", "pattern"))


SCRIPTS = {"glue": glue_script, "vit": vit_script}


def script_actions(script) -> dict[str, argparse.Action]:
    return {action.dest: action for action in script.build_parser()._actions}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_config_field_is_one_flag_documented_by_its_field(name):
    """Each setting is declared once: every field of the run's configs has its flag, whose help is the field's
    docstring entry and whose choices are the field's (glue takes every distillation term, vit the logits terms)."""
    actions = script_actions(SCRIPTS[name])
    expected = {
        TrainingConfig: {f.name: f.name for f in dataclasses.fields(TrainingConfig)},
        HubConfig: {f.name: f.name for f in dataclasses.fields(HubConfig)},
        SurgeConfig: {f.name: f.name for f in dataclasses.fields(SurgeConfig)
                      if f.name not in ("compensator", "weight_planes", "eps", "version")},
        DistillationConfig: {f.name: "embedding_mixup_alpha" if f.name == "embedding_mixup_alpha"
                             else f"distill_{f.name}" for f in dataclasses.fields(DistillationConfig)
                             if name == "glue" or f.name in ("temperature", "label_weight", "logits_weight")},
    }
    if name == "glue":
        expected[TextAugmentationConfig] = {"copies": "augment", "replace_probability": "augment_replace_probability",
                                            "drop_probability": "augment_drop_probability",
                                            "recombine_probability": "augment_recombine_probability"}
    for config_class, flags in expected.items():
        docs = field_docs(config_class)
        for field_name, dest in flags.items():
            assert dest in actions, f"{config_class.__name__}.{field_name} has no --{dest}"
            assert actions[dest].help == docs[field_name], dest
            config_field = next(f for f in dataclasses.fields(config_class) if f.name == field_name)
            assert actions[dest].choices == config_field.metadata.get("choices"), dest
    assert actions["surrogate"].choices == SURROGATES
    assert isinstance(actions["overwrite_output_dir"], argparse.BooleanOptionalAction)


def test_glue_flags_build_the_configs_they_name(tmp_path):
    argv = ["--model_name_or_path", "m", "--train_file", "t.csv", "--validation_file", "v.csv",
            "--output_dir", str(tmp_path / "o"), "--learning_rate", "0.002", "--max_grad_norm", "0",
            "--lr_scheduler_type", "cosine", "--binary_weight_decay", "0", "--distill_temperature", "2",
            "--distill_hidden_states_loss", "normalized", "--distill_mask_padding", "--embedding_mixup_alpha", "0.4",
            "--eta", "0.3", "--no-learnable_weight_scale", "--aux_weight", "frozen", "--augment", "2",
            "--augment_drop_probability", "0.2", "--seed", "5", "--with_tracking"]
    args = glue_script.parse_args(argv)
    assert cli.training_config_from_args(args) == TrainingConfig(
        output_dir=str(tmp_path / "o"), learning_rate=0.002, max_grad_norm=None, lr_scheduler_type="cosine",
        binary_weight_decay=0.0, per_device_train_batch_size=32, per_device_eval_batch_size=64, num_train_epochs=4,
        calibrate_activations=True, seed=5, report_to="all")
    assert cli.distillation_from_args(args, "teacher") == DistillationConfig(
        temperature=2.0, hidden_states_weight=1.0, hidden_states_loss="normalized", mask_padding=True,
        embedding_mixup_alpha=0.4)
    assert cli.distillation_from_args(args, None) is None
    assert cli.recipe_from_args(args) == SurgeConfig(eta=0.3, learnable_weight_scale=False, aux_weight="frozen")
    assert cli.recipe_from_args(args, weight_planes=2).weight_planes == 2
    assert glue_script.augmentation_config(args) == TextAugmentationConfig(copies=2, drop_probability=0.2, seed=5)


def test_max_grad_norm_zero_disables_clipping_as_in_transformers():
    assert TrainingConfig(output_dir="o", max_grad_norm=0).max_grad_norm is None
    with pytest.raises(ValueError, match=r"TrainingConfig.max_grad_norm must be > 0, got -1"):
        TrainingConfig(output_dir="o", max_grad_norm=-1)
