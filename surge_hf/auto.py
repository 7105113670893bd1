"""Registration of the SURGE configs and models with the transformers Auto classes, the SURGE class of each
wrapped transformers class, and `binarize`, which binarizes any model and gives a transformers BERT / ViT its SURGE
class.

After `import surge_hf`, `AutoConfig` resolves `surge_bert` / `surge_vit` and every Auto model class below builds the
SURGE model of a saved SURGE checkpoint (either form). Checkpoints also carry `auto_map` custom code, so
`trust_remote_code=True` loads them where surge_hf is not installed.

`binarize` is `binarize.binarize_modules` (swap the layers, for any PyTorch model) followed by
`adopt_surge_classes` (swap the transformers classes), peft's split between injecting adapters and wrapping the
model: the injector below knows no model class, so the SURGE model classes can build on it.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
)

from .binarize import binarize_modules
from .configuration_surge import SurgeConfig, renamed_surge_config_keyword
from .configuration_surge_bert import SurgeBertConfig
from .configuration_surge_vit import SurgeViTConfig
from .modeling_surge_bert import (
    SurgeBertForQuestionAnswering,
    SurgeBertForSequenceClassification,
    SurgeBertForTokenClassification,
    SurgeBertModel,
)
from .modeling_surge_vit import SurgeViTForImageClassification, SurgeViTModel
from .modeling_utils import SurgePreTrainedMixin

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


def _refuse_save_pretrained(class_name: str, *args: Any, **kwargs: Any) -> None:
    raise ValueError(
        f"This {class_name} was binarized with surge_hf.binarize, and surge_hf has no SURGE model class for it (it has "
        "them for BERT and ViT): save_pretrained would write a checkpoint that loads back as the float model, without "
        "its binary layers. Save its weights with safetensors.torch.save_model(model, path) and rebuild it with "
        "binarize(float_model, surge_config) then safetensors.torch.load_model(model, path)."
    )


@renamed_surge_config_keyword("recipe")
def adopt_surge_classes(model: nn.Module, surge_config: SurgeConfig) -> None:
    """Give a transformers BERT / ViT model that `binarize` just binarized its SURGE classes, in place: the model
    (and every wrapped transformers model inside it) becomes an instance of the SURGE subclass of its class, and its
    config of the SURGE config class holding `surge_config`. The layers and weights are untouched; `save_pretrained`
    then writes a SURGE checkpoint (train form, or packed with `packed=True`) that loads back as the same binary
    model. Any other transformers model gets a `save_pretrained` that refuses, naming what to do instead; other
    modules are left as they are."""
    if type(model) not in SURGE_CLASS_OF:
        if isinstance(model, PreTrainedModel) and not isinstance(model, SurgePreTrainedMixin):
            model.save_pretrained = functools.partial(_refuse_save_pretrained, type(model).__name__)
        return
    surge_class = SURGE_CLASS_OF[type(model)]
    model.config.__class__ = surge_class.config_class
    model.config.surge_config = surge_config
    model.config.surge_packed = False
    for module in model.modules():
        if type(module) in SURGE_CLASS_OF:
            module.__class__ = SURGE_CLASS_OF[type(module)]


@renamed_surge_config_keyword("config")
def binarize(model: nn.Module, surge_config: SurgeConfig | None = None) -> nn.Module:
    """Replace the targeted `nn.Linear`/`nn.Conv2d` modules of `model` by SURGE layers, in place, and give a
    transformers BERT or ViT model its SURGE class.

    The layers are swapped by `surge_hf.binarize.binarize_modules` (see there: parameters are reused under their
    names, SURGE-only tensors initialised from them, nothing changes when the recipe is invalid or matches nothing).
    A transformers BERT or ViT model then becomes an instance of its SURGE class (e.g.
    `SurgeBertForSequenceClassification`, with a `SurgeBertConfig` holding `surge_config`), so that `save_pretrained`
    writes a SURGE checkpoint, packed with `packed=True`, that loads back as this binary model (see
    `adopt_surge_classes`).
    """
    surge_config = surge_config or SurgeConfig()
    binarize_modules(model, surge_config)
    adopt_surge_classes(model, surge_config)
    return model
