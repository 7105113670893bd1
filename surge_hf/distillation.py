"""The training loss: task loss, SURGE auxiliary-branch loss and distillation from a full-precision teacher.

With student logits `z_s`, teacher logits `z_t`, temperature `T` and weights from `DistillationConfig`:

    L = label_weight * L_task + logits_weight * L_logits + hidden_states_weight * L_hidden
        + attentions_weight * L_attn + L_aux

    L_logits = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))     (classification; soft cross-entropy)
             = mean((z_s - z_t)^2)                                (regression)
    L_hidden = mean over layers l of mean((h_s^l - h_t^l)^2)        (embedding output and every layer)
    L_attn   = mean over layers l of mean((A_s^l - A_t^l)^2)        (attention probabilities)
    L_aux    = `surge_hf.auxiliary_loss(student)`                  (0 unless the recipe enables it)

Without a teacher, `L = L_task + L_aux`. `L_task` is the model's own loss for hard labels, or the soft-target
cross-entropy `-sum(y * log softmax(z_s))` when the batch carries `soft_labels` (mixup / cutmix).
`compute_loss` serves the Accelerate scripts and `DistillationTrainer` (a `transformers.Trainer`) alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import auxiliary_loss


@dataclass
class DistillationConfig:
    """Weights of the distillation terms (see the module docstring)."""

    temperature: float = 1.0
    label_weight: float = 0.0
    logits_weight: float = 1.0
    hidden_states_weight: float = 0.0
    attentions_weight: float = 0.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"DistillationConfig.{name}={value!r} must be a finite number >= 0.")
        if self.temperature <= 0:
            raise ValueError(f"DistillationConfig.temperature={self.temperature!r} must be > 0.")

    @property
    def needs_hidden_states(self) -> bool:
        return self.hidden_states_weight > 0

    @property
    def needs_attentions(self) -> bool:
        return self.attentions_weight > 0


def logits_distillation_loss(student: Tensor, teacher: Tensor, temperature: float, is_regression: bool) -> Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), or the MSE of the predictions for regression."""
    if is_regression:
        return F.mse_loss(student.float(), teacher.float())
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * temperature**2


def layerwise_mse(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...], what: str) -> Tensor:
    """Mean over layers of the MSE between matching student and teacher tensors."""
    if len(student) != len(teacher):
        raise ValueError(
            f"Cannot distil {what}: the student has {len(student)} and the teacher {len(teacher)}. Use a teacher "
            f"with the student's number of layers, or set the {what} distillation weight to 0."
        )
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher)]).mean()


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """-sum(y * log softmax(z)) averaged over the batch, for soft targets y (rows summing to 1)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def compute_loss(
    model: nn.Module,
    batch: dict[str, Any],
    teacher: nn.Module | None = None,
    distillation: DistillationConfig | None = None,
    is_regression: bool = False,
) -> tuple[Tensor, Any]:
    """The training loss of `model` on `batch` (see the module docstring) and the student's outputs.

    `model` may be wrapped (DDP); SURGE models that add the auxiliary loss to their own `loss` say so with the
    class attribute `adds_auxiliary_loss = True`, and the term is then counted once.
    """
    batch = dict(batch)
    soft_labels = batch.pop("soft_labels", None)
    distillation = distillation or DistillationConfig()
    extra = {}
    if teacher is not None and distillation.needs_hidden_states:
        extra["output_hidden_states"] = True
    if teacher is not None and distillation.needs_attentions:
        extra["output_attentions"] = True
    base = getattr(model, "module", model)
    outputs = model(**batch, **extra)
    aux = auxiliary_loss(base)
    if soft_labels is not None:
        task_loss = soft_cross_entropy(outputs.logits, soft_labels)
    elif aux is not None and outputs.loss is not None and getattr(base, "adds_auxiliary_loss", False):
        task_loss = outputs.loss - aux
    else:
        task_loss = outputs.loss
    if teacher is None:
        loss = task_loss
    else:
        teacher_inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            teacher_outputs = teacher(**teacher_inputs, **extra)
        loss = distillation.logits_weight * logits_distillation_loss(
            outputs.logits, teacher_outputs.logits, distillation.temperature, is_regression
        )
        if distillation.label_weight > 0:
            loss = loss + distillation.label_weight * task_loss
        if extra.get("output_hidden_states"):
            loss = loss + distillation.hidden_states_weight * layerwise_mse(
                outputs.hidden_states, teacher_outputs.hidden_states, "hidden states")
        if extra.get("output_attentions"):
            loss = loss + distillation.attentions_weight * layerwise_mse(
                outputs.attentions, teacher_outputs.attentions, "attention maps")
    return (loss if aux is None else loss + aux), outputs
