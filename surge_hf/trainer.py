"""`SurgeTrainer`: a `transformers.Trainer` that distils from a full-precision teacher.

A plain `Trainer` already trains the SURGE models (their `loss` includes the auxiliary-branch term). This subclass
adds the teacher terms of `surge_hf.distillation.compute_loss`, so the Trainer and the Accelerate scripts optimise
the very same objective.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import Trainer

from .distillation import DistillationConfig, compute_loss


class SurgeTrainer(Trainer):
    """`Trainer(..., teacher=teacher_model, distillation=DistillationConfig(...), is_regression=False)`."""

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | None = None,
        distillation: DistillationConfig | None = None,
        is_regression: bool = False,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.distillation = distillation or DistillationConfig()
        self.is_regression = is_regression
        if teacher is not None:
            self.teacher = teacher.to(self.args.device).eval()
            self.teacher.requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = compute_loss(model, inputs, self.teacher, self.distillation, self.is_regression)
        return (loss, outputs) if return_outputs else loss
