"""Faces with dlib: detection (HOG or CNN), landmarks, aligned chips, 128-d embeddings and sharpness.

The weights come from the `face_recognition_models` package (located with importlib, never through
its own helper, which imports `pkg_resources`); dlib itself is the prebuilt `dlib-bin` wheel.

    analyzer = FaceAnalyzer()
    faces = analyzer.analyze(image, detector="hog", landmarks=5)   # largest face first
    face_distance(faces[0].embedding, other.embedding) < 0.6        # same person (dlib's tolerance)
"""

import importlib.util
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import dlib
import numpy as np
from PIL import Image, ImageOps

Detector = Literal["hog", "cnn"]
DETECTORS: tuple[Detector, ...] = ("hog", "cnn")
LANDMARK_COUNTS = (5, 68)

MODELS_PACKAGE = "face_recognition_models"
RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"
CNN_FILE = "mmod_human_face_detector.dat"
LANDMARK_FILES = {5: "shape_predictor_5_face_landmarks.dat", 68: "shape_predictor_68_face_landmarks.dat"}

EMBEDDING_SIZE = 128
# The ResNet was trained on 150 px chips aligned by the 5-point model with dlib's default padding.
CHIP_SIZE = 150
CHIP_PADDING = 0.25

# Detection runs on a copy whose longer side is at most this (boxes are scaled back): a 12 MP phone photo
# would otherwise take seconds with HOG and minutes with the CNN, and faces stay >= 40 px at this scale.
DETECT_MAX_SIDE = 1024
# dlib's detectors look for faces of about 80 px; one upsampling finds them down to about 40 px.
# HOG is cheap (0.03 s -> 0.13 s on a 512 px image), so it always upsamples once.
HOG_UPSAMPLE = 1
# The CNN costs 2.7 s on a 512 px image without upsampling and 10.4 s with it (2 CPU cores): only small
# images, where an 80 px minimum would miss ordinary faces, are upsampled.
CNN_UPSAMPLE_BELOW_SIDE = 400

# HOG scores (SVM margins) on skimage's samples: the astronaut's face 1.16, her mission patch 0.12 (a
# false positive dlib's own threshold of 0 lets through), the patch in flipped or rescaled copies <= 0.14;
# on lfw_subset's tight 25 px face crops upscaled, the median face scores 0.9 and 84% score above 0.3.
MIN_HOG_SCORE = 0.3
# mmod confidences: real faces 1.06 (astronaut), 1.12 (cameraman's profile), 0.10-1.08 on 20 upscaled
# lfw_subset crops; none of 20 lfw non-faces nor skimage's other photos (coffee, chelsea, rocket, retina,
# ...) gave any detection. The CNN does not need HOG's margin: dlib's trained threshold of 0 stays, and a
# higher bar would only drop true faces. Its false positives are left to the size filter.
MIN_CNN_CONFIDENCE = 0.0
# A face whose shorter side is under 2% of the image's shorter side is too small to align or embed even
# in a crowd photo, and such specks are where texture false positives live (a 60 px face on 3000 px).
MIN_FACE_FRACTION = 0.02


@dataclass
class Face:
    """One detected face. Coordinates are pixels of the input image; `chip` is left out of `to_dict()`."""

    box: list[int]  # [x, y, w, h], clipped to the image
    score: float  # the detector's score: HOG SVM margin or mmod confidence (not a probability)
    landmarks: list[list[int]]  # 5 or 68 [x, y] points in dlib's order
    embedding: list[float] | None  # 128 floats (dlib ResNet), None when not asked for
    sharpness: float  # variance of the Laplacian of the grayscale aligned chip; higher is sharper
    chip: Image.Image = field(repr=False, compare=False)  # aligned 150 px RGB chip

    @property
    def area(self) -> int:
        return self.box[2] * self.box[3]

    @property
    def min_side(self) -> int:
        return min(self.box[2], self.box[3])

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": list(self.box),
            "score": self.score,
            "landmarks": [list(p) for p in self.landmarks],
            "embedding": None if self.embedding is None else list(self.embedding),
            "sharpness": self.sharpness,
        }


@dataclass(frozen=True)
class Detection:
    rect: dlib.rectangle  # in input-image pixels, unclipped (landmarks fit better on the full box)
    score: float


class FaceAnalyzer:
    """dlib's face models behind one lazily loaded, thread-safe object (see the module docstring)."""

    def __init__(self, models_dir: Path | None = None):
        self.models_dir = models_dir
        self._load_lock = threading.Lock()
        # dlib's detectors, shape predictors and DNNs keep per-call state in the object: one call at a time.
        self._net_lock = threading.Lock()
        self._hog: Any = None
        self._cnn: Any = None
        self._shape_predictors: dict[int, Any] = {}
        self._resnet: Any = None

    # -- loading ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Load the HOG detector, the 5-point landmarks and the ResNet (idempotent); the CNN and the
        68-point model load on first use."""
        with self._load_lock:
            if self._resnet is None:
                self.models_dir = self.models_dir or packaged_models_dir()
                self._hog = dlib.get_frontal_face_detector()
                self._shape_predictors[5] = dlib.shape_predictor(str(self.models_dir / LANDMARK_FILES[5]))
                self._resnet = dlib.face_recognition_model_v1(str(self.models_dir / RESNET_FILE))

    @property
    def resnet_path(self) -> Path:
        return (self.models_dir or packaged_models_dir()) / RESNET_FILE

    def _cnn_detector(self) -> Any:
        with self._load_lock:
            if self._cnn is None:
                assert self.models_dir is not None  # set by setup()
                self._cnn = dlib.cnn_face_detection_model_v1(str(self.models_dir / CNN_FILE))
            return self._cnn

    def _shape_predictor(self, points: int) -> Any:
        with self._load_lock:
            if points not in self._shape_predictors:
                assert self.models_dir is not None  # set by setup()
                self._shape_predictors[points] = dlib.shape_predictor(str(self.models_dir / LANDMARK_FILES[points]))
            return self._shape_predictors[points]

    # -- detection -------------------------------------------------------------------------------------

    def detect(self, image: Image.Image | np.ndarray, detector: Detector = "hog") -> list[Detection]:
        """Faces above the score and size thresholds, largest first."""
        if detector not in DETECTORS:
            raise ValueError(f"detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
        self.setup()
        pixels = image if isinstance(image, np.ndarray) else to_rgb_array(image)
        height, width = pixels.shape[:2]

        # 1. Detect on a copy no larger than DETECT_MAX_SIDE
        scale = min(1.0, DETECT_MAX_SIDE / max(width, height))
        small = pixels if scale == 1.0 else cv2.resize(
            pixels, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA
        )
        if detector == "hog":
            with self._net_lock:  # dlib's HOG scanner keeps scratch buffers: one caller at a time
                rects, scores, _ = self._hog.run(small, HOG_UPSAMPLE, MIN_HOG_SCORE)
            found = list(zip(rects, scores, strict=True))
        else:
            upsample = 1 if min(small.shape[:2]) < CNN_UPSAMPLE_BELOW_SIDE else 0
            cnn = self._cnn_detector()
            with self._net_lock:
                found = [(d.rect, d.confidence) for d in cnn(small, upsample)]
            found = [(rect, score) for rect, score in found if score >= MIN_CNN_CONFIDENCE]

        # 2. Scale back, drop specks, sort by clipped area
        detections = []
        for rect, score in found:
            full = dlib.rectangle(
                round(rect.left() / scale), round(rect.top() / scale),
                round(rect.right() / scale), round(rect.bottom() / scale),
            )
            box = clip_box(full, width, height)
            if min(box[2], box[3]) >= MIN_FACE_FRACTION * min(width, height):
                detections.append((box[2] * box[3], Detection(full, float(score))))
        detections.sort(key=lambda pair: -pair[0])
        return [detection for _, detection in detections]

    # -- the whole pipeline ----------------------------------------------------------------------------

    def analyze(self, image: Image.Image, *, detector: Detector = "hog", landmarks: int = 5,
                embeddings: bool = True) -> list[Face]:
        """Detect every face and describe it (landmarks, aligned chip, sharpness, embedding); largest first."""
        if landmarks not in LANDMARK_COUNTS:
            raise ValueError(f"landmarks must be 5 or 68, got {landmarks!r}")
        pixels = to_rgb_array(image)
        height, width = pixels.shape[:2]

        # 1. Detect
        detections = self.detect(pixels, detector)
        if not detections:
            return []

        # 2. Align: chips always from the 5-point model (what the ResNet was trained on), so embeddings and
        #    sharpness do not depend on which landmarks the caller asked for
        five = self._shape_predictor(5)
        with self._net_lock:
            shapes = [five(pixels, d.rect) for d in detections]
            chips = [dlib.get_face_chip(pixels, shape, size=CHIP_SIZE, padding=CHIP_PADDING) for shape in shapes]
        if landmarks == 5:
            points = [shape_points(shape) for shape in shapes]
        else:
            sixty_eight = self._shape_predictor(68)
            with self._net_lock:
                points = [shape_points(sixty_eight(pixels, d.rect)) for d in detections]

        # 3. Embed all chips in one batch
        vectors: list[list[float] | None] = [None] * len(chips)
        if embeddings:
            vectors = list(self.embed(chips))

        return [
            Face(
                box=clip_box(d.rect, width, height),
                score=d.score,
                landmarks=p,
                embedding=vector,
                sharpness=sharpness(chip),
                chip=Image.fromarray(chip),
            )
            for d, p, chip, vector in zip(detections, points, chips, vectors, strict=True)
        ]


    def embed(self, chips: list[Image.Image] | list[np.ndarray]) -> list[list[float]]:
        """128-d ResNet embeddings of aligned 150 px chips (`Face.chip`), in one batch."""
        if not chips:
            return []
        self.setup()
        arrays = [np.ascontiguousarray(np.asarray(chip, dtype=np.uint8)) for chip in chips]
        with self._net_lock:
            descriptors = self._resnet.compute_face_descriptor(arrays)
        return [[float(v) for v in descriptor] for descriptor in descriptors]


def face_distance(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> float:
    """Euclidean distance between two embeddings; dlib's models put the same person under 0.6."""
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))


def sharpness(chip: np.ndarray) -> float:
    """Variance of the Laplacian of the grayscale chip: edges make it large, blur (or upscaling) small."""
    gray = cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB whatever the input: EXIF orientation applied, transparency flattened onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_rgb_array(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(to_rgb(image), dtype=np.uint8))


def clip_box(rect: dlib.rectangle, width: int, height: int) -> list[int]:
    """[x, y, w, h] of a dlib rectangle (inclusive corners) clipped to the image."""
    left, top = max(0, rect.left()), max(0, rect.top())
    right, bottom = min(width, rect.right() + 1), min(height, rect.bottom() + 1)
    return [left, top, max(0, right - left), max(0, bottom - top)]


def shape_points(shape: Any) -> list[list[int]]:
    return [[point.x, point.y] for point in shape.parts()]


def packaged_models_dir() -> Path:
    """The `models/` directory inside the installed face_recognition_models package."""
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{MODELS_PACKAGE} is not installed (see services/facerec/requirements.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"
