"""Checks that a run's models fit its data, its settings and each other, from their configs alone (before any weights
load), for text and image models.

Used by both scripts, so that a mismatch fails in a second with the flag and the fix named, not as a shape error in
the middle of training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoModelForImageClassification

from ..data.image import ImageDataInfo
from ..data.text import TextDataInfo
from .objective import DistillationConfig
from .output_dir import TRAIN_STATE_DIR


def check_trainable_checkpoint(config: Any, name_or_path: str) -> None:
    """Raise unless the model to train from (`--model_name_or_path`, with `config`) has weights to train: a packed
    SURGE checkpoint holds sign bits, which no optimizer can move. Names the run's own train-form folder when the
    packed model is a run's output."""
    if not getattr(config, "surge_packed", False):
        return
    train_state = Path(name_or_path) / TRAIN_STATE_DIR
    instead = (f"--model_name_or_path {train_state} (the train-form model of that run)" if train_state.is_dir() else
               "the train-form model of the run that made it (its train_state/ folder)")
    model_class = (config.architectures or [type(config).__name__.replace("Config", "Model")])[0]
    raise ValueError(
        f"--model_name_or_path {name_or_path} is a packed (inference) SURGE checkpoint: its sign bits have no latent "
        f"weights to train. Start from {instead}, or write a trainable copy in Python: "
        f"surge_hf.{model_class}.from_pretrained(path).unfinalize().save_pretrained(new_path)."
    )


def check_max_length(config: Any, max_length: int, source: str) -> None:
    """Raise unless a text model with `config` takes inputs of `max_length` tokens (its position embeddings)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(f"--max_length {max_length} is above the {limit} positions of {source} "
                         f"(max_position_embeddings): pass --max_length {limit} or less.")


def check_teacher_shapes(student: Any, teacher: Any, distillation: DistillationConfig, source: str) -> None:
    """Raise unless the teacher's hidden states / attention maps can be compared with the student's.

    Hidden-state distillation needs the same hidden size and layer count; hidden-state relations (token-token
    similarities) the same layer count; attention-map distillation the same layer count and number of heads. Logit
    distillation needs none of them.
    """
    needed = []
    if distillation.hidden_states_weight > 0:
        needed += [("hidden_size", "--distill_hidden_states_weight"), ("num_hidden_layers",
                                                                       "--distill_hidden_states_weight")]
    if distillation.hidden_relations_weight > 0:
        needed += [("num_hidden_layers", "--distill_hidden_relations_weight")]
    if distillation.needs_attentions:
        needed += [("num_hidden_layers", "--distill_attentions_weight"), ("num_attention_heads",
                                                                          "--distill_attentions_weight")]
    for field, flag in needed:
        mine, theirs = getattr(student, field, None), getattr(teacher, field, None)
        if mine != theirs:
            raise ValueError(f"{flag} needs a teacher with the student's {field}: the student has {mine}, {source} "
                             f"has {theirs}. Use a teacher of the student's shape, or set {flag} 0 (logits only).")


def check_label_compatibility(config: Any, info: TextDataInfo) -> None:
    """Raise ValueError unless a model config (e.g. a distillation teacher's) predicts the data's labels.

    ``num_labels`` must match. For classification, ``label2id`` must match too (names compared case-insensitively),
    unless the config only has the generic names ``LABEL_0..LABEL_{n-1}``, which say nothing about the classes.
    A ``problem_type`` set on the config must be the data's: ``regression`` or ``single_label_classification``.
    """
    if config.num_labels != info.num_labels:
        kind = "regression (1 output)" if info.is_regression else f"{info.num_labels} classes {list(info.label_list)}"
        raise ValueError(
            f"the model config has num_labels={config.num_labels} but the data needs {kind}; "
            "use a model fine-tuned on this task's labels"
        )
    problem_type = getattr(config, "problem_type", None)
    expected = "regression" if info.is_regression else "single_label_classification"
    if problem_type is not None and problem_type != expected:
        raise ValueError(
            f"the model config has problem_type={problem_type!r} but the data needs {expected!r}; "
            "use a model fine-tuned on this kind of task"
        )
    if info.is_regression:
        return
    generic = {f"LABEL_{i}": i for i in range(config.num_labels)}
    config_label2id = {str(name): int(i) for name, i in config.label2id.items()}
    if config_label2id == generic:
        return
    if {k.lower(): v for k, v in config_label2id.items()} != {k.lower(): v for k, v in info.label2id.items()}:
        raise ValueError(
            f"the model config has label2id={config_label2id} but the data has {info.label2id}; "
            "use a model fine-tuned with the same classes in the same order"
        )


def check_image_teacher(config: Any, info: ImageDataInfo, source: str) -> None:
    """Raise unless a distillation teacher with `config` is an image classifier (any architecture that
    `AutoModelForImageClassification` loads: logits are all it gives) predicting the data's classes in the same
    order (or with only generic label names). Its input size and channels may differ: `image_teachers` adapts them."""
    if type(config) not in AutoModelForImageClassification._model_mapping:
        raise ValueError(f"{source} is a {config.model_type!r} model, not an image classifier that "
                         "AutoModelForImageClassification can load; use e.g. a ResNet, ConvNeXt or ViT classifier.")
    generic = {f"LABEL_{i}": i for i in range(config.num_labels)}
    label2id = {str(name): int(index) for name, index in config.label2id.items()}
    if config.num_labels != info.num_labels or label2id not in (generic, info.label2id):
        raise ValueError(f"{source} predicts {config.num_labels} classes {label2id}, the data has {info.label2id}; "
                         "use a teacher fine-tuned on the same classes in the same order.")
