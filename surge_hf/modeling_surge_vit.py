"""Binary ViT trained with SURGE: the transformers ViT classes with the recipe's Linear layers binarized.

Every class is the transformers class of the same task (same forward, outputs and losses) with three differences:

- `__init__` builds the network with a `SurgeViTModel` inside and then binarizes what `config.surge_config` targets
  (default: every Linear in the transformer layers; patch embedding, pooler and classifier stay full precision), as
  packed `BinaryLinear` layers when `config.surge_packed`;
- in training mode with labels, `loss` includes the auxiliary-branch loss of the recipe;
- checkpoints come in a train and a packed form (see `modeling_utils`).

ViT checkpoints on disk use the original transformers key names (`vit.encoder.layer.N.attention.attention.query`);
transformers renames them on load and back on save for `ViTModel`, and this module registers the same renaming for
`SurgeViTModel`, so plain ViT checkpoints load and SURGE ViT checkpoints keep the same key layout.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel, ViTForImageClassification, ViTModel, ViTPreTrainedModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import ImageClassifierOutput

from .configuration_surge_vit import SurgeViTConfig
from .modeling_utils import SurgePreTrainedMixin, with_auxiliary_loss


class SurgeViTPreTrainedModel(SurgePreTrainedMixin, ViTPreTrainedModel):
    """Base class of the SURGE ViT models: config class, weight init of SURGE-only tensors, checkpoint forms."""

    config: SurgeViTConfig
    config_class = SurgeViTConfig


class SurgeViTModel(SurgeViTPreTrainedModel, ViTModel):
    """`ViTModel` with binarized transformer layers.

    Args:
        config: the model configuration.
        add_pooling_layer, use_mask_token: as in `ViTModel`.
        apply_surge: binarize this model per the recipe; the task models pass False and binarize themselves, so
            that recipe module names are relative to the model the user holds.
    """

    def __init__(self, config: SurgeViTConfig, add_pooling_layer: bool = True, use_mask_token: bool = False,
                 apply_surge: bool = True):
        super().__init__(config, add_pooling_layer=add_pooling_layer, use_mask_token=use_mask_token)
        if apply_surge:
            self._apply_surge()


# Restates `ViTForImageClassification.__init__` (which builds a plain `ViTModel`) with a `SurgeViTModel`, so that
# the SURGE weight init also reaches the layers inside it.
class SurgeViTForImageClassification(SurgeViTPreTrainedModel, ViTForImageClassification):
    """`ViTForImageClassification` with binarized transformer layers."""

    def __init__(self, config: SurgeViTConfig):
        PreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.vit = SurgeViTModel(config, add_pooling_layer=False, apply_surge=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self._apply_surge()

    forward = with_auxiliary_loss(ViTForImageClassification.forward, ImageClassifierOutput)


# Checkpoint key renaming of ViTModel (transformers looks it up by class name, and skips it for classes defined
# outside transformers unless registered).
register_checkpoint_conversion_mapping(
    "SurgeViTModel", get_checkpoint_conversion_mapping("ViTModel") or [], overwrite=True
)

SurgeViTModel.register_for_auto_class("AutoModel")
SurgeViTForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = ["SurgeViTForImageClassification", "SurgeViTModel", "SurgeViTPreTrainedModel"]
