"""Resumable checkpoints of a training run: where they live, what they record, and which may be resumed.

A checkpoint is `output_dir/checkpoints/step_<N>/`: Accelerate's state (model, optimizer, scheduler, RNG) and
`trainer_state.json`, which holds the loop state, the id of the run that wrote it and the run's settings (the values
that decide the trajectory: learning rate, seed, recipe, maximum length, ...). It is written to a temporary folder
renamed only when complete, so an interrupted run always leaves its last good checkpoint intact.

Rules:
- a run prunes only the checkpoints it wrote itself (same run id), never another run's;
- `--resume_from_checkpoint latest` takes the most recently written complete checkpoint of `output_dir`;
- a resume is refused, before any work, when the checkpoint is incomplete or corrupt, or was written with other
  settings (another learning rate, seed, recipe, script, data, ...): the message names each difference and the fix;
- a checkpoint that does not fit on the disk raises `surge_hf.saving.DiskFullError` naming it and the space it
  needs, and leaves no partial folder.
"""

from __future__ import annotations

import json
import pickle
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors import SafetensorError, safe_open

from ..saving import removed_on_failure, tensor_bytes

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: incomplete, corrupt, or written with other settings."""


def new_run_id() -> str:
    """A fresh id for a run that does not resume (checkpoints carry it so that a run prunes only its own)."""
    return uuid.uuid4().hex


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete `step_<N>` checkpoints of `output_dir`, oldest written first."""
    root = checkpoint_root(output_dir)
    steps = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(steps, key=lambda p: ((p / STATE_FILE).stat().st_mtime_ns, _step_of(p)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The most recently written complete checkpoint under `output_dir/checkpoints`, or None."""
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def read_state(path: Path) -> dict[str, Any]:
    """The loop state of checkpoint `path`; a clear error when the file is damaged."""
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"Checkpoint {path} is corrupt: {state_file} cannot be read ({error}). Resume from "
                              "another checkpoint, or start again without --resume_from_checkpoint.") from error
    if not isinstance(state, dict) or not isinstance(state.get("completed_steps"), int):
        raise CheckpointError(f"Checkpoint {path} is corrupt: {state_file} has no completed_steps. Resume from "
                              "another checkpoint, or start again without --resume_from_checkpoint.")
    return state


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names (`latest` = the newest one in output_dir), or None."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no checkpoint under {checkpoint_root(output_dir)}; start without "
                "--resume_from_checkpoint, or point it at a checkpoint folder."
            )
        return path
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path}: not a complete checkpoint (no {STATE_FILE}); use a "
            f"{CHECKPOINT_DIR}/step_<N> folder written by this script, or 'latest'."
        )
    return path


def _describe(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def check_checkpoint(path: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check that checkpoint `path` can be resumed with `settings`; return its loop state.

    Refused (CheckpointError naming the file or the settings, and the fix): an unreadable state file, a
    safetensors file that does not open, and any setting that differs from the one the checkpoint was written
    with (settings missing on either side are not compared).
    """
    state = read_state(path)
    for weights in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"Checkpoint {path} is corrupt: {weights} does not load ({error}). Resume from "
                                  "another checkpoint, or start again without --resume_from_checkpoint.") from error
    saved = state.get("settings", {})
    changed = {name: (saved[name], value) for name, value in settings.items()
               if name in saved and _describe(saved[name]) != _describe(value)}
    if changed:
        lines = "; ".join(f"{name}: checkpoint {_describe(old)}, now {_describe(new)}"
                          for name, (old, new) in changed.items())
        raise CheckpointError(
            f"Checkpoint {path} was written by a run with other settings ({lines}). A resumed run must continue "
            "the same run: resume with the checkpoint's settings, or start a new run without "
            "--resume_from_checkpoint (in an empty --output_dir)."
        )
    return state


def load_checkpoint(accelerator: Accelerator, path: Path) -> None:
    """`accelerator.load_state(path)`, with an error that names the checkpoint and the fix when it does not fit."""
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(
            f"Checkpoint {path} does not fit this run's model or optimizer ({type(error).__name__}: "
            f"{str(error)[:500]}). Either a file in it is damaged, or it was written for another model, recipe or "
            "script: resume it with the command that wrote it, resume another checkpoint, or start again without "
            "--resume_from_checkpoint."
        ) from error


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict[str, Any],
                    keep: int | None) -> Path:
    """Write model, optimizer, scheduler, RNG and loop state for `step`; keep this run's `keep` newest checkpoints.

    Only checkpoints whose state carries this run's id (`state["run_id"]`) are pruned.
    """
    root = checkpoint_root(output_dir)
    final, staging = root / f"step_{step}", root / f".step_{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    with removed_on_failure(staging, what=f"checkpoint {final}", needed_bytes=lambda: _state_bytes(accelerator),
                            fix="Then resume with --resume_from_checkpoint latest (the last complete checkpoint is "
                                "intact)."):
        accelerator.save_state(str(staging))
        if accelerator.is_main_process:
            (staging / STATE_FILE).write_text(json.dumps(state))
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        if keep:
            own = [p for p in complete_checkpoints(output_dir) if _run_id(p) == state["run_id"]]
            for old in sorted(own, key=_step_of)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _state_bytes(accelerator: Accelerator) -> int:
    """About the size of a checkpoint: the prepared models' tensors and the optimizers' state tensors."""
    models = sum(tensor_bytes(model.state_dict().values()) for model in accelerator._models)
    optimizers = sum(tensor_bytes(value for state in optimizer.state_dict()["state"].values()
                                  for value in state.values()) for optimizer in accelerator._optimizers)
    return models + optimizers


def _run_id(path: Path) -> str | None:
    try:
        return json.loads((path / STATE_FILE).read_text()).get("run_id")
    except (OSError, ValueError):
        return None
