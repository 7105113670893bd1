"""surge_hf: train, share and deploy binary (1-bit) neural networks with SURGE, the Hugging Face way.

The modules at the top of the package are what a checkpoint runs: transformers copies the ones `modeling_surge_*.py`
reaches into every saved model for `trust_remote_code`. The subpackages are the harness, which ships with no
checkpoint: `training` (the training loop, objective, checkpoints and runs of the scripts), `data` (datasets,
augmentation and metrics), `hub` (model cards and uploads) and `analysis` (bit accounts and deployment reports).

`import surge_hf` registers the SURGE configs and models with the transformers Auto classes and loads only what a
checkpoint runs (the layers, the recipe and the model classes). Every other public name is imported from its module
on first use, so loading a checkpoint imports nothing of the training harness that transformers itself does not
(no `transformers.Trainer`, `datasets`, `evaluate` or model-card templates); `from surge_hf import X` works for
every name in `__all__` either way. The module paths of the previous release import their new modules, with a
`FutureWarning`, until the next release.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings
from importlib.machinery import ModuleSpec
from types import ModuleType
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
    "calibrate": "training.calibration",
    # Training: the SURGE objective with distillation, as a transformers Trainer or as the scripts' accelerate loop.
    "DistillationConfig": "training.objective",
    "compute_loss": "training.objective",
    "SurgeTrainer": "training.trainer",
    "TrainingConfig": "training.loop",
    "train": "training.loop",
    # Hub: the model card and the upload of a trained model's folder.
    "HubConfig": "hub.upload",
    "push_to_hub": "hub.upload",
    "write_model_card": "hub.model_card",
    # Analysis: bits and sizes per layer, SURGE's per-layer diagnostics, speed and memory measured on this machine.
    "BitAccount": "analysis.accounting",
    "LayerAccount": "analysis.accounting",
    "summary": "analysis.accounting",
    "diagnostics": "binarize",
    "DeploymentReport": "analysis.deployment",
    "measure_deployment": "analysis.deployment",
}

__all__ = sorted(["binarize", "register_auto_classes", *_LAZY_IMPORTS])

_REMOVED = {
    "auxiliary_loss": "surge_hf.auxiliary_loss(model) was removed: the auxiliary loss is collected during the forward "
                      "pass. Use `with surge_hf.collect_auxiliary_loss() as aux: outputs = model(**batch)` and add "
                      "aux.total() to the loss; a SURGE model also returns it as outputs.aux_loss, included in "
                      "outputs.loss. See CHANGELOG.md.",
}

# Modules of the previous release that moved into a subpackage (names relative to the package): the old name, or a
# submodule under it, imports the new module itself, with a FutureWarning naming it, until the next release.
_MOVED_MODULES: dict[str, str] = {
    "accounting": "analysis.accounting",
    "deployment": "analysis.deployment",
    "demo": "data.demo",
    "glue_metric": "data.glue_metric",
    "image_data": "data.image",
    "image_processing": "data.image_processing",
    "image_transforms": "data.image_transforms",
    "metrics": "data.metrics",
    "text_augmentation": "data.text_augmentation",
    "text_data": "data.text",
    "calibration": "training.calibration",
    "checkpointing": "training.checkpointing",
    "cli": "training.cli",
    "compatibility": "training.compatibility",
    "export": "training.export",
    "image_teachers": "training.image_teachers",
    "objective": "training.objective",
    "output_dir": "training.output_dir",
    "stages": "training.stages",
    "teacher_cache": "training.teacher_cache",
    "trainer": "training.trainer",
}

# Modules of the previous release that became a subpackage of the same name, and the modules of the subpackage that
# their names moved into: `from surge_hf.training import train` finds `surge_hf.training.loop.train`, with a
# FutureWarning naming it, until the next release.
_MOVED_NAMES: dict[str, tuple[str, ...]] = {
    "hub": ("hub.model_card", "hub.upload"),
    "training": ("training.loop",),
}

# Modules removed in the previous release: importing one raises an ImportError naming what replaces it.
_REMOVED_MODULES: dict[str, str] = {
    "distillation": (
        "surge_hf.distillation was merged into surge_hf.training.objective: import DistillationConfig, compute_loss, "
        "logits_distillation_loss, layerwise_mse and soft_cross_entropy from surge_hf.training.objective "
        "(DistillationConfig and compute_loss also from surge_hf). See CHANGELOG.md."
    ),
    "losses": (
        "surge_hf.losses was removed, and auxiliary_loss(model) with it: the auxiliary loss is collected during the "
        "forward pass. Use `with surge_hf.collect_auxiliary_loss() as aux: outputs = model(**batch)` and add "
        "aux.total() to the loss; a SURGE model also returns it as outputs.aux_loss, included in outputs.loss, and "
        "surge_hf.training.objective.compute_loss counts it once. See CHANGELOG.md."
    ),
}


def _warn_moved(old: str, new: str, stacklevel: int) -> None:
    """Warn that `old` is now `new`, for the code `stacklevel` frames above the caller (import machinery skipped)."""
    warnings.warn(f"{old} moved to {new}: import it from there (the old name works until the next release). See "
                  "CHANGELOG.md.", FutureWarning, stacklevel=stacklevel + 1)


class _PreviousReleaseModules:
    """The `sys.meta_path` finder (and loader) of the module names of the previous release.

    A moved module's old name (`surge_hf.accounting`, or a submodule under it) is an alias of its new module: the
    import returns the new module object, after a FutureWarning naming it, and leaves it in `sys.modules` under both
    names. A removed module's name raises the ImportError that names its replacement. Other names are left to the
    other finders.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if not fullname.startswith(f"{__name__}."):
            return None
        old, _, rest = fullname.removeprefix(f"{__name__}.").partition(".")
        if old in _REMOVED_MODULES:
            raise ImportError(_REMOVED_MODULES[old])
        if old not in _MOVED_MODULES:
            return None
        new = ".".join(part for part in (__name__, _MOVED_MODULES[old], rest) if part)
        return ModuleSpec(fullname, self, loader_state=new)

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        _warn_moved(spec.name, spec.loader_state, stacklevel=2)
        return importlib.import_module(spec.loader_state)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module is the new one, already imported."""


def _moved_name(package: str, name: str) -> Any:
    """`name` of `package` (`surge_hf.training`), as a name of the module of the previous release that the package
    replaced: found in the package's module it moved into, with a FutureWarning naming it, and kept in the package.
    AttributeError for any other name, a submodule not imported yet among them, so that the import system then
    imports the submodule."""
    namespace = vars(sys.modules[package])
    if not name.startswith("__") and name not in _submodule_names(namespace["__path__"]):
        for module_name in _MOVED_NAMES[package.removeprefix(f"{__name__}.")]:
            module = importlib.import_module(f".{module_name}", __name__)
            if hasattr(module, name):
                _warn_moved(f"{package}.{name}", f"{module.__name__}.{name}", stacklevel=3)
                namespace[name] = getattr(module, name)
                return namespace[name]
    raise AttributeError(f"module {package!r} has no attribute {name!r}")


# First, so that no other finder (an editable install's) resolves an old name to a stale file.
sys.meta_path.insert(0, _PreviousReleaseModules())


def _submodule_names(path: list[str]) -> set[str]:
    """The names of the modules and subpackages in a package's `__path__`."""
    return {info.name for info in pkgutil.iter_modules(path)}


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule, as `surge_hf.analysis`) on first access and keep it; name the
    replacement of an API removed in the previous release (an `ImportError`, so that `from surge_hf import name`
    shows the message too)."""
    if name in _LAZY_IMPORTS:
        value = getattr(importlib.import_module(f".{_LAZY_IMPORTS[name]}", __name__), name)
    elif name in _REMOVED:
        raise ImportError(_REMOVED[name])
    elif name in _submodule_names(__path__) or name in _MOVED_MODULES or name in _REMOVED_MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
