"""The face service's predictors: detect, enroll (embed one face), verify, identify, and memes.

Every predictor takes one `PredictRequest` per job whose images are decoded PIL images (any mode: they
are made upright RGB here) and returns one JSON-able dict per request. A `ValueError` whose message
starts with "[code] " becomes that job error code in the worker runtime; other ValueErrors are
`invalid_input`. Unknown parameters are ignored (the runtime passes its own, e.g. collection ids).

FaceDetectPredictor ("dlib-face-detector"):
    images: [image]
    params: detector ("hog" | "cnn", default "hog"), expressions (bool, default false),
            landmarks (5 | 68, default 5)
    output: {"faces": [{"box": [x, y, w, h], "score": float, "landmarks": [[x, y], ...], "sharpness": float,
                        "expression": null | {"label": str, "scores": {label: probability, 7 labels}}}]}
            faces largest first.

FaceEmbedPredictor ("dlib-face-enroller"), enrollment:
    images: [image]
    params: detector, min_face_size (px of the box's shorter side, default 80),
            min_sharpness (default MIN_SHARPNESS)
    output: {"faces_found": n, "face": {"box", "score", "embedding": [128 floats], "sharpness"}}
    errors: [no_face], [multiple_faces], [face_too_small], [face_too_blurry]

FaceVerifyPredictor ("dlib-face-verifier"), 1:1:
    images: [image_a, image_b]; the largest face of each is compared
    params: detector, threshold (distance, default 0.6)
    output: {"distance": float, "same_person": distance <= threshold, "threshold": float,
             "faces": [box_a, box_b]}
    errors: [no_face] naming the image without a face

FaceIdentifyPredictor ("dlib-face-identifier"), 1:N (the runtime searches the collection):
    images: [image]
    params: detector
    output: {"faces": [{"box", "score", "embedding": [128 floats]}]}, largest first (may be empty)

MemePredictor ("fer-meme-maker"):
    images: [image]
    params: detector, top_text / bottom_text (optional overrides, at most 200 characters), seed (int, default 0)
    output: {"expression": {"label", "scores"}, "caption": {"top", "bottom"}, "face": [x, y, w, h],
             "image_png": bytes}   # the runtime stores the PNG and replaces it with an image id
    errors: [no_face]

Every model runs on the CPU (services/facerec/device.py says why); asking for a GPU is an error at setup.
"""

import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import dlib
from PIL import Image

from percept.config import get_settings
from percept.predictor import BasePredictor, ModelInfo, PredictRequest, file_sha256, report_step
from percept.version import library_versions
from services.facerec.device import facerec_device
from services.facerec.expressions import ExpressionModel, expression_crop, top_expression
from services.facerec.faces import (
    CNN_FILE,
    DETECTORS,
    LANDMARK_COUNTS,
    Detector,
    Face,
    FaceAnalyzer,
    face_distance,
    to_rgb,
)
from services.facerec.memes import pick_caption, render_meme
from services.facerec.service import SERVICE

# The registry entry each predictor class serves: provenance names the model as the declaration does.
DECLARED_MODELS = {model.predictor.rpartition(":")[2]: model for model in SERVICE.models}
DEFAULT_DETECTOR = "hog"
DEFAULT_LANDMARKS = 5
# dlib's ResNet takes 150 px chips; smaller faces are upscaled into them and their embeddings drift: the
# astronaut's face at 91-130 px stays within 0.07 of itself, at 63 px 0.10, at 45 px 0.19, at 37 px 0.27.
DEFAULT_MIN_FACE_SIZE = 80
# Variance of the Laplacian of the 150 px chip, on the astronaut (91 px face): sharp 218, Gaussian blur
# sigma 1 -> 31.5 (embedding still 0.22 from the original, as close as a flipped copy), sigma 2 -> 10.4
# (0.38 away: most of the 0.6 margin gone), sigma 3 -> 5.9 (0.48). 20 keeps the first and refuses the
# second; a sharp face of the minimum size (80 px) measures well above it (about 150).
DEFAULT_MIN_SHARPNESS = 20.0
# dlib's tolerance for its ResNet: 99.38% on LFW at 0.6.
DEFAULT_THRESHOLD = 0.6
MAX_CAPTION_CHARS = 200


def face_libraries(*packages: str) -> dict[str, str]:
    """Provenance's library versions: the frameworks as imported (dlib-bin and opencv's wheels name their
    distributions differently), then `packages` by distribution name."""
    return {"dlib": dlib.__version__, "opencv": cv2.__version__,
            **library_versions("numpy", "pillow", "face_recognition_models", *packages)}


# One analyzer and one expression model per process, shared by every predictor (both are thread-safe):
# the worker builds each predictor class separately, and the models would otherwise load four times.
@cache
def shared_analyzer() -> FaceAnalyzer:
    return FaceAnalyzer()


@cache
def shared_expression_model() -> ExpressionModel:
    return ExpressionModel()


# -- parameter checks shared by the predictors ------------------------------------------------------------


def check_images(request: PredictRequest, names: tuple[str, ...]) -> list[Image.Image]:
    """The request's images as upright RGB, after checking how many there are."""
    if len(request.images) != len(names):
        raise ValueError(f"this model takes {len(names)} image(s) ({', '.join(names)}), got {len(request.images)}")
    for name, image in zip(names, request.images, strict=True):
        if not isinstance(image, Image.Image):
            raise ValueError(f"{name} must be a decoded PIL image, got {type(image).__name__}")
        if min(image.size) < 1:
            raise ValueError(f"{name} is empty ({image.size[0]} x {image.size[1]} px)")
    return [to_rgb(image) for image in request.images]


def param(params: dict[str, Any], name: str, default: Any) -> Any:
    # None is what the gateway sends for a parameter the caller left out: the model's default applies.
    value = params.get(name)
    return default if value is None else value


def check_detector(params: dict[str, Any]) -> Detector:
    detector = param(params, "detector", DEFAULT_DETECTOR)
    if detector not in DETECTORS:
        raise ValueError(f"detector must be \"hog\" (fast) or \"cnn\" (accurate, slow), got {detector!r}")
    return detector


def check_number(params: dict[str, Any], name: str, default: float, low: float, high: float,
                 low_inclusive: bool = True) -> float:
    value = param(params, name, default)
    in_range = isinstance(value, int | float) and not isinstance(value, bool) and (
        (low <= value if low_inclusive else low < value) and value <= high
    )
    if not in_range:
        bound = "from" if low_inclusive else "greater than"
        raise ValueError(f"{name} must be a number {bound} {low} up to {high}, got {value!r}")
    return float(value)


def check_bool(params: dict[str, Any], name: str, default: bool) -> bool:
    value = param(params, name, default)
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def expression_dict(scores: dict[str, float]) -> dict[str, Any]:
    return {"label": top_expression(scores), "scores": scores}


class FacePredictor(BasePredictor):
    """What the face predictors share: the dlib analyzer, set up once, and how each image is analysed."""

    def __init__(self, *, analyzer: FaceAnalyzer | None = None):
        super().__init__()
        self.analyzer = analyzer or shared_analyzer()

    def load(self) -> ModelInfo:
        """Check the device, load the models and describe the weights that give the outputs their identity."""
        facerec_device(get_settings().device)  # a GPU request fails here, before anything loads
        self.load_models()
        return self.describe()

    def load_models(self) -> None:
        self.analyzer.setup()

    def describe(self) -> ModelInfo:
        """The ResNet: its weights are the embeddings' identity."""
        return self.model_info(self.analyzer.resnet_path, face_libraries())

    def model_info(self, weights: Path, libraries: dict[str, str]) -> ModelInfo:
        model = DECLARED_MODELS[type(self).__name__]
        return ModelInfo(name=model.name, version=model.version, sha256=file_sha256(weights),
                         device=facerec_device(get_settings().device).description, libraries=libraries)

    def analyze_all(self, images: list[tuple[Image.Image, Detector]], on_step: Callable[..., None] | None,
                    **options: Any) -> list[list[Face]]:
        """Faces of every image, one progress step per image (the CNN detector takes seconds each)."""
        results = []
        for done, (image, detector) in enumerate(images, start=1):
            results.append(self.analyzer.analyze(image, detector=detector, **options))
            report_step(on_step, done, len(images))
        return results


# -- detect -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectParams:
    detector: Detector
    expressions: bool
    landmarks: int


class ExpressionFacePredictor(FacePredictor):
    """A face predictor that also reads expressions: the expression model loads with dlib's."""

    def __init__(self, *, analyzer: FaceAnalyzer | None = None, expression_model: ExpressionModel | None = None):
        super().__init__(analyzer=analyzer)
        self.expression_model = expression_model or shared_expression_model()

    def load_models(self) -> None:
        super().load_models()
        self.expression_model.setup()


class FaceDetectPredictor(ExpressionFacePredictor):
    """Every face in an image with its landmarks, sharpness and, on request, its expression."""

    def describe(self) -> ModelInfo:
        """The CNN detector's weights (HOG is built into dlib) and the expression model's libraries."""
        assert self.analyzer.models_dir is not None  # set by setup()
        return self.model_info(self.analyzer.models_dir / CNN_FILE,
                               {**face_libraries("fer"), **self.expression_model.libraries})

    def check_inputs(self, request: PredictRequest) -> tuple[Image.Image, DetectParams]:
        [image] = check_images(request, ("image",))
        landmarks = param(request.params, "landmarks", DEFAULT_LANDMARKS)
        if isinstance(landmarks, bool) or landmarks not in LANDMARK_COUNTS:
            raise ValueError(f"landmarks must be 5 or 68 (points per face), got {landmarks!r}")
        return image, DetectParams(check_detector(request.params), check_bool(request.params, "expressions", False),
                                   int(landmarks))

    def predict(self, requests: list[PredictRequest], on_step: Callable[..., None] | None = None
                ) -> list[dict[str, Any]]:
        # 1. Check inputs
        checked = [self.check_inputs(request) for request in requests]
        if not requests:
            return []
        self.setup()

        # 2. Detect and describe the faces of each image
        faces_per_image = []
        for done, (image, params) in enumerate(checked, start=1):
            faces_per_image.append(self.analyzer.analyze(image, detector=params.detector, landmarks=params.landmarks,
                                                         embeddings=False))
            report_step(on_step, done, len(checked))

        # 3. Expressions of all the faces that asked for them, in one batch
        crops = [expression_crop(image, face.box)
                 for (image, params), faces in zip(checked, faces_per_image, strict=True) if params.expressions
                 for face in faces]
        expressions = iter(self.expression_model.scores(crops))

        # 4. Shape the outputs
        outputs = []
        for (_, params), faces in zip(checked, faces_per_image, strict=True):
            outputs.append({"faces": [
                {"box": face.box, "score": face.score, "landmarks": face.landmarks, "sharpness": face.sharpness,
                 "expression": expression_dict(next(expressions)) if params.expressions else None}
                for face in faces
            ]})
        return outputs


# -- enroll -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedParams:
    detector: Detector
    min_face_size: float
    min_sharpness: float


class FaceEmbedPredictor(FacePredictor):
    """Enrollment: the embedding of the one acceptable face in an image, or a reason why there is none."""

    def check_inputs(self, request: PredictRequest) -> tuple[Image.Image, EmbedParams]:
        [image] = check_images(request, ("image",))
        params = request.params
        return image, EmbedParams(
            check_detector(params),
            check_number(params, "min_face_size", DEFAULT_MIN_FACE_SIZE, 1, 10_000),
            check_number(params, "min_sharpness", DEFAULT_MIN_SHARPNESS, 0, 1e9),
        )

    def predict(self, requests: list[PredictRequest], on_step: Callable[..., None] | None = None
                ) -> list[dict[str, Any]]:
        # 1. Check inputs
        checked = [self.check_inputs(request) for request in requests]
        if not requests:
            return []
        self.setup()

        # 2. Detect; embeddings wait until one face is accepted
        faces_per_image = self.analyze_all([(image, p.detector) for image, p in checked], on_step, embeddings=False)

        # 3. Accept exactly one face per image, then embed it
        outputs = []
        for (_, params), faces in zip(checked, faces_per_image, strict=True):
            face = accept_enrollment_face(faces, params)
            [face.embedding] = self.analyzer.embed([face.chip])
            outputs.append({"faces_found": len(faces), "face": {
                "box": face.box, "score": face.score, "embedding": face.embedding, "sharpness": face.sharpness,
            }})
        return outputs


def accept_enrollment_face(faces: list[Face], params: EmbedParams) -> Face:
    """The one face large enough to enroll; a bystander too small to be enrolled does not count."""
    if not faces:
        raise ValueError("[no_face] No face was found in the image; send a photo with one clearly visible face.")
    large = [face for face in faces if face.min_side >= params.min_face_size]
    if len(large) > 1:
        raise ValueError(f"[multiple_faces] {len(large)} faces were found in the image; send a photo with only "
                         "the person to enroll (crop the others out).")
    if not large:
        raise ValueError(f"[face_too_small] The face is {faces[0].min_side} px across; at least "
                         f"{params.min_face_size:g} px is needed: send a closer or larger photo.")
    face = large[0]
    if face.sharpness < params.min_sharpness:
        raise ValueError(f"[face_too_blurry] The face is too blurry to enroll (sharpness {face.sharpness:.1f}, at "
                         f"least {params.min_sharpness:g} needed); send a sharper, well-focused photo.")
    return face


# -- verify -----------------------------------------------------------------------------------------------


class FaceVerifyPredictor(FacePredictor):
    """1:1: is the largest face of image_a the same person as the largest face of image_b?"""

    def check_inputs(self, request: PredictRequest) -> tuple[list[Image.Image], Detector, float]:
        images = check_images(request, ("image_a", "image_b"))
        threshold = check_number(request.params, "threshold", DEFAULT_THRESHOLD, 0, 2, low_inclusive=False)
        return images, check_detector(request.params), threshold

    def predict(self, requests: list[PredictRequest], on_step: Callable[..., None] | None = None
                ) -> list[dict[str, Any]]:
        # 1. Check inputs
        checked = [self.check_inputs(request) for request in requests]
        if not requests:
            return []
        self.setup()

        # 2. Detect in both images of every request
        pairs = [(image, detector) for images, detector, _ in checked for image in images]
        faces_per_image = self.analyze_all(pairs, on_step, embeddings=False)

        # 3. Embed the largest face of each image and compare
        outputs = []
        for index, (_, _, threshold) in enumerate(checked):
            main_faces = []
            for name, faces in zip(("image_a", "image_b"), faces_per_image[2 * index:2 * index + 2], strict=True):
                if not faces:
                    raise ValueError(f"[no_face] No face was found in {name}; "
                                     "send a photo with a clearly visible face.")
                main_faces.append(faces[0])
            embedding_a, embedding_b = self.analyzer.embed([face.chip for face in main_faces])
            distance = face_distance(embedding_a, embedding_b)
            outputs.append({"distance": distance, "same_person": distance <= threshold, "threshold": threshold,
                            "faces": [face.box for face in main_faces]})
        return outputs


# -- identify ---------------------------------------------------------------------------------------------


class FaceIdentifyPredictor(FacePredictor):
    """1:N, the model's half: every face's embedding (the runtime searches the collection)."""

    def check_inputs(self, request: PredictRequest) -> tuple[Image.Image, Detector]:
        [image] = check_images(request, ("image",))
        return image, check_detector(request.params)

    def predict(self, requests: list[PredictRequest], on_step: Callable[..., None] | None = None
                ) -> list[dict[str, Any]]:
        # 1. Check inputs
        checked = [self.check_inputs(request) for request in requests]
        if not requests:
            return []
        self.setup()

        # 2. Detect and embed every face (largest first)
        faces_per_image = self.analyze_all(checked, on_step, embeddings=True)

        # 3. Shape the outputs
        return [{"faces": [{"box": face.box, "score": face.score, "embedding": face.embedding} for face in faces]}
                for faces in faces_per_image]


# -- memes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemeParams:
    detector: Detector
    top_text: str | None
    bottom_text: str | None
    seed: int


class MemePredictor(ExpressionFacePredictor):
    """A meme of the photo: the main face's expression picks a caption, rendered top and bottom."""

    def describe(self) -> ModelInfo:
        """The expression model's weights: they choose the caption."""
        assert self.expression_model.weights_path is not None  # set by setup()
        return self.model_info(self.expression_model.weights_path,
                               {**face_libraries("fer"), **self.expression_model.libraries})

    def check_inputs(self, request: PredictRequest) -> tuple[Image.Image, MemeParams]:
        [image] = check_images(request, ("image",))
        params = request.params
        texts = []
        for name in ("top_text", "bottom_text"):
            text = params.get(name)
            if text is not None and (not isinstance(text, str) or len(text) > MAX_CAPTION_CHARS):
                raise ValueError(f"{name} must be text of at most {MAX_CAPTION_CHARS} characters, got {text!r:.60}")
            texts.append(text)
        seed = param(params, "seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        return image, MemeParams(check_detector(params), texts[0], texts[1], seed)

    def predict(self, requests: list[PredictRequest], on_step: Callable[..., None] | None = None
                ) -> list[dict[str, Any]]:
        # 1. Check inputs
        checked = [self.check_inputs(request) for request in requests]
        if not requests:
            return []
        self.setup()

        # 2. Find the main (largest) face of each photo
        faces_per_image = self.analyze_all([(image, p.detector) for image, p in checked], on_step, embeddings=False)
        for faces in faces_per_image:
            if not faces:
                raise ValueError("[no_face] No face was found in the image; a meme needs a photo with a visible face.")

        # 3. Read the main faces' expressions in one batch
        crops = [expression_crop(image, faces[0].box) for (image, _), faces in zip(checked, faces_per_image,
                                                                                    strict=True)]
        expressions = self.expression_model.scores(crops)

        # 4. Pick each caption (a caller's text wins) and render the meme
        outputs = []
        for (image, params), faces, scores in zip(checked, faces_per_image, expressions, strict=True):
            label = top_expression(scores)
            top, bottom = pick_caption(label, params.seed)
            top = top if params.top_text is None else params.top_text
            bottom = bottom if params.bottom_text is None else params.bottom_text
            png = io.BytesIO()
            render_meme(image, top, bottom).save(png, format="PNG")
            outputs.append({"expression": expression_dict(scores), "caption": {"top": top, "bottom": bottom},
                            "face": faces[0].box, "image_png": png.getvalue()})
        return outputs
