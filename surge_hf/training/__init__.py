"""Training binary models: the Accelerate loop of the scripts (`loop`) and `SurgeTrainer` (`trainer`), with the
SURGE objective and distillation (`objective`, `teacher_cache`, `image_teachers`), calibration before the first step
(`calibration`), resumable checkpoints (`checkpointing`), and the scripts' runs: their flags (`cli`), the checks
before any work (`compatibility`, `output_dir`), their stages (`stages`) and what they leave behind (`export`)."""

from __future__ import annotations

from typing import Any

from .. import _moved_name


def __getattr__(name: str) -> Any:
    """The names of the module `surge_hf.training` of the previous release, now in `surge_hf.training.loop`, with a
    FutureWarning, until the next release."""
    return _moved_name(__name__, name)
