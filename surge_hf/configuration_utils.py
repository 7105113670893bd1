"""What the SURGE model configs share: the recipe and the packed-weights flag.

A SURGE config is the transformers config of the architecture it wraps (`BertConfig`, `ViTConfig`) with four more
fields:

- `surge_config`: the `SurgeConfig` recipe, held as the validated (immutable) object. Any assignment (constructor,
  attribute, `config.json`) accepts a `SurgeConfig`, its dict form or None (the default recipe); a dict goes through
  `SurgeConfig.from_dict`, so unknown recipe keys are an error. Only `to_dict` turns it into a plain dict, which is
  what `config.json` holds (a dataclass value would break transformers' JSON writer).
- `surge_packed`: True when the binarized layers hold packed sign bits (`BinaryLinear`), False when they hold
  trainable latent weights (`SurgeLinear`).
- `surge_int8_embeddings`: the embedding modules that a packed model stores in int8 with per-row scales
  (`surge_hf.embeddings`), or None.
- `surge_int4_embeddings`: the embedding modules that a packed model stores in 4 bits, each mapped to its group size
  (the columns that share a scale), or None. A config written before this field existed reads as None.

`from_pretrained(..., surge=recipe)` is the one place where the recipe has a short keyword (the model classes'
`from_pretrained` and the config classes' `from_dict` both accept it). A plain checkpoint of the wrapped architecture
loads into the SURGE config unchanged (its `model_type` is accepted); any other `model_type` is an error.
"""

from __future__ import annotations

import os
from typing import Any

from .configuration_surge import SurgeConfig

RECIPE_KEYWORD = "surge"
"""The `from_pretrained` keyword for the recipe (stored as `surge_config`)."""


def as_surge_config(surge_config: SurgeConfig | dict[str, Any] | None) -> SurgeConfig:
    """The validated `SurgeConfig` form of a recipe (None is the default recipe)."""
    if surge_config is None:
        return SurgeConfig()
    if isinstance(surge_config, SurgeConfig):
        return surge_config
    if isinstance(surge_config, dict):
        return SurgeConfig.from_dict(surge_config)
    raise TypeError(f"surge_config must be a SurgeConfig, a dict or None, got {type(surge_config).__name__}.")


def _upgrade_previous_release(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A `config.json` dict of the previous release, which held the recipe under `surge`, in the current form
    (`surge_config`; its recipe dict has every field of that release, and the fields added since default to what
    that release did). A dict holding both keys is ambiguous and an error."""
    if "surge_config" in config_dict:
        raise ValueError(
            f"This config has both `{RECIPE_KEYWORD}` (the recipe key of the previous release) and `surge_config`; "
            f"remove `{RECIPE_KEYWORD}` from config.json."
        )
    upgraded = {key: value for key, value in config_dict.items() if key != RECIPE_KEYWORD}
    upgraded["surge_config"] = config_dict[RECIPE_KEYWORD]
    return upgraded


class SurgeConfigMixin:
    """Validates `surge_config`, `surge_packed` and `model_type` on every assignment. Mixed in before the transformers
    config class; the two fields themselves are declared on each config class (dataclass fields)."""

    model_type: str
    base_model_type: str  # the model_type of the wrapped architecture, e.g. "bert"

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "model_type":
            # Loading a config dict passes its model_type as a keyword; keep the class attribute.
            if value not in (self.base_model_type, self.model_type):
                raise ValueError(
                    f"{type(self).__name__} builds on a `{self.base_model_type}` config, but this config has "
                    f"model_type `{value}`. Load it with the matching class (or AutoConfig after `import surge_hf`)."
                )
            return
        if key == RECIPE_KEYWORD:
            self._reject_recipe_keyword()
        if key == "surge_config":
            value = as_surge_config(value)
        elif key == "surge_packed" and not isinstance(value, bool):
            raise ValueError(f"surge_packed must be True or False, got {value!r}.")
        elif key == "surge_int8_embeddings" and value is not None:
            if not isinstance(value, (list, tuple)) or not all(isinstance(name, str) for name in value):
                raise ValueError(f"surge_int8_embeddings must be a list of module names or None, got {value!r}.")
            value = list(value)
        elif key == "surge_int4_embeddings" and value is not None:
            if not isinstance(value, dict) or not all(
                    isinstance(name, str) and type(size) is int and size > 0 for name, size in value.items()):
                raise ValueError("surge_int4_embeddings must map module names to group sizes (positive integers) or "
                                 f"be None, got {value!r}.")
            value = dict(value)
        super().__setattr__(key, value)

    @classmethod
    def _reject_recipe_keyword(cls) -> None:
        raise ValueError(
            f"The SURGE recipe of a {cls.__name__} is `surge_config` (`surge=` is only the keyword of "
            "from_pretrained); set config.surge_config, or pass surge_config=."
        )

    @property
    def surge(self) -> SurgeConfig:
        """Renamed `surge_config`: an error naming it (for one release)."""
        raise AttributeError(
            "config.surge was renamed config.surge_config, which holds the SurgeConfig itself (its to_dict() gives "
            "the dict that config.surge held). See CHANGELOG.md."
        )

    @property
    def surge_recipe(self) -> SurgeConfig:
        """Renamed `surge_config`: an error naming it (for one release)."""
        raise AttributeError("config.surge_recipe was renamed config.surge_config. See CHANGELOG.md.")

    def to_dict(self) -> dict[str, Any]:
        """The transformers dict form, with the recipe as its plain dict (`SurgeConfig.to_dict`)."""
        output = super().to_dict()
        output["surge_config"] = self.surge_config.to_dict()
        return output

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """`PretrainedConfig.from_dict`, with `surge=` accepted as the keyword for `surge_config`, and the
        `config.json` of the previous release (the recipe under the key `surge`) read as it is."""
        if RECIPE_KEYWORD in config_dict:
            config_dict = _upgrade_previous_release(config_dict)
        if RECIPE_KEYWORD in kwargs:
            config_dict = {**config_dict, "surge_config": kwargs.pop(RECIPE_KEYWORD)}
        elif config_dict.get("model_type") == cls.model_type and "surge_config" not in config_dict:
            raise ValueError(
                f"This {cls.model_type} config has no `surge_config` (the SURGE recipe), so the layers it describes "
                "are unknown. Add the recipe the checkpoint was trained with as `surge_config` in config.json, or "
                "pass it: from_pretrained(path, surge=SurgeConfig(...))."
            )
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
        """`PretrainedConfig.get_config_dict`, without the `model_type` of a config of the wrapped architecture
        (`bert` for a SURGE BERT): a SURGE model is built from such a checkpoint by design, so it loads as this
        class (default recipe unless one is passed) without transformers' warning about a checkpoint of another
        model type."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == cls.base_model_type:
            config_dict = {key: value for key, value in config_dict.items() if key != "model_type"}
        return config_dict, kwargs

    @classmethod
    def from_base_config(cls, config: Any, surge_config: SurgeConfig | dict[str, Any] | None = None, **kwargs: Any):
        """A SURGE config with the architecture of `config` (a config of the wrapped type or a SURGE one), the recipe
        `surge_config` (default: the recipe of `config` if it has one, else the default recipe) and any other field
        overridden by `kwargs`. The result describes a trainable (unpacked) model."""
        if config.model_type not in (cls.base_model_type, cls.model_type):
            raise ValueError(
                f"{cls.__name__}.from_base_config needs a `{cls.base_model_type}` config, got model_type "
                f"`{config.model_type}`."
            )
        fields = config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            fields.pop(key, None)
        if surge_config is not None:
            fields["surge_config"] = surge_config
        fields.update(surge_packed=False, surge_int8_embeddings=None, surge_int4_embeddings=None, **kwargs)
        return cls(**fields)
