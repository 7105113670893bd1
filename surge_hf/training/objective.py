"""The training objective: task loss, SURGE auxiliary-branch loss and distillation from a full-precision teacher.

With student logits `z_s`, teacher logits `z_t`, temperature `T` and weights from `DistillationConfig`:

    L = label_weight * L_task + logits_weight * L_logits + hidden_states_weight * L_hidden
        + hidden_relations_weight * L_rel + attentions_weight * L_attn + L_aux     (with a teacher)
    L = L_task + L_aux                                          (without)

    L_logits = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))     (classification; soft cross-entropy)
             = mean((z_s - z_t)^2)                                (regression)
    L_hidden = mean over layers l of mean((h_s^l - h_t^l)^2)        (embedding output and every layer; with
                                                                   mask_padding, over real tokens only)
             = mean over layers l and tokens i of ||n(h_s^l_i) - n(h_t^l_i)||^2 = 2 - 2 cos(h_s^l_i, h_t^l_i)
                                                                  (hidden_states_loss="normalized": scale-free,
                                                                   n(v) = v / ||v||)
    L_rel    = mean over layers l, examples and token pairs (i, j) of (R_s^l_ij - R_t^l_ij)^2,
               R^l_ij = cos(h^l_i, h^l_j)                         (the token-token relations of each layer's hidden
                                                                   states; over real tokens with mask_padding)
    L_attn   = mean over layers l of mean((A_s^l - A_t^l)^2)        (attention probabilities)
    L_aux    = sum over SURGE layers of w * mean((W_a x - f_b)^2)   (recipes with aux_loss_weight = w > 0)

With `embedding_mixup_alpha > 0` (text, training only) student and teacher see the same mixed token embeddings
(`mix_token_embeddings`), learnt through the distillation terms alone.

`L_task` is the model's own loss for hard labels (rows labelled `IGNORE_LABEL` do not count; it is 0 for a batch
without a labelled row), or the soft-target cross-entropy `-sum(y * log softmax(z_s))` when
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
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The collector lives in `aux_loss`, below the layers; it is re-exported here, where it used to be defined.
from ..aux_loss import AuxiliaryLossCollector, collect_auxiliary_loss, record_auxiliary_loss
from .teacher_cache import TEACHER_INDEX

HIDDEN_STATES_LOSSES = ("mse", "normalized")
"""The forms of L_hidden (`DistillationConfig.hidden_states_loss`)."""
IGNORE_LABEL = -100
"""The class id of a row without a hard label (torch's `cross_entropy` default `ignore_index`): augmented inputs,
learnt from the teacher's outputs alone."""


__all__ = [
    "AuxiliaryLossCollector",
    "DistillationConfig",
    "HIDDEN_STATES_LOSSES",
    "collect_auxiliary_loss",
    "compute_loss",
    "distillation_loss",
    "hidden_relations_loss",
    "layerwise_mse",
    "logits_distillation_loss",
    "record_auxiliary_loss",
    "soft_cross_entropy",
    "task_loss",
]


@dataclass
class DistillationConfig:
    """Weights of the distillation terms (see the module docstring).

    Args:
        temperature: T of the logits term.
        label_weight: weight of the task loss on the hard labels.
        logits_weight: weight of the logits term (the teacher's soft outputs).
        hidden_states_weight: weight of the hidden-state term (embedding output and every layer).
        hidden_states_loss: mse compares hidden states as they are; normalized compares their directions, 2 - 2 cos
            per token (scale-free).
        hidden_relations_weight: weight of the MSE between the student's and the teacher's token-token cosine
            similarities in every layer's hidden states.
        attentions_weight: weight of the attention-probability term.
        embedding_mixup_alpha: embedding mixup (MixKD): train on token embeddings of two sentences mixed with
            lam ~ Beta(alpha, alpha), shown to student and teacher alike; 0 turns it off.
        mask_padding: distil hidden states on real tokens only (padded positions are not compared).
    """

    temperature: float = 1.0
    label_weight: float = 0.0
    logits_weight: float = 1.0
    hidden_states_weight: float = 0.0
    hidden_states_loss: str = field(default="mse", metadata={"choices": HIDDEN_STATES_LOSSES})
    hidden_relations_weight: float = 0.0
    attentions_weight: float = 0.0
    embedding_mixup_alpha: float = 0.0
    mask_padding: bool = False

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, str):
                continue
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"DistillationConfig.{name}={value!r} must be a finite number >= 0.")
        if self.hidden_states_loss not in HIDDEN_STATES_LOSSES:
            raise ValueError(f"DistillationConfig.hidden_states_loss={self.hidden_states_loss!r} is not one of "
                             f"{', '.join(HIDDEN_STATES_LOSSES)}: 'mse' compares hidden states as they are, "
                             "'normalized' compares their directions (scale-free).")
        if self.temperature <= 0:
            raise ValueError(f"DistillationConfig.temperature={self.temperature!r} must be > 0.")
        if self.embedding_mixup_alpha > 0 and self.label_weight > 0:
            raise ValueError(
                f"DistillationConfig.embedding_mixup_alpha={self.embedding_mixup_alpha} mixes two inputs, which have "
                f"no hard label; set label_weight=0 (it is {self.label_weight}) or embedding_mixup_alpha=0."
            )

    @property
    def needs_hidden_states(self) -> bool:
        return self.hidden_states_weight > 0 or self.hidden_relations_weight > 0

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


def _check_layer_counts(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...], what: str) -> None:
    if len(student) != len(teacher):
        raise ValueError(
            f"Cannot distil {what}: the student has {len(student)} and the teacher {len(teacher)}. Use a teacher "
            f"with the student's number of layers, or set the {what} distillation weight to 0."
        )


def layerwise_mse(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...], what: str,
                  token_mask: Tensor | None = None, *, normalized: bool = False) -> Tensor:
    """Mean over layers of the MSE between matching student and teacher tensors; with `token_mask` (B, L) of
    hidden states (B, L, H), the mean runs over the tokens where the mask is 1 only.

    With `normalized`, each token's vector is divided by its norm first and the squared distances are summed over
    the last dim instead of averaged: per token ||n(s) - n(t)||^2 = 2 - 2 cos(s, t), whatever the two scales."""
    _check_layer_counts(student, teacher, what)
    if normalized:
        student = tuple(F.normalize(s.float(), dim=-1) for s in student)
        teacher = tuple(F.normalize(t.float(), dim=-1) for t in teacher)
        return layerwise_mse(student, teacher, what, token_mask) * student[0].shape[-1]
    if token_mask is None:
        return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher)]).mean()
    weights = token_mask.float().unsqueeze(-1)
    count = weights.sum() * student[0].shape[-1]
    return torch.stack([((s.float() - t.float()) ** 2 * weights).sum() / count
                        for s, t in zip(student, teacher)]).mean()


def hidden_relations_loss(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...],
                          token_mask: Tensor | None = None) -> Tensor:
    """L_rel: mean over layers of the MSE between the student's and the teacher's token-token cosine similarities,
    `R_ij = cos(h_i, h_j)` of each example's hidden states (B, L, H); with `token_mask` (B, L), over the pairs of
    real tokens only. Scale-free, and defined whatever the two hidden sizes."""
    _check_layer_counts(student, teacher, "hidden-state relations")

    def relations(hidden: Tensor) -> Tensor:
        unit = F.normalize(hidden.float(), dim=-1)
        return unit @ unit.transpose(-1, -2)

    if token_mask is None:
        return torch.stack([F.mse_loss(relations(s), relations(t)) for s, t in zip(student, teacher)]).mean()
    mask = token_mask.float()
    pairs = mask.unsqueeze(-1) * mask.unsqueeze(-2)
    return torch.stack([((relations(s) - relations(t)) ** 2 * pairs).sum() / pairs.sum()
                        for s, t in zip(student, teacher)]).mean()


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """-sum(y * log softmax(z)) averaged over the batch, for soft targets y (rows summing to 1)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def task_loss(outputs: Any, soft_labels: Tensor | None, labels: Tensor | None = None) -> Tensor | None:
    """L_task alone: the soft-target cross-entropy, else the model's `loss` without the `aux_loss` a SURGE model
    adds to it (None when the model computed no loss; 0 when every row of `labels` is `IGNORE_LABEL`)."""
    if soft_labels is not None:
        return soft_cross_entropy(outputs.logits, soft_labels)
    if labels is not None and not labels.is_floating_point() and bool((labels == IGNORE_LABEL).all()):
        return outputs.logits.sum() * 0.0  # the model's mean over no labelled row would be NaN
    included_aux = getattr(outputs, "aux_loss", None)
    if outputs.loss is None or included_aux is None:
        return outputs.loss
    return outputs.loss - included_aux


def distillation_loss(outputs: Any, teacher_outputs: Any, distillation: DistillationConfig,
                      is_regression: bool, attention_mask: Tensor | None = None) -> Tensor:
    """logits_weight * L_logits + hidden_states_weight * L_hidden + hidden_relations_weight * L_rel
    + attentions_weight * L_attn (`attention_mask`: the real tokens, for `mask_padding`)."""
    loss = distillation.logits_weight * logits_distillation_loss(
        outputs.logits, teacher_outputs.logits, distillation.temperature, is_regression
    )
    token_mask = attention_mask if distillation.mask_padding else None
    if distillation.hidden_states_weight > 0:
        loss = loss + distillation.hidden_states_weight * layerwise_mse(
            outputs.hidden_states, teacher_outputs.hidden_states, "hidden states", token_mask,
            normalized=distillation.hidden_states_loss == "normalized")
    if distillation.hidden_relations_weight > 0:
        loss = loss + distillation.hidden_relations_weight * hidden_relations_loss(
            outputs.hidden_states, teacher_outputs.hidden_states, token_mask)
    if distillation.needs_attentions:
        loss = loss + distillation.attentions_weight * layerwise_mse(
            outputs.attentions, teacher_outputs.attentions, "attention maps")
    return loss


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a DDP (or similar) wrapper."""
    return getattr(model, "module", model)


def mix_token_embeddings(
    student: nn.Module, teacher: nn.Module, batch: dict[str, Any], alpha: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Embedding mixup (MixKD) of a text batch: the student's and the teacher's inputs.

    Row i becomes `lam_i * E(x_i) + (1 - lam_i) * E(x_p(i))` in each model's own token-embedding table `E`, with
    `p` a random permutation of the rows, `lam_i ~ Beta(alpha, alpha)` and the union of both rows' attention
    masks (position and token-type embeddings are added by the models as usual). The mixed input has no hard label:
    only the distillation terms learn from it. Draws from torch's global generator, so a seeded or resumed run
    mixes the same rows.
    """
    input_ids = batch["input_ids"]
    rows = input_ids.shape[0]
    permutation = torch.randperm(rows).to(input_ids.device)
    lam = torch.distributions.Beta(alpha, alpha).sample((rows, 1, 1)).to(input_ids.device)
    rest = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "attention_mask")}
    if "attention_mask" in batch:
        rest["attention_mask"] = torch.maximum(batch["attention_mask"], batch["attention_mask"][permutation])

    def mixed(model: nn.Module) -> Tensor:
        embeddings = _unwrapped(model).get_input_embeddings()(input_ids)
        return lam.to(embeddings.dtype) * embeddings + (1 - lam.to(embeddings.dtype)) * embeddings[permutation]

    with torch.no_grad():
        teacher_inputs = {**rest, "inputs_embeds": mixed(teacher)}
    return {**rest, "inputs_embeds": mixed(student)}, teacher_inputs


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
    teacher_index = batch.pop(TEACHER_INDEX, None)
    distillation = distillation or DistillationConfig()
    extra = {}
    if teacher is not None and distillation.needs_hidden_states:
        extra["output_hidden_states"] = True
    if teacher is not None and distillation.needs_attentions:
        extra["output_attentions"] = True
    teacher_inputs = {k: v for k, v in batch.items() if k != "labels"}
    if teacher_index is not None:  # a `CachedTeacher` looks its outputs up by row
        teacher_inputs[TEACHER_INDEX] = teacher_index
    if teacher is not None and distillation.embedding_mixup_alpha > 0 and model.training:
        batch, teacher_inputs = mix_token_embeddings(model, teacher, batch, distillation.embedding_mixup_alpha)
    with collect_auxiliary_loss() as aux:
        outputs = model(**batch, **extra)
    task = task_loss(outputs, soft_labels, batch.get("labels"))
    if teacher is None:
        loss = task
    else:
        with torch.no_grad():
            teacher_outputs = teacher(**teacher_inputs, **extra)
        loss = distillation_loss(outputs, teacher_outputs, distillation, is_regression,
                                 batch.get("attention_mask"))
        if distillation.label_weight > 0:
            loss = loss + distillation.label_weight * task
    aux_total = aux.total()
    return (loss if aux_total is None else loss + aux_total.to(loss.dtype)), outputs
