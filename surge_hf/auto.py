"""Registration of the SURGE configs and models with the transformers Auto classes.

After `import surge_hf`, `AutoConfig` resolves `surge_bert` / `surge_vit` and every Auto model class below builds the
SURGE model of a saved SURGE checkpoint (either form). Checkpoints also carry `auto_map` custom code, so
`trust_remote_code=True` loads them where surge_hf is not installed.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

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
