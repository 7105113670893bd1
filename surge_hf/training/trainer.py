"""`SurgeTrainer`: a `transformers.Trainer` that optimises `surge_hf.training.objective.compute_loss`.

A plain `Trainer` already trains the SURGE models on task + auxiliary loss (their `loss` includes `aux_loss`). This
subclass optimises the whole objective for any binarized model, including the teacher terms when a teacher is given,
so the Trainer and the Accelerate scripts optimise the very same objective.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import Trainer

from .objective import DistillationConfig, compute_loss


class SurgeTrainer(Trainer):
    """`SurgeTrainer(model, args, ..., teacher=teacher_model, distillation=DistillationConfig(...))`.

    Args:
        teacher: a full-precision model to distil from (moved to the training device, frozen, in eval mode).
        distillation: the weights of the distillation terms (default `DistillationConfig()`).
        is_regression: distil regression outputs with an MSE instead of the soft cross-entropy.
        *args, **kwargs: the `transformers.Trainer` arguments.
    """

    # `compute_loss` returns the batch mean, not a sum normalised by `num_items_in_batch`: the Trainer divides it by
    # the gradient-accumulation steps, so accumulating k batches of n equals one batch of k * n.
    loss_is_scaled_for_ga = False

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
