"""The rules of a training run's output folder, checked before any model or data is loaded.

- `output_dir` is never the folder of a model the run reads (`--model_name_or_path`, the teacher), and such a model
  never lies in a folder the run rewrites (`train_state/`, `checkpoints/`): the run would replace the weights it
  starts from. (A model in another subfolder, such as an earlier stage's `teacher/`, is fine.)
- A non-empty `output_dir` is refused unless the run resumes (`--resume_from_checkpoint`) or the user asks to
  overwrite it (`--overwrite_output_dir`): nobody's files are replaced by surprise. The folders of the run's own
  earlier stages do not count.
- `output_dir` must be creatable and writable, so that a run never fails after training for want of a folder.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path

from .checkpointing import CHECKPOINT_DIR

TRAIN_STATE_DIR = "train_state"
# Folders of output_dir that a run replaces as a whole.
REWRITTEN_FOLDERS = (TRAIN_STATE_DIR, CHECKPOINT_DIR)


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(output_dir: str | os.PathLike[str]) -> None:
    """Raise unless `output_dir` is a writable folder or can be created (nothing is created here)."""
    path = Path(output_dir).absolute()
    existing = _first_existing(path)
    if existing == path and not path.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir} exists and is not a folder: pass a folder path.")
    if existing != path and not existing.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir} cannot be created: {existing} is a file, not a folder. "
                                 "Pass a path under a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise PermissionError(f"--output_dir {output_dir} {what}. Pass a folder you can write to.")


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(
    output_dir: str | os.PathLike[str],
    *,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    own_folders: Collection[str] = (),
) -> None:
    """Apply the output-folder rules (module docstring) before a run starts.

    Args:
        output_dir: the run's output folder.
        inputs: flag name -> model folder (or Hub id) the run reads, e.g. `{"--model_name_or_path": "bert"}`; only
            local folders are compared.
        overwrite: `--overwrite_output_dir`: a non-empty folder may be written into.
        resume: the run resumes from a checkpoint, so the folder holds this run's own files.
        own_folders: entries of `output_dir` written by the run's earlier stages (e.g. `teacher`).
    """
    target = Path(output_dir).resolve()
    for flag, source in (inputs or {}).items():
        if source is None or not Path(source).exists():
            continue
        folder = Path(source).resolve()
        if folder == target or any(_is_within(folder, target / name) for name in REWRITTEN_FOLDERS):
            raise ValueError(f"--output_dir {output_dir} would overwrite {flag} {source} (the folder itself, or its "
                             "train_state/ or checkpoints/): the run would replace the weights it starts from. Pass "
                             "another --output_dir.")
    check_writable(output_dir)
    entries = sorted(entry.name for entry in target.iterdir()) if target.is_dir() else []
    entries = [name for name in entries if name not in own_folders]
    if entries and not (overwrite or resume):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(f"--output_dir {output_dir} is not empty ({shown}). Pass an empty or new folder, "
                              "--overwrite_output_dir to write into it, or --resume_from_checkpoint to continue "
                              "the run it holds.")
