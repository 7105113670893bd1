"""SurgeConfig: validation (exact messages naming the field and its allowed values), JSON round trips, and the
target/exclude checks that need a model (`resolve_targets`)."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
from torch import nn

from surge_hf import SurgeConfig, binarize, resolve_targets


def _exact(message: str) -> str:
    """A `pytest.raises(match=...)` pattern that matches `message` and nothing longer."""
    return "^" + re.escape(message) + "$"


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("weight_scale", "row", "channel, tensor, none"),
        ("activation_binarizer", "bisign", "sign, rsign, elastic"),
        ("surrogate", "tanh", "clipped_ste, identity, approx_sign, swish_sign"),
        ("compensator", "dpgc", "surge, fixed, ste"),
        ("aux_weight", "copy", "separate, shared, frozen"),
        ("lambda_placement", "next", "fork, previous"),
    ],
)
def test_unknown_choice_names_field_and_allowed_values(field: str, value: str, allowed: str) -> None:
    message = f"SurgeConfig.{field}={value!r} is not valid; allowed values: {allowed}."
    with pytest.raises(ValueError, match=_exact(message)):
        SurgeConfig(**{field: value})


@pytest.mark.parametrize("eta", [-0.1, -1e-12])
def test_negative_eta(eta: float) -> None:
    with pytest.raises(ValueError, match=_exact(f"SurgeConfig.eta={eta!r} must be >= 0.")):
        SurgeConfig(eta=eta)


@pytest.mark.parametrize(
    ("field", "value"),
    [("eta", math.nan), ("eta", math.inf), ("eta", "0.1"), ("eta", True), ("swish_beta", -math.inf),
     ("eps", math.nan), ("aux_loss_weight", None)],
)
def test_non_finite_or_non_numeric(field: str, value) -> None:
    with pytest.raises(ValueError, match=_exact(f"SurgeConfig.{field}={value!r} must be a finite number.")):
        SurgeConfig(**{field: value})


@pytest.mark.parametrize(("field", "value"), [("swish_beta", 0.0), ("eps", -1e-8)])
def test_non_positive_beta_or_eps(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=_exact("SurgeConfig.swish_beta and SurgeConfig.eps must be > 0.")):
        SurgeConfig(**{field: value})


def test_negative_aux_loss_weight() -> None:
    with pytest.raises(ValueError, match=_exact("SurgeConfig.aux_loss_weight=-1.0 must be >= 0.")):
        SurgeConfig(aux_loss_weight=-1.0)


@pytest.mark.parametrize("bits", [0, 3, 16, True, "8"])
def test_activation_bits_allowed_values(bits) -> None:
    message = f"SurgeConfig.activation_bits={bits!r} is not valid; allowed values: 1, 2, 4, 8."
    with pytest.raises(ValueError, match=_exact(message)):
        SurgeConfig(activation_bits=bits, activation_binarizer="elastic")


@pytest.mark.parametrize(("changes", "shown"), [
    ({"activation_bits": 4, "activation_binarizer": "rsign"}, "activation_bits=4"),
    ({"unsigned_activation_modules": ["output.dense"], "activation_binarizer": "sign"}, "activation_bits=1"),
])
def test_uniform_activations_need_a_step(changes: dict, shown: str) -> None:
    binarizer = changes["activation_binarizer"]
    message = (
        f"SurgeConfig.{shown} / unsigned_activation_modules need a learnable step size, but "
        f"activation_binarizer={binarizer!r} has none; set activation_binarizer='elastic'."
    )
    with pytest.raises(ValueError, match=_exact(message)):
        SurgeConfig(**changes)


def test_learnable_weight_scale_needs_a_scale_shape() -> None:
    message = ("SurgeConfig.learnable_weight_scale=True needs weight_scale='channel' or 'tensor' (the shape and "
               "initial value of the learned scale), not 'none'.")
    with pytest.raises(ValueError, match=_exact(message)):
        SurgeConfig(learnable_weight_scale=True, weight_scale="none")


def test_unsigned_modules_must_be_binarized_targets() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    cfg = SurgeConfig(target_modules=["0"], unsigned_activation_modules=["2"], activation_binarizer="elastic")
    with pytest.raises(ValueError, match=r"^SurgeConfig.unsigned_activation_modules entry '2' matches no"):
        binarize(model, cfg)
    cfg = cfg.replace(target_modules=["0", "2"])
    binarize(model, cfg)
    assert model[0].activation_spec.signed and not model[2].activation_spec.signed


@pytest.mark.parametrize("field", ["binarize_weights", "binarize_activations", "scale_aux_grad",
                                   "learnable_weight_scale"])
def test_flags_must_be_bool(field: str) -> None:
    with pytest.raises(ValueError, match=_exact(f"SurgeConfig.{field}=1 must be True or False.")):
        SurgeConfig(**{field: 1})


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
@pytest.mark.parametrize("value", [[], ["query", 3], 7, {"query": 1}])
def test_bad_target_lists(field: str, value) -> None:
    message = (
        f"SurgeConfig.{field}={value!r} must be a regular expression string, a non-empty list of "
        "module-name suffixes, or None."
    )
    with pytest.raises(ValueError, match=_exact(message)):
        SurgeConfig(**{field: value})


def test_target_list_is_held_as_a_tuple_and_written_as_a_list() -> None:
    config = SurgeConfig(target_modules=["query", "key"])
    assert config.target_modules == ("query", "key")
    assert config.to_dict()["target_modules"] == ["query", "key"]
    assert SurgeConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_recipe_is_frozen_after_validation() -> None:
    config = SurgeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'eta'"):
        config.eta = -3
    assert config.eta == 0.1 and config.replace(eta=0.5).eta == 0.5


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_invalid_regular_expression_names_the_field(field: str) -> None:
    message = (
        f"SurgeConfig.{field}='encoder.(layer' is not a valid regular expression (missing ), unterminated "
        "subpattern at position 8); fix the pattern, or pass a list of module-name suffixes instead."
    )
    with pytest.raises(ValueError, match=_exact(message)):
        SurgeConfig(**{field: "encoder.(layer"})


def test_wrong_version() -> None:
    message = (
        "SurgeConfig.version=2 is not supported by this surge_hf; it reads version 1. "
        "Upgrade surge_hf to load this recipe."
    )
    with pytest.raises(ValueError, match=_exact(message)):
        SurgeConfig(version=2)


def test_aux_loss_needs_aux_branch() -> None:
    message = (
        "SurgeConfig.aux_loss_weight > 0 needs an auxiliary branch, but compensator='ste' has none; "
        "set compensator to 'surge' or 'fixed', or aux_loss_weight to 0."
    )
    with pytest.raises(ValueError, match=_exact(message)):
        SurgeConfig(compensator="ste", aux_loss_weight=0.5)
    assert SurgeConfig(compensator="ste", aux_loss_weight=0.0).has_aux_branch is False
    assert SurgeConfig(compensator="fixed", aux_loss_weight=0.5).has_aux_branch is True


def test_defaults() -> None:
    cfg = SurgeConfig()
    assert cfg.to_dict() == {
        "target_modules": None, "exclude_modules": None, "binarize_weights": True, "binarize_activations": True,
        "weight_scale": "channel", "activation_binarizer": "elastic", "surrogate": "clipped_ste", "swish_beta": 5.0,
        "compensator": "surge", "eta": 0.1, "aux_weight": "separate", "lambda_placement": "fork",
        "scale_aux_grad": False, "aux_loss_weight": 0.0, "eps": 1e-8, "shortcuts": False, "shortcut_gate_init": 1.0,
        "binarize_attention": False, "attention_alpha_init": 0.05, "version": 1,
        "activation_bits": 1, "unsigned_activation_modules": None, "learnable_weight_scale": False,
        "weight_planes": 1,
    }


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"target_modules": ["query", "value"], "exclude_modules": r".*layer\.0\..*", "eta": 0.25},
        {"compensator": "fixed", "aux_weight": "shared", "lambda_placement": "previous", "scale_aux_grad": True,
         "aux_loss_weight": 0.01, "surrogate": "swish_sign", "swish_beta": 3.5, "weight_scale": "tensor",
         "activation_binarizer": "elastic", "binarize_activations": False, "eps": 1e-6},
        {"compensator": "ste", "target_modules": ("a",)},
    ],
)
def test_json_round_trip(changes: dict) -> None:
    cfg = SurgeConfig(**changes)
    text = json.dumps(cfg.to_dict())
    back = SurgeConfig.from_dict(json.loads(text))
    assert back == cfg
    assert json.dumps(back.to_dict()) == text


def test_from_dict_unknown_keys_list_known_keys() -> None:
    message = (
        "Unknown SURGE recipe key(s) ['lam', 'zeta']; known keys: activation_binarizer, activation_bits, "
        "attention_alpha_init, aux_loss_weight, aux_weight, binarize_activations, binarize_attention, "
        "binarize_weights, compensator, eps, eta, exclude_modules, lambda_placement, learnable_weight_scale, "
        "scale_aux_grad, shortcut_gate_init, shortcuts, surrogate, swish_beta, target_modules, "
        "unsigned_activation_modules, version, weight_planes, weight_scale. "
        "Remove or rename them."
    )
    with pytest.raises(ValueError, match=_exact(message)):
        SurgeConfig.from_dict({"eta": 0.2, "zeta": 1, "lam": 2})


def test_from_dict_validates() -> None:
    with pytest.raises(ValueError, match=_exact("SurgeConfig.eta=-2 must be >= 0.")):
        SurgeConfig.from_dict({"eta": -2})


def test_replace_validates_and_copies() -> None:
    cfg = SurgeConfig(eta=0.3)
    other = cfg.replace(compensator="fixed")
    assert (cfg.compensator, other.compensator, other.eta) == ("surge", "fixed", 0.3)
    with pytest.raises(ValueError, match=_exact("SurgeConfig.surrogate='sigmoid' is not valid; allowed values: "
                                                "clipped_ste, identity, approx_sign, swish_sign.")):
        cfg.replace(surrogate="sigmoid")


# -- target checks that need a model -------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleDict({"query": nn.Linear(4, 4), "value": nn.Linear(4, 4)})
        self.head = nn.Linear(4, 2)


def test_target_list_entry_matching_nothing_names_field() -> None:
    message = (
        "SurgeConfig.target_modules entry 'key' matches no Linear/Conv2d module of this model. "
        "Module names look like: block.query, block.value, head"
    )
    with pytest.raises(ValueError, match=_exact(message)):
        resolve_targets(_Net(), SurgeConfig(target_modules=["query", "key"]))


def test_suffix_must_start_at_a_dot() -> None:
    # "uery" is a character suffix of "block.query" but not a module-name suffix.
    with pytest.raises(ValueError, match=re.escape("SurgeConfig.target_modules entry 'uery' matches no")):
        resolve_targets(_Net(), SurgeConfig(target_modules=["uery"]))


def test_target_regex_matching_nothing_names_field() -> None:
    with pytest.raises(ValueError, match=re.escape(r"SurgeConfig.target_modules entry 'blocks\\..*' matches no")):
        resolve_targets(_Net(), SurgeConfig(target_modules=r"blocks\..*"))


def test_exclude_entry_matching_nothing_names_field() -> None:
    with pytest.raises(ValueError, match=re.escape("SurgeConfig.exclude_modules entry 'key' matches no")):
        resolve_targets(_Net(), SurgeConfig(target_modules=["query"], exclude_modules=["key"]))


def test_everything_excluded() -> None:
    message = (
        "SurgeConfig.target_modules=('query',) (minus exclude_modules) selects no Linear/Conv2d module; "
        "this model has: block.query, block.value, head."
    )
    with pytest.raises(ValueError, match=_exact(message)):
        binarize(_Net(), SurgeConfig(target_modules=["query"], exclude_modules=["block.query"]))


def test_no_default_for_unknown_architecture() -> None:
    message = (
        "SurgeConfig.target_modules is None and there is no default for model type None; set target_modules to a "
        "regular expression or a list of module-name suffixes. Defaults exist for: bert, vit, resnet."
    )
    with pytest.raises(ValueError, match=_exact(message)):
        binarize(_Net(), SurgeConfig())


def test_module_name_listing_is_truncated() -> None:
    net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(10)])
    with pytest.raises(ValueError, match=re.escape("Module names look like: 0, 1, 2, 3, 4, 5, 6, 7, ...")):
        resolve_targets(net, SurgeConfig(target_modules=["10"]))


@pytest.mark.parametrize("planes", [0, 3, True, "2"])
def test_weight_planes_allowed_values(planes) -> None:
    with pytest.raises(ValueError, match=_exact(f"SurgeConfig.weight_planes={planes!r} is not valid; allowed values: "
                                                "1, 2.")):
        SurgeConfig(weight_planes=planes)


@pytest.mark.parametrize("changes", [{"weight_scale": "none"}, {"binarize_weights": False}])
def test_two_weight_planes_need_binary_weights_with_a_scale(changes: dict) -> None:
    with pytest.raises(ValueError, match=_exact("SurgeConfig.weight_planes=2 needs binary weights with a scale per "
                                                "plane: set binarize_weights=True and weight_scale='channel' or "
                                                "'tensor', or weight_planes=1.")):
        SurgeConfig(weight_planes=2, **changes)
    assert SurgeConfig(weight_planes=2).packable is False and SurgeConfig().packable is True


@pytest.mark.parametrize("changes", [{"aux_loss_weight": 0.1}, {"scale_aux_grad": True}])
def test_frozen_auxiliary_weight_refuses_what_would_train_it(changes: dict) -> None:
    with pytest.raises(ValueError, match=_exact("SurgeConfig.aux_weight='frozen' never trains W_a, but "
                                                "aux_loss_weight > 0 / scale_aux_grad=True act on W_a's training; "
                                                "set aux_weight='separate', or aux_loss_weight=0 and "
                                                "scale_aux_grad=False.")):
        SurgeConfig(aux_weight="frozen", **changes)
