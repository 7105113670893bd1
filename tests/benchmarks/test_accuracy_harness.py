"""benchmarks/accuracy.py: the equal-time budget (step times probed once, steps derived from the reference), and
every text recipe a command that scripts/glue.py accepts."""

from __future__ import annotations

import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("accuracy_benchmark", ROOT / "benchmarks" / "accuracy.py")
accuracy = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = accuracy  # its dataclasses look their module up
spec.loader.exec_module(accuracy)
glue_script = load_script("glue")


def test_equal_time_gives_each_recipe_the_reference_recipes_seconds(tmp_path, monkeypatch):
    suite = accuracy.TEXT.suites["augment"]
    probed = []

    def fake_probe(args, suite_, recipe, lr, seed):
        probed.append(recipe)
        return {"surge_aug4_1250": 2.0, "ste_aug4_1250": 1.4}[recipe]

    monkeypatch.setattr(accuracy, "probe_step_seconds", fake_probe)
    args = Namespace(task="text", runs_dir=tmp_path, equal_time_as="surge_aug4_1250")
    assert accuracy.equal_time_steps(args, suite, "surge_aug4_1250", 5e-4, 0) is None
    budget = accuracy.equal_time_steps(args, suite, "ste_aug4_1250", 5e-4, 0)
    assert budget == {"reference": "surge_aug4_1250", "budget_s": 2500.0, "step_s": 1.4,
                      "reference_step_s": 2.0, "steps": 1786}
    assert accuracy.equal_time_steps(args, suite, "ste_aug4_1250", 5e-4, 1) == budget  # probed once, reused
    assert probed == ["surge_aug4_1250", "ste_aug4_1250"]
    assert json.loads((tmp_path / "probes" / "step_seconds.json").read_text()) == {"surge_aug4_1250": 2.0,
                                                                                  "ste_aug4_1250": 1.4}


def test_a_probe_measures_seconds_per_step_from_two_runs(tmp_path, monkeypatch):
    """Each probe run costs 100 s of setup (a teacher stage, loading) plus 0.5 s per step; the probe's estimate is
    the per-step cost alone, with the step counts of --probe_steps."""
    clock = [0.0]
    ran = []

    def fake_run(flags, **_):
        steps = int(flags[len(flags) - 1 - flags[::-1].index("--max_train_steps") + 1])
        ran.append(steps)
        clock[0] += 100.0 + 0.5 * steps

    monkeypatch.setattr(accuracy.subprocess, "run", fake_run)
    monkeypatch.setattr(accuracy.time, "perf_counter", lambda: clock[0])
    args = Namespace(task="vision", runs_dir=tmp_path, mixed_precision=None, vision_dataset=tmp_path / "data",
                     probe_steps="5,105")
    suite = accuracy.VISION.suites["cpu_settle_time"]
    assert accuracy.probe_step_seconds(args, suite, "ste_shortcuts_resnet_teacher", 1e-3, 0) == 0.5
    assert ran == [5, 105]


def test_equal_time_needs_a_step_budget():
    with pytest.raises(ValueError, match="--equal_time_as surge_bit: the recipe has no --max_train_steps"):
        accuracy.recipe_steps(accuracy.TEXT, accuracy.TEXT.suites["ladder"], "surge_bit")


@pytest.mark.parametrize("recipe", sorted(accuracy.TEXT.recipes))
def test_every_text_recipe_is_a_valid_glue_command(recipe, tmp_path):
    """Each recipe's flags, with its suite's, pass scripts/glue.py's own parsing and checks (a misspelt flag or a
    refused combination fails here, not an hour into a benchmark)."""
    suite = next((suite for suite in accuracy.TEXT.suites.values() if recipe in suite.recipes),
                 accuracy.TEXT.suites["cpu"])
    args = Namespace(task="text", runs_dir=tmp_path, mixed_precision=None, model=tmp_path / "model",
                     data_dir=tmp_path / "data")
    flags = accuracy.command(args, suite, recipe, 5e-4, 0)
    parsed = glue_script.parse_args(flags[2:])
    assert parsed.seed == 0 and parsed.output_dir == accuracy.run_dir(tmp_path, recipe, 5e-4, 0)
