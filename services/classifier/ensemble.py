"""Ensembles of custom classifiers, served like any classifier (same params and output as
`CustomClassifier`; see services/classifier/custom.py).

Combination: for each class c, score(c) = sum over members m of w(m, c) * p_m(c), then the scores are
normalised to sum to 1. w(m, c) is m's validation F1 on c, so a member that is good at "sad" counts more
for "sad"; a member without class c contributes nothing to it (the classes are the union of the
members'). F1 is floored at MIN_WEIGHT so that a member with no measured F1 (a tiny class) or F1 0
still breaks ties, but cannot outvote a member that is good at the class.

Threshold (when a request gives none): the manifest's "threshold" if the artifact carries one, else the
mean of the members' calibrated thresholds weighted by each member's macro F1. The ensemble's scores are
not the members' scores, so this is a starting point rather than a calibration: pass unknown_threshold
for a precise operating point.

Artifact: a zip (see `build_ensemble_artifact`) with `manifest.json` =
    {"format": 1, "members": [{"ref": "name:version", "file": "members/0.bin", "per_class_f1": {label: f1}}]}
and each member's CustomClassifier artifact under its "file".
"""

import hashlib
import threading
from collections.abc import Callable
from typing import Any

import torch

from percept.ensembles import build_ensemble_artifact, read_ensemble_artifact  # noqa: F401 (re-exported)
from percept.predictor import ModelInfo, PredictRequest
from services.classifier.custom import (
    CustomModel,
    classify_probabilities,
    frozen_backbone,
    library_versions,
    load_custom_model,
    preprocess_batch,
)
from services.classifier.predictor import RESIZE_SIZE, ClassifyParams, check_classify_request, report_step

MIN_WEIGHT = 0.01


def combine_probabilities(member_probabilities: list[torch.Tensor], member_labels: list[list[str]],
                          weights: list[dict[str, float]], labels: list[str]) -> torch.Tensor:
    """(N, C_m) probabilities of each member -> (N, len(labels)) per-class F1-weighted, normalised."""
    scores = torch.zeros(member_probabilities[0].shape[0], len(labels))
    column = {label: i for i, label in enumerate(labels)}
    for probabilities, own_labels, own_weights in zip(member_probabilities, member_labels, weights, strict=True):
        for j, label in enumerate(own_labels):
            scores[:, column[label]] += own_weights[label] * probabilities[:, j]
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-12)


def member_weights(per_class_f1: dict[str, float | None], labels: list[str], ref: str) -> dict[str, float]:
    missing = [label for label in labels if label not in per_class_f1]
    if missing:
        raise ValueError(f"ensemble member {ref!r} has no F1 for its classes {missing}")
    return {label: max(MIN_WEIGHT, per_class_f1[label] or 0.0) for label in labels}


class EnsembleClassifier:
    """Per-class F1-weighted ensemble of custom classifiers (see the module docstring)."""

    input_size = RESIZE_SIZE  # its members share the ImageNet classifier's preprocessing

    def __init__(self, artifact: bytes, name: str, version: str):
        self.artifact = artifact
        self.name = name
        self.version = version
        self._members: list[CustomModel] = []
        self._weights: list[dict[str, float]] = []
        self.labels: list[str] = []
        self.threshold = 0.0
        self._info: ModelInfo | None = None
        self._lock = threading.Lock()

    def setup(self) -> ModelInfo:
        """Load every member once; later calls return the same ModelInfo."""
        with self._lock:
            if self._info is None:
                manifest, artifacts = read_ensemble_artifact(self.artifact)
                if not artifacts:
                    raise ValueError("the ensemble has no members")
                members = [load_custom_model(artifact) for artifact in artifacts]
                weights = [member_weights(entry["per_class_f1"], member.labels, entry["ref"])
                           for entry, member in zip(manifest["members"], members, strict=True)]
                self.labels = sorted({label for member in members for label in member.labels})
                if "threshold" in manifest:
                    self.threshold = float(manifest["threshold"])
                else:
                    quality = [sum(w.values()) / len(w) for w in weights]  # macro F1 (floored)
                    self.threshold = sum(q * m.threshold for q, m in zip(quality, members, strict=True)) / sum(quality)
                self._members, self._weights = members, weights
                self._info = ModelInfo(name=self.name, version=self.version,
                                       sha256=hashlib.sha256(self.artifact).hexdigest(), device="cpu",
                                       libraries=library_versions())
        return self._info

    def check_inputs(self, request: PredictRequest) -> ClassifyParams:
        top_k, expected, threshold = check_classify_request(request)
        if threshold is None:
            self.setup()
            threshold = self.threshold
        return ClassifyParams(top_k, expected, threshold)

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, 224, 224) preprocessed images -> (N, len(self.labels)) combined probabilities."""
        self.setup()
        # The frozen layers all members share run once; each member continues from there.
        start = min(member.tuned_from_layer for member in self._members)
        with torch.no_grad():
            activations = frozen_backbone().activations(batch, start)
            member_probabilities = [member.logits(activations, start).softmax(dim=1) for member in self._members]
        return combine_probabilities(member_probabilities, [m.labels for m in self._members], self._weights,
                                     self.labels)

    def predict(self, requests: list[PredictRequest], on_step: Callable[..., None] | None = None
                ) -> list[dict[str, Any]]:
        """Classify every request's image with every member in one batch; one output dict per request."""
        # 1. Check inputs
        checked = [check_classify_request(request) for request in requests]
        if not requests:
            return []
        self.setup()
        params = [ClassifyParams(k, expected, self.threshold if t is None else t) for k, expected, t in checked]

        # 2. Preprocess every image into one batch
        batch = preprocess_batch(requests)
        report_step(on_step, 1, 2)

        # 3. Every member on the batch, combined per class
        probabilities = self.probabilities(batch)
        report_step(on_step, 2, 2)

        # 4. Shape each request's output
        return [classify_probabilities(self.labels, p, param).to_dict()
                for p, param in zip(probabilities, params, strict=True)]
