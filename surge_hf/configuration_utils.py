"""What the SURGE model configs share: the recipe stored as a plain dict and the packed-weights flag.

A SURGE config is the transformers config of the architecture it wraps (`BertConfig`, `ViTConfig`) with three more
fields:

- `surge`: the `SurgeConfig` recipe as a plain JSON dict (a dataclass on a transformers config breaks saving). Any
  assignment (constructor, `from_pretrained(..., surge=...)`, attribute) accepts a `SurgeConfig`, a dict or None
  (the default recipe) and is validated by `SurgeConfig.from_dict`, so unknown recipe keys are an error.
- `surge_packed`: True when the binarized layers hold packed sign bits (`BinaryLinear`), False when they hold
  trainable latent weights (`SurgeLinear`).
- `surge_int8_embeddings`: the embedding modules that a packed model stores in int8 with per-row scales
  (`surge_hf.embeddings`), or None.

A plain checkpoint of the wrapped architecture loads into the SURGE config unchanged (its `model_type` is accepted);
any other `model_type` is an error.
"""

from __future__ import annotations

from typing import Any

from .configuration_surge import SurgeConfig


def recipe_dict(recipe: SurgeConfig | dict[str, Any] | None) -> dict[str, Any]:
    """The validated plain-dict form of a recipe (None is the default recipe)."""
    if recipe is None:
        return SurgeConfig().to_dict()
    if isinstance(recipe, SurgeConfig):
        return recipe.to_dict()
    if isinstance(recipe, dict):
        return SurgeConfig.from_dict(recipe).to_dict()
    raise TypeError(f"surge must be a SurgeConfig, a dict or None, got {type(recipe).__name__}.")


class SurgeConfigMixin:
    """Validates `surge`, `surge_packed` and `model_type` on every assignment. Mixed in before the transformers
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
        if key == "surge":
            value = recipe_dict(value)
        elif key == "surge_packed" and not isinstance(value, bool):
            raise ValueError(f"surge_packed must be True or False, got {value!r}.")
        elif key == "surge_int8_embeddings" and value is not None:
            if not isinstance(value, (list, tuple)) or not all(isinstance(name, str) for name in value):
                raise ValueError(f"surge_int8_embeddings must be a list of module names or None, got {value!r}.")
            value = list(value)
        super().__setattr__(key, value)

    @property
    def surge_recipe(self) -> SurgeConfig:
        """The recipe as a validated `SurgeConfig`."""
        return SurgeConfig.from_dict(self.surge)

    @classmethod
    def from_base_config(cls, config: Any, surge: SurgeConfig | dict[str, Any] | None = None, **kwargs: Any):
        """A SURGE config with the architecture of `config` (a config of the wrapped type or a SURGE one), the recipe
        `surge` (default: the recipe of `config` if it has one, else the default recipe) and any other field
        overridden by `kwargs`. The result describes a trainable (unpacked) model."""
        if config.model_type not in (cls.base_model_type, cls.model_type):
            raise ValueError(
                f"{cls.__name__}.from_base_config needs a `{cls.base_model_type}` config, got model_type "
                f"`{config.model_type}`."
            )
        fields = config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            fields.pop(key, None)
        if surge is not None:
            fields["surge"] = surge
        fields.update(surge_packed=False, surge_int8_embeddings=None, **kwargs)
        return cls(**fields)
