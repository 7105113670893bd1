"""surge_hf: train, share and deploy binary (1-bit) neural networks with SURGE, the Hugging Face way.

`import surge_hf` registers the SURGE configs and models with the transformers Auto classes and loads only what a
checkpoint runs (the layers, the recipe and the model classes). Every other public name is imported from its module
on first use, so loading a checkpoint imports nothing of the training harness that transformers itself does not
(no `transformers.Trainer`, `datasets`, `evaluate` or model-card templates); `from surge_hf import X` works for
every name in `__all__` either way.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from .auto import binarize as binarize  # the function, which shadows the submodule `surge_hf.binarize`
from .auto import register_auto_classes

__version__ = "0.1.0"

register_auto_classes()

# Every other public name and the module that defines it, imported on first use (the modules of the first two
# groups are already loaded by the registration above; the others load the training harness).
_LAZY_IMPORTS: dict[str, str] = {
    # Layers and the recipe: SurgeConfig, the binary layers it builds, and the auxiliary loss they record.
    "SurgeConfig": "configuration_surge",
    "BinaryConv2d": "layers",
    "BinaryLinear": "layers",
    "SurgeConv2d": "layers",
    "SurgeLinear": "layers",
    "ShortcutLinear": "shortcuts",
    "add_shortcuts": "shortcuts",
    "Int4Embedding": "embeddings",
    "Int8Embedding": "embeddings",
    "quantize_embeddings": "embeddings",
    "collect_auxiliary_loss": "aux_loss",
    # Models: the SURGE BERT and ViT configs and model classes (registered with the Auto classes on import).
    "SurgeBertConfig": "configuration_surge_bert",
    "SurgeBertModel": "modeling_surge_bert",
    "SurgeBertPreTrainedModel": "modeling_surge_bert",
    "SurgeBertForQuestionAnswering": "modeling_surge_bert",
    "SurgeBertForSequenceClassification": "modeling_surge_bert",
    "SurgeBertForTokenClassification": "modeling_surge_bert",
    "SurgeViTConfig": "configuration_surge_vit",
    "SurgeViTModel": "modeling_surge_vit",
    "SurgeViTPreTrainedModel": "modeling_surge_vit",
    "SurgeViTForImageClassification": "modeling_surge_vit",
    # Conversion: binarize any model's layers, finalize them into packed layers (and back), calibrate activations.
    "binarize_modules": "binarize",
    "resolve_targets": "binarize",
    "surge_layers": "binarize",
    "finalize": "binarize",
    "unfinalize": "binarize",
    "calibrate": "calibration",
    # Training: the SURGE objective with distillation, as a transformers Trainer or as the scripts' accelerate loop.
    "DistillationConfig": "objective",
    "compute_loss": "objective",
    "SurgeTrainer": "trainer",
    "TrainingConfig": "training",
    "train": "training",
    # Hub: the model card and the upload of a trained model's folder.
    "HubConfig": "hub",
    "push_to_hub": "hub",
    "write_model_card": "hub",
    # Analysis: bits and sizes per layer, SURGE's per-layer diagnostics, speed and memory measured on this machine.
    "BitAccount": "accounting",
    "LayerAccount": "accounting",
    "summary": "accounting",
    "diagnostics": "binarize",
    "DeploymentReport": "deployment",
    "measure_deployment": "deployment",
}

__all__ = sorted(["binarize", "register_auto_classes", *_LAZY_IMPORTS])

_REMOVED = {
    "auxiliary_loss": "surge_hf.auxiliary_loss(model) was removed: the auxiliary loss is collected during the forward "
                      "pass. Use `with surge_hf.collect_auxiliary_loss() as aux: outputs = model(**batch)` and add "
                      "aux.total() to the loss; a SURGE model also returns it as outputs.aux_loss, included in "
                      "outputs.loss. See CHANGELOG.md.",
}


def _submodule_names() -> set[str]:
    return {info.name for info in pkgutil.iter_modules(__path__)}


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule, as `surge_hf.objective`) on first access and keep it; name the
    replacement of an API removed in the previous release (an `ImportError`, so that `from surge_hf import name`
    shows the message too)."""
    if name in _LAZY_IMPORTS:
        value = getattr(importlib.import_module(f".{_LAZY_IMPORTS[name]}", __name__), name)
    elif name in _REMOVED:
        raise ImportError(_REMOVED[name])
    elif name in _submodule_names():
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

