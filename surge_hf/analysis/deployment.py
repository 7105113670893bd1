"""`measure_deployment(model, inputs)`: what a packed model costs where it runs, measured on this machine.

It times the packed model (binarized layers on the CPU kernel where it applies, `surge_hf.kernels`) against its
float32 twin, the same architecture with every packed layer replaced by a float `nn.Linear`/`nn.Conv2d` holding the
dequantized weight (and int8 or 4-bit embeddings by float ones): the cost the float32 model would have. Both run on
the same inputs, round-robin, and the medians are compared, so load from other processes slows both alike. It also
counts the bytes of the tensors each holds in memory (state dict, plus the packed layers' kernel panels).
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .. import kernels
from ..embeddings import dequantize_embeddings
from ..layers import BINARY_LAYER_TYPES


@dataclass
class DeploymentReport:
    """Measured numbers of a packed model: median ms per forward against its float32 twin, bytes held in memory,
    and the packed file's size (when given)."""

    machine: str
    threads: int
    kernel: str
    input_shapes: dict[str, list[int]]
    rounds: int
    packed_ms: float
    float32_ms: float
    packed_tensor_bytes: int
    float32_tensor_bytes: int
    file_bytes: int | None = None

    @property
    def speedup(self) -> float:
        """float32 time / packed time."""
        return self.float32_ms / self.packed_ms

    @property
    def memory_ratio(self) -> float:
        """float32 tensor bytes / packed tensor bytes."""
        return self.float32_tensor_bytes / self.packed_tensor_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup, "memory_ratio": self.memory_ratio}

    def __str__(self) -> str:
        shapes = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in self.input_shapes.items())
        lines = [f"measured on {self.machine}, {self.threads} thread(s), kernel: {self.kernel}, inputs: {shapes}",
                 f"forward: packed {self.packed_ms:.2f} ms, float32 {self.float32_ms:.2f} ms "
                 f"({self.speedup:.1f}x faster)",
                 f"weights in memory: packed {self.packed_tensor_bytes / 2**20:.2f} MiB, float32 "
                 f"{self.float32_tensor_bytes / 2**20:.2f} MiB ({self.memory_ratio:.1f}x smaller)"]
        if self.file_bytes is not None:
            lines.append(f"packed file: {self.file_bytes / 2**20:.2f} MiB")
        return "\n".join(lines)


def float32_twin(model: nn.Module) -> nn.Module:
    """A copy of `model` with every packed layer replaced by its float layer (weight alpha * sign(W)) and every
    quantized embedding by a float embedding: the same computation cost as the float32 model."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if not isinstance(module, BINARY_LAYER_TYPES):
            continue
        plain = module.float_layer()
        with torch.no_grad():
            plain.weight.copy_(module.dequantized_weight())
            if module.bias is not None:
                plain.bias.copy_(module.bias)
        twin.set_submodule(name, plain)
    dequantize_embeddings(twin)
    return twin.eval()


def held_tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict tensors and of its packed layers' kernel panels (built on first forward)."""
    state = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    panels = sum(tensor.numel() * tensor.element_size() for module in model.modules()
                 if isinstance(module, BINARY_LAYER_TYPES) for tensor in module.held_panels())
    return state + panels


def _median_ms(models: dict[str, nn.Module], inputs: Mapping[str, Tensor], rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(**inputs)  # warm-up: kernel panels, allocator
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(**inputs)
                samples[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


def measure_deployment(model: nn.Module, inputs: Mapping[str, Tensor], *, file_bytes: int | None = None,
                       rounds: int = 5) -> DeploymentReport:
    """Time `model` (packed, on the CPU) against its float32 twin on `inputs` (keyword inputs of `model(...)`) and
    count the bytes both hold; `file_bytes` is the packed file's size, when known."""
    if not any(isinstance(module, BINARY_LAYER_TYPES) for module in model.modules()):
        raise ValueError("measure_deployment() needs a packed model; call model.finalize() (or load the packed "
                         "checkpoint) first.")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    model = model.eval()
    twin = float32_twin(model)
    times = _median_ms({"packed": model, "float32": twin}, inputs, rounds)
    return DeploymentReport(
        machine=f"{platform.machine()} {platform.system()} CPU",
        threads=torch.get_num_threads(),
        kernel=kernels.isa() if kernels.available() else "none (reference path)",
        input_shapes={name: list(value.shape) for name, value in inputs.items()},
        rounds=rounds,
        packed_ms=times["packed"],
        float32_ms=times["float32"],
        packed_tensor_bytes=held_tensor_bytes(model),
        float32_tensor_bytes=held_tensor_bytes(twin),
        file_bytes=file_bytes,
    )
