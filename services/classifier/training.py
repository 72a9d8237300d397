"""Train a custom classifier on labelled photos: transfer learning on the ImageNet EfficientNet-Lite0.

The backbone stays frozen (or, with `fine_tune`, all but its last MBConv block and 1x1 head convolution),
so each photo - and each augmented variant of a training photo - goes through it once; a linear softmax
head is then trained for many epochs on the cached activations, which takes seconds.

    result = train_classifier(samples, TrainingConfig(balance="class_weight", augment=True))
    result.artifact  # bytes for CustomClassifier(artifact, name, version)
    result.metrics   # per class and confusion matrix on the validation split; the calibrated threshold
    result.card      # what the model is and how it was trained

The worker runs `ClassifierTrainer` (the `train_classifier` job): the dataset zip decoded, then the above.
Training runs on PERCEPT_DEVICE's choice, in fp32 on every device (the few optimizer steps cost little,
and the same seed gives the same model up to the device's float arithmetic).

Validation split: stratified per class, `val_fraction` of each class's photos (at least one) held out,
and every class keeps at least one training photo. A class with fewer than 2 photos cannot spare one:
it gets no validation photos, has no recall or F1 (reported as None) and is listed in
`metrics["tiny_classes"]`. Metrics and early stopping use only the validation photos, never augmented and
never seen in training.

The unknown threshold is calibrated on out-of-fold predictions over every photo, not on the validation
split: a split of a small dataset holds a handful of photos (one of a 3-photo class), and a threshold
fitted to so few scores is as strict as the least confident of them, refusing much of what the model gets
right. Instead the photos are dealt into k stratified folds (k = round(1 / val_fraction), 2 to
MAX_CALIBRATION_FOLDS, so each fold's model trains on about as many photos as the served one), a model is
trained on all but each fold with the served model's recipe and epoch count (cheap: the backbone
activations are cached), and each photo is scored by the model that did not see it. The threshold is
then the least strict one at which those predictions reach `target_precision` (see
`calibrate_threshold`): 0 - nothing refused - when every prediction may be accepted. `metrics` reports it
with the precision and coverage it had on those predictions, overall and per class
(`coverage_per_class`, the share of each class's photos at or above the threshold).

Deterministic: the same photos, config and seed give the same artifact and metrics (augmentations are
drawn from the seed and each photo's content, and no global random state is used).
"""

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from torch import nn

from percept.datasets import iter_dataset
from percept.devices import Device
from percept.errors import PerceptError
from percept.imaging import decode_rgb
from percept.predictor import StepCallback, TrainingData, TrainingResult
from services.classifier.custom import (
    BACKBONE_LAYERS,
    BACKBONE_NAME,
    FEATURE_DIM,
    CustomClassifier,
    CustomModel,
    FrozenBackbone,
    frozen_backbone,
)
from services.classifier.predictor import RESIZE_SIZE, preprocess

CUSTOM_PREDICTOR = "services.classifier.custom:CustomClassifier"

Balance = Literal["none", "undersample", "oversample", "class_weight"]
BALANCE_MODES: tuple[str, ...] = ("none", "undersample", "oversample", "class_weight")
# fine_tune trains the last MBConv block (192 -> 320 channels, 7 x 7) and the 1x1 head convolution:
# about 1M of the backbone's 3.4M weights, where ImageNet-specific features live.
FINE_TUNE_FROM_LAYER = BACKBONE_LAYERS - 2
FINE_TUNE_LR_FACTOR = 0.1  # pretrained layers move ten times slower than the new head
HEAD_DROPOUT = 0.2  # as EfficientNet-Lite0's own classifier was trained
WEIGHT_DECAY = 1e-4
MIN_LOSS_IMPROVEMENT = 1e-4  # a smaller drop in validation loss does not reset the patience
# A few dozen photos make one or two batches: an epoch is then several passes, so that `epochs` buys
# enough optimizer steps (8 epochs of 33 photos: 16 steps, mean top score 0.81 -> 64 steps, 0.93).
MIN_BATCHES_PER_EPOCH = 8
FEATURE_BATCH = 32  # images per backbone forward pass
# Each calibration fold trains a model: more folds, more out-of-fold photos per model trained, and more
# training (k times the served model's, which matters only with fine_tune: heads take milliseconds).
MAX_CALIBRATION_FOLDS = 5
THRESHOLD_METHOD = "out-of-fold"
# Process-wide cache of backbone activations: retraining the same photos with other settings (balance,
# epochs, threshold target) skips the backbone. Pooled features are 5 KB per image or variant.
DEFAULT_FEATURE_CACHE_BYTES = 256 * 2**20
# Augmentation strengths: mild, so that a variant is still clearly a photo of its class.
MAX_ROTATION_DEGREES = 15.0
MIN_CROP_AREA = 0.7
MAX_CROP_ASPECT_CHANGE = 4 / 3
COLOUR_JITTER = 0.2  # brightness, contrast and saturation factors in [0.8, 1.2]; hue is left alone
MAX_NOISE_SIGMA = 8.0  # in 0..255 units


@dataclass(frozen=True)
class TrainingConfig:
    """How to train; `check_config()` says what is wrong with a bad value."""

    balance: Balance = "none"  # how to treat classes of very different sizes (see `balanced_indices`)
    augment: bool = False  # train on each photo plus `augment_copies` random variants of it
    augment_copies: int = 5  # "six photos from one": the original and five variants
    epochs: int = 30  # at most; early stopping usually ends sooner
    val_fraction: float = 0.2  # of each class's photos, held out for metrics, early stopping and threshold
    target_precision: float = 0.9  # the unknown threshold is the least strict reaching this out of fold
    seed: int = 0
    fine_tune: bool = False  # also train the backbone's last MBConv block and head convolution (slower)
    batch_size: int = 32
    learning_rate: float = 3e-3  # Adam, for the head (fine-tuned layers get a tenth)
    patience: int = 5  # stop after this many epochs without a lower validation loss

    def check_config(self) -> None:
        """Raise ValueError, naming the field and the accepted values, when a setting is unusable."""
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"balance must be one of {', '.join(BALANCE_MODES)}; got {self.balance!r}")
        for name, low, high in (("augment_copies", 1, 20), ("epochs", 1, 500), ("batch_size", 1, 4096),
                                ("patience", 1, 500), ("seed", 0, 2**63 - 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high}; got {value!r}")
        for name in ("augment", "fine_tune"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false; got {getattr(self, name)!r}")
        if not is_number(self.val_fraction) or not 0 < self.val_fraction < 0.9:
            raise ValueError(f"val_fraction must be above 0 and below 0.9 (0.2 holds out a fifth of each "
                             f"class for validation); got {self.val_fraction!r}")
        if not is_number(self.target_precision) or not 0 < self.target_precision <= 1:
            raise ValueError(f"target_precision must be above 0 and at most 1; got {self.target_precision!r}")
        if not is_number(self.learning_rate) or not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be above 0 and at most 1 (try 0.003); got {self.learning_rate!r}")


@dataclass
class Split:
    """Indices into the samples: stratified, every class keeps a training photo."""

    train: list[int]
    val: list[int]
    tiny_classes: list[str] = field(default_factory=list)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def stratified_split(labels: list[str], classes: list[str], val_fraction: float, seed: int) -> Split:
    """Hold out round(n * val_fraction) photos of each class, at least 1 and at most n - 1.

    A class with fewer than 2 photos gets no validation photos and is reported as tiny.
    """
    rng = np.random.default_rng([seed, 1])
    split = Split([], [])
    for label in classes:
        members = [i for i, x in enumerate(labels) if x == label]
        members = [members[i] for i in rng.permutation(len(members))]
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
        if len(members) < 2:
            n_val = 0
            split.tiny_classes.append(label)
        split.val.extend(members[:n_val])
        split.train.extend(members[n_val:])
    split.train.sort()
    split.val.sort()
    return split


def calibration_folds(val_fraction: float) -> int:
    """k for out-of-fold calibration: each fold's model trains on (k - 1) / k of the photos, about the
    1 - val_fraction the served model trains on."""
    return min(MAX_CALIBRATION_FOLDS, max(2, round(1 / val_fraction)))


def stratified_folds(labels: list[str], classes: list[str], k: int, seed: int) -> list[list[int]]:
    """Each class's photos, shuffled, dealt round the k folds (classes continue where the last one stopped,
    so the folds differ in size by at most one photo). A class with fewer than 2 photos is in no fold: it
    could not be predicted without its only photo, so it trains in every fold and is never scored."""
    rng = np.random.default_rng([seed, 3])
    folds: list[list[int]] = [[] for _ in range(k)]
    dealt = 0
    for label in classes:
        members = [i for i, x in enumerate(labels) if x == label]
        if len(members) < 2:
            continue
        for i in rng.permutation(len(members)):
            folds[dealt % k].append(members[i])
            dealt += 1
    return [sorted(fold) for fold in folds if fold]


def image_digest(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode} {image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def augment_image(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One random variant: flip, small rotation, crop, brightness/contrast/saturation jitter, pixel noise."""
    image = image.convert("RGB")
    # Large photos are shrunk first: preprocessing resizes to RESIZE_SIZE anyway, so nothing is lost.
    factor = min(image.size) // (2 * RESIZE_SIZE)
    if factor >= 2:
        image = image.reduce(factor)
    width, height = image.size
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    fill = tuple(int(c) for c in np.asarray(image).reshape(-1, 3).mean(axis=0))
    image = image.rotate(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES),
                         resample=Image.Resampling.BILINEAR, fillcolor=fill)
    area = rng.uniform(MIN_CROP_AREA, 1.0) * width * height
    aspect = np.exp(rng.uniform(-np.log(MAX_CROP_ASPECT_CHANGE), np.log(MAX_CROP_ASPECT_CHANGE)))
    crop_w = min(width, max(1, round(np.sqrt(area * aspect))))
    crop_h = min(height, max(1, round(np.sqrt(area / aspect))))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    image = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.BILINEAR)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(1 - COLOUR_JITTER, 1 + COLOUR_JITTER))
    pixels: np.ndarray = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0, rng.uniform(0, MAX_NOISE_SIGMA), size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


class FeatureExtractor:
    """Backbone activations of photos and of their augmented variants, with an optional LRU cache.

    Variant 0 is the photo itself; variant k >= 1 is `augment_image` with a generator seeded by
    (seed, the photo's content, k), so it does not depend on the photo's position in the dataset.
    The backbone runs on its device (by default PERCEPT_DEVICE's choice); activations come back, and are
    cached, on the CPU: host memory is the cheaper place for a cache, and training moves them once.
    """

    def __init__(self, backbone: FrozenBackbone | None = None, cache_bytes: int = 0, *, device: Device | None = None):
        self._backbone = backbone
        self._device = device
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    @property
    def backbone(self) -> FrozenBackbone:
        if self._backbone is None:
            self._backbone = frozen_backbone(self._device)
        return self._backbone

    def activations(self, images: list[Image.Image], variants: list[int], *, seed: int, stop: int,
                    on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Activations after backbone layers [0, stop) of each (image, variant) pair, stacked, on the CPU."""
        digests = {id(image): image_digest(image) for image in images}
        keys = [(digests[id(image)], variant, seed if variant else None, stop)
                for image, variant in zip(images, variants, strict=True)]
        found: dict[tuple, torch.Tensor] = {}
        with self._lock:
            for key in keys:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    found[key] = self._cache[key]
        missing = list(dict.fromkeys(key for key in keys if key not in found))
        image_of = {key: image for key, image in zip(keys, images, strict=True)}
        for start in range(0, len(missing), FEATURE_BATCH):
            chunk = missing[start:start + FEATURE_BATCH]
            pixels = np.stack([preprocess(variant_image(image_of[key], key, seed)) for key in chunk])
            output = self.backbone.activations(torch.from_numpy(pixels), stop).cpu()
            for key, row in zip(chunk, output, strict=True):
                found[key] = row.clone()  # not a view: the batch tensor can be freed
            self._remember({key: found[key] for key in chunk})
            if on_batch is not None:
                on_batch(min(start + FEATURE_BATCH, len(missing)), len(missing))
        return torch.stack([found[key] for key in keys])

    def _remember(self, items: dict[tuple, torch.Tensor]) -> None:
        if not self.cache_bytes:
            return
        with self._lock:
            for key, tensor in items.items():
                if key not in self._cache:
                    self._cache[key] = tensor
                    self._cached_bytes += tensor.numel() * tensor.element_size()
            while self._cached_bytes > self.cache_bytes and self._cache:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.numel() * evicted.element_size()


def variant_image(image: Image.Image, key: tuple, seed: int) -> Image.Image:
    digest, variant = key[0], key[1]
    if variant == 0:
        return image
    return augment_image(image, np.random.default_rng([seed, int(digest[:16], 16), variant]))


_default_extractor: FeatureExtractor | None = None
_default_extractor_lock = threading.Lock()


def default_extractor() -> FeatureExtractor:
    """The process-wide extractor (shared backbone, DEFAULT_FEATURE_CACHE_BYTES of cache)."""
    global _default_extractor
    with _default_extractor_lock:
        if _default_extractor is None:
            _default_extractor = FeatureExtractor(cache_bytes=DEFAULT_FEATURE_CACHE_BYTES)
        return _default_extractor


def balanced_indices(targets: np.ndarray, num_classes: int, balance: str, rng: np.random.Generator) -> np.ndarray:
    """One pass over the training examples, shuffled.

    "undersample": every class drawn down (without replacement) to the smallest class's size, afresh each
    pass, so over the epochs the large classes' photos are all used. "oversample": every class drawn up
    (with replacement) to the largest class's size. "none" and "class_weight": every example once
    (class_weight reweights the loss instead).
    """
    by_class = [np.flatnonzero(targets == c) for c in range(num_classes)]
    by_class = [members for members in by_class if len(members)]
    if balance == "undersample":
        size = min(len(members) for members in by_class)
        chosen = [rng.choice(members, size, replace=False) for members in by_class]
    elif balance == "oversample":
        size = max(len(members) for members in by_class)
        chosen = [np.concatenate([members, rng.choice(members, size - len(members), replace=True)])
                  for members in by_class]
    else:
        chosen = by_class
    indices = np.concatenate(chosen)
    return indices[rng.permutation(len(indices))]


def initial_bias(targets: np.ndarray, num_classes: int, balance: str) -> torch.Tensor:
    """Log class frequencies under `balance`: the best logits before looking at any photo."""
    if balance != "none":
        return torch.zeros(num_classes)
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    return torch.tensor(np.log(np.maximum(counts, 1) / counts.sum()), dtype=torch.float32)


def epoch_order(targets: np.ndarray, num_classes: int, config: TrainingConfig, rng: np.random.Generator
                ) -> torch.Tensor:
    """One epoch's examples: a balanced pass, repeated (drawn afresh) up to MIN_BATCHES_PER_EPOCH batches."""
    passes = [balanced_indices(targets, num_classes, config.balance, rng)]
    while sum(map(len, passes)) < MIN_BATCHES_PER_EPOCH * config.batch_size:
        passes.append(balanced_indices(targets, num_classes, config.balance, rng))
    return torch.from_numpy(np.concatenate(passes))


def class_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """n / (classes * n_c): each class contributes equally to the loss ("balanced" weights)."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def validation_loss(logits: torch.Tensor, targets: torch.Tensor, balanced: bool) -> float:
    """Cross-entropy on the validation photos; with balancing on, the mean of each class's mean loss,
    so early stopping watches the same thing the balanced training optimises."""
    losses = F.cross_entropy(logits, targets, reduction="none")
    if not balanced:
        return float(losses.mean())
    per_class = [losses[targets == c].mean() for c in targets.unique()]
    return float(torch.stack(per_class).mean())


def classification_metrics(targets: np.ndarray, predicted: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Per-class precision/recall/F1/support, macro F1 (over classes with validation photos), accuracy and
    the confusion matrix (rows = true class, columns = predicted class)."""
    n = len(labels)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (targets, predicted), 1)
    per_class: dict[str, dict[str, Any]] = {}
    f1s = []
    for c, label in enumerate(labels):
        support, predicted_c, correct = int(matrix[c].sum()), int(matrix[:, c].sum()), int(matrix[c, c])
        precision = correct / predicted_c if predicted_c else 0.0
        recall: float | None
        f1: float | None
        if support:
            recall = correct / support
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            f1s.append(f1)
        else:
            recall = f1 = None  # a tiny class: nothing to measure recall on
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return {
        "per_class": per_class,
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "accuracy": float(np.mean(targets == predicted)) if len(targets) else 0.0,
        "confusion_matrix": {"labels": list(labels), "matrix": matrix.tolist()},
    }


def calibrate_threshold(scores: np.ndarray, correct: np.ndarray, target_precision: float) -> dict[str, Any]:
    """The least strict threshold t on the top-1 score such that the predictions with score >= t are
    right at least `target_precision` of the time.

    A threshold is only as strict as the evidence requires: when accepting every prediction reaches the
    target, t is 0 (nothing is refused, however confident the least confident prediction was). Otherwise
    every t above the most confident refused score and up to the least confident accepted one accepts the
    same predictions, and t is the midpoint of the two, as far from either score as the evidence allows.

    When no t reaches the target, the cut with the best precision (the most accepting such) is used and
    "threshold_reached" is False.
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_correct = scores[order], correct[order].astype(np.float64)
    accepted = np.arange(1, len(scores) + 1)
    precision = np.cumsum(sorted_correct) / accepted
    # Only the last of equal scores is a real cut: a threshold accepts all of them or none.
    is_cut = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    candidates = np.flatnonzero(is_cut)
    reaching = candidates[precision[candidates] >= target_precision - 1e-12]
    reached = len(reaching) > 0
    if reached:
        cut = reaching[-1]  # the most accepted = the lowest threshold
    else:
        best = precision[candidates].max()
        cut = candidates[precision[candidates] >= best - 1e-12][-1]
    threshold = 0.0 if cut == len(scores) - 1 else (sorted_scores[cut] + sorted_scores[cut + 1]) / 2
    return {
        "threshold": float(threshold),
        "threshold_reached": bool(reached),
        "precision_at_threshold": float(precision[cut]),
        "coverage": float(accepted[cut] / len(scores)),
    }


def coverage_by_class(scores: np.ndarray, targets: np.ndarray, threshold: float, labels: list[str]
                      ) -> dict[str, float | None]:
    """The share of each class's photos whose top-1 score is at or above the threshold (None: no photos)."""
    return {label: float(np.mean(scores[targets == c] >= threshold)) if np.any(targets == c) else None
            for c, label in enumerate(labels)}


def train_classifier(samples: list[tuple[Image.Image, str]], config: TrainingConfig,
                     on_epoch: Callable[[int, int, dict], None] | None = None, *,
                     on_features: Callable[[int, int], None] | None = None,
                     on_calibration: Callable[[int, int], None] | None = None,
                     extractor: FeatureExtractor | None = None) -> TrainingResult:
    """Train a classifier on (photo, class name) pairs; see the module docstring.

    on_epoch(epoch, total_epochs, {"loss", "accuracy", "val_loss", "val_accuracy"}) is called after every
    epoch of the served model, on_features(done, total) after every batch of backbone passes and
    on_calibration(done, total) after every calibration fold's model; an exception raised by any of them
    (e.g. JobCanceled) propagates and ends training. `extractor` defaults to the process-wide one.
    """
    # 1. Check inputs
    config.check_config()
    classes = sorted({label for _, label in samples})
    if len(classes) < 2:
        raise ValueError(f"a classifier needs at least 2 classes (one folder of photos per class); got "
                         f"{len(classes)}: {classes}")
    labels = [label for _, label in samples]
    split = stratified_split(labels, classes, config.val_fraction, config.seed)
    if not split.val:
        raise ValueError("no class has the 2 photos needed to hold one out for validation; add photos so "
                         "that metrics and the unknown threshold can be measured")
    extractor = extractor or default_extractor()
    backbone = extractor.backbone
    device = backbone.device.name
    index_of = {label: c for c, label in enumerate(classes)}
    targets_of = np.array([index_of[label] for label in labels])

    # 2. Backbone activations, once per photo and augmented variant. The served model trains on the
    # training photos' variants and validates on the validation photos; the calibration folds train on
    # every photo's variants (a validation photo is a training photo in other folds), so those come last.
    stop = FINE_TUNE_FROM_LAYER if config.fine_tune else BACKBONE_LAYERS
    variants = list(range(1 + config.augment_copies)) if config.augment else [0]
    train_items = [(i, v) for i in split.train for v in variants]
    items = train_items + [(i, 0) for i in split.val] + [(i, v) for i in split.val for v in variants[1:]]
    activations = extractor.activations([samples[i][0] for i, _ in items], [v for _, v in items],
                                        seed=config.seed, stop=stop, on_batch=on_features).to(device)
    row_of = {item: row for row, item in enumerate(items)}

    def rows(wanted: list[tuple[int, int]]) -> torch.Tensor:
        return torch.tensor([row_of[item] for item in wanted], device=device)

    x_train, x_val = activations[:len(train_items)], activations[rows([(i, 0) for i in split.val])]
    train_targets = targets_of[[i for i, _ in train_items]]
    y_val = torch.from_numpy(targets_of[split.val]).to(device)

    # 3. The served model, with early stopping on validation loss (the best epoch's weights are kept)
    model = new_model(classes, backbone, stop, train_targets, config)
    history, best_epoch = fit_model(model, x_train, train_targets, config, config.epochs, validation=(x_val, y_val),
                                    rng=np.random.default_rng([config.seed, 2]),
                                    generator=torch.Generator().manual_seed(config.seed), on_epoch=on_epoch)

    # 4. Validation metrics
    with torch.no_grad():
        probabilities = model.logits(x_val, stop).softmax(dim=1).cpu().numpy()
    val_targets = y_val.cpu().numpy()

    # 5. The unknown threshold, from out-of-fold predictions: each photo scored by a model trained as the
    # served one was (for its best epoch count) on the other folds' photos and variants
    folds = stratified_folds(labels, classes, calibration_folds(config.val_fraction), config.seed)
    scored: list[int] = []
    fold_probabilities = []
    for f, fold in enumerate(folds):
        held_out = set(fold)
        fold_items = [(i, v) for i in range(len(samples)) if i not in held_out for v in variants]
        fold_targets = targets_of[[i for i, _ in fold_items]]
        fold_model = new_model(classes, backbone, stop, fold_targets, config)
        fold_rng = np.random.default_rng([config.seed, 2, f + 1])
        fit_model(fold_model, activations[rows(fold_items)], fold_targets, config, best_epoch, rng=fold_rng,
                  generator=torch.Generator().manual_seed(int(fold_rng.integers(2**62))))
        with torch.no_grad():
            fold_probabilities.append(fold_model.logits(activations[rows([(i, 0) for i in fold])], stop)
                                      .softmax(dim=1).cpu().numpy())
        scored.extend(fold)
        if on_calibration is not None:
            on_calibration(f + 1, len(folds))
    out_of_fold = np.concatenate(fold_probabilities)
    oof_targets, oof_scores = targets_of[scored], out_of_fold.max(axis=1)
    calibration = calibrate_threshold(oof_scores, out_of_fold.argmax(axis=1) == oof_targets, config.target_precision)
    model.threshold = calibration["threshold"]
    metrics = {
        **classification_metrics(val_targets, probabilities.argmax(axis=1), classes),
        **calibration,
        "coverage_per_class": coverage_by_class(oof_scores, oof_targets, calibration["threshold"], classes),
        "threshold_method": THRESHOLD_METHOD,
        "calibration_folds": len(folds),
        "calibration_size": len(scored),
        "target_precision": config.target_precision,
        "val_size": len(split.val),
        "train_size": len(train_items),
        "train_images": len(split.train),
        "tiny_classes": split.tiny_classes,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "history": history,
    }
    counts = {label: labels.count(label) for label in classes}
    card = {
        "model_type": "custom-classifier",
        "head": "linear softmax on pooled backbone features",
        "backbone": BACKBONE_NAME,
        "backbone_weights": "ImageNet",
        "backbone_weights_sha256": backbone.weights_sha256,
        "fine_tuned_layers": "last MBConv block and head convolution" if config.fine_tune else None,
        "feature_dim": FEATURE_DIM,
        "labels": classes,
        "class_counts": counts,
        "config": asdict(config),
        "device": backbone.device.description,
    }
    return TrainingResult(metrics=metrics, card=card, artifact=model.to_artifact(), predictor=CUSTOM_PREDICTOR,
                          model_kind="classify", device=backbone.device.description)


def new_model(classes: list[str], backbone: FrozenBackbone, stop: int, train_targets: np.ndarray,
              config: TrainingConfig) -> CustomModel:
    """An untrained model: shared frozen layers, copies of the tuned ones, a linear head on the pooled
    features. (Standardising the features per dimension was tried: it generalises worse from a few photos.)"""
    device = backbone.device.name
    model = CustomModel(classes, backbone, stop, nn.Linear(FEATURE_DIM, len(classes), device=device), 0.0,
                        config.target_precision)
    with torch.no_grad():
        model.head.weight.zero_()  # the softmax regression is convex: a fixed start, no random init
        # Start from the class frequencies training will see (uniform when balancing), so the first
        # epochs learn what tells the classes apart rather than how common each is.
        model.head.bias.copy_(initial_bias(train_targets, len(classes), config.balance))
    return model


def fit_model(model: CustomModel, x_train: torch.Tensor, train_targets: np.ndarray, config: TrainingConfig,
              epochs: int, *, rng: np.random.Generator, generator: torch.Generator,
              validation: tuple[torch.Tensor, torch.Tensor] | None = None,
              on_epoch: Callable[[int, int, dict], None] | None = None) -> tuple[list[dict[str, float]], int]:
    """Train `model` on activations for up to `epochs` epochs; returns (history, best epoch).

    With `validation` (activations, targets), early stopping on validation loss: the best epoch's weights
    are kept. Without, exactly `epochs` epochs. The order and the dropout masks are drawn on the CPU (from
    `rng` and `generator`), so they are the same on every device. The model is left in eval mode, frozen.
    """
    device = x_train.device
    num_classes = len(model.labels)
    stop = model.tuned_from_layer
    y_train = torch.from_numpy(train_targets).to(device)
    model.requires_grad_(True)
    parameters = [{"params": model.head.parameters(), "lr": config.learning_rate}]
    if config.fine_tune:
        parameters.append({"params": model.tuned.parameters(), "lr": config.learning_rate * FINE_TUNE_LR_FACTOR})
    optimizer = torch.optim.AdamW(parameters, weight_decay=WEIGHT_DECAY)
    loss_weights = class_weights(train_targets, num_classes).to(device) if config.balance == "class_weight" else None

    def logits_of(x: torch.Tensor, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
        features = model.features(x, stop)
        if dropout_mask is not None:
            features = features * dropout_mask
        return model.head(features)

    history: list[dict[str, float]] = []
    best_loss, best_epoch = float("inf"), 0
    best_state = snapshot(model) if validation is not None else {}
    for epoch in range(1, epochs + 1):
        model.train()
        order = epoch_order(train_targets, num_classes, config, rng).to(device)
        total_loss = correct = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            keep = (torch.rand((len(batch), FEATURE_DIM), generator=generator) >= HEAD_DROPOUT).float().to(device)
            logits = logits_of(x_train[batch], keep / (1 - HEAD_DROPOUT))
            loss = F.cross_entropy(logits, y_train[batch], weight=loss_weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(batch)
            correct += float((logits.argmax(dim=1) == y_train[batch]).sum())
        epoch_metrics = {"loss": total_loss / len(order), "accuracy": correct / len(order)}
        if validation is not None:
            x_val, y_val = validation
            model.eval()
            with torch.no_grad():
                val_logits = logits_of(x_val)
            val_loss = validation_loss(val_logits, y_val, balanced=config.balance != "none")
            epoch_metrics |= {"val_loss": val_loss,
                              "val_accuracy": float((val_logits.argmax(dim=1) == y_val).float().mean())}
        history.append({"epoch": epoch, **epoch_metrics})
        if on_epoch is not None:
            on_epoch(epoch, epochs, epoch_metrics)
        if validation is None:
            best_epoch = epoch
        elif epoch_metrics["val_loss"] < best_loss - MIN_LOSS_IMPROVEMENT:
            best_loss, best_epoch, best_state = epoch_metrics["val_loss"], epoch, snapshot(model)
        elif epoch - best_epoch >= config.patience:
            break
    if validation is not None:
        model.load_state_dict(best_state)
    model.eval().requires_grad_(False)
    return history, best_epoch


def snapshot(model: CustomModel) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


TRAINING_PARAMS = frozenset(f.name for f in fields(TrainingConfig))


def train_from_params(samples: list[tuple[Image.Image, str]], params: dict[str, Any],
                      on_step: Callable[[int, int, dict], None] | None = None) -> TrainingResult:
    """A training job's params (other keys, e.g. the dataset and model name, are the job's, not the
    training's) -> `train_classifier`.

    `on_step(done, total, info)` hears the three phases: backbone passes ({"phase": "features"}), the
    served model's epochs ({"phase": "training", "loss", ...}) and the threshold's calibration folds
    ({"phase": "calibration"}); raising from it (a cancel) stops the training there.
    """
    config = TrainingConfig(**{key: value for key, value in params.items() if key in TRAINING_PARAMS})
    if on_step is None:
        return train_classifier(samples, config)
    return train_classifier(
        samples, config,
        on_epoch=lambda epoch, total, info: on_step(epoch, total, {"phase": "training", **info}),
        on_features=lambda done, total: on_step(done, total, {"phase": "features"}),
        on_calibration=lambda done, total: on_step(done, total, {"phase": "calibration"}))


class ClassifierTrainer:
    """The `train_classifier` job: a dataset zip (one folder of photos per class) -> a custom classifier
    served by `CustomClassifier`. Files that do not decode are skipped and counted in the output (the
    dataset's analysis already listed them)."""

    def train(self, data: TrainingData, params: dict[str, Any], on_step: StepCallback) -> TrainingResult:
        # 1. Decode the photos as the trained model will see them when served (no train/serve skew)
        if data.archive is None:
            raise ValueError("training a classifier needs a dataset")
        samples, skipped = [], 0
        for entry in iter_dataset(data.archive, data.limits):
            try:
                image = decode_rgb(entry.data, data.limits.max_image_pixels, at_least=CustomClassifier.input_size)
            except PerceptError:
                skipped += 1
                continue
            samples.append((image, entry.label))

        # 2. Train, reporting backbone passes, epochs and calibration folds; a cancel raised by on_step
        # stops it there
        result = train_from_params(samples, params, on_step)
        result.output = {"dataset": {"id": data.dataset.get("id"), "images": len(samples), "skipped_files": skipped}}
        return result
