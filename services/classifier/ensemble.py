"""Ensembles of custom classifiers: built by a `build_ensemble` job (`EnsembleBuilder`) from registered
models, served like any classifier (`EnsembleClassifier`: same params and output as `CustomClassifier`;
see services/classifier/custom.py).

Combination: for each class c, score(c) = sum over members m of w(m, c) * p_m(c), then the scores are
normalised to sum to 1. w(m, c) is m's validation F1 on c, so a member that is good at "sad" counts more
for "sad"; a member without class c contributes nothing to it (the classes are the union of the
members'). F1 is floored at MIN_WEIGHT so that a member with no measured F1 (a tiny class) or F1 0
still breaks ties, but cannot outvote a member that is good at the class.

Threshold (when a request gives none): the mean of the members' calibrated thresholds weighted by each
member's macro F1. The ensemble's scores are not the members' scores, so this is a starting point rather
than a calibration: pass unknown_threshold for a precise operating point.

Artifact: a zip (`build_ensemble_artifact`) with `manifest.json` =
    {"format": 1, "members": [{"ref": "name:version", "file": "members/0.bin", "per_class_f1": {label: f1}}]}
and each member's CustomClassifier artifact under its "file". A null F1 is a class the member had no
validation images for.
"""

import hashlib
import io
import json
import zipfile
from collections.abc import Callable
from typing import Any

import torch

from percept.devices import Device
from percept.predictor import (
    BasePredictor,
    ModelArtifact,
    ModelInfo,
    PredictRequest,
    StepCallback,
    TrainingData,
    TrainingResult,
    report_step,
)
from percept.version import library_versions
from services.classifier.custom import (
    CustomModel,
    classify_probabilities,
    frozen_backbone,
    load_custom_model,
    preprocess_batch,
)
from services.classifier.predictor import (
    LIBRARIES,
    RESIZE_SIZE,
    ClassifyParams,
    check_classify_request,
    inference_precision,
    model_device,
)

ENSEMBLE_PREDICTOR = "services.classifier.ensemble:EnsembleClassifier"
ENSEMBLE_FORMAT = 1
# Fixed zip timestamps: the same members give the same bytes, hence the same sha256.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
MIN_WEIGHT = 0.01
WEIGHTING = "each member's vote for a class is weighted by its validation F1 on that class"


def build_ensemble_artifact(members: list[tuple[str, bytes, dict[str, float | None]]]) -> bytes:
    """Zip (ref "name:version", member artifact, its validation F1 per class) triples into an ensemble
    artifact."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    manifest: dict[str, Any] = {"format": ENSEMBLE_FORMAT, "members": []}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for index, (ref, artifact, per_class_f1) in enumerate(members):
            if not per_class_f1:
                raise ValueError(f"member {ref!r} has no per-class F1; use its training metrics' per_class f1")
            for label, f1 in per_class_f1.items():
                if f1 is not None and not 0 <= f1 <= 1:
                    raise ValueError(f"member {ref!r}: F1 of {label!r} must be from 0 to 1 or null, got {f1!r}")
            name = f"members/{index}.bin"
            archive.writestr(zipfile.ZipInfo(name, ZIP_DATE_TIME), artifact)
            manifest["members"].append({"ref": ref, "file": name, "per_class_f1": {
                label: None if f1 is None else float(f1) for label, f1 in per_class_f1.items()}})
        archive.writestr(zipfile.ZipInfo("manifest.json", ZIP_DATE_TIME), json.dumps(manifest, sort_keys=True))
    return buffer.getvalue()


def read_ensemble_artifact(artifact: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """The manifest and the members' artifacts, in manifest order."""
    try:
        with zipfile.ZipFile(io.BytesIO(artifact)) as archive:
            manifest = json.loads(archive.read("manifest.json"))
            if manifest.get("format") != ENSEMBLE_FORMAT:
                raise ValueError(f"ensemble format {manifest.get('format')!r} is not supported "
                                 f"(this code reads format {ENSEMBLE_FORMAT})")
            return manifest, [archive.read(member["file"]) for member in manifest["members"]]
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"not an ensemble artifact: {exc}") from exc


def combine_probabilities(member_probabilities: list[torch.Tensor], member_labels: list[list[str]],
                          weights: list[dict[str, float]], labels: list[str]) -> torch.Tensor:
    """(N, C_m) probabilities of each member -> (N, len(labels)) per-class F1-weighted, normalised."""
    first = member_probabilities[0]
    scores = torch.zeros(first.shape[0], len(labels), device=first.device)
    column = {label: i for i, label in enumerate(labels)}
    for probabilities, own_labels, own_weights in zip(member_probabilities, member_labels, weights, strict=True):
        for j, label in enumerate(own_labels):
            scores[:, column[label]] += own_weights[label] * probabilities[:, j].float()
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-12)


def member_weights(per_class_f1: dict[str, float | None], labels: list[str], ref: str) -> dict[str, float]:
    missing = [label for label in labels if label not in per_class_f1]
    if missing:
        raise ValueError(f"ensemble member {ref!r} has no F1 for its classes {missing}")
    return {label: max(MIN_WEIGHT, per_class_f1[label] or 0.0) for label in labels}


class EnsembleClassifier(BasePredictor):
    """Per-class F1-weighted ensemble of custom classifiers (see the module docstring).

    `device` (tests, benchmarks): "cpu", "cuda:1", ... or a `Device`; by default PERCEPT_DEVICE's choice.
    """

    input_size = RESIZE_SIZE  # its members share the ImageNet classifier's preprocessing

    def __init__(self, artifact: bytes, name: str, version: str, *, device: Device | str | None = None):
        super().__init__()
        self.artifact = artifact
        self.name = name
        self.version = version
        self.device = model_device(device)
        self._members: list[CustomModel] = []
        self._weights: list[dict[str, float]] = []
        self.labels: list[str] = []
        self.threshold = 0.0

    def load(self) -> ModelInfo:
        """Load every member onto the device; a member that does not load is named in the ValueError."""
        manifest, artifacts = read_ensemble_artifact(self.artifact)
        if not artifacts:
            raise ValueError("the ensemble has no members")
        backbone = frozen_backbone(self.device)
        members, weights = [], []
        for entry, artifact in zip(manifest["members"], artifacts, strict=True):
            try:
                member = load_custom_model(artifact, backbone)
            except ValueError as exc:
                raise ValueError(f"ensemble member {entry['ref']!r}: {exc}") from exc
            members.append(member)
            weights.append(member_weights(entry["per_class_f1"], member.labels, entry["ref"]))
        self.labels = sorted({label for member in members for label in member.labels})
        quality = [sum(w.values()) / len(w) for w in weights]  # macro F1 (floored)
        self.threshold = sum(q * m.threshold for q, m in zip(quality, members, strict=True)) / sum(quality)
        self._members, self._weights = members, weights
        return ModelInfo(name=self.name, version=self.version, sha256=hashlib.sha256(self.artifact).hexdigest(),
                         device=self.device.description, libraries=library_versions(*LIBRARIES))

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, 224, 224) preprocessed images -> (N, len(self.labels)) combined probabilities, on the CPU."""
        self.setup()
        # The frozen layers all members share run once; each member continues from there.
        start = min(member.tuned_from_layer for member in self._members)
        with torch.no_grad(), inference_precision(self.device):
            activations = frozen_backbone(self.device).activations(batch, start)
            member_probabilities = [member.logits(activations, start).softmax(dim=1) for member in self._members]
        return combine_probabilities(member_probabilities, [m.labels for m in self._members], self._weights,
                                     self.labels).cpu()

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


class EnsembleBuilder:
    """The `build_ensemble` job: registered classifiers (the job's model inputs) -> an ensemble artifact.

    Each member's weights are its training metrics' per-class validation F1. The built ensemble is loaded
    before it is returned, so a member that cannot be served fails this job rather than the first
    classify; such errors carry the code `invalid_ensemble_member`.
    """

    def train(self, data: TrainingData, params: dict[str, Any], on_step: StepCallback) -> TrainingResult:
        # 1. Check the members
        members = data.models
        if len(members) < 2:
            raise ValueError(f"[invalid_ensemble_member] An ensemble combines at least 2 trained classifiers; "
                             f"got {len(members)}.")
        refs = [member.ref for member in members]
        if len(set(refs)) < len(refs):
            raise ValueError("[invalid_ensemble_member] An ensemble's members must be different models.")
        for member in members:
            if member.card.get("type") == "ensemble":
                raise ValueError(f"[invalid_ensemble_member] {member.ref!r} is an ensemble; ensembles combine "
                                 "trained classifiers.")
        parts = [(member.ref, member.artifact, per_class_f1(member)) for member in members]

        # 2. Build the artifact and load it as the classify worker will
        try:
            artifact = build_ensemble_artifact(parts)
            report_step(on_step, 1, 2)
            ensemble = EnsembleClassifier(artifact, params.get("name", "ensemble"), "")
            info = ensemble.setup()
        except ValueError as exc:
            raise ValueError(f"[invalid_ensemble_member] {exc}") from exc
        report_step(on_step, 2, 2)

        # 3. Describe it
        return TrainingResult(
            artifact=artifact,
            metrics={"members": {ref: f1 for ref, _, f1 in parts}},
            card={"type": "ensemble", "members": refs, "labels": ensemble.labels, "weighting": WEIGHTING,
                  "device": info.device},
            predictor=ENSEMBLE_PREDICTOR,
            model_kind="classify",
            device=info.device,
        )


def per_class_f1(member: ModelArtifact) -> dict[str, float | None]:
    """A member's validation F1 per class, from its training metrics (None: a class it could not measure)."""
    per_class = member.metrics.get("per_class") or {}
    return {label: values.get("f1") for label, values in per_class.items()}
