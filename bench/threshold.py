"""Unknown-threshold figures: the out-of-fold calibration against the validation-split one it replaced, on
real photos and on the synthetic benchmarks.

Run: .venv/bin/python bench/threshold.py [--device auto|cpu|cuda|cuda:N] [--seeds N]   (~3 min on 2 cores)

1. Real photos (skimage's lfw_subset, 25 x 25 faces and non-faces): 80 photos of one class and 3 of the
   other (26.7:1) trained with the issue's settings (balance=oversample, augment=true, val_fraction=0.25,
   target_precision=0.9); 20 + 40 held-out photos (the minority's 40) scored with the stored threshold,
   an unknown counting as a miss. Both ways round, data seeds 0..N-1.
2. Synthetic balancing (tests/synthetic.py): 200:10 red and orange circles at 64 px, data seeds 1-4, 60 + 60
   held out from other seeds; minority and majority recall (the argmax) per balance mode, and what the
   threshold keeps of the held-out minority.
3. Synthetic threshold calibration: three confusable classes of 80 at 64 px, val_fraction 0.5, target
   precision 0.95, data seeds 1-6; precision and coverage on the calibration predictions and on 150
   held-out photos.

"Before" is the previous method, the lowest validation score at which the served model's validation
predictions reach the target (`validation_split_threshold` below), applied to the same served model:
training the served model did not change, only how its threshold is chosen, so this is exactly the
threshold the previous release stored.

--device sets PERCEPT_DEVICE before anything reads the settings (default: the environment's, else auto);
the device used is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from harness import add_device_argument, apply_device

if TYPE_CHECKING:
    from PIL import Image

    from percept.predictor import TrainingResult
    from services.classifier.training import FeatureExtractor

# tests/synthetic.py builds the data sets; the repository root is not on the path of a script in bench/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REAL_TRAIN = (80, 3)  # majority, minority: the dataset
REAL_HELD_OUT = (20, 40)
REAL_SETTINGS: dict[str, Any] = {"balance": "oversample", "augment": True, "val_fraction": 0.25,
                                 "target_precision": 0.9, "seed": 0}
SIZE = 64
IMBALANCED = {"majority": 200, "minority": 10}
BALANCE_SEEDS = (1, 2, 3, 4)
CONFUSABLE = {"a": 80, "b": 80, "c": 80}
CALIBRATION_SEEDS = (1, 2, 3, 4, 5, 6)


def validation_split_threshold(scores: np.ndarray, correct: np.ndarray, target_precision: float) -> float:
    """The previous method: the lowest validation score s such that the predictions scoring >= s reach the
    target (when none does, the lowest with the best precision)."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    precision = np.cumsum(correct[order]) / np.arange(1, len(scores) + 1)
    cuts = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    reaching = cuts[precision[cuts] >= target_precision - 1e-12]
    if not len(reaching):
        reaching = cuts[precision[cuts] >= precision[cuts].max() - 1e-12]
    return float(sorted_scores[reaching[-1]])


def macro_f1(predicted: np.ndarray, targets: np.ndarray, num_classes: int) -> float:
    """Over the classes; a prediction of -1 (unknown) is a miss for the true class and no false positive."""
    f1s = []
    for c in range(num_classes):
        tp = np.sum((predicted == c) & (targets == c))
        fp = np.sum((predicted == c) & (targets != c))
        fn = np.sum((predicted != c) & (targets == c))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1s))


class Scorer:
    """Trains through `train_classifier` and scores photos with the trained head on cached backbone
    features (the numbers CustomClassifier serves, without a second backbone pass per photo)."""

    def __init__(self, extractor: FeatureExtractor):
        self.extractor = extractor

    def train(self, samples: list[tuple[Image.Image, str]], **settings: Any) -> TrainingResult:
        from services.classifier.training import TrainingConfig, train_classifier

        return train_classifier(samples, TrainingConfig(**settings), extractor=self.extractor)

    def probabilities(self, artifact: bytes | None, images: list[Image.Image]) -> np.ndarray:
        import torch

        from services.classifier.custom import load_custom_model

        assert artifact is not None  # train_classifier always returns one
        model = load_custom_model(artifact, self.extractor.backbone)
        activations = self.extractor.activations(images, [0] * len(images), seed=0, stop=model.tuned_from_layer)
        with torch.no_grad():
            logits = model.logits(activations.to(self.extractor.backbone.device.name), model.tuned_from_layer)
        return logits.softmax(dim=1).cpu().numpy()

    def old_threshold(self, result: TrainingResult, samples: list[tuple[Image.Image, str]],
                      settings: dict[str, Any]) -> float:
        """The threshold the previous method stored for this served model: from its validation split."""
        from services.classifier.training import TrainingConfig, stratified_split

        config = TrainingConfig(**settings)
        labels = [label for _, label in samples]
        classes = sorted(set(labels))
        split = stratified_split(labels, classes, config.val_fraction, config.seed)
        probs = self.probabilities(result.artifact, [samples[i][0] for i in split.val])
        targets = np.array([classes.index(labels[i]) for i in split.val])
        return validation_split_threshold(probs.max(axis=1), probs.argmax(axis=1) == targets,
                                          config.target_precision)


def held_out_figures(probs: np.ndarray, targets: np.ndarray, threshold: float, minority: int) -> dict[str, float]:
    accepted = probs.max(axis=1) >= threshold
    predicted = np.where(accepted, probs.argmax(axis=1), -1)
    return {"f1": macro_f1(predicted, targets, probs.shape[1]),
            "minority_coverage": float(accepted[targets == minority].mean()),
            "precision": float(np.mean(predicted[accepted] == targets[accepted])) if accepted.any() else 1.0,
            "coverage": float(accepted.mean())}


def real_photo_table(scorer: Scorer, seeds: int) -> None:
    from tests.synthetic import imbalanced_faces

    print(f"\n## 1. Real photos: lfw_subset, {REAL_TRAIN[0]}:{REAL_TRAIN[1]} training photos, "
          f"{REAL_HELD_OUT[0]} + {REAL_HELD_OUT[1]} held out (minority {REAL_HELD_OUT[1]}), {REAL_SETTINGS}")
    print("held-out macro-F1 with the stored threshold (unknown = miss); min cov = share of held-out minority "
          "photos accepted; reported = metrics['coverage_per_class'][minority]")
    header = (f"{'minority':<8} {'seed':>4} {'argmax F1':>9} | {'before thr':>10} {'F1':>6} {'min cov':>7} | "
              f"{'after thr':>9} {'F1':>6} {'min cov':>7} {'reported':>8} {'calib prec':>10}")
    for minority in ("face", "other"):
        print(header)
        rows = []
        for seed in range(seeds):
            train, held_out = imbalanced_faces(minority, REAL_TRAIN, REAL_HELD_OUT, seed)
            classes = sorted({label for _, label in train})
            result = scorer.train(train, **REAL_SETTINGS)
            probs = scorer.probabilities(result.artifact, [image for image, _ in held_out])
            targets = np.array([classes.index(label) for _, label in held_out])
            m = classes.index(minority)
            old = scorer.old_threshold(result, train, REAL_SETTINGS)
            before, after = (held_out_figures(probs, targets, t, m) for t in (old, result.metrics["threshold"]))
            argmax = macro_f1(probs.argmax(axis=1), targets, len(classes))
            rows.append((argmax, before["f1"], before["minority_coverage"], after["f1"], after["minority_coverage"]))
            print(f"{minority:<8} {seed:>4} {argmax:>9.3f} | {old:>10.3f} {before['f1']:>6.3f} "
                  f"{before['minority_coverage']:>7.2f} | {result.metrics['threshold']:>9.3f} {after['f1']:>6.3f} "
                  f"{after['minority_coverage']:>7.2f} {result.metrics['coverage_per_class'][minority]:>8.2f} "
                  f"{result.metrics['precision_at_threshold']:>10.3f}", flush=True)
        mean = np.mean(rows, axis=0)
        print(f"{minority:<8} {'mean':>4} {mean[0]:>9.3f} | {'':>10} {mean[1]:>6.3f} {mean[2]:>7.2f} | {'':>9} "
              f"{mean[3]:>6.3f} {mean[4]:>7.2f}   F1 >= 0.9: before {sum(r[1] >= 0.9 for r in rows)}/{seeds}, "
              f"after {sum(r[3] >= 0.9 for r in rows)}/{seeds}\n")


def balancing_table(scorer: Scorer) -> None:
    from tests.synthetic import make_samples

    print(f"## 2. Synthetic balancing: {IMBALANCED} at {SIZE} px, data seeds {BALANCE_SEEDS}, 60 + 60 held out "
          "(data seed + 100); means over the seeds")
    print(f"{'balance':<13} {'minority recall':>15} {'majority recall':>15} | {'before: min cov':>15} {'F1':>6} | "
          f"{'after: min cov':>14} {'F1':>6} {'reported':>8}")
    for balance in ("none", "undersample", "oversample", "class_weight"):
        rows = []
        for seed in BALANCE_SEEDS:
            samples = make_samples(IMBALANCED, seed=seed, size=SIZE)
            held_out = make_samples({"majority": 60, "minority": 60}, seed=seed + 100, size=SIZE)
            targets = np.array([0 if label == "majority" else 1 for _, label in held_out])
            settings: dict[str, Any] = {"balance": balance, "seed": 0}
            result = scorer.train(samples, **settings)
            probs = scorer.probabilities(result.artifact, [image for image, _ in held_out])
            predicted = probs.argmax(axis=1)
            old = scorer.old_threshold(result, samples, settings)
            before, after = (held_out_figures(probs, targets, t, 1) for t in (old, result.metrics["threshold"]))
            rows.append((np.mean(predicted[targets == 1] == 1), np.mean(predicted[targets == 0] == 0),
                         before["minority_coverage"], before["f1"], after["minority_coverage"], after["f1"],
                         result.metrics["coverage_per_class"]["minority"]))
        mean = np.mean(rows, axis=0)
        print(f"{balance:<13} {mean[0]:>15.2f} {mean[1]:>15.2f} | {mean[2]:>15.2f} {mean[3]:>6.3f} | "
              f"{mean[4]:>14.2f} {mean[5]:>6.3f} {mean[6]:>8.2f}", flush=True)


def calibration_table(scorer: Scorer) -> None:
    from services.classifier.training import TrainingConfig, stratified_split
    from tests.synthetic import make_samples

    settings: dict[str, Any] = {"val_fraction": 0.5, "target_precision": 0.95, "seed": 1}
    print(f"\n## 3. Synthetic threshold calibration: {CONFUSABLE} at {SIZE} px, {settings}, 150 held out (seed 100)")
    print(f"{'seed':>4} | {'before thr':>10} {'val prec':>8} {'val cov':>7} {'held prec':>9} {'held cov':>8} | "
          f"{'after thr':>9} {'oof prec':>8} {'oof cov':>7} {'held prec':>9} {'held cov':>8}")
    held_out = make_samples({label: 50 for label in CONFUSABLE}, seed=100, size=SIZE)
    targets = np.array([sorted(CONFUSABLE).index(label) for _, label in held_out])
    rows = []
    for seed in CALIBRATION_SEEDS:
        samples = make_samples(CONFUSABLE, seed=seed, size=SIZE)
        result = scorer.train(samples, **settings)
        probs = scorer.probabilities(result.artifact, [image for image, _ in held_out])
        # The previous method's own figures, on the validation split it calibrated on
        labels = [label for _, label in samples]
        split = stratified_split(labels, sorted(CONFUSABLE), TrainingConfig(**settings).val_fraction, 1)
        val = scorer.probabilities(result.artifact, [samples[i][0] for i in split.val])
        val_targets = np.array([sorted(CONFUSABLE).index(labels[i]) for i in split.val])
        old = scorer.old_threshold(result, samples, settings)
        val_figures = held_out_figures(val, val_targets, old, 0)
        before, after = (held_out_figures(probs, targets, t, 0) for t in (old, result.metrics["threshold"]))
        metrics = result.metrics
        rows.append((val_figures["precision"], val_figures["coverage"], before["precision"], before["coverage"],
                     metrics["precision_at_threshold"], metrics["coverage"], after["precision"], after["coverage"]))
        print(f"{seed:>4} | {old:>10.3f} {val_figures['precision']:>8.3f} {val_figures['coverage']:>7.2f} "
              f"{before['precision']:>9.3f} {before['coverage']:>8.2f} | {metrics['threshold']:>9.3f} "
              f"{metrics['precision_at_threshold']:>8.3f} {metrics['coverage']:>7.2f} {after['precision']:>9.3f} "
              f"{after['coverage']:>8.2f}", flush=True)
    mean = np.mean(rows, axis=0)
    print(f"{'mean':>4} | {'':>10} {mean[0]:>8.3f} {mean[1]:>7.2f} {mean[2]:>9.3f} {mean[3]:>8.2f} | {'':>9} "
          f"{mean[4]:>8.3f} {mean[5]:>7.2f} {mean[6]:>9.3f} {mean[7]:>8.2f}")
    print(f"held-out precision >= 0.95: before {sum(r[2] >= 0.95 for r in rows)}/{len(rows)}, "
          f"after {sum(r[6] >= 0.95 for r in rows)}/{len(rows)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    parser.add_argument("--seeds", type=int, default=10, help="real-photo data seeds per direction (default 10)")
    args = parser.parse_args()
    apply_device(parser, args.device)  # before anything reads the settings

    import torch

    from percept.config import get_settings
    from services.classifier.training import FeatureExtractor

    try:
        extractor = FeatureExtractor(cache_bytes=512 * 2**20)
        device = extractor.backbone.device.description
    except ValueError as exc:  # a GPU this machine does not have
        sys.exit(str(exc))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print(f"device: PERCEPT_DEVICE={get_settings().device} -> {device}")
    started = time.perf_counter()
    scorer = Scorer(extractor)
    real_photo_table(scorer, args.seeds)
    balancing_table(scorer)
    calibration_table(scorer)
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
