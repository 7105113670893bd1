"""surge_hf: train, share and deploy binary (1-bit) neural networks with SURGE, the Hugging Face way."""

from .accounting import BitAccount, LayerAccount, summary
from .auto import binarize, register_auto_classes
from .aux_loss import collect_auxiliary_loss
from .binarize import binarize_modules, diagnostics, finalize, resolve_targets, surge_layers, unfinalize
from .calibration import calibrate
from .configuration_surge import SurgeConfig
from .configuration_surge_bert import SurgeBertConfig
from .configuration_surge_vit import SurgeViTConfig
from .deployment import DeploymentReport, measure_deployment
from .embeddings import Int4Embedding, Int8Embedding, quantize_embeddings
from .layers import BinaryConv2d, BinaryLinear, SurgeConv2d, SurgeLinear
from .modeling_surge_bert import (
    SurgeBertForQuestionAnswering,
    SurgeBertForSequenceClassification,
    SurgeBertForTokenClassification,
    SurgeBertModel,
    SurgeBertPreTrainedModel,
)
from .modeling_surge_vit import SurgeViTForImageClassification, SurgeViTModel, SurgeViTPreTrainedModel
from .objective import DistillationConfig, compute_loss
from .shortcuts import ShortcutLinear, add_shortcuts
from .trainer import SurgeTrainer

__version__ = "0.1.0"

register_auto_classes()

__all__ = [
    "BinaryConv2d",
    "BinaryLinear",
    "BitAccount",
    "DeploymentReport",
    "DistillationConfig",
    "Int4Embedding",
    "Int8Embedding",
    "LayerAccount",
    "ShortcutLinear",
    "SurgeBertConfig",
    "SurgeBertForQuestionAnswering",
    "SurgeBertForSequenceClassification",
    "SurgeBertForTokenClassification",
    "SurgeBertModel",
    "SurgeBertPreTrainedModel",
    "SurgeConfig",
    "SurgeConv2d",
    "SurgeLinear",
    "SurgeTrainer",
    "SurgeViTConfig",
    "SurgeViTForImageClassification",
    "SurgeViTModel",
    "SurgeViTPreTrainedModel",
    "add_shortcuts",
    "collect_auxiliary_loss",
    "compute_loss",
    "binarize",
    "binarize_modules",
    "calibrate",
    "diagnostics",
    "finalize",
    "measure_deployment",
    "quantize_embeddings",
    "register_auto_classes",
    "resolve_targets",
    "summary",
    "surge_layers",
    "unfinalize",
]

_REMOVED = {
    "auxiliary_loss": "surge_hf.auxiliary_loss(model) was removed: the auxiliary loss is collected during the forward "
                      "pass. Use `with surge_hf.collect_auxiliary_loss() as aux: outputs = model(**batch)` and add "
                      "aux.total() to the loss; a SURGE model also returns it as outputs.aux_loss, included in "
                      "outputs.loss. See CHANGELOG.md.",
}


def __getattr__(name: str):
    """Name the replacement of an API removed in the previous release (an `ImportError`, so that
    `from surge_hf import name` shows the message too)."""
    if name in _REMOVED:
        raise ImportError(_REMOVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
