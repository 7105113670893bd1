"""Sharing trained models on the Hugging Face Hub: their model card (`model_card`, rendered from the templates in
`model_cards/`) and their upload (`upload`)."""

from __future__ import annotations

from typing import Any

from .. import _moved_name


def __getattr__(name: str) -> Any:
    """The names of the module `surge_hf.hub` of the previous release, now in `surge_hf.hub.model_card` and
    `surge_hf.hub.upload`, with a FutureWarning, until the next release."""
    return _moved_name(__name__, name)
