"""Registration of the SURGE configs and models with the transformers Auto classes, and the SURGE class of each
wrapped transformers class.

After `import surge_hf`, `AutoConfig` resolves `surge_bert` / `surge_vit` and every Auto model class below builds the
SURGE model of a saved SURGE checkpoint (either form). Checkpoints also carry `auto_map` custom code, so
`trust_remote_code=True` loads them where surge_hf is not installed.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_surge import SurgeConfig
from .configuration_surge_bert import SurgeBertConfig
from .configuration_surge_vit import SurgeViTConfig
from .modeling_surge_bert import (
    SurgeBertForQuestionAnswering,
    SurgeBertForSequenceClassification,
    SurgeBertForTokenClassification,
    SurgeBertModel,
)
from .modeling_surge_vit import SurgeViTForImageClassification, SurgeViTModel

AUTO_MODELS = {
    AutoModel: (SurgeBertModel, SurgeViTModel),
    AutoModelForSequenceClassification: (SurgeBertForSequenceClassification,),
    AutoModelForTokenClassification: (SurgeBertForTokenClassification,),
    AutoModelForQuestionAnswering: (SurgeBertForQuestionAnswering,),
    AutoModelForImageClassification: (SurgeViTForImageClassification,),
}


def register_auto_classes() -> None:
    """Register the SURGE configs with `AutoConfig` and the models with the Auto model classes (idempotent)."""
    for config_class in (SurgeBertConfig, SurgeViTConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for auto_class, model_classes in AUTO_MODELS.items():
        for model_class in model_classes:
            auto_class.register(model_class.config_class, model_class, exist_ok=True)


SURGE_CLASS_OF = {surge_class.__bases__[-1]: surge_class for classes in AUTO_MODELS.values() for surge_class in classes}
"""The SURGE class of each transformers class it wraps (`BertForSequenceClassification` -> its SURGE subclass)."""


def adopt_surge_classes(model: nn.Module, recipe: SurgeConfig) -> None:
    """Give a transformers BERT / ViT model that `binarize` just binarized its SURGE classes, in place: the model
    (and every wrapped transformers model inside it) becomes an instance of the SURGE subclass of its class, and its
    config of the SURGE config class holding `recipe`. The layers and weights are untouched; `save_pretrained` then
    writes a SURGE checkpoint (train form, or packed with `packed=True`) that loads back as the same binary model.
    Other models are left as they are."""
    if type(model) not in SURGE_CLASS_OF:
        return
    surge_class = SURGE_CLASS_OF[type(model)]
    model.config.__class__ = surge_class.config_class
    model.config.surge_config = recipe
    model.config.surge_packed = False
    for module in model.modules():
        if type(module) in SURGE_CLASS_OF:
            module.__class__ = SURGE_CLASS_OF[type(module)]
