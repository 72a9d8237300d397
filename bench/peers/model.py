"""The one predictor every peer serves: Percept's own ImageNetClassifier (services/classifier), fed images
decoded exactly as Percept's classifier worker decodes them (percept.imaging.decode_rgb, at least the model's
input size), one PredictRequest per uploaded JPEG.

Imported by the peer apps inside their own virtualenvs, with the work tree on PYTHONPATH: the predictor
needs only torch, numpy, Pillow, the packaged weights and pydantic-settings (bench/peers/envs.py).
"""

import os
from typing import Any

from percept.imaging import decode_rgb
from percept.predictor import PredictRequest
from services.classifier.predictor import ImageNetClassifier

MAX_PIXELS = 40_000_000  # Percept's default PERCEPT_MAX_IMAGE_PIXELS: the same refusal limit as the worker's
PARAMS = {"top_k": 5}  # POST /v1/classify's default


def load_predictor() -> ImageNetClassifier:
    # The device string handed to the predictor as-is: Percept's settings (PERCEPT_DEVICE through
    # pydantic-settings, which imports more of the platform) are not loaded in the peers' envs.
    predictor = ImageNetClassifier(device=os.environ.get("PERCEPT_DEVICE") or "auto")
    predictor.setup()
    predictor.predict([PredictRequest(images=[decode_rgb(_warm_up_jpeg(), MAX_PIXELS)], params=PARAMS)])
    return predictor


def classify(predictor: ImageNetClassifier, uploads: list[bytes]) -> list[dict[str, Any]]:
    """One result per uploaded JPEG, all in one predict() call (one batch)."""
    requests = [PredictRequest(images=[decode_rgb(data, MAX_PIXELS, at_least=predictor.input_size)],
                               params=PARAMS) for data in uploads]
    return predictor.predict(requests)


def _warm_up_jpeg() -> bytes:
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (320, 240), (120, 90, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()
