"""Checks that a run's models fit its settings and each other, from their configs alone (before any weights load).

Used by both scripts, so that a mismatch fails in a second with the flag and the fix named, not as a shape error in
the middle of training.
"""

from __future__ import annotations

from typing import Any

from .distillation import DistillationConfig


def check_max_length(config: Any, max_length: int, source: str) -> None:
    """Raise unless a text model with `config` takes inputs of `max_length` tokens (its position embeddings)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(f"--max_length {max_length} is above the {limit} positions of {source} "
                         f"(max_position_embeddings): pass --max_length {limit} or less.")


def check_teacher_shapes(student: Any, teacher: Any, distillation: DistillationConfig, source: str) -> None:
    """Raise unless the teacher's hidden states / attention maps can be compared with the student's.

    Hidden-state distillation needs the same hidden size and layer count; attention-map distillation the same
    layer count and number of heads. Logit distillation needs neither.
    """
    needed = []
    if distillation.needs_hidden_states:
        needed += [("hidden_size", "--distill_hidden_states_weight"), ("num_hidden_layers",
                                                                       "--distill_hidden_states_weight")]
    if distillation.needs_attentions:
        needed += [("num_hidden_layers", "--distill_attentions_weight"), ("num_attention_heads",
                                                                          "--distill_attentions_weight")]
    for field, flag in needed:
        mine, theirs = getattr(student, field, None), getattr(teacher, field, None)
        if mine != theirs:
            raise ValueError(f"{flag} needs a teacher with the student's {field}: the student has {mine}, {source} "
                             f"has {theirs}. Use a teacher of the student's shape, or set {flag} 0 (logits only).")
