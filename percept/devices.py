"""PERCEPT_DEVICE: which device a service's models run on.

`auto` (default): the first CUDA device when the framework sees one, else the CPU; `cpu`; `cuda` (the
first GPU, required); `cuda:N`. The choice is made here without importing a framework: each service
passes its framework's view of the GPUs (for torch, `torch.cuda` itself). A device that cannot be had
is an error, never a silent fallback to the CPU.
"""

import re
from dataclasses import dataclass
from typing import Protocol

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class CudaView(Protocol):
    """What the choice needs to know of the GPUs: `torch.cuda` has exactly these."""

    def is_available(self) -> bool: ...

    def device_count(self) -> int: ...

    def get_device_name(self, device: int) -> str: ...


@dataclass(frozen=True)
class Device:
    name: str  # what the framework is given: "cpu", "cuda:0"
    description: str  # what provenance and the registry record: "cpu", "cuda:0 (NVIDIA H100 80GB HBM3)"

    @property
    def is_cuda(self) -> bool:
        return self.name.startswith("cuda")


def check_device_setting(value: str) -> str:
    """The setting's own check (at start-up, before any framework loads)."""
    normalised = value.strip().lower()
    if not DEVICE_PATTERN.match(normalised):
        raise ValueError(f"PERCEPT_DEVICE must be auto, cpu, cuda or cuda:N (N a GPU index); got {value!r}")
    return normalised


def choose_device(requested: str, cuda: CudaView | None) -> Device:
    """The device `requested` names, given the GPUs `cuda` sees (None: the framework has no CUDA build)."""
    requested = check_device_setting(requested)
    gpus = cuda.device_count() if cuda is not None and cuda.is_available() else 0
    if requested == "cpu" or (requested == "auto" and gpus == 0):
        return Device("cpu", "cpu")
    index = int(requested.partition(":")[2] or 0)
    if gpus == 0:
        raise ValueError(f"PERCEPT_DEVICE={requested} but no CUDA device is visible here (a CPU-only build, no "
                         "driver, or CUDA_VISIBLE_DEVICES hides them); use PERCEPT_DEVICE=cpu or auto")
    if index >= gpus:
        raise ValueError(f"PERCEPT_DEVICE={requested} but only {gpus} CUDA device(s) are visible "
                         f"(cuda:0 to cuda:{gpus - 1})")
    assert cuda is not None
    name = f"cuda:{index}"
    return Device(name, f"{name} ({cuda.get_device_name(index)})")


def cpu_only(requested: str, reason: str) -> Device:
    """For a service pinned to the CPU: `auto` and `cpu` are fine, asking for a GPU is an error."""
    requested = check_device_setting(requested)
    if requested not in ("auto", "cpu"):
        raise ValueError(f"PERCEPT_DEVICE={requested}, but this service runs on the CPU only: {reason}")
    return Device("cpu", "cpu")
