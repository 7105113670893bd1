"""The rules of a training run's output folder, checked before any model or data is loaded.

- `output_dir` is never the folder of a model the run reads (`--model_name_or_path`, the teacher), and such a model
  never lies in a folder the run rewrites (`train_state/`, `checkpoints/`): the run would replace the weights it
  starts from. (A model in another subfolder, such as an earlier stage's `teacher/`, is fine.)
- A non-empty `output_dir` is refused unless the run resumes (`--resume_from_checkpoint`) or the user asks to
  overwrite it (`--overwrite_output_dir`): nobody's files are replaced by surprise. The folders of the run's own
  earlier stages do not count.
- `output_dir` must be creatable and writable, so that a run never fails after training for want of a folder.
- One run at a time: a run holds an exclusive lock on `output_dir` (`locked_output_dir`), and a second run started
  into the same folder is refused at once, naming the first.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from accelerate.utils import get_int_from_env

from .checkpointing import CHECKPOINT_DIR

try:
    import fcntl
except ImportError:  # Windows: no advisory file locks; runs are not locked there
    fcntl = None

TRAIN_STATE_DIR = "train_state"
# Folders of output_dir that a run replaces as a whole.
REWRITTEN_FOLDERS = (TRAIN_STATE_DIR, CHECKPOINT_DIR)
LOCK_FILE = ".surge_hf.lock"
# The environment variables that hold a process's global rank under `accelerate launch`, torchrun or MPI.
_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")


class OutputDirInUseError(RuntimeError):
    """Another run holds the lock on the output folder."""


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
    entries = [name for name in entries if name not in own_folders and name != LOCK_FILE]
    if entries and not (overwrite or resume):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(f"--output_dir {output_dir} is not empty ({shown}). Pass an empty or new folder, "
                              "--overwrite_output_dir to write into it, or --resume_from_checkpoint to continue "
                              "the run it holds.")


def is_main_process() -> bool:
    """Whether this process is the main one (global rank 0) of its launch, known before any `Accelerator` exists:
    a single process, or rank 0 of `accelerate launch`, torchrun or MPI."""
    return get_int_from_env(_RANK_VARIABLES, 0) == 0


def _folders_to_create(folder: Path) -> list[Path]:
    """The folders `folder.mkdir(parents=True)` would create, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _holder(handle: IO[str]) -> str:
    """The run that holds the lock, as its lock file records it."""
    handle.seek(0)
    try:
        owner = json.loads(handle.read())
        return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
    except (ValueError, KeyError, TypeError):  # the holder has not written its record yet
        return "a run that is starting"


def _acquire(path: Path, output_dir: str | os.PathLike[str]) -> IO[str]:
    """Open and lock `path` (the lock file of `output_dir`) and record this process in it; refuse if it is held."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            handle.close()
            raise OutputDirInUseError(
                f"--output_dir {output_dir} is in use by another run ({holder}): two runs writing one folder "
                "overwrite each other's checkpoints and outputs. Wait until that run ends (or stop it), or pass "
                "another --output_dir."
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()  # the previous holder removed the file between our open and lock: lock the new one
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}))
    handle.flush()
    return handle


@contextmanager
def locked_output_dir(output_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on `output_dir` for the block (`fcntl.flock` of `output_dir/.surge_hf.lock`, which
    records the holder's pid, host and start time).

    A second run into the same folder raises `OutputDirInUseError` naming the holder. The lock goes with its holder:
    the kernel releases it when the process ends in any way, so the file left by a killed run blocks nobody. Only the
    main process takes it (`is_main_process`); on Windows (no `fcntl`) none is taken. The lock file is removed on
    exit, and so is `output_dir` itself when the lock created it and nothing was written there.
    """
    if fcntl is None or not is_main_process():
        yield
        return
    folder = Path(output_dir)
    created = _folders_to_create(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        handle = _acquire(folder / LOCK_FILE, output_dir)
        try:
            yield
        finally:
            (folder / LOCK_FILE).unlink(missing_ok=True)
            handle.close()
    finally:
        for path in created:
            if any(path.iterdir()):
                break
            path.rmdir()
