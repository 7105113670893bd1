"""Turn any PyTorch model into a SURGE binary network and back: the model-agnostic half of `surge_hf.binarize`.

- `binarize_modules(model, surge_config)`: swap matching `nn.Linear`/`nn.Conv2d` for `SurgeLinear`/`SurgeConv2d` in
  place (inside a `ShortcutLinear` when `surge_config.shortcuts`; with binary attention when
  `surge_config.binarize_attention`).
- `finalize(model)`: swap them for packed `BinaryLinear`/`BinaryConv2d` (drops every training-only tensor); feed-forward
  blocks write packed sign bits between their layers (`fusion`).
- `unfinalize(model, surge_config)`: rebuild trainable SURGE layers from packed ones (latent weight = alpha * sign).
- `surge_layers(model)` and `diagnostics(model)`: the layers and their per-layer training signals.

The public `surge_hf.binarize` (in `surge_hf.auto`) is `binarize_modules` plus giving a transformers BERT / ViT its
SURGE model class, as peft's `get_peft_model` wraps its `inject_adapter_in_model`: this module knows no model class,
so the SURGE model classes can build on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .binary_attention import add_binary_attention
from .configuration_surge import (
    DEFAULT_TARGET_MODULES,
    MODEL_TYPE_ALIASES,
    SurgeConfig,
    renamed_surge_config_keyword,
)
from .fusion import fold_sign_outputs, unfold_sign_outputs
from .layers import (
    BINARY_LAYER_TYPES,
    LAYER_KINDS,
    SURGE_LAYER_TYPES,
    SURGE_ONLY_TENSORS,
    BinaryLayer,
    SurgeLayer,
    layer_kind,
)
from .shortcuts import add_shortcuts


def _model_type(model: nn.Module) -> str | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return MODEL_TYPE_ALIASES.get(model_type, model_type)


def _matches(name: str, pattern: str | list[str]) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in pattern)


def _check_every_entry_matches(field: str, pattern: str | list[str] | None, names: list[str]) -> None:
    if pattern is None:
        return
    # A regular expression must match something; so must each entry of a suffix list.
    for entry in [pattern] if isinstance(pattern, str) else [[suffix] for suffix in pattern]:
        if not any(_matches(name, entry) for name in names):
            shown_entry = entry if isinstance(entry, str) else entry[0]
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(
                f"SurgeConfig.{field} entry {shown_entry!r} matches no Linear/Conv2d module of this model. "
                f"Module names look like: {shown}"
            )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@renamed_surge_config_keyword("config")
def resolve_targets(model: nn.Module, surge_config: SurgeConfig) -> list[str]:
    """Names of the `nn.Linear`/`nn.Conv2d` modules that `binarize` would replace (validated, in model order)."""
    float_types = tuple(kind.ops_type.float_type for kind in LAYER_KINDS)
    candidates = [name for name, module in model.named_modules() if type(module) in float_types]
    target = surge_config.target_modules
    if target is None:
        model_type = _model_type(model)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"SurgeConfig.target_modules is None and there is no default for model type {model_type!r}; set "
                "target_modules to a regular expression or a list of module-name suffixes. Defaults exist for: "
                f"{', '.join(DEFAULT_TARGET_MODULES)}."
            )
        target = DEFAULT_TARGET_MODULES[model_type]
    else:
        _check_every_entry_matches("target_modules", target, candidates)
    _check_every_entry_matches("exclude_modules", surge_config.exclude_modules, candidates)
    excluded = surge_config.exclude_modules
    selected = [name for name in candidates if _matches(name, target) and not (excluded and _matches(name, excluded))]
    if not selected:
        raise ValueError(
            f"SurgeConfig.target_modules={target!r} (minus exclude_modules) selects no Linear/Conv2d module; "
            f"this model has: {', '.join(candidates[:8]) or 'none'}."
        )
    return selected


@renamed_surge_config_keyword("config")
def binarize_modules(model: nn.Module, surge_config: SurgeConfig | None = None) -> nn.Module:
    """Replace the targeted `nn.Linear`/`nn.Conv2d` modules of `model` by SURGE layers, in place (the model's own
    class is left as it is; `surge_hf.binarize` also gives transformers models their SURGE class).

    The original `weight`/`bias` parameters are reused under the same names (plain checkpoints still load);
    SURGE-only parameters (`aux_weight`, `input_threshold`, `input_scale`) are initialised from them, on their device
    and in their dtype. Every replacement is built before the first is swapped in, so an error leaves the model as
    it was. Raises `ValueError` if the model already holds SURGE or packed binary layers, if the recipe is invalid
    or if it matches nothing.

    A model on the meta device gets SURGE layers whose SURGE-only tensors are filled in by `load_state_dict` after
    `model.to_empty(...)` (see `SurgeLayer`).
    """
    surge_config = surge_config or SurgeConfig()
    surge_config.validate()
    if any(isinstance(m, SURGE_LAYER_TYPES + BINARY_LAYER_TYPES) for m in model.modules()):
        raise ValueError("This model is already binarized; binarize() applies once. Start from the float model.")
    targets = resolve_targets(model, surge_config)
    unsigned_modules = surge_config.unsigned_activation_modules
    _check_every_entry_matches("unsigned_activation_modules", unsigned_modules, targets)
    replacements = {}
    for name in targets:
        module = model.get_submodule(name)
        unsigned = unsigned_modules is not None and _matches(name, unsigned_modules)
        replacements[name] = layer_kind(module).surge_type.from_float(module, surge_config, unsigned)
        replacements[name]._surge_state_pending = module.weight.is_meta
    for name, replacement in replacements.items():
        _set_submodule(model, name, replacement)
    if surge_config.shortcuts:
        add_shortcuts(model, surge_config)
    if surge_config.binarize_attention:
        add_binary_attention(model, surge_config)
    _keep_local_state_out_of_ddp(model)
    return model


def surge_layers(model: nn.Module) -> Iterator[tuple[str, SurgeLayer]]:
    """The (name, layer) pairs of the trainable SURGE layers of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, SURGE_LAYER_TYPES):
            yield name, module


def packed_layer(layer: SurgeLayer, name: str = "") -> BinaryLayer:
    """The packed inference layer of a SURGE layer (outputs equal the SURGE layer's eval-mode outputs).

    Raises `ValueError`, naming the layer as `name`, for weights that cannot be packed to 1 bit (two weight planes, or
    a second plane still weighted in).
    """
    if layer.second_plane_weight:
        raise ValueError(
            f"{name or type(layer).__name__} still weights its second weight plane by "
            f"{layer.second_plane_weight:g} (a run stepping down from two planes, TrainingConfig.plane_anneal_steps, "
            "that did not reach its end): its function is not the 1-bit weight's. Set second_plane_weight = 0 "
            "(train on past the anneal) before packing."
        )
    if not layer.surge_config.packable:
        raise ValueError(
            f"{name or type(layer).__name__} has weight_planes={layer.surge_config.weight_planes}: a two-plane "
            "(2-bit) training stage cannot be packed to 1 bit. Train a weight_planes=1 model from it "
            "(scripts/glue.py --weight_planes_schedule 2,1 does), or save it unpacked."
        )
    return layer_kind(layer).packed_type.from_surge(layer)


def finalize(model: nn.Module, sign_outputs: bool = True) -> nn.Module:
    """Replace every SURGE layer by its packed inference layer, in place, and put the model in eval mode.

    Removes the auxiliary weights, the previous-step lam and every other training-only tensor. With `sign_outputs`,
    the intermediate layer of each recognised feed-forward block writes the output layer's sign codes as packed bits
    on the CPU kernel instead of floats (`surge_hf.fusion`). The finalized model's outputs equal the SURGE model's
    eval-mode outputs exactly.
    """
    layers = list(surge_layers(model))
    if not layers:
        raise ValueError("finalize() found no SURGE layer in this model; call surge_hf.binarize(model) first.")
    packed = [(name, packed_layer(layer, name)) for name, layer in layers]  # every layer, before any is replaced
    for name, layer in packed:
        _set_submodule(model, name, layer)
    if sign_outputs:
        fold_sign_outputs(model)
    return model.eval()


@torch.no_grad()
@renamed_surge_config_keyword("config")
def unfinalize(model: nn.Module, surge_config: SurgeConfig | None = None) -> nn.Module:
    """Rebuild trainable SURGE layers from packed ones, in place (latent weight W = alpha * sign, W_a = W).

    The result computes exactly what the packed model computes and can be trained further with `surge_config` (by
    default, the recipe the packed layers were made with).
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BINARY_LAYER_TYPES)]
    if not layers:
        raise ValueError("unfinalize() found no packed binary layer in this model.")
    unfold_sign_outputs(model)
    for name, packed in layers:
        weight = packed.dequantized_weight()
        plain = packed.float_layer().to(device=weight.device, dtype=weight.dtype)
        plain.weight.copy_(weight)
        if packed.bias is not None:
            plain.bias.copy_(packed.bias)
        unsigned = not packed.activation_spec.signed
        layer = layer_kind(packed).surge_type.from_float(plain, surge_config or packed.surge_config, unsigned)
        for tensor_name in (tensor.name for tensor in SURGE_ONLY_TENSORS if tensor.binarizer):
            source, target = getattr(packed, tensor_name), getattr(layer, tensor_name)
            if source is not None and target is not None:
                target.copy_(source)
        _set_submodule(model, name, layer)
    _keep_local_state_out_of_ddp(model)
    return model


def _keep_local_state_out_of_ddp(model: nn.Module) -> None:
    """Name every `previous_lambda` buffer as one DistributedDataParallel must not broadcast from rank 0.

    Each rank computes lam from the gradients of its own batch at the fork (activation gradients are never
    all-reduced), so with `lambda_placement="previous"` each rank applies the lam it computed at its previous step,
    as with `"fork"` it applies this step's. DDP's buffer broadcast would give every rank rank 0's. The names are
    relative to `model`: wrap `model` itself in DDP (as `Accelerator.prepare` does)."""
    local = [f"{name}.previous_lambda" for name, layer in surge_layers(model) if layer.previous_lambda is not None]
    kept = [name for name in getattr(model, "_ddp_params_and_buffers_to_ignore", ())
            if not name.endswith(".previous_lambda")]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, kept + local)


def diagnostics(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per-layer training signals for logging: lam, ||g_b||, ||g_a|| (last backward) and the sign-flip ratio.

    Reading them synchronises with the device; call it at logging steps, not every step.
    """
    return {name: layer.diagnostics() for name, layer in surge_layers(model)}


def __getattr__(name: str):
    """`binarize` moved to `surge_hf.auto` (it adopts the transformers classes, which build on this module)."""
    if name == "binarize":
        raise ImportError(
            "surge_hf.binarize.binarize moved: import the public function as `from surge_hf import binarize` (it also "
            "gives a transformers BERT / ViT its SURGE class), or use surge_hf.binarize.binarize_modules to swap the "
            "layers only."
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
