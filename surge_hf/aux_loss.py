"""How SURGE layers hand their auxiliary-branch loss to whoever computes the training loss.

A SURGE layer whose recipe has `aux_loss_weight = w > 0` computes, in training, the term
`w * mean((W_a x - f_b)^2)` (see `surge_hf.layers`) and hands it to every open `collect_auxiliary_loss()` block;
the SURGE models collect around their own forward and return the sum as `aux_loss`, and
`surge_hf.training.objective.compute_loss` collects around any model. The term is collected, never stored on a
module, so nothing of it outlives the forward pass that made it.

A block asks for the terms only when it is opened with gradients enabled: the term trains `W_a` and nothing else,
so without gradients there is nothing to collect (the block stays empty, and no layer pays for the extra product).
Parts of the forward pass may still run without gradients inside a block opened with them: reentrant gradient
checkpointing (`torch.utils.checkpoint(..., use_reentrant=True)`) runs the checkpointed layers under
`torch.no_grad()` and recomputes them in the backward pass. The layers then build their term with gradients anyway
(it depends on `W_a` only, not on the checkpointed activations), so the loss is the same with or without
checkpointing.

This module sits below the layers and imports nothing of surge_hf: it is the one seam between a layer and the loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

__all__ = ["AuxiliaryLossCollector", "auxiliary_loss_requested", "collect_auxiliary_loss", "record_auxiliary_loss"]


class AuxiliaryLossCollector:
    """The auxiliary-loss terms recorded by SURGE layers while the collector is open."""

    def __init__(self) -> None:
        self.terms: list[Tensor] = []

    def total(self) -> Tensor | None:
        """The sum of the recorded terms (None when no layer recorded one)."""
        return torch.stack(self.terms).sum() if self.terms else None


_OPEN_COLLECTORS: ContextVar[tuple[AuxiliaryLossCollector, ...]] = ContextVar("surge_aux_loss_collectors", default=())


@contextmanager
def collect_auxiliary_loss() -> Iterator[AuxiliaryLossCollector]:
    """Collect the auxiliary-branch loss of the forward passes run inside the block:

        with surge_hf.collect_auxiliary_loss() as aux:
            outputs = model(**batch)
        loss = outputs.loss + aux.total()          # aux.total() is None without an auxiliary-loss recipe

    Opened under `torch.no_grad()`, the block collects nothing (see the module docstring).
    """
    collector = AuxiliaryLossCollector()
    if not torch.is_grad_enabled():
        yield collector
        return
    token = _OPEN_COLLECTORS.set((*_OPEN_COLLECTORS.get(), collector))
    try:
        yield collector
    finally:
        _OPEN_COLLECTORS.reset(token)


def auxiliary_loss_requested() -> bool:
    """Whether a `collect_auxiliary_loss()` block opened with gradients enabled is open (a layer computes its term
    only then)."""
    return bool(_OPEN_COLLECTORS.get())


def record_auxiliary_loss(term: Tensor) -> None:
    """Hand one layer's weighted auxiliary-loss term to every open collector."""
    for collector in _OPEN_COLLECTORS.get():
        collector.terms.append(term)
