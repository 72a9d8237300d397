"""Custom classifiers: the synthetic data set, training on the real ImageNet backbone (directly and as the
worker's `ClassifierTrainer`), serving the artifact (CustomClassifier) and per-class F1-weighted ensembles
(`EnsembleBuilder`, EnsembleClassifier).

The backbone pass dominates the cost (~25 ms per image on 2 CPU cores), so the data sets are small
64-pixel images, trained models are shared by module-scoped fixtures, and one feature cache serves all
the training runs (different balance modes of the same photos reuse its activations).
"""

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from percept.datasets import DatasetLimits
from percept.errors import PerceptError
from percept.predictor import JobCanceled, ModelArtifact, PredictRequest, TrainingData
from services.classifier.custom import BACKBONE_LAYERS, CustomClassifier, frozen_backbone, load_custom_model
from services.classifier.ensemble import (
    EnsembleBuilder,
    EnsembleClassifier,
    build_ensemble_artifact,
    combine_probabilities,
    read_ensemble_artifact,
)
from services.classifier.training import (
    FINE_TUNE_FROM_LAYER,
    MIN_LOSS_IMPROVEMENT,
    ClassifierTrainer,
    FeatureExtractor,
    TrainingConfig,
    calibrate_threshold,
    calibration_folds,
    stratified_folds,
    stratified_split,
    train_classifier,
)
from tests.synthetic import COLOURS, class_style, imbalanced_faces, make_samples, write_zip

SIZE = 64
EASY = {"blue-square": 12, "green-triangle": 12, "red-circle": 12}
# The generator's default styles: "majority" a red circle, "minority" an orange one (only the hue differs).
IMBALANCED = {"majority": 200, "minority": 10}
# a, b, c: a red circle, an orange circle, an orange octagon - neighbours differ in one thing only.
CONFUSABLE = {"a": 80, "b": 80, "c": 80}


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor(cache_bytes=512 * 2**20)


@pytest.fixture(scope="module")
def easy_samples():
    return make_samples(EASY, seed=0, size=SIZE)


@pytest.fixture(scope="module")
def easy_held_out():
    return make_samples({label: 8 for label in EASY}, seed=99, size=SIZE)


@pytest.fixture(scope="module")
def easy_model(easy_samples, extractor):
    return train_classifier(easy_samples, TrainingConfig(balance="class_weight", seed=1), extractor=extractor)


def predict(classifier, images, **params) -> list[dict]:
    return classifier.predict([PredictRequest(images=[image], params=dict(params)) for image in images])


def probabilities(artifact: bytes, extractor: FeatureExtractor, images) -> np.ndarray:
    """A trained head on cached held-out features: the same numbers CustomClassifier serves, cheaper."""
    model = load_custom_model(artifact, extractor.backbone)
    activations = extractor.activations(images, [0] * len(images), seed=0, stop=model.tuned_from_layer)
    with torch.no_grad():
        logits = model.logits(activations.to(extractor.backbone.device.name), model.tuned_from_layer)
        return logits.softmax(dim=1).cpu().numpy()


def with_payload(artifact: bytes, **changes) -> bytes:
    """The artifact with top-level payload entries replaced."""
    payload = torch.load(io.BytesIO(artifact), weights_only=True)
    payload.update(changes)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def recall(predicted: np.ndarray, targets: np.ndarray, c: int) -> float:
    return float(np.mean(predicted[targets == c] == c))


# --- the synthetic data set ---------------------------------------------------------------------


def test_synthetic_samples_are_deterministic_and_vary():
    first = make_samples({"red-circle": 3, "blue-square": 2}, seed=5, size=SIZE)
    again = make_samples({"red-circle": 3, "blue-square": 2}, seed=5, size=SIZE)
    other = make_samples({"red-circle": 3, "blue-square": 2}, seed=6, size=SIZE)

    assert [label for _, label in first] == ["blue-square"] * 2 + ["red-circle"] * 3
    assert all(image.size == (SIZE, SIZE) and image.mode == "RGB" for image, _ in first)
    assert all(a.tobytes() == b.tobytes() for (a, _), (b, _) in zip(first, again, strict=True))
    assert all(a.tobytes() != b.tobytes() for (a, _), (b, _) in zip(first, other, strict=True))
    assert first[2][0].tobytes() != first[3][0].tobytes()  # two samples of a class differ


def test_class_names_pick_the_style():
    assert class_style("red-circle", 7) == (COLOURS["red"], "circle")
    assert class_style("Blue_Square", 0) == (COLOURS["blue"], "square")
    # Unnamed classes take neighbouring default styles: different, but in one attribute only.
    (colour0, shape0), (colour1, shape1) = class_style("majority", 0), class_style("minority", 1)
    assert (colour0, shape0) != (colour1, shape1) and shape0 == shape1
    with pytest.raises(ValueError, match="counts"):
        make_samples({"a": -1})


def test_write_zip_has_a_folder_per_class_and_undecodable_files():
    samples = make_samples({"red-circle": 3, "blue-square": 2}, seed=1, size=32)
    buffer = io.BytesIO()
    write_zip(samples, buffer, corrupt=3)

    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        names = sorted(archive.namelist())
        assert names == sorted(["blue-square/0.png", "blue-square/1.png", "red-circle/0.png", "red-circle/1.png",
                                "red-circle/2.png", "blue-square/broken_0.jpg", "red-circle/broken_1.jpg",
                                "blue-square/broken_2.jpg"])
        decoded = Image.open(io.BytesIO(archive.read("red-circle/2.png")))
        assert decoded.tobytes() == samples[4][0].tobytes()
        for name in (n for n in names if "broken" in n):
            with pytest.raises(OSError):  # PIL's UnidentifiedImageError and truncated-file errors
                Image.open(io.BytesIO(archive.read(name))).load()


# --- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "field"), [
    ({"balance": "smote"}, "balance"),
    ({"augment_copies": 0}, "augment_copies"),
    ({"epochs": 0}, "epochs"),
    ({"epochs": 2.5}, "epochs"),
    ({"epochs": True}, "epochs"),
    ({"val_fraction": 0.0}, "val_fraction"),
    ({"val_fraction": 0.95}, "val_fraction"),
    ({"target_precision": 0.0}, "target_precision"),
    ({"target_precision": 1.5}, "target_precision"),
    ({"batch_size": 0}, "batch_size"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"patience": 0}, "patience"),
    ({"seed": -1}, "seed"),
    ({"augment": "yes"}, "augment"),
])
def test_check_config_rejects_bad_values(change, field):
    TrainingConfig().check_config()  # the defaults are valid
    with pytest.raises(ValueError, match=field):
        TrainingConfig(**change).check_config()


def test_training_needs_two_classes_and_something_to_validate_on(easy_samples):
    with pytest.raises(ValueError, match="at least 2 classes"):
        train_classifier(easy_samples[:12], TrainingConfig())
    one_each = [easy_samples[0], easy_samples[12]]
    with pytest.raises(ValueError, match="validation"):
        train_classifier(one_each, TrainingConfig())


def test_stratified_split_keeps_a_training_photo_per_class():
    labels = ["a"] * 10 + ["b"] * 2 + ["c"]
    split = stratified_split(labels, ["a", "b", "c"], val_fraction=0.2, seed=0)

    val_labels = [labels[i] for i in split.val]
    assert sorted(val_labels) == ["a", "a", "b"]  # round(10 * 0.2) = 2; b's 2 photos spare 1; c's 1 none
    assert {labels[i] for i in split.train} == {"a", "b", "c"}
    assert sorted(split.train + split.val) == list(range(len(labels)))
    assert split.tiny_classes == ["c"]


def test_easy_classes_train_with_full_metrics(easy_model, easy_held_out, extractor):
    metrics = easy_model.metrics
    labels = sorted(EASY)

    assert metrics["val_size"] == 6 and metrics["train_size"] == 30  # round(12 * 0.2) = 2 per class
    assert set(metrics["per_class"]) == set(labels)
    assert all(set(m) == {"precision", "recall", "f1", "support"} for m in metrics["per_class"].values())
    assert metrics["confusion_matrix"]["labels"] == labels
    assert np.array(metrics["confusion_matrix"]["matrix"]).sum() == metrics["val_size"]
    assert metrics["tiny_classes"] == []
    assert len(metrics["history"]) == metrics["epochs_run"] and 1 <= metrics["best_epoch"] <= metrics["epochs_run"]
    json.dumps(metrics), json.dumps(easy_model.card)  # both JSON-able
    assert easy_model.card["feature_dim"] == 1280 and easy_model.card["class_counts"] == EASY
    assert easy_model.card["config"]["balance"] == "class_weight"

    probs = probabilities(easy_model.artifact, extractor, [image for image, _ in easy_held_out])
    targets = np.array([labels.index(label) for _, label in easy_held_out])
    assert np.mean(probs.argmax(axis=1) == targets) >= 0.8


@pytest.fixture(scope="module")
def imbalance_runs(extractor):
    """The same 20:1 photos trained without and with balancing, scored on a held-out set (other seed)."""
    samples = make_samples(IMBALANCED, seed=1, size=SIZE)
    held_out = make_samples({"majority": 40, "minority": 60}, seed=100, size=SIZE)
    targets = np.array([0 if label == "majority" else 1 for _, label in held_out])
    runs = {}
    for balance in ("none", "oversample", "class_weight"):
        result = train_classifier(samples, TrainingConfig(balance=balance, seed=0), extractor=extractor)
        predicted = probabilities(result.artifact, extractor, [image for image, _ in held_out]).argmax(axis=1)
        runs[balance] = {"minority": recall(predicted, targets, 1), "majority": recall(predicted, targets, 0)}
    return runs


@pytest.mark.parametrize("balance", ["oversample", "class_weight"])
def test_balancing_recovers_minority_recall(imbalance_runs, balance):
    # Measured: none 0.02, oversample 0.48, class_weight 0.62; the majority pays (1.00 -> 0.95, 0.88).
    # Over data seeds 1-4 (60 + 60 held out) the gain was 0.30 to 0.76 for either mode.
    assert imbalance_runs[balance]["minority"] >= imbalance_runs["none"]["minority"] + 0.3, imbalance_runs
    assert imbalance_runs[balance]["majority"] >= 0.6, imbalance_runs


@pytest.fixture(scope="module")
def calibrated(extractor):
    samples = make_samples(CONFUSABLE, seed=1, size=SIZE)
    config = TrainingConfig(val_fraction=0.5, target_precision=0.95, seed=1)
    return train_classifier(samples, config, extractor=extractor)


def test_threshold_reaches_the_target_precision_on_held_out_photos(calibrated, extractor):
    metrics = calibrated.metrics
    assert metrics["threshold_reached"] is True
    assert metrics["precision_at_threshold"] >= 0.95 and 0 < metrics["coverage"] < 1
    # val_fraction 0.5: two folds, every photo scored once by the model that did not train on it
    assert metrics["calibration_folds"] == 2 and metrics["calibration_size"] == 240
    assert all(0 < c < 1 for c in metrics["coverage_per_class"].values())

    held_out = make_samples({label: 50 for label in CONFUSABLE}, seed=100, size=SIZE)
    probs = probabilities(calibrated.artifact, extractor, [image for image, _ in held_out])
    targets = np.array([sorted(CONFUSABLE).index(label) for _, label in held_out])
    correct = probs.argmax(axis=1) == targets
    accepted = probs.max(axis=1) >= metrics["threshold"]
    # Without the threshold the model is below the target (else this test would prove nothing) ...
    assert correct.mean() < 0.95 and 0.3 < accepted.mean() < 1.0
    # ... with it, the accepted predictions reach it, up to sampling error: the threshold was fitted on
    # ~165 accepted out-of-fold predictions and is checked on ~100 held-out photos, binomial standard
    # errors of a 0.95 precision of ~0.017 and ~0.022, so 0.05 is about 1.8 combined standard errors.
    # Measured here: 0.960 (0.942 with the previous validation-split threshold); over data seeds 1-6
    # (bench/threshold.py) 0.894 to 0.964, mean 0.941 at coverage 0.75 (before: mean 0.939 at 0.74).
    assert correct[accepted].mean() >= 0.95 - 0.05


def macro_f1_with_unknowns(predicted: list[str | None], truth: list[str], labels: list[str]) -> float:
    """Macro-F1 where None (unknown) is no prediction: a miss for the true class, no false positive."""
    f1s = []
    for label in labels:
        tp = sum(p == t == label for p, t in zip(predicted, truth, strict=True))
        fp = sum(p == label != t for p, t in zip(predicted, truth, strict=True))
        fn = sum(t == label != p for p, t in zip(predicted, truth, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1s))


def test_threshold_keeps_the_minority_of_a_small_imbalanced_real_photo_dataset():
    # The case on real photos: 80 non-faces and 3 faces (26.7:1) from lfw_subset, trained with the
    # issue's settings (but 2 augmented copies, not 5, to halve the backbone passes); 20 non-faces and 40
    # faces held out. The validation split holds 20 non-faces and one face, all right: the old threshold
    # was the least confident of those 21 scores (0.997 here), which refused most held-out faces
    # (macro-F1 0.76, the argmax alone 0.98). Out of fold, accepting every prediction reaches precision
    # 0.9, so nothing is refused. With 5 copies, over data seeds 0-19 (bench/threshold.py): held-out
    # macro-F1 >= 0.9 in 19 (mean 0.97, the argmax's), against 11 (mean 0.90) before.
    train, held_out = imbalanced_faces(minority="face", train=(80, 3), held_out=(20, 40), seed=0)
    data = TrainingData(archive=dataset_zip(train), limits=DatasetLimits(), dataset={"id": "ds_faces"})
    params = {"name": "faces", "balance": "oversample", "augment": True, "augment_copies": 2,
              "val_fraction": 0.25, "target_precision": 0.9, "seed": 0}
    result = ClassifierTrainer().train(data, params, lambda *args: None)

    # Served with its stored threshold (no unknown_threshold in the requests)
    outputs = predict(CustomClassifier(result.artifact, "faces", "1"), [image for image, _ in held_out])
    predicted = [None if o["unknown"] else o["labels"][0]["label"] for o in outputs]
    truth = [label for _, label in held_out]
    faces = [p for p, t in zip(predicted, truth, strict=True) if t == "face"]
    assert macro_f1_with_unknowns(predicted, truth, ["face", "other"]) >= 0.9
    assert sum(p is not None for p in faces) / len(faces) >= 0.9  # held-out faces accepted
    # The metrics say how the threshold was chosen and what it keeps of each class.
    metrics = result.metrics
    assert metrics["threshold_method"] == "out-of-fold" and metrics["calibration_folds"] == 4
    assert metrics["calibration_size"] == 83 and metrics["val_size"] == 21
    assert metrics["precision_at_threshold"] >= 0.9 and metrics["threshold_reached"] is True
    assert set(metrics["coverage_per_class"]) == {"face", "other"}
    assert metrics["coverage_per_class"]["face"] == 1.0  # the minority's coverage, reported


def test_calibrate_threshold_accepts_the_most_that_reach_the_target():
    scores = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, True, True, False, True, False])

    # 0.6 must be refused and 0.7 may be accepted: the threshold lies halfway between them.
    assert calibrate_threshold(scores, correct, 0.75) == {
        "threshold": pytest.approx(0.65), "threshold_reached": True, "precision_at_threshold": 0.8,
        "coverage": 5 / 6}
    assert calibrate_threshold(scores, correct, 1.0)["threshold"] == pytest.approx(0.85)
    unreachable = calibrate_threshold(scores, np.array([False, True, True, True, True, False]), 0.9)
    assert unreachable["threshold_reached"] is False and unreachable["threshold"] == pytest.approx(0.65)
    assert unreachable["precision_at_threshold"] == 0.8


def test_calibrate_threshold_refuses_nothing_when_every_cut_reaches_the_target():
    # The case: a perfect calibration run. The least confident score (0.62) is no evidence that
    # less confident predictions are wrong, so nothing is refused.
    scores = np.array([0.99, 0.97, 0.9, 0.62])
    calibration = calibrate_threshold(scores, np.ones(4, dtype=bool), 0.9)
    assert calibration == {"threshold": 0.0, "threshold_reached": True, "precision_at_threshold": 1.0,
                           "coverage": 1.0}
    # The same when accepting everything reaches the target with an error in it; and ties count once.
    assert calibrate_threshold(np.array([0.9, 0.8, 0.8, 0.7]), np.array([True, False, True, True]), 0.75
                               )["threshold"] == 0.0
    assert calibrate_threshold(np.array([0.9, 0.6, 0.6]), np.array([True, True, False]), 0.9
                               )["threshold"] == pytest.approx(0.75)


def test_stratified_folds_cover_every_photo_of_the_classes_that_can_spare_one():
    labels = ["a"] * 9 + ["b"] * 3 + ["c"]
    folds = stratified_folds(labels, ["a", "b", "c"], k=4, seed=0)

    assert sorted(i for fold in folds for i in fold) == list(range(12))  # c's only photo trains in every fold
    assert sorted(len(fold) for fold in folds) == [3, 3, 3, 3]
    assert all(sum(labels[i] == "b" for i in fold) <= 1 for fold in folds)  # b keeps 2 training photos
    assert stratified_folds(labels, ["a", "b", "c"], k=4, seed=0) == folds
    assert [calibration_folds(f) for f in (0.5, 0.25, 0.2, 0.05, 0.8)] == [2, 4, 5, 5, 2]


def test_same_seed_same_model_even_without_the_cache(easy_samples):
    samples = easy_samples[::2]  # 6 photos per class keep this cheap
    config = TrainingConfig(augment=True, augment_copies=1, epochs=4, seed=3)
    first = train_classifier(samples, config, extractor=FeatureExtractor())
    second = train_classifier(samples, config, extractor=FeatureExtractor())
    other_seed = train_classifier(samples, TrainingConfig(augment=True, augment_copies=1, epochs=4, seed=4),
                                  extractor=FeatureExtractor())

    assert first.metrics == second.metrics
    assert first.artifact == second.artifact
    assert first.metrics["history"] != other_seed.metrics["history"]


def test_augmentation_multiplies_training_photos_only_and_tiny_classes_are_reported(easy_samples, extractor):
    star = make_samples({"yellow-star": 1}, seed=2, size=SIZE)
    samples = easy_samples + star
    plain = train_classifier(samples, TrainingConfig(epochs=3), extractor=extractor)
    augmented = train_classifier(samples, TrainingConfig(epochs=3, augment=True, augment_copies=2), extractor=extractor)

    assert plain.metrics["train_size"] == plain.metrics["train_images"] == 31  # 3 x 10 + the star
    assert augmented.metrics["train_size"] == 3 * 31
    assert augmented.metrics["val_size"] == plain.metrics["val_size"] == 6  # never augmented
    for result in (plain, augmented):
        assert result.metrics["tiny_classes"] == ["yellow-star"]
        assert result.metrics["per_class"]["yellow-star"]["support"] == 0
        assert result.metrics["per_class"]["yellow-star"]["recall"] is None
        assert "yellow-star" in result.metrics["confusion_matrix"]["labels"]
    # The star was learnt from its one photo: the served model knows the class.
    [output] = predict(CustomClassifier(augmented.artifact, "shapes", "1"), [star[0][0]], top_k=10)
    assert {x["label"] for x in output["labels"]} == set(EASY) | {"yellow-star"}
    # Variants are real, different images.
    image = easy_samples[0][0]
    variants = extractor.activations([image] * 3, [0, 1, 2], seed=0, stop=BACKBONE_LAYERS)
    assert not torch.equal(variants[0], variants[1]) and not torch.equal(variants[1], variants[2])


def test_early_stopping_keeps_the_best_epoch(easy_samples, extractor):
    seen = []
    result = train_classifier(easy_samples, TrainingConfig(epochs=300, patience=3, seed=1),
                              on_epoch=lambda epoch, total, metrics: seen.append((epoch, total, metrics)),
                              extractor=extractor)
    metrics = result.metrics

    assert metrics["epochs_run"] < 300
    assert metrics["epochs_run"] - metrics["best_epoch"] == 3
    val_losses = [h["val_loss"] for h in metrics["history"]]
    best = val_losses[metrics["best_epoch"] - 1]
    assert all(loss > best - MIN_LOSS_IMPROVEMENT for loss in val_losses)  # smaller gains do not count
    assert [(epoch, total) for epoch, total, _ in seen] == [(e, 300) for e in range(1, metrics["epochs_run"] + 1)]
    assert set(seen[0][2]) == {"loss", "accuracy", "val_loss", "val_accuracy"}


def test_an_exception_in_on_epoch_stops_training(easy_samples, extractor):
    def cancel(epoch, total, metrics):
        if epoch == 2:
            raise JobCanceled()

    with pytest.raises(JobCanceled):
        train_classifier(easy_samples, TrainingConfig(epochs=10), on_epoch=cancel, extractor=extractor)


# --- the worker's trainer: ClassifierTrainer ----------------------------------------------------


def dataset_zip(samples, corrupt: int = 0) -> bytes:
    buffer = io.BytesIO()
    write_zip(samples, buffer, corrupt=corrupt)
    return buffer.getvalue()


def test_classifier_trainer_trains_from_the_dataset_zip(easy_samples, easy_held_out):
    archive = dataset_zip(easy_samples, corrupt=2)
    data = TrainingData(archive=archive, limits=DatasetLimits(),
                        dataset={"id": "ds_shapes", "sha256": hashlib.sha256(archive).hexdigest()})
    steps = []
    result = ClassifierTrainer().train(data, {"name": "shapes", "epochs": 4, "seed": 1, "balance": "class_weight"},
                                       lambda done, total, info=None: steps.append((done, total, info)))

    # The runtime registers the model from these and adds `output` to the job's output.
    assert result.predictor == "services.classifier.custom:CustomClassifier"
    assert result.model_kind == "classify"
    assert result.output == {"dataset": {"id": "ds_shapes", "images": len(easy_samples), "skipped_files": 2}}
    assert result.device == result.card["device"] == "cpu"
    assert result.card["class_counts"] == EASY and result.card["config"]["balance"] == "class_weight"
    assert result.metrics["epochs_run"] <= 4 and result.metrics["train_images"] + result.metrics["val_size"] == 36
    # Progress covers the three phases in order: backbone passes, every epoch, every calibration fold.
    phases = [info["phase"] for _, _, info in steps]
    assert sorted(set(phases), key=phases.index) == ["features", "training", "calibration"]
    assert [done for done, _, info in steps if info["phase"] == "training"] == list(
        range(1, result.metrics["epochs_run"] + 1))
    assert [(done, total) for done, total, info in steps if info["phase"] == "calibration"] == [
        (f, 5) for f in range(1, 6)]
    # The artifact serves, and knows the dataset's classes.
    outputs = predict(CustomClassifier(result.artifact, "shapes", "1"), [image for image, _ in easy_held_out])
    accuracy = np.mean([o["labels"][0]["label"] == label for o, (_, label) in zip(outputs, easy_held_out,
                                                                                     strict=True)])
    assert accuracy >= 0.8


def test_classifier_trainer_refuses_unusable_datasets_with_a_message(easy_samples):
    def train(archive):
        ClassifierTrainer().train(TrainingData(archive, DatasetLimits()), {"name": "x"}, lambda *args: None)

    # The archive's own checks keep their error code (the runtime reports a PerceptError as it is) ...
    with pytest.raises(PerceptError, match="one class folder") as excinfo:
        train(dataset_zip(easy_samples[:12]))
    assert excinfo.value.code == "too_few_classes"
    # ... and a second class whose only file does not decode leaves one class to train on.
    buffer = io.BytesIO(dataset_zip(easy_samples[:12]))
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.writestr("red-circle/broken.jpg", b"\xff\xd8\xff\xe0 not a photo")
    with pytest.raises(ValueError, match="at least 2 classes"):
        train(buffer.getvalue())
    with pytest.raises(ValueError, match="needs a dataset"):
        train(None)


@pytest.mark.parametrize("phase", ["training", "calibration"])
def test_classifier_trainer_stops_when_on_step_cancels(easy_samples, phase):
    archive = dataset_zip(easy_samples)

    def cancel(done, total, info=None):
        if info["phase"] == phase and done == 2:
            raise JobCanceled()

    with pytest.raises(JobCanceled):
        ClassifierTrainer().train(TrainingData(archive, DatasetLimits()), {"name": "x", "epochs": 10}, cancel)


# --- serving: CustomClassifier ------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(easy_model) -> CustomClassifier:
    classifier = CustomClassifier(easy_model.artifact, "shapes", "3")
    classifier.setup()
    return classifier


def test_custom_classifier_serves_the_trained_model(served, easy_model, easy_held_out, extractor):
    images = [image for image, _ in easy_held_out]
    outputs = predict(served, images)

    assert [len(o["labels"]) for o in outputs] == [3] * len(images)  # top_k 5 clipped to the 3 classes
    for output in outputs:
        scores = [x["score"] for x in output["labels"]]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-5)
        assert output["match"] is None
    accuracy = np.mean([o["labels"][0]["label"] == label for o, (_, label) in zip(outputs, easy_held_out,
                                                                                     strict=True)])
    assert accuracy >= 0.8
    # The served numbers are the training-side numbers.
    expected = probabilities(easy_model.artifact, extractor, images[:4])
    for output, row in zip(outputs[:4], expected, strict=True):
        assert output["labels"][0]["score"] == pytest.approx(float(row.max()), abs=1e-5)
    # Its own calibrated threshold is the default.
    threshold = easy_model.metrics["threshold"]
    assert all(o["unknown"] == (o["labels"][0]["score"] < threshold) for o in outputs)


def test_custom_classifier_verdicts(served, easy_held_out):
    image, label = next((image, label) for image, label in easy_held_out if label == "blue-square")
    [top] = predict(served, [image], top_k=1)
    predicted = top["labels"][0]["label"]
    other = next(x for x in EASY if x != predicted)

    [match] = predict(served, [image], expected_label=f"  {predicted.upper()} ", unknown_threshold=0.0)
    [mismatch] = predict(served, [image], expected_label=other, unknown_threshold=0.0)
    [unknown] = predict(served, [image], expected_label=predicted, unknown_threshold=0.999)
    assert len(top["labels"]) == 1
    assert match["match"] == {"expected": predicted.upper(), "predicted": predicted, "verdict": "match"}
    assert mismatch["match"] == {"expected": other, "predicted": predicted, "verdict": "mismatch"}
    assert unknown["unknown"] is True and unknown["match"]["verdict"] == "unknown"


def test_custom_classifier_uses_its_threshold_unless_given_one(easy_model, easy_held_out):
    images = [image for image, _ in easy_held_out[:4]]
    # The same weights with the calibrated threshold at either extreme: only the artifact's own threshold
    # can make every image unknown (or none) when the request gives no threshold.
    strict = CustomClassifier(with_payload(easy_model.artifact, threshold=0.9999), "strict", "1")
    lenient = CustomClassifier(with_payload(easy_model.artifact, threshold=0.0), "lenient", "1")

    for params in ({}, {"unknown_threshold": None}):
        assert [o["unknown"] for o in predict(strict, images, **params)] == [True] * 4
        assert [o["unknown"] for o in predict(lenient, images, **params)] == [False] * 4
    assert [o["unknown"] for o in predict(strict, images, unknown_threshold=0.0)] == [False] * 4
    assert [o["unknown"] for o in predict(lenient, images, unknown_threshold=1.0)] == [True] * 4


@pytest.mark.parametrize("params", [{"top_k": 0}, {"top_k": "5"}, {"top_k": 1001}, {"unknown_threshold": 1.5},
                                    {"unknown_threshold": True}, {"expected_label": " "}])
def test_custom_classifier_rejects_bad_params(served, params):
    image = make_samples({"red-circle": 1}, seed=3, size=SIZE)[0][0]
    with pytest.raises(ValueError, match=next(iter(params))):
        served.predict([PredictRequest([image], params)])


def test_custom_classifier_setup_is_lazy_and_idempotent(easy_model):
    classifier = CustomClassifier(easy_model.artifact, "shapes", "3", device="cpu")
    assert classifier._model is None
    info = classifier.setup()
    model = classifier._model

    assert classifier.setup() is info
    assert classifier._model is model  # loaded once
    assert (info.name, info.version, info.device) == ("shapes", "3", "cpu")
    assert info.sha256 == hashlib.sha256(easy_model.artifact).hexdigest()
    assert "torch" in info.libraries


def test_artifact_is_weights_only_and_checked(easy_model):
    payload = torch.load(io.BytesIO(easy_model.artifact), weights_only=True)
    assert payload["labels"] == sorted(EASY) and payload["format_version"] == 1
    assert payload["head"]["weight"].shape == (3, 1280) and payload["tuned_layers"] == {}
    assert payload["threshold"] == easy_model.metrics["threshold"]

    with pytest.raises(ValueError, match="not a custom classifier"):
        CustomClassifier(b"not a model", "x", "1").setup()
    payload["backbone"]["weights_sha256"] = "0" * 64
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with pytest.raises(ValueError, match="retrain"):
        CustomClassifier(buffer.getvalue(), "x", "1").setup()


def test_fine_tuned_layers_travel_in_the_artifact(easy_samples, easy_held_out, extractor):
    result = train_classifier(easy_samples, TrainingConfig(fine_tune=True, epochs=3, seed=1), extractor=extractor)
    payload = torch.load(io.BytesIO(result.artifact), weights_only=True)
    imagenet = {k: v for k, v in frozen_backbone().model.state_dict().items() if k.startswith("blocks.15.")}

    assert payload["backbone"]["tuned_from_layer"] == FINE_TUNE_FROM_LAYER
    tuned_block = {k.removeprefix("0."): v for k, v in payload["tuned_layers"].items() if k.startswith("0.")}
    assert tuned_block.keys() == {k.removeprefix("blocks.15.") for k in imagenet}
    assert any(not torch.equal(tuned_block[k.removeprefix("blocks.15.")], v) for k, v in imagenet.items())
    # The served model runs the tuned layers: its scores are the training side's.
    images = [image for image, _ in easy_held_out[:3]]
    outputs = predict(CustomClassifier(result.artifact, "tuned", "1"), images)
    expected = probabilities(result.artifact, extractor, images)
    for output, row in zip(outputs, expected, strict=True):
        assert output["labels"][0]["score"] == pytest.approx(float(row.max()), abs=1e-5)


# --- ensembles ----------------------------------------------------------------------------------


def relabelled(artifact: bytes, swap: tuple[str, str]) -> bytes:
    """The same weights with two class names swapped: a model confidently wrong on exactly those two."""
    payload = torch.load(io.BytesIO(artifact), weights_only=True)
    a, b = payload["labels"].index(swap[0]), payload["labels"].index(swap[1])
    payload["labels"][a], payload["labels"][b] = payload["labels"][b], payload["labels"][a]
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def f1_per_class(outputs, truth, labels) -> dict[str, float]:
    predicted = [o["labels"][0]["label"] for o in outputs]
    f1 = {}
    for label in labels:
        tp = sum(p == t == label for p, t in zip(predicted, truth, strict=True))
        fp = sum(p == label != t for p, t in zip(predicted, truth, strict=True))
        fn = sum(t == label != p for p, t in zip(predicted, truth, strict=True))
        f1[label] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return f1


def test_ensemble_weights_members_by_their_f1_per_class(easy_model, easy_held_out):
    x, y, z = "blue-square", "green-triangle", "red-circle"
    # A is the trained model with y and z swapped (good at x, wrong on y); B swaps x and z (good at y only).
    member_a = relabelled(easy_model.artifact, (y, z))
    member_b = relabelled(easy_model.artifact, (x, z))
    images = [image for image, _ in easy_held_out]
    truth = [label for _, label in easy_held_out]
    outputs_a = predict(CustomClassifier(member_a, "a", "1"), images, top_k=3)
    outputs_b = predict(CustomClassifier(member_b, "b", "1"), images, top_k=3)
    f1_a, f1_b = f1_per_class(outputs_a, truth, EASY), f1_per_class(outputs_b, truth, EASY)
    assert f1_a[x] >= 0.8 and f1_a[y] == 0 and f1_b[y] >= 0.8 and f1_b[x] == 0

    artifact = build_ensemble_artifact([("a:1", member_a, f1_a), ("b:1", member_b, f1_b)])
    ensemble = EnsembleClassifier(artifact, "vote", "1")
    outputs = predict(ensemble, images, top_k=3)

    def recall_of(outs, label):
        return np.mean([o["labels"][0]["label"] == label for o, t in zip(outs, truth, strict=True) if t == label])

    def true_score(outs, label):  # the mean probability the ensemble gives the true class
        return np.mean([next(s["score"] for s in o["labels"] if s["label"] == t)
                        for o, t in zip(outs, truth, strict=True) if t == label])

    assert recall_of(outputs, x) >= recall_of(outputs_a, x) and recall_of(outputs, y) >= recall_of(outputs_b, y)
    assert recall_of(outputs, x) > recall_of(outputs_b, x) and recall_of(outputs, y) > recall_of(outputs_a, y)
    # With equal weights the confidently wrong member would pull the true class to ~0.5 (B is as sure
    # that an x is a z as A is that it is an x); weighted by F1 it stays near A's own confidence.
    assert true_score(outputs, x) >= 0.8 and true_score(outputs, y) >= 0.8
    assert ensemble.setup().sha256 == hashlib.sha256(artifact).hexdigest()
    # Both members carry the trained model's calibrated threshold, so its F1-weighted mean is that threshold.
    assert ensemble.threshold == pytest.approx(easy_model.metrics["threshold"])


def test_combine_probabilities_by_class_f1_over_the_union_of_classes():
    labels = ["cat", "dog", "fox"]
    a = torch.tensor([[0.9, 0.1]])  # A knows cat and dog
    b = torch.tensor([[0.2, 0.2, 0.6]])  # B knows all three, but is only good at fox
    weights = [{"cat": 1.0, "dog": 0.5}, {"cat": 0.1, "dog": 0.1, "fox": 0.9}]
    combined = combine_probabilities([a, b], [["cat", "dog"], labels], weights, labels)

    scores = np.array([0.9 + 0.02, 0.05 + 0.02, 0.54])
    assert combined[0].numpy() == pytest.approx(scores / scores.sum(), abs=1e-6)
    equal = combine_probabilities([a, b], [["cat", "dog"], labels], [{k: 1.0 for k in w} for w in weights], labels)
    assert combined[0, 0] > equal[0, 0]  # A's cat counts more than B's poor opinion of cats


def test_ensemble_artifact_is_a_deterministic_zip():
    members = [("a:1", b"first", {"x": 0.5}), ("b:2", b"second", {"x": 1.0, "y": None})]
    artifact = build_ensemble_artifact(members)

    assert build_ensemble_artifact(members) == artifact
    manifest, blobs = read_ensemble_artifact(artifact)
    assert manifest == {"format": 1, "members": [
        {"ref": "a:1", "file": "members/0.bin", "per_class_f1": {"x": 0.5}},
        {"ref": "b:2", "file": "members/1.bin", "per_class_f1": {"x": 1.0, "y": None}}]}
    assert blobs == [b"first", b"second"]
    with pytest.raises(ValueError, match="F1"):
        build_ensemble_artifact([("a:1", b"first", {"x": 1.5})])
    with pytest.raises(ValueError, match="not an ensemble"):
        read_ensemble_artifact(b"junk")


# --- the worker's builder: EnsembleBuilder -------------------------------------------------------


F1_EASY = {label: 0.9 for label in EASY}


def member(ref: str, artifact: bytes, f1: dict[str, float | None], card: dict | None = None) -> ModelArtifact:
    """A registered model as the runtime hands it over: training metrics carry per-class F1."""
    per_class = {label: {"f1": value, "support": 2} for label, value in f1.items()}
    return ModelArtifact(ref, artifact, {"per_class": per_class, "macro_f1": 0.5},
                         card or {"model_type": "custom-classifier"})


def test_ensemble_builder_builds_a_servable_ensemble_from_registered_models(easy_model, easy_held_out):
    x, y, z = "blue-square", "green-triangle", "red-circle"
    member_a = relabelled(easy_model.artifact, (y, z))
    member_b = relabelled(easy_model.artifact, (x, z))
    f1_a, f1_b = {x: 1.0, y: 0.0, z: 0.5}, {x: 0.0, y: 1.0, z: None}
    steps = []
    result = EnsembleBuilder().train(TrainingData(None, DatasetLimits(), models=[
        member("a:1", member_a, f1_a), member("b:2", member_b, f1_b)]), {"name": "vote"},
        lambda done, total, info=None: steps.append((done, total)))

    assert result.predictor == "services.classifier.ensemble:EnsembleClassifier"
    assert result.model_kind == "classify" and result.device == "cpu"
    assert result.metrics == {"members": {"a:1": f1_a, "b:2": f1_b}}
    assert result.card["type"] == "ensemble" and result.card["members"] == ["a:1", "b:2"]
    assert result.card["labels"] == sorted(EASY) and "F1" in result.card["weighting"]
    assert steps[-1] == (2, 2)
    # The same artifact the format's own builder makes from those weights, and it serves.
    assert result.artifact == build_ensemble_artifact([("a:1", member_a, f1_a), ("b:2", member_b, f1_b)])
    images = [image for image, label in easy_held_out if label == x]
    outputs = predict(EnsembleClassifier(result.artifact, "vote", "1"), images)
    assert np.mean([o["labels"][0]["label"] == x for o in outputs]) >= 0.8  # A (F1 1.0 on x) wins over B


@pytest.mark.parametrize(("members", "message"), [
    (lambda good: [member("a:1", good, {"blue-square": 1.0})], "at least 2"),
    (lambda good: [member("a:1", good, F1_EASY), member("a:1", good, F1_EASY)], "different models"),
    (lambda good: [member("a:1", good, F1_EASY), member("b:1", b"not a model", F1_EASY)], "'b:1'.*not a custom"),
    (lambda good: [member("a:1", good, F1_EASY), member("b:1", good, {})], "'b:1' has no per-class F1"),
    (lambda good: [member("a:1", good, F1_EASY), member("b:1", good, {"blue-square": 1.0})], "'b:1' has no F1 for"),
    (lambda good: [member("a:1", good, F1_EASY), member("v:1", good, F1_EASY, {"type": "ensemble"})],
     "'v:1' is an ensemble"),
])
def test_ensemble_builder_fails_the_job_for_a_member_that_cannot_be_served(easy_model, members, message):
    data = TrainingData(None, DatasetLimits(), models=members(easy_model.artifact))
    with pytest.raises(ValueError, match=r"^\[invalid_ensemble_member\] .*" + message):
        EnsembleBuilder().train(data, {"name": "vote"}, lambda *args: None)

