"""ImageNet top-k classification with EfficientNet-Lite0, plus an "unknown" flag and a label check.

Inputs (one `PredictRequest` per job):
    images: exactly one RGB PIL image, any size (resized and centre-cropped to 224 x 224).
    params:
        top_k (int, 1..1000, default 5): how many classes to return, best first.
        expected_label (str or None, default None): a class name the caller expects, e.g. a listing's
            category; compared case-insensitively with the top-1 class and each of its synonyms.
        unknown_threshold (float in [0, 1], default 0.25; None also means 0.25): below this top-1
            probability the image is reported as unknown (likely none of the 1000 ImageNet classes).

Output (one JSON-able dict per request):
    {"labels": [{"label": "espresso", "score": 0.95}, ...],   # top_k classes by softmax probability
     "unknown": false,                                        # top-1 score < unknown_threshold
     "match": null | {"expected": str, "predicted": str, "verdict": "match" | "mismatch" | "unknown"}}
"""

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from percept.devices import Device, choose_device
from percept.predictor import BasePredictor, ModelInfo, PredictRequest, file_sha256, report_step
from percept.version import library_versions
from services.classifier.device import torch_device
from services.classifier.efficientnet import load_efficientnet_lite0, packaged_weights_path
from services.classifier.service import SERVICE

# The registry entry this predictor serves: provenance names the model as the declaration does.
[BUILTIN_MODEL] = [model for model in SERVICE.models if model.predictor.endswith(":ImageNetClassifier")]
# Recorded in every classifier's provenance (torch's own version says whether it is a CUDA build).
LIBRARIES = ("torch", "numpy", "pillow")
LABELS_PATH = Path(__file__).with_name("imagenet_labels.txt")
NUM_CLASSES = 1000
CROP_SIZE = 224
# Resize the shorter side to 224 / 0.875 = 256 with bicubic before the crop: the training-time
# evaluation recipe of these weights (coffee() -> espresso 0.951; a 224 resize gives 0.940).
RESIZE_SIZE = 256
RESIZE_FILTER = Image.Resampling.BICUBIC
MEAN = STD = 0.5  # TF-trained weights expect pixels scaled to [-1, 1]
# NHWC: the depthwise convolutions run about 25% faster on CPU than in the default NCHW layout.
MEMORY_FORMAT = torch.channels_last
DEFAULT_TOP_K = 5
DEFAULT_UNKNOWN_THRESHOLD = 0.25

Verdict = Literal["match", "mismatch", "unknown"]


@dataclass(frozen=True)
class ImageNetClass:
    """One ImageNet class as written in the labels file: "tabby, tabby cat" -> synonyms."""

    index: int
    synonyms: tuple[str, ...]

    @classmethod
    def from_line(cls, index: int, line: str) -> "ImageNetClass":
        return cls(index, tuple(s.strip() for s in line.split(",") if s.strip()))

    @property
    def label(self) -> str:
        return self.synonyms[0]

    def matches(self, text: str) -> bool:
        wanted = text.strip().casefold()
        return wanted == ", ".join(self.synonyms).casefold() or any(
            wanted == s.casefold() for s in self.synonyms
        )


@dataclass(frozen=True)
class ClassifyParams:
    top_k: int = DEFAULT_TOP_K
    expected_label: str | None = None
    unknown_threshold: float = DEFAULT_UNKNOWN_THRESHOLD


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float


@dataclass(frozen=True)
class LabelMatch:
    expected: str
    predicted: str
    verdict: Verdict


@dataclass(frozen=True)
class ClassificationOutput:
    labels: list[LabelScore]
    unknown: bool
    match: LabelMatch | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ImageNetClassifier(BasePredictor):
    """The classifier service's ImageNet predictor (see the module docstring for inputs and outputs).

    `device` (tests, benchmarks): "cpu", "cuda:1", ... or a `Device`; by default PERCEPT_DEVICE's choice.
    """

    input_size = RESIZE_SIZE  # preprocess() resizes the shorter side to this first

    def __init__(self, *, weights_path: Path | None = None, device: Device | str | None = None):
        super().__init__()
        self.weights_path = weights_path
        self.device = model_device(device)
        self._model: torch.nn.Module | None = None
        self._classes: list[ImageNetClass] = []

    def load(self) -> ModelInfo:
        """Load the labels and the model onto the device."""
        weights_path = self.weights_path or packaged_weights_path()
        self._classes = load_imagenet_classes(LABELS_PATH)
        model = load_efficientnet_lite0(weights_path)
        self._model = model.to(self.device.name).to(memory_format=MEMORY_FORMAT)  # type: ignore[call-overload]
        self.weights_path = weights_path
        return ModelInfo(name=BUILTIN_MODEL.name, version=BUILTIN_MODEL.version, sha256=file_sha256(weights_path),
                         device=self.device.description, libraries=library_versions(*LIBRARIES))

    def check_inputs(self, request: PredictRequest) -> ClassifyParams:
        """Validate one request and return its parameters with defaults filled in."""
        top_k, expected, threshold = check_classify_request(request)
        # None is what the gateway sends when the caller gave no threshold: each model applies its own.
        return ClassifyParams(top_k, expected, DEFAULT_UNKNOWN_THRESHOLD if threshold is None else threshold)

    def classify(self, probabilities: torch.Tensor, params: ClassifyParams) -> ClassificationOutput:
        """Shape one image's softmax output into the top-k labels, the unknown flag and the match."""
        scores, indices = probabilities.topk(params.top_k)
        top = [(self._classes[i], s) for i, s in zip(indices.tolist(), scores.tolist(), strict=True)]
        unknown = top[0][1] < params.unknown_threshold
        match = None
        if params.expected_label is not None:
            best = top[0][0]
            verdict: Verdict = (
                "unknown" if unknown else "match" if best.matches(params.expected_label) else "mismatch"
            )
            match = LabelMatch(params.expected_label, best.label, verdict)
        return ClassificationOutput([LabelScore(c.label, s) for c, s in top], unknown, match)

    def predict(self, requests: list[PredictRequest], on_step: Callable[..., None] | None = None
                ) -> list[dict[str, Any]]:
        """Classify every request's image in one batched forward pass; one output dict per request."""
        # 1. Check inputs (before loading anything, so a bad request fails fast)
        params = [self.check_inputs(request) for request in requests]
        if not requests:
            return []
        self.setup()
        assert self._model is not None  # loaded by setup()

        # 2. Preprocess every image into one batch (a batch's images side by side: resizing lets go of the GIL)
        images = [r.images[0] for r in requests]
        batch = torch.from_numpy(np.stack(list(preprocessors().map(preprocess, images)) if len(images) > 1
                                          else [preprocess(images[0])]))
        batch = batch.to(self.device.name, memory_format=MEMORY_FORMAT)
        report_step(on_step, 1, 2)

        # 3. Run the model once for the whole batch (fp16 on a GPU; softmax runs in fp32 under autocast)
        with torch.inference_mode(), inference_precision(self.device):
            probabilities = self._model(batch).softmax(dim=-1).float().cpu()
        report_step(on_step, 2, 2)

        # 4. Shape each request's output
        return [self.classify(p, param).to_dict() for p, param in zip(probabilities, params, strict=True)]


@cache
def preprocessors() -> ThreadPoolExecutor:
    """This process's threads for preprocessing a batch (one per core, at most 8), made on first use (after a fork)."""
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="preprocess")


def model_device(device: Device | str | None) -> Device:
    """A predictor's `device` keyword -> the Device (None: PERCEPT_DEVICE's choice for this process)."""
    if device is None:
        return torch_device()
    if isinstance(device, Device):
        return device
    return choose_device(device, torch.cuda)


def inference_precision(device: Device) -> contextlib.AbstractContextManager:
    """fp16 autocast for inference on a GPU (tensor cores, half the memory traffic); fp32 on the CPU,
    where fp16 convolutions are slower and less precise."""
    if device.is_cuda:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def check_classify_request(request: PredictRequest, max_top_k: int = NUM_CLASSES
                           ) -> tuple[int, str | None, float | None]:
    """Validate one classify request: (top_k, expected_label, unknown_threshold or None = the model's own)."""
    if len(request.images) != 1:
        raise ValueError(f"classify takes exactly one image per request, got {len(request.images)}")
    if not isinstance(request.images[0], Image.Image):
        raise ValueError(f"the image must be a decoded PIL image, got {type(request.images[0]).__name__}")
    params = request.params
    top_k = params.get("top_k", DEFAULT_TOP_K)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= max_top_k:
        raise ValueError(f"top_k must be an integer from 1 to {max_top_k}, got {top_k!r}")
    expected = params.get("expected_label")
    if expected is not None and (not isinstance(expected, str) or not expected.strip()):
        raise ValueError(f"expected_label must be a non-empty class name or null, got {expected!r}")
    threshold = params.get("unknown_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                  or not 0 <= threshold <= 1):
        raise ValueError(f"unknown_threshold must be a number from 0 to 1 or null, got {threshold!r}")
    return top_k, expected.strip() if expected else None, None if threshold is None else float(threshold)


def preprocess(image: Image.Image) -> np.ndarray:
    """Resize the shorter side to RESIZE_SIZE, centre-crop CROP_SIZE, scale to [-1, 1]; CHW float32."""
    image = image.convert("RGB")
    width, height = image.size
    scale = RESIZE_SIZE / min(width, height)
    size = (max(RESIZE_SIZE, round(width * scale)), max(RESIZE_SIZE, round(height * scale)))
    image = image.resize(size, RESIZE_FILTER)
    left, top = (size[0] - CROP_SIZE) // 2, (size[1] - CROP_SIZE) // 2
    image = image.crop((left, top, left + CROP_SIZE, top + CROP_SIZE))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return ((pixels - MEAN) / STD).transpose(2, 0, 1).copy()


def load_imagenet_classes(path: Path) -> list[ImageNetClass]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) != NUM_CLASSES:
        raise RuntimeError(f"{path} has {len(lines)} lines, expected one per ImageNet class ({NUM_CLASSES})")
    return [ImageNetClass.from_line(i, line) for i, line in enumerate(lines)]
