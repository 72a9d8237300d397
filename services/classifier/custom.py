"""Custom classifiers (trained by `services.classifier.training` on a user's labelled photos), served
exactly like the ImageNet classifier.

Inputs (one `PredictRequest` per job):
    images: exactly one RGB PIL image, any size (the ImageNet classifier's preprocessing: 224 x 224).
    params:
        top_k (int, 1..1000, default 5): how many classes to return, best first; clipped to the model's
            number of classes.
        expected_label (str or None, default None): a class name the caller expects; compared
            case-insensitively (surrounding spaces ignored) with the top-1 class name.
        unknown_threshold (float in [0, 1] or None, default None): below this top-1 probability the image
            is reported as unknown; None uses the threshold calibrated at training time, the least strict
            one at which out-of-fold predictions reached the target precision (0 when nothing needed refusing;
            `services.classifier.training`).

Output (one JSON-able dict per request), as `ImageNetClassifier`:
    {"labels": [{"label": "blue-square", "score": 0.97}, ...],
     "unknown": false,
     "match": null | {"expected": str, "predicted": str, "verdict": "match" | "mismatch" | "unknown"}}

Artifact (`torch.save` of a dict that `torch.load(..., weights_only=True)` reads; format version 1):
    {"format": "percept.custom-classifier", "format_version": 1,
     "labels": [str, ...],                                   # class names, in the head's row order
     "head": {"weight": Tensor[C, 1280], "bias": Tensor[C]}, # softmax(features @ weight.T + bias)
     "threshold": float, "target_precision": float,
     "backbone": {"name": "efficientnet-lite0", "weights_sha256": str, "feature_dim": 1280,
                  "tuned_from_layer": int},                  # BACKBONE_LAYERS when nothing was fine-tuned
     "tuned_layers": {state-dict key: Tensor},               # backbone layers [tuned_from_layer:], else {}
     "preprocessing": PREPROCESSING}
"""

import hashlib
import io
import threading
from collections.abc import Callable, Sequence
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from torch import nn

from percept.devices import Device
from percept.predictor import BasePredictor, ModelInfo, PredictRequest, file_sha256, report_step
from percept.version import library_versions
from services.classifier.device import torch_device
from services.classifier.efficientnet import EfficientNetLite0, load_efficientnet_lite0, packaged_weights_path
from services.classifier.predictor import (
    CROP_SIZE,
    LIBRARIES,
    MEAN,
    MEMORY_FORMAT,
    RESIZE_SIZE,
    STD,
    ClassificationOutput,
    ClassifyParams,
    LabelMatch,
    LabelScore,
    Verdict,
    check_classify_request,
    inference_precision,
    model_device,
    preprocess,
)

ARTIFACT_FORMAT = "percept.custom-classifier"
ARTIFACT_VERSION = 1
BACKBONE_NAME = "efficientnet-lite0"
FEATURE_DIM = 1280
# The stem, the 16 MBConv blocks and the 1x1 head convolution; activations after all of them are pooled.
BACKBONE_LAYERS = 18
# What `predictor.preprocess` does; stored in every artifact and checked on load, so a model is never
# served with a preprocessing it was not trained with.
PREPROCESSING: dict[str, Any] = {"resize_size": RESIZE_SIZE, "crop_size": CROP_SIZE, "resample": "bicubic",
                                 "mean": MEAN, "std": STD}


class FrozenBackbone:
    """The ImageNet EfficientNet-Lite0, loaded once per process and device and shared (read-only) by every
    custom model and by training: a worker serving many custom classifiers holds one copy of the backbone."""

    def __init__(self, model: EfficientNetLite0, weights_sha256: str, device: Device):
        self.device = device
        self.model = (model.to(device.name).to(memory_format=MEMORY_FORMAT)  # type: ignore[call-overload]
                      .eval().requires_grad_(False))
        self.layers: list[nn.Module] = [model.stem, *model.blocks, model.head]
        self.weights_sha256 = weights_sha256
        assert len(self.layers) == BACKBONE_LAYERS

    def activations(self, batch: torch.Tensor, stop: int = BACKBONE_LAYERS) -> torch.Tensor:
        """Run preprocessed images (on any device) through layers [0, stop), on the backbone's device;
        pooled 1280-d features when stop is the end. In the caller's precision (fp32 unless autocast)."""
        with torch.no_grad():
            return run_layers(self.layers, batch.to(self.device.name, memory_format=MEMORY_FORMAT), 0, stop)


_backbones: dict[str, FrozenBackbone] = {}
_backbone_lock = threading.Lock()


def frozen_backbone(device: Device | None = None) -> FrozenBackbone:
    """The process-wide backbone with the packaged ImageNet weights on `device` (default: PERCEPT_DEVICE's
    choice), loaded on first use."""
    device = device or torch_device()
    with _backbone_lock:
        if device.name not in _backbones:
            path = packaged_weights_path()
            _backbones[device.name] = FrozenBackbone(load_efficientnet_lite0(path), file_sha256(path), device)
        return _backbones[device.name]


def run_layers(layers: Sequence[nn.Module], x: torch.Tensor, start: int, stop: int = BACKBONE_LAYERS
               ) -> torch.Tensor:
    """Activations after layers [start, stop), given those before `start`; pooled once the last layer ran.

    Pooled features stand for "after every layer", so `start == BACKBONE_LAYERS` passes them through.
    """
    if start == BACKBONE_LAYERS:
        return x
    for layer in layers[start:stop]:
        x = layer(x)
    return x.mean(dim=(2, 3)) if stop == BACKBONE_LAYERS else x


class CustomModel(nn.Module):
    """A trained classifier: the shared frozen layers, its own copies of any fine-tuned ones, a linear head."""

    def __init__(self, labels: list[str], backbone: FrozenBackbone, tuned_from_layer: int,
                 head: nn.Linear, threshold: float, target_precision: float):
        super().__init__()
        self.labels = labels
        self.threshold = threshold
        self.target_precision = target_precision
        self.tuned_from_layer = tuned_from_layer
        self.weights_sha256 = backbone.weights_sha256
        # Not registered as a submodule: the frozen layers belong to the process-wide backbone.
        self.frozen_layers = backbone.layers[:tuned_from_layer]
        self.tuned = nn.ModuleList(deepcopy(layer) for layer in backbone.layers[tuned_from_layer:])
        self.tuned.requires_grad_(True)
        self.head = head

    @property
    def layers(self) -> list[nn.Module]:
        return [*self.frozen_layers, *self.tuned]

    def features(self, activations: torch.Tensor, start: int) -> torch.Tensor:
        """Pooled features from the activations after layers [0, start) (start <= tuned_from_layer)."""
        if start > self.tuned_from_layer:
            raise ValueError(f"activations after layer {start} skip this model's tuned layers "
                             f"(from {self.tuned_from_layer})")
        return run_layers(self.layers, activations, start)

    def logits(self, activations: torch.Tensor, start: int) -> torch.Tensor:
        return self.head(self.features(activations, start))

    def train(self, mode: bool = True) -> "CustomModel":
        # BatchNorm keeps the ImageNet running statistics while fine-tuning: a few dozen photos per
        # batch would make poor estimates. Only the weights (and BN's scale and shift) are trained.
        super().train(mode)
        self.tuned.eval()
        return self

    def to_artifact(self) -> bytes:
        """Everything needed to serve this model, as bytes (see the module docstring for the format).

        Tensors are saved from the CPU, so the artifact is the same whichever device trained it."""
        tuned = {key: host_copy(value) for key, value in self.tuned.state_dict().items()}
        payload = {
            "format": ARTIFACT_FORMAT,
            "format_version": ARTIFACT_VERSION,
            "labels": list(self.labels),
            "head": {"weight": host_copy(self.head.weight), "bias": host_copy(self.head.bias)},
            "threshold": float(self.threshold),
            "target_precision": float(self.target_precision),
            "backbone": {"name": BACKBONE_NAME, "weights_sha256": self.weights_sha256,
                         "feature_dim": FEATURE_DIM, "tuned_from_layer": self.tuned_from_layer},
            "tuned_layers": tuned,
            "preprocessing": dict(PREPROCESSING),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def load_custom_model(artifact: bytes, backbone: FrozenBackbone | None = None) -> CustomModel:
    """Read an artifact written by `CustomModel.to_artifact` onto the backbone's device (default: the
    process-wide backbone), checking it fits this code and these weights."""
    backbone = backbone or frozen_backbone()
    try:
        payload = torch.load(io.BytesIO(artifact), map_location=backbone.device.name, weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not one of its archives
        raise ValueError(f"not a custom classifier artifact: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise ValueError("not a custom classifier artifact (no 'percept.custom-classifier' format marker)")
    if payload.get("format_version") != ARTIFACT_VERSION:
        raise ValueError(f"custom classifier artifact version {payload.get('format_version')!r} is not supported "
                         f"(this code reads version {ARTIFACT_VERSION}); retrain the model")
    if payload["preprocessing"] != PREPROCESSING:
        raise ValueError(f"the model was trained with preprocessing {payload['preprocessing']}, this service "
                         f"applies {PREPROCESSING}; retrain the model")
    spec = payload["backbone"]
    if spec["name"] != BACKBONE_NAME or spec["weights_sha256"] != backbone.weights_sha256:
        raise ValueError(f"the model was trained on backbone {spec['name']} with weights {spec['weights_sha256']}, "
                         f"this service has {BACKBONE_NAME} with {backbone.weights_sha256}; retrain the model")
    labels = list(payload["labels"])
    weight, bias = payload["head"]["weight"], payload["head"]["bias"]
    head = nn.Linear(FEATURE_DIM, len(labels), device=backbone.device.name)
    head.load_state_dict({"weight": weight, "bias": bias})
    model = CustomModel(labels, backbone, int(spec["tuned_from_layer"]), head,
                        float(payload["threshold"]), float(payload["target_precision"]))
    model.tuned.load_state_dict(payload["tuned_layers"])
    return model.eval().requires_grad_(False)


def classify_probabilities(labels: list[str], probabilities: torch.Tensor, params: ClassifyParams
                           ) -> ClassificationOutput:
    """One image's class probabilities -> top-k labels, the unknown flag and the expected-label verdict."""
    scores, indices = probabilities.topk(min(params.top_k, len(labels)))
    top = [(labels[i], s) for i, s in zip(indices.tolist(), scores.tolist(), strict=True)]
    unknown = top[0][1] < params.unknown_threshold
    match = None
    if params.expected_label is not None:
        predicted = top[0][0]
        verdict: Verdict = ("unknown" if unknown else
                            "match" if predicted.casefold() == params.expected_label.casefold() else "mismatch")
        match = LabelMatch(params.expected_label, predicted, verdict)
    return ClassificationOutput([LabelScore(label, score) for label, score in top], unknown, match)


def preprocess_batch(requests: list[PredictRequest]) -> torch.Tensor:
    return torch.from_numpy(np.stack([preprocess(r.images[0]) for r in requests]))


class CustomClassifier(BasePredictor):
    """A trained custom classifier behind the predictor contract (see the module docstring).

    `device` (tests, benchmarks): "cpu", "cuda:1", ... or a `Device`; by default PERCEPT_DEVICE's choice.
    """

    input_size = RESIZE_SIZE  # the ImageNet classifier's preprocessing

    def __init__(self, artifact: bytes, name: str, version: str, *, device: Device | str | None = None):
        super().__init__()
        self.artifact = artifact
        self.name = name
        self.version = version
        self.device = model_device(device)
        self._model: CustomModel | None = None

    def load(self) -> ModelInfo:
        """Load the artifact, and the shared backbone if no model on this device has yet."""
        self._model = load_custom_model(self.artifact, frozen_backbone(self.device))
        return ModelInfo(name=self.name, version=self.version, sha256=hashlib.sha256(self.artifact).hexdigest(),
                         device=self.device.description, libraries=library_versions(*LIBRARIES))

    def predict(self, requests: list[PredictRequest], on_step: Callable[..., None] | None = None
                ) -> list[dict[str, Any]]:
        """Classify every request's image in one batched forward pass; one output dict per request."""
        # 1. Check inputs (a bad request fails before any image is processed)
        checked = [check_classify_request(request) for request in requests]
        if not requests:
            return []
        self.setup()
        model = self._model
        assert model is not None  # loaded by setup()
        params = [ClassifyParams(k, expected, model.threshold if t is None else t) for k, expected, t in checked]

        # 2. Preprocess every image into one batch
        batch = preprocess_batch(requests)
        report_step(on_step, 1, 2)

        # 3. Shared frozen layers, then this model's own, once for the whole batch (fp16 on a GPU)
        backbone = frozen_backbone(self.device)
        with torch.no_grad(), inference_precision(self.device):
            activations = backbone.activations(batch, model.tuned_from_layer)
            probabilities = model.logits(activations, model.tuned_from_layer).softmax(dim=-1).float().cpu()
        report_step(on_step, 2, 2)

        # 4. Shape each request's output
        return [classify_probabilities(model.labels, p, param).to_dict()
                for p, param in zip(probabilities, params, strict=True)]
