"""The earlier stages of a training run (a teacher, lower-precision students) and the record of what made each one.

A script that trains in stages (`scripts/glue.py`: a full-precision teacher, then one stage per entry of
`--activation_bits_schedule` but the last; `scripts/vit.py`: a ResNet teacher) writes each earlier stage to its own
folder of `--output_dir` and records there, in `stage.json`, what made it (`stage_record`): the base model (and a
teacher given by path or Hub id), the stage's settings (everything that decides what it computes, as its
checkpoints store them, with the content digest of the data) and the record of the stage it started from. Before
any work, every stage is planned (`Stage.plan`) from what its folder holds:

- nothing: the stage is trained (`START`);
- a finished stage (`all_results.json`) with the same record: it is reused (`REUSE`);
- an interrupted stage (no `all_results.json`) with the same record: it continues from its latest checkpoint
  (`RESUME`), or is trained again from the start when it wrote none (`START`);
- anything else (another record, or files and no record): `StageError`, naming each difference and the fix; with
  `overwrite` (`--overwrite_output_dir`) the stage is trained again from the start instead.

Both scripts plan and run their earlier stages with the same runner (`PlannedStage`, `plan_stages`, `run_stages`):
every stage is planned before any of them runs, and each is reused, continued or trained with the same messages.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpointing import latest_checkpoint

STAGE_FILE = "stage.json"
RESULTS_FILE = "all_results.json"
_DIGEST_CHARS = 16
_CHUNK_BYTES = 2**20
_SHOWN_CHARS = 200  # of a value in a message


class StageError(ValueError):
    """A folder of an earlier stage that this run cannot use: made by another command, or by nothing it knows."""


class StageAction(enum.Enum):
    """What a run does with an earlier stage (see the module docstring)."""

    REUSE = "reuse"
    RESUME = "resume"
    START = "start"


@functools.cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file's content (cached per path, size and modification time: a changed file is read again)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _digest_of(path: Path) -> str:
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _is_data_file(path: Path, root: Path) -> bool:
    """Files of a data folder that hold its data: not hidden, and not the `cache-*` files `datasets` writes next to
    a dataset saved with `save_to_disk` when it is processed."""
    parts = path.relative_to(root).parts
    return path.is_file() and not any(part.startswith(".") for part in parts) and not parts[-1].startswith("cache-")


def content_digest(source: str | os.PathLike[str]) -> str:
    """`sha256:<16 hex digits>` of the content of a local data file, or of every data file of a local folder (their
    relative paths and contents, in order); any other `source` (a Hub dataset name) is returned as it is.

    Two copies of the same data at different paths have the same digest; an edited file has another one.
    """
    path = Path(source)
    if path.is_file():
        hexdigest = _digest_of(path)
    elif path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if _is_data_file(p, path)):
            digest.update(f"{file.relative_to(path).as_posix()}\0{_digest_of(file)}\n".encode())
        hexdigest = digest.hexdigest()
    else:
        return str(source)
    return f"sha256:{hexdigest[:_DIGEST_CHARS]}"


def model_source(name_or_path: str | os.PathLike[str] | None) -> str | None:
    """A model as a stage record names it: the absolute path of a local folder, else the Hub id as given."""
    if name_or_path is None:
        return None
    path = Path(name_or_path)
    return str(path.resolve()) if path.exists() else str(name_or_path)


def stage_record(base_model: str | None, settings: dict[str, Any], previous: dict[str, Any] | None,
                 teacher: str | None = None) -> dict[str, Any]:
    """What makes a stage: the run's base model and the teacher it distils from when that is not an earlier stage
    (`model_source`), the stage's settings (JSON values, with the data's `content_digest`) and the record of the
    stage it starts from (None for the first stage)."""
    return {"base_model": model_source(base_model), "teacher": model_source(teacher), "settings": settings,
            "previous": previous}


def record_digest(record: dict[str, Any]) -> str:
    """`sha256:<16 hex digits>` of a stage record: what a later stage's checkpoints store of the stage before."""
    return f"sha256:{hashlib.sha256(_as_json(record).encode()).hexdigest()[:_DIGEST_CHARS]}"


def _as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _shown(value: Any) -> str:
    text = _as_json(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def _name(path: tuple[str, ...]) -> str:
    """`("previous", "settings", "learning_rate")` -> `previous.learning_rate`."""
    return ".".join(part for part in path if part != "settings") or "record"


def record_differences(recorded: Any, current: Any, path: tuple[str, ...] = ()) -> list[str]:
    """`name: recorded X, now Y` for each value that differs between two stage records (values missing on either
    side, such as a setting added by a newer version, are not compared)."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return [line for key in current if key in recorded
                for line in record_differences(recorded[key], current[key], (*path, key))]
    if _as_json(recorded) == _as_json(current):
        return []
    return [f"{_name(path)}: recorded {_shown(recorded)}, now {_shown(current)}"]


@dataclass(frozen=True)
class Stage:
    """An earlier stage of a run: its folder, what it is called (for messages) and its `stage_record`."""

    folder: Path
    title: str
    record: dict[str, Any]

    def plan(self, *, overwrite: bool = False) -> StageAction:
        """What to do with the stage, from what its folder holds (module docstring); reads only.

        Raises:
            StageError: the folder holds another stage, or files and no record, and not `overwrite`.
        """
        if not self.folder.is_dir() or not any(self.folder.iterdir()):
            return StageAction.START
        problem = self._foreign()
        if problem:
            if overwrite:
                return StageAction.START
            record = self.folder / STAGE_FILE
            rerun = f", or run the command that made it (its settings are in {record})" if record.is_file() else ""
            raise StageError(
                f"{self.folder} holds {problem}, so it is not this command's {self.title} stage. Pass another "
                f"--output_dir, delete {self.folder} or pass --overwrite_output_dir to train the stage again{rerun}."
            )
        if (self.folder / RESULTS_FILE).is_file():
            return StageAction.REUSE
        return StageAction.RESUME if latest_checkpoint(self.folder) is not None else StageAction.START

    def _foreign(self) -> str | None:
        """Why the folder is not this stage's (None when its record matches)."""
        try:
            recorded = json.loads((self.folder / STAGE_FILE).read_text())
        except FileNotFoundError:
            return f"files but no {STAGE_FILE} (another run's outputs, or a stage written before stages were recorded)"
        except (OSError, ValueError) as error:
            return f"an unreadable {STAGE_FILE} ({error})"
        differences = record_differences(recorded, self.record)
        if differences:
            return f"a stage made with other settings ({'; '.join(differences)})"
        return None

    @contextmanager
    def running(self, action: StageAction, *, main_process: bool = True) -> Iterator[None]:
        """The block that trains (`START`) or continues (`RESUME`) the stage. `START` first empties the folder and
        writes the record, so that an interrupted stage is known as this command's; a block that fails before
        writing anything else leaves no folder. Only the main process of a launch touches the folder."""
        if not main_process:
            yield
            return
        if action is StageAction.START:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            staging = self.folder / f".{STAGE_FILE}.tmp"
            staging.write_text(json.dumps(self.record, indent=2, sort_keys=True))
            staging.rename(self.folder / STAGE_FILE)
        try:
            yield
        except BaseException:
            if self.folder.is_dir() and [entry.name for entry in self.folder.iterdir()] == [STAGE_FILE]:
                shutil.rmtree(self.folder)
            raise


@dataclass
class PlannedStage:
    """An earlier stage with what trains it.

    `train(action)` trains (`START`) or continues (`RESUME`) it into its folder; a script that needs its data loaded
    first plans the stage with `train=None` and sets it (`dataclasses.replace`) before `run_stages`. `amount` says how
    long it trains ("4 steps at learning rate 0.001") and `note` is printed after that; `label` names the stage on the
    final model's card; `action` is what this run does with it, set by `plan_stages`.
    """

    stage: Stage
    train: Callable[[StageAction], None] | None
    amount: str
    label: str
    note: str = ""
    action: StageAction = StageAction.START


def plan_stages(stages: list[PlannedStage], *, overwrite: bool = False) -> None:
    """Decide what to do with every stage (`Stage.plan`) before any of them runs: a folder of another command is
    refused before any work."""
    for planned in stages:
        planned.action = planned.stage.plan(overwrite=overwrite)


def run_stages(stages: list[PlannedStage], *, total: int, main_process: bool = True,
               log: Callable[[str], None] = print, finished: Callable[[PlannedStage], None] | None = None) -> None:
    """Reuse, continue or train each planned stage in order (stage `n` of `total`, the final model being the last),
    each training inside `Stage.running`; `finished(stage)` is called after each one, reused or trained."""
    for number, planned in enumerate(stages, 1):
        stage = planned.stage
        where = f"Stage {number} of {total}"
        if planned.action is StageAction.REUSE:
            log(f"{where}: reusing the {stage.title} in {stage.folder} (made by this command: same model, data and "
                "settings).")
        else:
            if planned.train is None:
                raise ValueError(f"The {stage.title} stage was planned without what trains it: set its `train`.")
            doing = "continuing the interrupted" if planned.action is StageAction.RESUME else "training the"
            log(f"{where}: {doing} {stage.title} in {stage.folder}: {planned.amount}.{planned.note}")
            with stage.running(planned.action, main_process=main_process):
                planned.train(planned.action)
        if finished is not None:
            finished(planned)
