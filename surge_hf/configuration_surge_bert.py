"""`SurgeBertConfig`: a `BertConfig` plus the SURGE recipe (see `configuration_utils` for the added fields)."""

from __future__ import annotations

from typing import Any

from transformers import BertConfig

from .configuration_surge import SurgeConfig
from .configuration_utils import SurgeConfigMixin


class SurgeBertConfig(SurgeConfigMixin, BertConfig):
    """Configuration of a binary BERT trained with SURGE.

    Args:
        surge_config: the binarization recipe (`SurgeConfig`, its dict form, or None for the default recipe); held as
            a `SurgeConfig`, written to `config.json` as a plain dict. Its `target_modules=None` binarizes every Linear
            inside the encoder layers.
        surge_packed: whether the binarized layers hold packed sign bits (inference) rather than latent weights.
        surge_int8_embeddings: names of the embedding modules stored in int8 with per-row scales (packed models,
            see `surge_hf.embeddings`); None when no embedding is int8.
        surge_int4_embeddings: names of the embedding modules stored in 4 bits, each mapped to its group size (the
            columns that share a scale); None when no embedding is 4-bit.
        **kwargs: the `BertConfig` fields.

    Example:
        >>> config = SurgeBertConfig.from_bert_config(BertConfig(), surge_config=SurgeConfig(compensator="ste"))
    """

    model_type = "surge_bert"
    base_model_type = "bert"

    surge_config: SurgeConfig | dict[str, Any] | None = None
    surge_packed: bool = False
    surge_int8_embeddings: list[str] | None = None
    surge_int4_embeddings: dict[str, int] | None = None

    @classmethod
    def from_bert_config(
        cls, config: BertConfig, surge_config: SurgeConfig | dict[str, Any] | None = None, **kwargs: Any
    ) -> SurgeBertConfig:
        """A `SurgeBertConfig` with the architecture of `config` and the recipe `surge_config`
        (see `from_base_config`)."""
        return cls.from_base_config(config, surge_config, **kwargs)


SurgeBertConfig.register_for_auto_class()

__all__ = ["SurgeBertConfig"]
