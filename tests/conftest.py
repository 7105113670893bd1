"""Shared test set-up: one intra-op thread, and loading the scripts under scripts/ as modules."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from huggingface_hub import constants

from surge_hf import kernels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tensors here are tiny: extra intra-op threads only add contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub_login(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a push checks before training (online mode, a token), for tests that fake `HfApi`: nothing is sent."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")


@pytest.fixture(scope="module")
def isas() -> list[str]:
    """The instruction sets the CPU kernel supports here (skips the test where the kernel cannot be built)."""
    if not kernels.available():
        pytest.skip("the surge_hf CPU kernel could not be built here")
    return kernels.supported_isas()


def pm1(u: torch.Tensor) -> torch.Tensor:
    """+1 where `u >= 0`, else -1, as int64 (the sign convention of the binarizers and the kernel)."""
    return torch.where(u >= 0, 1, -1).to(torch.int64)


def load_script(name: str) -> ModuleType:
    """Import `scripts/<name>.py` (the scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def launch_two_cpu_processes(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch` of `scripts/<script>.py` on two real CPU ranks (`--cpu` alone would start one)."""
    launcher = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    command = [str(launcher) if launcher.exists() else "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "scripts" / f"{script}.py"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
