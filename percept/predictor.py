"""The contract between the worker runtime and a service's predictor (cog's BasePredictor, batched).

A predictor is constructed with no arguments besides keyword configuration, loads its model in
`setup()` (once, lazily, idempotent) and then answers `predict()` many times. It knows nothing of
HTTP, Celery or the database: the worker runtime hands it decoded inputs and stores what it returns.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ModelInfo:
    """What provenance records of the model that produced an output."""

    name: str
    version: str
    sha256: str | None
    device: str = "cpu"
    libraries: dict[str, str] = field(default_factory=dict)


@dataclass
class PredictRequest:
    """One job's inputs: decoded RGB images (PIL) in the order of the request, and its parameters."""

    images: list[Any]
    params: dict[str, Any]


class StepCallback(Protocol):
    def __call__(self, done: int, total: int, info: dict[str, Any] | None = None) -> None:
        """Report progress; raises `JobCanceled` when the job was canceled, at a step boundary."""


class JobCanceled(Exception):
    """Raised by a step callback so a long predictor stops at its next step boundary."""


class Predictor(Protocol):
    """May also have `input_size`: the fewest pixels on each side the model needs. The runtime then
    decodes large photos at a reduced scale, never below it (absent: full resolution, e.g. faces)."""

    def setup(self) -> ModelInfo:
        """Load the model (idempotent) and describe it."""

    def predict(self, requests: list[PredictRequest], on_step: Callable[..., None] | None = None
                ) -> list[dict[str, Any]]:
        """One output (JSON-able dict) per request, in order; raise ValueError for bad input."""
