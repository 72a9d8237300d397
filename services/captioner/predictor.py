"""Captions for photos from a captioner Percept trained (`services.captioner.training`): the frozen encoder
it was trained on (the packaged EfficientNet-Lite0, or the user's TorchScript encoder the artifact carries),
then the LSTM decoder with batched beam search (`services.captioner.decoding`).

Inputs (one `PredictRequest` per job):
    images: exactly one RGB PIL image, any size (resized and centre-cropped to 224 x 224).
    params (absent or None: the default):
        beam_width (int, 1..20, default 3): beams kept per step; 1 is greedy decoding.
        num_captions (int, 1..beam_width, default 1): how many distinct captions to return (the n best).
        max_length (int, 1..the model's limit, default the limit): the most words a caption may have
            (startseq and endseq not counted); the limit is the max_length it was trained with, in words
            (`metrics["max_length"]` in the registry).
        min_length (int, 0..max_length, default 1): the fewest words (endseq is not allowed before).
        length_penalty (float, 0..5, default 0): captions are ranked by log-probability / n ** length_penalty,
            n the caption's tokens counting endseq (words + 1); 0 ranks by log-probability alone, 1 by
            log-probability per token, higher favours longer captions. No effect on greedy decoding. The
            default is 0 because 1 costs BLEU here: on held-out scenes beam-3 BLEU-4 is 0.89 at 0, 0.76 at
            0.5 and 0.68 at 1 (greedy 0.85); per-token scores prefer the longest phrasings, which name more
            of what the model is least sure of (position, size).
        no_repeat_ngram_size (int, 0..10, default 0 = off): no n-gram of words occurs twice in a caption.
        temperature: must be absent or None: this model decodes deterministically (no sampling).

Output (one JSON-able dict per request):
    {"captions": [{"text": "a red circle on a white background",
                   "tokens": ["a", "red", ...],       # the words (no markers)
                   "log_prob": -0.41,                 # the model's log-probability of the words and endseq
                   "score": -0.41}, ...]}             # log_prob with the length penalty; best first, distinct

A bad parameter raises ValueError("[code] message") (codes below), so the job fails with that code.
"""

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from percept.devices import Device, choose_device
from percept.predictor import BasePredictor, ModelInfo, PredictRequest, report_step
from percept.version import library_versions
from services.captioner.decoding import DecodingOptions, Hypothesis, beam_search
from services.captioner.device import torch_device
from services.captioner.encoder import (
    RESIZE_SIZE,
    FrozenEncoder,
    frozen_encoder,
    packaged_weights_sha256,
    preprocess,
    scripted_encoder,
)
from services.captioner.model import CaptionModel, Vocabulary, load_caption_model

LIBRARIES = ("torch", "numpy", "pillow")
MAX_BEAM_WIDTH = 20  # as the gateway; the decoder call grows with images x beams
MAX_NO_REPEAT_NGRAM = 10
LENGTH_PENALTY_RANGE = (0.0, 5.0)
ENCODER_BATCH = 32  # images per encoder forward pass, as the classifier's micro-batches
DEFAULTS = {"beam_width": 3, "num_captions": 1, "min_length": 1, "length_penalty": 0.0, "no_repeat_ngram_size": 0}


@dataclass(frozen=True)
class Caption:
    text: str
    tokens: list[str]
    log_prob: float
    score: float

    @classmethod
    def from_hypothesis(cls, hypothesis: Hypothesis, vocabulary: Vocabulary) -> "Caption":
        words = vocabulary.decode(hypothesis.ids)
        return cls(" ".join(words), words, round(hypothesis.log_prob, 6), round(hypothesis.score, 6))

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens, "log_prob": self.log_prob, "score": self.score}


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decoding_options(params: dict[str, Any], max_words: int) -> DecodingOptions:
    """Validate a request's serving params against a model allowing `max_words` words; defaults filled in."""
    def get(name: str, default: Any) -> Any:
        value = params.get(name)
        return default if value is None else value

    beam_width = get("beam_width", DEFAULTS["beam_width"])
    if not is_integer(beam_width) or not 1 <= beam_width <= MAX_BEAM_WIDTH:
        raise ValueError(f"[invalid_beam_width] beam_width must be an integer from 1 (greedy) to {MAX_BEAM_WIDTH}; "
                         f"got {beam_width!r}")
    num_captions = get("num_captions", DEFAULTS["num_captions"])
    if not is_integer(num_captions) or num_captions < 1:
        raise ValueError(f"[invalid_num_captions] num_captions must be a whole number of at least 1; "
                         f"got {num_captions!r}")
    if num_captions > beam_width:
        raise ValueError(f"[num_captions_over_beam_width] num_captions ({num_captions}) must not exceed beam_width "
                         f"({beam_width}): beam search finds at most beam_width captions; raise beam_width")
    max_length = get("max_length", max_words)
    if not is_integer(max_length) or max_length < 1:
        raise ValueError(f"[invalid_max_length] max_length must be a whole number of words, at least 1; "
                         f"got {max_length!r}")
    if max_length > max_words:
        raise ValueError(f"[max_length_too_long] max_length must be at most {max_words} words for this model (its "
                         f"trained maximum); got {max_length}")
    min_length = get("min_length", DEFAULTS["min_length"])
    if not is_integer(min_length) or not 0 <= min_length <= max_length:
        raise ValueError(f"[invalid_min_length] min_length must be a whole number from 0 to max_length "
                         f"({max_length}); got {min_length!r}")
    alpha = get("length_penalty", DEFAULTS["length_penalty"])
    low, high = LENGTH_PENALTY_RANGE
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not low <= alpha <= high:
        raise ValueError(f"[invalid_length_penalty] length_penalty must be a number from {low:g} to {high:g} "
                         f"(0: rank by log-probability; 1: by log-probability per word); got {alpha!r}")
    ngram = get("no_repeat_ngram_size", DEFAULTS["no_repeat_ngram_size"])
    if not is_integer(ngram) or not 0 <= ngram <= MAX_NO_REPEAT_NGRAM:
        raise ValueError(f"[invalid_no_repeat_ngram_size] no_repeat_ngram_size must be a whole number from 0 (off) "
                         f"to {MAX_NO_REPEAT_NGRAM}; got {ngram!r}")
    if params.get("temperature") is not None:
        raise ValueError("[sampling_unsupported] this captioner decodes deterministically (greedy or beam search); "
                         "leave temperature out")
    return DecodingOptions(beam_width, num_captions, max_length, min_length, float(alpha), ngram)


def check_images(request: PredictRequest) -> Image.Image:
    if len(request.images) != 1:
        raise ValueError(f"caption takes exactly one image per request, got {len(request.images)}")
    image = request.images[0]
    if not isinstance(image, Image.Image):
        raise ValueError(f"the image must be a decoded PIL image, got {type(image).__name__}")
    return image


def model_device(device: Device | str | None) -> Device:
    """A predictor's `device` keyword -> the Device (None: PERCEPT_DEVICE's choice for this process)."""
    if device is None:
        return torch_device()
    if isinstance(device, Device):
        return device
    return choose_device(device, torch.cuda)


def inference_precision(device: Device) -> contextlib.AbstractContextManager:
    """fp16 autocast on a GPU; fp32 on the CPU (fp16 is slower there and the LSTM state would drift)."""
    if device.is_cuda:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def encode_images(encoder: FrozenEncoder, images: list[Image.Image], batch_size: int = ENCODER_BATCH,
                  on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """(N, F) fp32 pooled features on the encoder's device, `batch_size` images per forward pass."""
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(np.stack([preprocess(image) for image in images[start:start + batch_size]]))
        with inference_precision(encoder.device):
            chunks.append(encoder.features(pixels).float())
        if on_batch is not None:
            on_batch(min(start + batch_size, len(images)), len(images))
    return torch.cat(chunks)


def generate_captions(model: CaptionModel, features: torch.Tensor, options: list[DecodingOptions],
                      device: Device) -> list[list[Caption]]:
    """Batched beam search over features already on the model's device; each image's captions, best first."""
    with torch.inference_mode(), inference_precision(device):
        hypotheses = beam_search(model.decoder, features, options)
    return [[Caption.from_hypothesis(h, model.vocabulary) for h in found] for found in hypotheses]


class LSTMCaptioner(BasePredictor):
    """A trained LSTM captioner behind the predictor contract (see the module docstring).

    `device` (tests, benchmarks): "cpu", "cuda:1", ... or a `Device`; by default PERCEPT_DEVICE's choice.
    """

    input_size = RESIZE_SIZE  # preprocess() resizes the shorter side to this first

    def __init__(self, *, artifact: bytes, name: str, version: str, device: Device | str | None = None):
        super().__init__()
        self.artifact = artifact
        self.name = name
        self.version = version
        self.device = model_device(device)
        self._encoder: FrozenEncoder | None = None
        self._model: CaptionModel | None = None

    @property
    def max_words(self) -> int:
        """The longest caption (in words) this model may be asked for."""
        self.setup()
        assert self._model is not None
        return self._model.config.max_words

    def load(self) -> ModelInfo:
        """Load this artifact's decoder and its encoder: the shared EfficientNet-Lite0 (once per device) or
        the TorchScript encoder inside the artifact (this predictor's own)."""
        try:
            installed = packaged_weights_sha256()
        except FileNotFoundError:  # only artifacts on the packaged encoder need it; frozen_encoder says why
            installed = "(not installed)"
        model = load_caption_model(self.artifact, self.device.name, installed)
        spec = model.encoder
        if spec.torchscript is None:
            encoder = frozen_encoder(self.device)
        else:
            encoder = scripted_encoder(spec.torchscript, self.device, spec.name)
            if encoder.feature_dim != spec.feature_dim:
                raise ValueError(f"the artifact's TorchScript encoder gives {encoder.feature_dim} features here; "
                                 f"it was trained with {spec.feature_dim}")
        self._encoder, self._model = encoder, model
        return ModelInfo(name=self.name, version=self.version, sha256=hashlib.sha256(self.artifact).hexdigest(),
                         device=self.device.description, libraries=library_versions(*LIBRARIES))

    def predict(self, requests: list[PredictRequest], on_step: Callable[..., None] | None = None
                ) -> list[dict[str, Any]]:
        """Caption every request's image: one batched encoder pass per ENCODER_BATCH images, then one beam
        search in which every beam of every image advances together."""
        # 1. Check inputs (the images before loading anything; the params need the model's limit)
        images = [check_images(request) for request in requests]
        if not requests:
            return []
        self.setup()
        assert self._model is not None and self._encoder is not None  # loaded by setup()
        options = [decoding_options(request.params, self._model.config.max_words) for request in requests]

        # 2. Encode the images in micro-batches
        features = encode_images(self._encoder, images)
        report_step(on_step, 1, 2)

        # 3. Decode every image's beams together
        captions = generate_captions(self._model, features, options, self.device)
        report_step(on_step, 2, 2)

        # 4. Shape each request's output
        return [{"captions": [caption.to_dict() for caption in found]} for found in captions]
