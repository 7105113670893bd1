"""What every SURGE transformers model shares: building the binary layers from the recipe, initialising the
SURGE-only parameters, adding the auxiliary loss to the training loss, and the two checkpoint forms.

Checkpoint forms (one `save_pretrained` / `from_pretrained`, the layers decide):

- *train*: the model holds trainable `SurgeLinear` layers (`config.surge_packed = False`); `model.safetensors` holds
  the latent weights, the auxiliary weights `aux_weight`, thresholds and scales. `Trainer` checkpoints add the
  optimizer state as usual.
- *packed*: the model holds `BinaryLinear` layers (`config.surge_packed = True`); `model.safetensors` holds, for each
  binarized layer, `weight_packed` (uint8, 8 signs per byte, see `packing`) and `weight_scale` (alpha), and no
  auxiliary weight. `model.finalize()` turns a trained model into this form in memory;
  `model.save_pretrained(path, packed=True)` writes it without changing the in-memory model.
  `model.quantize_embeddings()` (after `finalize`) also stores the embedding tables in int8 with per-row scales
  (`weight_int8`, `weight_scale`; listed in `config.surge_int8_embeddings`), or with `bits=4` in 4 bits with a scale
  per group of columns (`weight_int4`, `weight_scale`; `config.surge_int4_embeddings`), kept so in memory after
  loading.

Loading follows transformers' contract for trainable models: a train-form or plain checkpoint that lacks weights
loads, the missing weights are initialised (`_init_weights`) and listed in `output_loading_info`'s `missing_keys`.
The tensors the recipe adds to the wrapped architecture (SURGE-only tensors, shortcuts, binary-attention scales)
are initialised from the loaded weights as `binarize` would (W_a = W, tau = 0, s = 1, ...), and one log line says
so instead of transformers' MISSING report. Loading is strict for packed checkpoints: one missing any tensor of a
binarized layer, or with a tensor of the wrong shape, or with a weight scale that is not finite and positive, is an
error (random sign bits cannot be trained back), and so is loading a packed checkpoint into trainable layers. A
SURGE `config.json` without its `surge_config` is an error too.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig
from transformers import initialization as init
from transformers import modeling_utils as transformers_modeling_utils
from transformers.utils import ModelOutput

from .aux_loss import collect_auxiliary_loss
from .binarize import binarize_modules, packed_layer, surge_layers
from .binarize import finalize as finalize_layers
from .binarize import unfinalize as unfinalize_layers
from .binary_attention import ATTENTION_IMPLEMENTATION, BinaryAttentionProbabilities, init_binary_attention_parameters
from .configuration_surge import SurgeConfig
from .configuration_utils import RECIPE_KEYWORD, as_surge_config
from .embeddings import (
    QuantizedEmbedding,
    dequantize_embeddings,
    quantize_embeddings,
    quantized_embedding_placeholders,
)
from .layers import BINARY_LAYER_TYPES, SURGE_LAYER_TYPES, SURGE_ONLY_TENSORS
from .saving import replaced_atomically, tensor_bytes
from .shortcuts import ShortcutLinear, add_shortcuts, init_shortcut_parameters

logger = logging.getLogger(__name__)

PACKED_TENSOR_NAMES = ("weight_packed", "weight_scale", "weight_int8", "weight_int4")


def initial_values(surge_config: SurgeConfig) -> dict[str, str]:
    """In words, the value that `_init_weights` gives each tensor the recipe adds (`init_surge_parameters`, from
    `layers.SURGE_ONLY_TENSORS`; `init_shortcut_parameters`, `init_binary_attention_parameters`), by its name in its
    module."""
    return {
        **{tensor.name: tensor.initial for tensor in SURGE_ONLY_TENSORS},
        "norm.weight": "norm.weight = 1", "norm.bias": "norm.bias = 0",
        "gate": f"gate = {surge_config.shortcut_gate_init:g}", "prelu_slope": "prelu_slope = 1",
        "shift_in": "shift_in = 0", "shift_out": "shift_out = 0",
        "alpha": f"alpha = {surge_config.attention_alpha_init:g}",
    }


def added_tensors(module: nn.Module) -> list[str]:
    """The names, in `module`, of the tensors that the recipe adds to the wrapped architecture: a trainable SURGE
    layer's SURGE-only tensors, a shortcut's own tensors (not its wrapped layer's), binary-attention scales."""
    if isinstance(module, SURGE_LAYER_TYPES):
        return [tensor.name for tensor in module.surge_only_tensors()]
    if isinstance(module, ShortcutLinear):
        return [name for name in module.state_dict() if not name.startswith("layer.")]
    if isinstance(module, BinaryAttentionProbabilities):
        return list(module.state_dict())
    return []


def init_surge_parameters(module: nn.Module) -> None:
    """Initialise the SURGE-only tensors of a SURGE layer that were not loaded from a checkpoint to their initial
    values (`layers.SURGE_ONLY_TENSORS`): W_a = W (the latent weight, loaded or freshly initialised), tau = 0, s = 1,
    learned alpha = mean |W|, previous lam = 0.

    Uses `transformers.initialization`, which leaves tensors that `from_pretrained` loaded untouched."""
    for tensor in module.surge_only_tensors():
        init.copy_(getattr(module, tensor.name), tensor.initial_value(module, module.weight))


@functools.cache
def output_class_with_aux_loss(output_class: type[ModelOutput]) -> type[ModelOutput]:
    """`output_class` (a transformers `ModelOutput`) with one more field, `aux_loss`: the auxiliary-branch loss of
    the forward pass (None in eval mode, under `torch.no_grad()` or without an auxiliary-loss recipe)."""
    return dataclasses.make_dataclass(
        f"Surge{output_class.__name__}",
        [("aux_loss", torch.FloatTensor | None, dataclasses.field(default=None))],
        bases=(output_class,),
        namespace={"__module__": __name__},
    )


def with_auxiliary_loss(forward: Callable[..., Any], output_class: type[ModelOutput]) -> Callable[..., Any]:
    """Wrap a transformers head's `forward` (which returns `output_class`) so that it returns the auxiliary-branch
    loss of the recipe as `aux_loss` (see `surge_hf.training.objective`) and, when it computes a `loss`, includes it
    there: `loss = task_loss + sum_layers w * mean((W_a x - f_b)^2)`, so a plain `Trainer` optimises both.

    The wrapper keeps the wrapped signature (`Trainer` reads it to select dataset columns) and honours
    `return_dict` / `config.return_dict` like the wrapped method. In eval mode it opens no collector (layers record
    no term there), so the forward pass holds nothing that `torch.export` or `torch.compile(fullgraph=True)` cannot
    trace.
    """

    output_class = output_class_with_aux_loss(output_class)  # built here: tracing cannot define classes

    @functools.wraps(forward)
    def wrapper(self, *args: Any, return_dict: bool | None = None, **kwargs: Any) -> Any:
        if self.training:
            with collect_auxiliary_loss() as collected:
                outputs = forward(self, *args, return_dict=True, **kwargs)
            aux_loss = collected.total()
        else:
            outputs, aux_loss = forward(self, *args, return_dict=True, **kwargs), None
        outputs = output_class(**outputs, aux_loss=aux_loss)
        if outputs.loss is not None and outputs.aux_loss is not None:
            outputs.loss = outputs.loss + outputs.aux_loss.to(outputs.loss.dtype)
        if return_dict is None:
            return_dict = self.config.return_dict
        return outputs if return_dict else outputs.to_tuple()

    return wrapper


_SURGE_MODEL_CLASSES: list[type] = []
"""Every SURGE model class defined (`SurgePreTrainedMixin.__init_subclass__`)."""


def auto_map(config_class: type) -> dict[str, str]:
    """The `auto_map` entries (`"AutoModel": "modeling_surge_bert.SurgeBertModel"`, ...) of every SURGE model class
    of `config_class` registered for an Auto class (`register_for_auto_class`)."""
    return {
        model_class._auto_class: f"{model_class.__module__.rpartition('.')[2]}.{model_class.__name__}"
        for model_class in _SURGE_MODEL_CLASSES
        if model_class.config_class is config_class and "_auto_class" in vars(model_class)
    }


def _register_recordable_outputs(model_class: type) -> None:
    """Register what `model_class` can record (`output_hidden_states`, `output_attentions`) with transformers'
    output-capturing hooks.

    transformers registers a model class's `_can_record_outputs` when an instance is built (`PreTrainedModel.__init__`,
    keyed by class name), so a transformers model that `surge_hf.binarize` turns into a SURGE class, in a process
    where no model of that class was built, would return `hidden_states=None` and `attentions=None`. Registering at
    class definition covers it."""
    registry = getattr(transformers_modeling_utils, "_CAN_RECORD_REGISTRY", None)
    if registry is not None and model_class._can_record_outputs:
        # dict.__setitem__: the registry keys on `str(class)`, whether it is a plain dict or transformers' subclass
        # whose own __setitem__ takes a model instance.
        dict.__setitem__(registry, str(model_class), model_class._can_record_outputs)


class SurgePreTrainedMixin:
    """Mixed in before the `PreTrainedModel` class of the wrapped architecture by every SURGE model class.

    A SURGE model class builds the wrapped architecture, then calls `_apply_surge()` (the outermost class only,
    so that recipe module names are those of `model.named_modules()`).
    """

    config: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register_recordable_outputs(cls)
        _SURGE_MODEL_CLASSES.append(cls)

    # -- construction and initialisation ---------------------------------------------------------------------
    def _apply_surge(self) -> None:
        """Binarize the modules the recipe targets (packed layers when `config.surge_packed`), then `post_init`."""
        binarize_modules(self, self.config.surge_config)
        for _, layer in surge_layers(self):
            layer._surge_state_pending = False  # `from_pretrained` loads or `_init_weights` initialises every tensor
        if self.config.surge_packed:
            finalize_layers(self)
        quantized_embedding_placeholders(self, self.config.surge_int8_embeddings or (),
                                         self.config.surge_int4_embeddings)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """The wrapped architecture's init, then the SURGE-only tensors (see `init_surge_parameters`)."""
        super()._init_weights(module)
        if isinstance(module, SURGE_LAYER_TYPES):
            init_surge_parameters(module)
        elif isinstance(module, ShortcutLinear):
            init_shortcut_parameters(module)
        elif isinstance(module, BinaryAttentionProbabilities):
            init_binary_attention_parameters(module)

    # -- attention -------------------------------------------------------------------------------------------
    def set_attn_implementation(self, attn_implementation: str | dict, *args: Any, **kwargs: Any) -> None:
        """`PreTrainedModel.set_attn_implementation`, refusing to turn binarized attention back to full precision
        (see `_check_attn_implementation`)."""
        self._check_attn_implementation(attn_implementation)
        super().set_attn_implementation(attn_implementation, *args, **kwargs)

    def _check_attn_implementation(self, attn_implementation: str | dict) -> None:
        """Raise if the recipe binarizes attention and `attn_implementation` names another attention function: the
        model would compute float attention while its recipe (and its model card) says binary."""
        requested = attn_implementation.get("", None) if isinstance(attn_implementation, dict) else attn_implementation
        if self.config.surge_config.binarize_attention and requested not in (None, ATTENTION_IMPLEMENTATION):
            raise ValueError(
                f"This {type(self).__name__} binarizes its attention (SurgeConfig.binarize_attention=True), which runs "
                f"as the attention implementation {ATTENTION_IMPLEMENTATION!r}; attn_implementation={requested!r} "
                "would compute it in full precision while the recipe says binary. Keep "
                f"{ATTENTION_IMPLEMENTATION!r}, or use a recipe with binarize_attention=False (binarize the float "
                "model again)."
            )

    # -- the two forms ---------------------------------------------------------------------------------------
    def _binarized_layers(self) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.named_modules():
            if isinstance(module, SURGE_LAYER_TYPES + BINARY_LAYER_TYPES):
                yield name, module

    @property
    def is_packed(self) -> bool:
        """Whether the binarized layers hold packed sign bits (True) or trainable latent weights (False)."""
        kinds = {isinstance(module, BINARY_LAYER_TYPES) for _, module in self._binarized_layers()}
        if len(kinds) > 1:
            raise ValueError(
                "This model mixes packed and trainable SURGE layers; call model.finalize() to pack all of them."
            )
        return kinds == {True}

    def finalize(self, sign_outputs: bool = True):
        """Pack every SURGE layer in place (`surge_hf.finalize`, where `sign_outputs` is described) and mark the
        config packed. Returns the model, in eval mode; its outputs equal the eval-mode outputs before packing
        exactly."""
        finalize_layers(self, sign_outputs)
        self.config.surge_packed = True
        return self

    def quantize_embeddings(self, names: list[str] | None = None, bits: int = 8, group_size: int | None = None):
        """Store the embedding tables `names` (default: every `nn.Embedding`) in int8 with per-row scales (`bits=8`)
        or in 4 bits with one scale per `group_size` columns (`bits=4`), in place (`surge_hf.embeddings`); a packed
        model only. `save_pretrained` then writes them so and `from_pretrained` keeps them so in memory. Returns the
        model."""
        quantize_embeddings(self, names, bits, group_size)
        return self

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Embedding:
        """`PreTrainedModel.resize_token_embeddings`, for float input embeddings only: the new rows of a table need
        training, which a quantized table (`quantize_embeddings`) cannot get."""
        table = self.get_input_embeddings()
        if isinstance(table, QuantizedEmbedding):
            raise ValueError(
                f"resize_token_embeddings() cannot resize the {table.format_name} input embedding table of this packed "
                f"model (config.{table.config_field}): its new rows would need training, which a quantized table "
                "cannot get. Call model.unfinalize() (float embeddings, trainable layers), resize and train, then "
                "finalize() and quantize_embeddings() again."
            )
        return super().resize_token_embeddings(*args, **kwargs)

    def unfinalize(self, surge_config: SurgeConfig | dict[str, Any] | None = None):
        """Rebuild trainable SURGE layers from the packed ones (latent W = alpha * sign(W), W_a = W; quantized
        embeddings become float embeddings holding their dequantised rows), in place, so a packed checkpoint can be
        trained further. `surge_config` replaces the recipe (default: the saved one)."""
        recipe = None if surge_config is None else as_surge_config(surge_config)
        unfinalize_layers(self, recipe)
        dequantize_embeddings(self)
        self.config.surge_int8_embeddings = self.config.surge_int4_embeddings = None
        if recipe is not None:
            self.config.surge_config = recipe
        self.config.surge_packed = False
        return self

    @contextmanager
    def _packed_view(self) -> Iterator[None]:
        """Temporarily swap every SURGE layer for its packed layer (the originals are put back on exit)."""
        originals = list(surge_layers(self))
        try:
            for name, layer in originals:
                self.set_submodule(name, packed_layer(layer, name))
            self.config.surge_packed = True
            yield
        finally:
            for name, layer in originals:
                self.set_submodule(name, layer)
            self.config.surge_packed = False

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, *args: Any,
                        packed: bool = False, **kwargs: Any):
        """`PreTrainedModel.save_pretrained`, writing the form the model is in (packed after `finalize`, else
        train form). `packed=True` writes the packed form of a trainable model without changing it. The config's
        `auto_map` names every SURGE class of the architecture, so that custom code loads the checkpoint through
        `AutoModel` and every Auto class of a head, not only the class it was saved as.

        The save is atomic (`surge_hf.saving.replaced_atomically`): it writes into a temporary sibling folder that
        holds a copy of `save_directory`'s files and then takes its place, so an interruption or a full disk leaves
        the previous checkpoint there loadable (a full disk raises `DiskFullError`, naming the space needed). With
        `push_to_hub`, `repo_id` defaults to the name of `save_directory`, as in transformers. A save that is not
        the main process's (`is_main_process=False`), a `distributed_checkpoint`, and a save into a folder whose
        parent folder is not writable (no sibling can be made there) write in place.
        """
        if packed and not self.is_packed and kwargs.get("state_dict") is not None:
            raise ValueError("save_pretrained(packed=True) builds its own state dict; do not pass state_dict.")
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **auto_map(self.config_class)}
        parent = os.path.dirname(os.path.abspath(save_directory))
        if (not is_main_process or kwargs.get("distributed_checkpoint") or os.path.isfile(save_directory)
                or not os.access(parent, os.W_OK)):
            return self._save_form(save_directory, is_main_process, *args, packed=packed, **kwargs)
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", os.path.basename(os.path.abspath(save_directory)))
        with replaced_atomically(save_directory, what="the model",
                                 needed_bytes=lambda: tensor_bytes(self.state_dict().values())) as staging:
            return self._save_form(staging, is_main_process, *args, packed=packed, **kwargs)

    def _save_form(self, save_directory: str | os.PathLike, *args: Any, packed: bool, **kwargs: Any):
        """`PreTrainedModel.save_pretrained` of the packed form (`packed=True` on a trainable model, through a
        temporary packed view) or of the form the model is in."""
        if packed and not self.is_packed:
            with self._packed_view():
                return super().save_pretrained(save_directory, *args, **kwargs)
        self.config.surge_packed = self.is_packed
        return super().save_pretrained(save_directory, *args, **kwargs)

    # -- strict loading --------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args: Any,
                        **kwargs: Any):
        """`PreTrainedModel.from_pretrained` (a SURGE checkpoint in either form, or a plain checkpoint of the
        wrapped architecture, whose weights become the latent weights), with strict checks on packed layers.

        Raises:
            OSError: a weights file is not valid safetensors (truncated or corrupted).
            ValueError: a packed checkpoint misses a tensor of a binarized layer or has one of the wrong shape,
                or a packed checkpoint is loaded into trainable layers, or `attn_implementation` names a float
                attention for a recipe that binarizes attention.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        # The Auto classes pass `attn_implementation` on to the config they load.
        attn_implementation = kwargs.get("attn_implementation",
                                         getattr(kwargs.get("config"), "_attn_implementation_internal", None))
        shortcut_recipe = cls._shortcuts_to_add(pretrained_model_name_or_path, kwargs)
        if shortcut_recipe is not None:
            kwargs[RECIPE_KEYWORD] = shortcut_recipe.replace(shortcuts=False)
        config = kwargs.get("config")
        if RECIPE_KEYWORD in kwargs and config is not None and not isinstance(config, (str, os.PathLike)):
            kwargs["config"] = copy.deepcopy(config)
            kwargs["config"].surge_config = kwargs.pop(RECIPE_KEYWORD)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
            info["missing_keys"] = {*info["missing_keys"], *model.__dict__.pop("_surge_initialised_keys", ())}
        except SafetensorError as error:
            raise OSError(
                f"Could not read the weights of {pretrained_model_name_or_path!s}: the safetensors file is "
                f"truncated or corrupted ({error}). Download or save the checkpoint again (from the Hub: "
                "force_download=True)."
            ) from error
        model._check_loading(pretrained_model_name_or_path, info)
        model._check_attn_implementation(attn_implementation)
        if shortcut_recipe is not None:
            add_shortcuts(model, shortcut_recipe)
            model.config.surge_config = shortcut_recipe
        return (model, info) if output_loading_info else model

    @staticmethod
    def _shortcuts_to_add(source: str | os.PathLike | None, kwargs: dict[str, Any]) -> SurgeConfig | None:
        """The recipe passed as `surge=` when it asks for shortcuts that the checkpoint does not have (a plain or
        shortcut-free SURGE checkpoint): such a checkpoint loads without them and gets them added afterwards (see
        `shortcuts.add_shortcuts`), so its Linear weights keep their names and, with `shortcut_gate_init=0`, the
        model keeps its function."""
        if kwargs.get(RECIPE_KEYWORD) is None or source is None:
            return None
        recipe = as_surge_config(kwargs[RECIPE_KEYWORD])
        if not recipe.shortcuts:
            return None
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        saved = getattr(AutoConfig.from_pretrained(source, **hub_kwargs), "surge_config", None)
        return None if saved is not None and saved.shortcuts else recipe

    def _adjust_missing_and_unexpected_keys(self, loading_info: Any) -> None:
        """transformers' hook before its load report: take the tensors that the recipe adds and initialises out of
        the report, say in one line what was initialised and how, and keep them for `output_loading_info` (see
        `from_pretrained`). A packed model has nothing to initialise: `_check_loading` checks its tensors."""
        super()._adjust_missing_and_unexpected_keys(loading_info)
        if self.is_packed:
            return
        added = {f"{name}.{tensor}" if name else tensor: tensor
                 for name, module in self.named_modules() for tensor in added_tensors(module)}
        initialised = {key for key in loading_info.missing_keys if key in added}
        if initialised:
            loading_info.missing_keys = {key for key in loading_info.missing_keys if key not in initialised}
            self._surge_initialised_keys = initialised
            logger.warning(self._initialisation_note(initialised, added))

    def _initialisation_note(self, initialised: set[str], added: dict[str, str]) -> str:
        """The log line for the added tensors (state-dict key -> name in its module) a checkpoint did not hold."""
        values = initial_values(self.config.surge_config)
        how = ", ".join(values[tensor] for tensor in values if tensor in {added[key] for key in initialised})
        what = f"{type(self).__name__}: {self.name_or_path}"
        if initialised == set(added):
            return (f"{what} holds none of the {len(added)} tensors that the SURGE recipe adds; they were initialised "
                    f"as binarize() does: {how}.")
        shown = ", ".join(sorted(initialised)[:3]) + (", ..." if len(initialised) > 3 else "")
        return (f"{what} lacks {len(initialised)} of the {len(added)} tensors that the SURGE recipe adds ({shown}); "
                f"they were initialised as binarize() does: {how}. Save the checkpoint again if it was meant to hold "
                "them.")

    def _check_loading(self, source: Any, info: dict[str, Any]) -> None:
        """Raise if packed layers did not load completely or hold invalid scales, or if a packed checkpoint was
        loaded into trainable layers (see `from_pretrained`)."""
        if not self.is_packed:
            packed_keys = sorted(key for key in info["unexpected_keys"] if key.endswith(PACKED_TENSOR_NAMES))
            if packed_keys:
                raise ValueError(
                    f"{source!s} is a packed (inference) checkpoint ({packed_keys[0]}, ...), but the config asks "
                    "for trainable layers (surge_packed=False). Load it without overriding surge_packed and call "
                    "model.unfinalize() to get a trainable model, or load the train-form checkpoint."
                )
            return
        prefixes = tuple(f"{name}." for name in [*(name for name, _ in self._binarized_layers()),
                                                 *(self.config.surge_int8_embeddings or []),
                                                 *(self.config.surge_int4_embeddings or {})])
        mismatched = [entry[0] if isinstance(entry, tuple) else entry for entry in info["mismatched_keys"]]
        incomplete = sorted(key for key in [*info["missing_keys"], *mismatched] if key.startswith(prefixes))
        _raise_if_incomplete(
            f"packed checkpoint {source!s}", incomplete, "A packed layer cannot be re-initialised; save the "
            "checkpoint again with save_pretrained(path, packed=True) or model.finalize()."
        )
        self._check_packed_scales(source)

    def _check_packed_scales(self, source: Any) -> None:
        for name, layer in self._binarized_layers():
            scale = layer._buffers.get("weight_scale")
            if scale is not None and not (torch.isfinite(scale).all() and (scale > 0).all()):
                raise ValueError(
                    f"The packed checkpoint {source!s} holds invalid weight scales in {name}.weight_scale (NaN, "
                    "inf, zero or negative; each is the mean |W| of an output channel and must be > 0). Save the "
                    "checkpoint again from the trained model with save_pretrained(path, packed=True)."
                )


def _raise_if_incomplete(checkpoint: str, keys: list[str], fix: str) -> None:
    """A `ValueError` naming the first missing or mis-shaped `keys` of `checkpoint` and `fix`, if there are any."""
    if keys:
        shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
        raise ValueError(
            f"The {checkpoint} is incomplete: {len(keys)} tensor(s) of binarized layers are missing or have the "
            f"wrong shape ({shown}). {fix}"
        )
