"""The stage runner both scripts share: every stage planned before any runs, then reused, continued or trained in
order with the same messages; a stage planned without what trains it is refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from surge_hf.training.stages import (
    RESULTS_FILE,
    STAGE_FILE,
    PlannedStage,
    Stage,
    StageAction,
    StageError,
    plan_stages,
    run_stages,
    stage_record,
)


def planned(folder: Path, title: str, trained: list[tuple[str, StageAction]], lr: float = 0.5) -> PlannedStage:
    def train(action: StageAction) -> None:
        trained.append((title, action))
        (folder / RESULTS_FILE).write_text("{}")

    record = stage_record("base", {"learning_rate": lr}, None)
    return PlannedStage(Stage(folder, title, record), train, "2 steps at learning rate 0.5", title, " A note.")


def test_stages_are_trained_then_reused_in_order_with_their_messages(tmp_path):
    trained: list[tuple[str, StageAction]] = []
    stages = [planned(tmp_path / "a", "first", trained), planned(tmp_path / "b", "second", trained)]
    lines, finished = [], []
    plan_stages(stages)
    run_stages(stages, total=3, log=lines.append, finished=lambda stage: finished.append(stage.label))
    assert trained == [("first", StageAction.START), ("second", StageAction.START)]
    assert lines == [f"Stage 1 of 3: training the first in {tmp_path / 'a'}: 2 steps at learning rate 0.5. A note.",
                     f"Stage 2 of 3: training the second in {tmp_path / 'b'}: 2 steps at learning rate 0.5. A note."]
    assert finished == ["first", "second"]
    assert json.loads((tmp_path / "a" / STAGE_FILE).read_text())["settings"] == {"learning_rate": 0.5}

    again = [planned(tmp_path / "a", "first", trained), planned(tmp_path / "b", "second", trained)]
    plan_stages(again)
    lines.clear()
    run_stages(again, total=3, log=lines.append)
    assert len(trained) == 2 and [stage.action for stage in again] == [StageAction.REUSE] * 2
    assert lines[0] == (f"Stage 1 of 3: reusing the first in {tmp_path / 'a'} (made by this command: same model, "
                        "data and settings).")


def test_every_stage_is_planned_before_any_runs(tmp_path):
    trained: list[tuple[str, StageAction]] = []
    first = planned(tmp_path / "a", "first", trained)
    plan_stages([first])
    run_stages([first], total=2, log=lambda line: None)
    stages = [planned(tmp_path / "b", "second", trained), planned(tmp_path / "a", "first", trained, lr=0.1)]
    with pytest.raises(StageError, match="a stage made with other settings \\(learning_rate: recorded 0.5, now 0.1\\)"):
        plan_stages(stages)
    assert not (tmp_path / "b").exists() and trained == [("first", StageAction.START)]


def test_a_stage_planned_without_what_trains_it_is_refused_and_leaves_no_folder(tmp_path):
    stage = dataclasses.replace(planned(tmp_path / "a", "teacher", []), train=None)
    plan_stages([stage])
    with pytest.raises(ValueError, match="The teacher stage was planned without what trains it: set its `train`."):
        run_stages([stage], total=2, log=lambda line: None)
    assert not (tmp_path / "a").exists()
