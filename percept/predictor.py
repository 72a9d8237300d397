"""The two contracts between the worker runtime and a service: `Predictor` and `Trainer`.

A predictor is constructed with keyword configuration only (a trained model's: `artifact`, `name`,
`version`), loads its model in `setup()` (once, lazily, idempotent) and then answers `predict()` many
times. A trainer turns a dataset and parameters into a model artifact, its metrics and card, and names
the predictor that serves it. Neither knows anything of HTTP, Celery or the database: the runtime hands
them decoded inputs and stores what they return. Both take their device from the settings
(`PERCEPT_DEVICE`, see `percept.devices`).
"""

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class ModelInfo:
    """What provenance records of the model that produced an output."""

    name: str
    version: str
    sha256: str | None
    device: str = "cpu"  # as used: "cpu" or "cuda:0 (NVIDIA H100 80GB HBM3)"
    libraries: dict[str, str] = field(default_factory=dict)
    # What the loaded model holds on its device (0: not measured), and that device's memory for models when it
    # is an accelerator's (0: unbounded, e.g. the CPU): the worker's model cache keeps the models it serves
    # warm within it, evicting the least recently used.
    memory_bytes: int = 0
    device_memory_bytes: int = 0


@dataclass
class PredictRequest:
    """One job's inputs: decoded RGB images (PIL) in the order of the request, and its parameters."""

    images: list[Any]
    params: dict[str, Any]


class StepCallback(Protocol):
    def __call__(self, done: int, total: int, info: dict[str, Any] | None = None) -> None:
        """Report progress; raises `JobCanceled` when the job was canceled, at a step boundary."""


class JobCanceled(Exception):
    """Raised by a step callback so a long predictor or trainer stops at its next step boundary."""


class Predictor(Protocol):
    """May also have `input_size`: the fewest pixels on each side the model needs. The runtime then
    decodes large photos at a reduced scale, never below it (absent: full resolution, e.g. faces)."""

    def setup(self) -> ModelInfo:
        """Load the model (idempotent) and describe it."""

    def predict(self, requests: list[PredictRequest], on_step: StepCallback | None = None
                ) -> list[dict[str, Any]]:
        """One output (JSON-able dict) per request, in order; raise ValueError for bad input."""


class BasePredictor:
    """The thread-safe, lazy, idempotent `setup()` every predictor shares: subclasses write `load()`."""

    input_size: int | None = None

    def __init__(self) -> None:
        self._info: ModelInfo | None = None
        self._setup_lock = threading.Lock()

    def setup(self) -> ModelInfo:
        """Load once (concurrent callers wait for the first); later calls return the same ModelInfo."""
        if self._info is None:
            with self._setup_lock:
                if self._info is None:
                    self._info = self.load()
        return self._info

    def load(self) -> ModelInfo:
        """Load the model's weights onto the device and describe what was loaded."""
        raise NotImplementedError

    def predict(self, requests: list[PredictRequest], on_step: StepCallback | None = None
                ) -> list[dict[str, Any]]:
        raise NotImplementedError


@dataclass(frozen=True)
class ModelArtifact:
    """A registered model a training job starts from (an ensemble's members, a model to fine-tune)."""

    ref: str  # "name:version"
    artifact: bytes
    metrics: dict[str, Any]
    card: dict[str, Any]


class FeatureCache(Protocol):
    """Bytes a trainer keeps between jobs under keys it chooses (e.g. an encoder's features per image
    sha256), so retraining on the same photos skips the work. Backed by object storage."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes) -> None: ...


@dataclass
class TrainingData:
    """What a training job is given: its dataset zip or uploaded archive (untrusted: read it through
    `percept.datasets`, which applies `limits`), any registered models named in its inputs, and a cache
    that outlives the job."""

    archive: bytes | None
    limits: Any  # percept.datasets.DatasetLimits
    models: list[ModelArtifact] = field(default_factory=list)
    dataset: dict[str, Any] = field(default_factory=dict)  # {"id", "sha256"} of the dataset, if any
    cache: FeatureCache | None = None


@dataclass
class TrainingResult:
    """What a trainer returns. `predictor` ("module:Class") serves `artifact` (one file; a trainer with
    several packs them); the runtime registers it as the next version of the job's `name`. A job that
    makes no model (dataset analysis) returns no predictor and puts what it found in `output`."""

    metrics: dict[str, Any]
    card: dict[str, Any] = field(default_factory=dict)
    artifact: bytes | None = None
    predictor: str | None = None
    model_kind: str | None = None  # the job kind the model answers
    output: dict[str, Any] = field(default_factory=dict)  # more of the job's output, beside the metrics
    device: str = "cpu"


class Trainer(Protocol):
    def train(self, data: TrainingData, params: dict[str, Any], on_step: StepCallback) -> TrainingResult:
        """Train; raise ValueError with a sentence for unusable data or params. `on_step` raises
        JobCanceled when the job was canceled: let it propagate."""


def report_step(on_step: StepCallback | Callable[..., None] | None, done: int, total: int,
                info: dict[str, Any] | None = None) -> None:
    """Report a step; the callback raises JobCanceled when the job was canceled, so this is also
    where a long job stops."""
    if on_step is not None:
        on_step(done, total, info)


@dataclass(frozen=True)
class ChildJob:
    """One child job a fan-out makes (a grid's cell): a job of `kind` with these parameters."""

    kind: str
    params: dict[str, Any]


@dataclass(frozen=True)
class ChildResult:
    """A child job as it ended, in the order `FanOut.children` made them."""

    id: str
    status: str  # succeeded | failed | canceled
    params: dict[str, Any]
    output: dict[str, Any] | None
    error: dict[str, Any] | None


class FanOut(Protocol):
    """A job kind that fans out (see `percept.services.JobKind.fan_out`). The runtime calls `children` when the
    parent job first runs, records them in the same transaction that sets the parent waiting, and sends them;
    when the last child ends (succeeded, failed or canceled: one failed child fails only itself), the parent
    runs again and `gather` turns the children's results into its output. Neither knows the database."""

    def children(self, params: dict[str, Any]) -> list[ChildJob]:
        """The child jobs of a parent with these (normalised) parameters, in a stable order."""

    def gather(self, params: dict[str, Any], children: list[ChildResult],
               read_image: Callable[[str], bytes]) -> dict[str, Any]:
        """The parent's output from its children's results; `read_image(image_id)` reads an image the children
        made. Raise ValueError("[code] sentence") to fail the parent."""


@cache
def file_sha256(path: Path) -> str:
    """The sha256 of a weights file (cached: the files of an installed package do not change)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_model_ref(ref: str) -> tuple[str, str]:
    """`name` or `name:version` -> (name, version); an empty version means the latest."""
    name, _, version = ref.partition(":")
    return name, version
