"""The shape of the package, read from its source: imports point down (no import cycle among surge_hf modules, at
module or function level), and the modules a checkpoint runs import nothing of the training harness; and, run in
fresh interpreters, `import surge_hf` and loading a checkpoint import no harness module (the rest of the package's
public names load on first use).

transformers copies the modules that `modeling_surge_*.py` reaches through `from .x import` lines into every saved
checkpoint for `trust_remote_code`, from the same folder only; those (the checkpoint closure) must only reach each
other. The layout says what ships: the closure is exactly the flat modules of `surge_hf/`, and every subpackage is
harness. Run the check with `python -m pytest tests/test_imports.py`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, ViTConfig

from surge_hf import (
    SurgeBertConfig,
    SurgeBertForSequenceClassification,
    SurgeConfig,
    SurgeViTConfig,
    SurgeViTForImageClassification,
)

PACKAGE = Path(__file__).resolve().parents[1] / "surge_hf"
HARNESS_MODULES = ("transformers.trainer", "accelerate", "datasets", "evaluate", "jinja2")
"""Modules of the training harness (Trainer, training loop, data, metrics, model-card templates) that loading a
checkpoint has no use for."""
CLOSURE_NAMED = {"quantizers", "packing", "scaler", "layers", "shortcuts", "binary_attention", "embeddings", "kernels",
                 "binarize", "auto", "aux_loss", "fusion", "saving"}


def _module_names() -> list[str]:
    """Every module of the package by dotted name relative to it (`layers`, `training.loop`; `` for the package
    itself)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _path(module: str) -> Path:
    candidate = PACKAGE.joinpath(*module.split(".")) if module else PACKAGE
    return candidate / "__init__.py" if candidate.is_dir() else candidate.with_suffix(".py")


def _resolve(module: str, target: str, known: set[str]) -> str | None:
    """The package module that `target` (a dotted name relative to the package) names, or None when it is outside
    the package; `from .x import y` may name a submodule `x.y` or a name `y` of `x`."""
    while target not in known and "." in target:
        target = target.rpartition(".")[0]
    return target if target in known else None


def imported_modules(module: str, known: set[str]) -> set[str]:
    """The package modules that `module` imports anywhere in its source (module level or inside functions)."""
    tree = ast.parse(_path(module).read_text(), filename=str(_path(module)))
    is_package = _path(module).name == "__init__.py"
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    package_parts = [part for part in package_parts if part]
    found = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name.removeprefix("surge_hf").lstrip(".") for alias in node.names
                       if alias.name == "surge_hf" or alias.name.startswith("surge_hf.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[:len(package_parts) - node.level + 1]
                prefix = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module == "surge_hf" or (node.module or "").startswith("surge_hf."):
                prefix = node.module.removeprefix("surge_hf").lstrip(".")
            else:
                continue
            targets = [".".join(part for part in (prefix, alias.name) if part) for alias in node.names]
        for target in targets:
            resolved = _resolve(module, target, known)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


def import_graph() -> dict[str, set[str]]:
    known = set(_module_names())
    return {module: imported_modules(module, known) for module in known}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (as the list of modules around it), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for neighbour in sorted(graph[node]):
            if state.get(neighbour) == "open":
                return stack[stack.index(neighbour):] + [neighbour]
            if neighbour not in state and (cycle := visit(neighbour)) is not None:
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def closure_modules() -> set[str]:
    return {name for name in _module_names()
            if name in CLOSURE_NAMED or name.startswith(("configuration_", "modeling_"))}


def flat_modules() -> set[str]:
    """The modules at the top of the package (`surge_hf/*.py` but `__init__.py`)."""
    return {path.stem for path in PACKAGE.glob("*.py") if path.name != "__init__.py"}


def subpackages() -> set[str]:
    """The folders of the package (`analysis`, `training`, ...)."""
    return {path.name for path in PACKAGE.iterdir() if path.is_dir() and any(path.rglob("*.py"))}


def reached_from(module: str) -> set[str]:
    """`module` and every package module it reaches through its imports."""
    graph, reached, todo = import_graph(), set(), [module]
    while todo:
        if (name := todo.pop()) not in reached:
            reached.add(name)
            todo.extend(graph[name])
    return reached


def test_the_walker_sees_relative_absolute_and_function_level_imports(tmp_path, monkeypatch):
    package = tmp_path / "surge_hf"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import f\n")
    (package / "a.py").write_text("import torch\nfrom .b import g\n\ndef f():\n    from surge_hf.sub import c\n")
    (package / "b.py").write_text("import surge_hf.a\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("from .. import b\nfrom . import d\n")
    (package / "sub" / "d.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    graph = import_graph()
    assert graph == {"": {"a"}, "a": {"b", "sub.c"}, "b": {"a"}, "sub": set(), "sub.c": {"b", "sub.d"},
                     "sub.d": set()}
    assert find_cycle(graph) == ["a", "b", "a"]


def test_no_import_cycle_among_surge_hf_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("module", sorted(closure_modules()))
def test_checkpoint_closure_imports_only_the_closure(module):
    outside = imported_modules(module, set(_module_names())) - closure_modules()
    assert outside == set(), f"{module} (a module a checkpoint runs) imports harness modules {sorted(outside)}"


def test_the_closure_is_the_documented_one():
    assert closure_modules() == CLOSURE_NAMED | {
        "configuration_surge", "configuration_utils", "configuration_surge_bert", "configuration_surge_vit",
        "modeling_utils", "modeling_surge_bert", "modeling_surge_vit"}


def test_the_closure_is_exactly_the_flat_modules_and_every_folder_is_harness():
    assert subpackages() == {"analysis", "data", "hub", "training"}
    assert closure_modules() == flat_modules()
    assert not {name for name in closure_modules() if "." in name}


@pytest.mark.parametrize("module", sorted(closure_modules()))
def test_no_closure_module_imports_a_subpackage(module):
    imported = imported_modules(module, set(_module_names()))
    assert not {name for name in imported if name.split(".")[0] in subpackages()}, imported


def tiny_model(architecture: str) -> SurgeBertForSequenceClassification | SurgeViTForImageClassification:
    torch.manual_seed(0)
    if architecture == "bert":
        return SurgeBertForSequenceClassification(SurgeBertConfig.from_bert_config(BertConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37),
            surge_config=SurgeConfig()))
    return SurgeViTForImageClassification(SurgeViTConfig.from_vit_config(ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=8, patch_size=4,
        num_labels=3), surge_config=SurgeConfig()))


@pytest.mark.parametrize("packed", [False, True], ids=["train", "packed"])
@pytest.mark.parametrize("architecture", ["bert", "vit"])
def test_a_saved_checkpoint_carries_the_closure_modules_its_model_reaches_and_no_other_code(architecture, packed,
                                                                                              tmp_path):
    tiny_model(architecture).save_pretrained(tmp_path, packed=packed)
    code = {path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*.py")}
    assert code == {f"{module}.py" for module in reached_from(f"modeling_surge_{architecture}")}
    assert {name.removesuffix(".py") for name in code} <= closure_modules()


def modules_imported_by(code: str) -> dict[str, list[str]]:
    """Run `code` in a fresh interpreter and return which `HARNESS_MODULES` and which surge_hf submodules (by name
    relative to the package) it left imported."""
    report = (
        "\nimport json, sys\n"
        f"print(json.dumps({{'harness': [m for m in {HARNESS_MODULES!r} if m in sys.modules], "
        "'surge_hf': sorted(m.removeprefix('surge_hf.') for m in sys.modules if m.startswith('surge_hf.'))}))"
    )
    completed = subprocess.run([sys.executable, "-c", code + report], capture_output=True, text=True, check=True,
                               cwd=PACKAGE.parent)
    return json.loads(completed.stdout.splitlines()[-1])


def test_import_and_checkpoint_loading_import_no_harness_module_beyond_what_transformers_does(tmp_path):
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "plain")
    SurgeBertForSequenceClassification(SurgeBertConfig.from_bert_config(config, surge_config=SurgeConfig())
                                       ).save_pretrained(tmp_path / "packed", packed=True)
    load = ("from transformers import AutoModelForSequenceClassification\n"
            "model = AutoModelForSequenceClassification.from_pretrained({!r})\n")

    # transformers itself imports some of them (accelerate with its modeling code, jinja2 for chat templates)
    by_transformers = modules_imported_by(load.format(str(tmp_path / "plain")))["harness"]
    on_import = modules_imported_by("import surge_hf")
    on_load = modules_imported_by("import surge_hf\n" + load.format(str(tmp_path / "packed")) +
                                  "assert type(model) is __import__('surge_hf').SurgeBertForSequenceClassification\n"
                                  "assert model.is_packed")

    assert not {"transformers.trainer", "datasets", "evaluate"} & set(by_transformers)
    assert set(on_import["harness"]) <= set(by_transformers)
    assert on_load["harness"] == by_transformers
    assert set(on_load["surge_hf"]) <= closure_modules()


def test_every_public_name_imports_from_the_package_and_is_listed():
    import surge_hf

    assert set(surge_hf.__all__) <= set(dir(surge_hf))
    for name in surge_hf.__all__:
        assert getattr(surge_hf, name).__name__ == name, name
    assert surge_hf.binarize.__module__ == "surge_hf.auto"
