"""The training objective: task loss, SURGE auxiliary-branch loss and distillation from a full-precision teacher.

With student logits `z_s`, teacher logits `z_t`, temperature `T` and weights from `DistillationConfig`:

    L = label_weight * L_task + logits_weight * L_logits + hidden_states_weight * L_hidden
        + attentions_weight * L_attn + L_aux                    (with a teacher)
    L = L_task + L_aux                                          (without)

    L_logits = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))     (classification; soft cross-entropy)
             = mean((z_s - z_t)^2)                                (regression)
    L_hidden = mean over layers l of mean((h_s^l - h_t^l)^2)        (embedding output and every layer)
    L_attn   = mean over layers l of mean((A_s^l - A_t^l)^2)        (attention probabilities)
    L_aux    = sum over SURGE layers of w * mean((W_a x - f_b)^2)   (recipes with aux_loss_weight = w > 0)

`L_task` is the model's own loss for hard labels, or the soft-target cross-entropy `-sum(y * log softmax(z_s))` when
the batch carries `soft_labels` (mixup / cutmix). In `L_aux`, `x` and `f_b` are detached: only `W_a` is trained by
it. `compute_loss` serves the Accelerate scripts and `SurgeTrainer` (a `transformers.Trainer`) alike.

The auxiliary loss is collected, not stored (`surge_hf.aux_loss`): a SURGE layer in training computes its term, at
the cost of the auxiliary forward product SURGE otherwise skips, and hands it to every `collect_auxiliary_loss()`
block opened with gradients enabled. The SURGE models collect around their own forward and return the sum as
`aux_loss`, added to their `loss` as transformers' mixture-of-experts models do with their router loss;
`compute_loss` collects around any model, so a model binarized with `surge_hf.binarize` gets the same objective.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The collector lives in `aux_loss`, below the layers; it is re-exported here, where it used to be defined.
from .aux_loss import AuxiliaryLossCollector, collect_auxiliary_loss, record_auxiliary_loss

__all__ = [
    "AuxiliaryLossCollector",
    "DistillationConfig",
    "collect_auxiliary_loss",
    "compute_loss",
    "distillation_loss",
    "layerwise_mse",
    "logits_distillation_loss",
    "record_auxiliary_loss",
    "soft_cross_entropy",
    "task_loss",
]


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


def task_loss(outputs: Any, soft_labels: Tensor | None) -> Tensor | None:
    """L_task alone: the soft-target cross-entropy, else the model's `loss` without the `aux_loss` a SURGE model
    adds to it (None when the model computed no loss)."""
    if soft_labels is not None:
        return soft_cross_entropy(outputs.logits, soft_labels)
    included_aux = getattr(outputs, "aux_loss", None)
    if outputs.loss is None or included_aux is None:
        return outputs.loss
    return outputs.loss - included_aux


def distillation_loss(outputs: Any, teacher_outputs: Any, distillation: DistillationConfig,
                      is_regression: bool) -> Tensor:
    """logits_weight * L_logits + hidden_states_weight * L_hidden + attentions_weight * L_attn."""
    loss = distillation.logits_weight * logits_distillation_loss(
        outputs.logits, teacher_outputs.logits, distillation.temperature, is_regression
    )
    if distillation.needs_hidden_states:
        loss = loss + distillation.hidden_states_weight * layerwise_mse(
            outputs.hidden_states, teacher_outputs.hidden_states, "hidden states")
    if distillation.needs_attentions:
        loss = loss + distillation.attentions_weight * layerwise_mse(
            outputs.attentions, teacher_outputs.attentions, "attention maps")
    return loss


def compute_loss(
    model: nn.Module,
    batch: dict[str, Any],
    teacher: nn.Module | None = None,
    distillation: DistillationConfig | None = None,
    is_regression: bool = False,
) -> tuple[Tensor, Any]:
    """The training loss L of `model` on `batch` (see the module docstring) and the student's outputs.

    `model` may be wrapped (DDP). The auxiliary term is counted once, whether or not the model's own `loss`
    includes it.
    """
    batch = dict(batch)
    soft_labels = batch.pop("soft_labels", None)
    distillation = distillation or DistillationConfig()
    extra = {}
    if teacher is not None and distillation.needs_hidden_states:
        extra["output_hidden_states"] = True
    if teacher is not None and distillation.needs_attentions:
        extra["output_attentions"] = True
    with collect_auxiliary_loss() as aux:
        outputs = model(**batch, **extra)
    task = task_loss(outputs, soft_labels)
    if teacher is None:
        loss = task
    else:
        teacher_inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            teacher_outputs = teacher(**teacher_inputs, **extra)
        loss = distillation_loss(outputs, teacher_outputs, distillation, is_regression)
        if distillation.label_weight > 0:
            loss = loss + distillation.label_weight * task
    aux_total = aux.total()
    return (loss if aux_total is None else loss + aux_total.to(loss.dtype)), outputs
