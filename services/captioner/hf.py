"""Hugging Face image-to-text checkpoints, imported as a zip of the directory `save_pretrained` wrote, and
served like the platform's own captioner.

Supported architectures (`config.json` `architectures`, or its `model_type`): `VisionEncoderDecoderModel`
(a ViT-style encoder with a GPT-2-style decoder, e.g. vit-gpt2 captioners) and `BlipForConditionalGeneration`.
Nothing is ever downloaded (`local_files_only=True`) and no code from the checkpoint runs
(`trust_remote_code=False`): the directory brings configuration, weights (safetensors, or a PyTorch
`.bin` that transformers reads with `weights_only`), its image processor and its tokenizer.

The archive is untrusted. Its central directory is checked before anything is inflated (relative paths
only, no links, no encryption, file count, declared unpacked size, compression ratio), and each member is
then unpacked with a budget of its declared size into a temporary directory that is removed once the model
is in memory.

`HFCaptioner` inputs (one `PredictRequest` per job):
    images: exactly one RGB PIL image, any size (the checkpoint's image processor resizes it).
    params (other keys, such as `model`, are ignored):
        beam_width (int, 1..16, default 3): beams of beam search; 1 is greedy decoding.
        num_captions (int, 1..beam_width, default 1): how many distinct captions to return.
        max_length (int, 1..128, default 20): at most this many new tokens per caption.
        min_length (int, 0..max_length, default 1): at least this many new tokens before the end token.
        length_penalty (float, -5..5, default 1.0): captions are ranked by log_prob / length ** length_penalty
            (length: the new tokens with the end token), as transformers' beam search ranks them; above 0
            favours longer captions, 0 ranks by log_prob alone.
        no_repeat_ngram_size (int, 0..max_length, default 0): no n-gram of this size (in tokens) occurs
            twice; 0 turns it off.
        temperature (float in (0, 10] or None, default None): set, tokens are sampled (beam sampling when
            beam_width > 1) at this temperature instead of searched for.
        seed (int >= 0 or None, default None): the sampling seed, so a sampled caption can be reproduced.

Output (one JSON-able dict per request), shaped as the platform's own captioner's:
    {"captions": [{"text": "a dog runs on the grass",
                   "tokens": ["a", "dog", "runs", "on", "the", "grass"],  # the words: the text split on spaces
                   "log_prob": -4.21,     # the model's log-probability of the caption's tokens and end token
                   "score": -0.60}, ...]} # log_prob with the length penalty (what the search ranks by)
    Best first by score and distinct (by text): up to `num_captions`, fewer when the beams decode to fewer
    distinct non-empty texts. `log_prob` comes from the raw logits, so neither the temperature nor n-gram bans change
    it. `tokens` are words, not the tokenizer's sub-word pieces, so that captions of both kinds of captioner
    compare.

Bad parameters raise ValueError("[invalid_parameters] ..."); a zip that is not a loadable checkpoint raises
ValueError("[invalid_checkpoint] ...") or ("[unsafe_zip_path] ...").
"""

import hashlib
import json
import math
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from percept.checkpoints import invalid_checkpoint, unpack_checkpoint
from percept.devices import Device
from percept.predictor import (
    BasePredictor,
    ModelInfo,
    PredictRequest,
    StepCallback,
    TrainingData,
    TrainingResult,
    report_step,
)
from percept.version import library_versions
from services.captioner.device import torch_device

# `architectures` in config.json -> the transformers class that loads it (and the `model_type` that implies it).
ARCHITECTURES = {"VisionEncoderDecoderModel": "vision-encoder-decoder",
                 "BlipForConditionalGeneration": "blip"}
PREDICTOR = "services.captioner.hf:HFCaptioner"
LIBRARIES = ("transformers", "tokenizers", "torch")

# Serving parameters: defaults and bounds (the platform's captioner takes the same ones).
DEFAULT_BEAM_WIDTH = 3
MAX_BEAM_WIDTH = 16
DEFAULT_MAX_LENGTH = 20
MAX_NEW_TOKENS = 128
MAX_LENGTH_PENALTY = 5.0
MAX_TEMPERATURE = 10.0

_WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")
_MAX_LISTED_FILES = 200
# The import's smoke test: a small generated picture, a few greedy tokens.
_TEST_IMAGE_SIZE = 64
_TEST_TOKENS = 4


@dataclass(frozen=True)
class CaptionParams:
    beam_width: int = DEFAULT_BEAM_WIDTH
    num_captions: int = 1
    max_length: int = DEFAULT_MAX_LENGTH
    min_length: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    temperature: float | None = None
    seed: int | None = None


def _integer(params: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = params.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"[invalid_parameters] `{name}` must be a whole number from {low} to {high}; got {value!r}.")
    return value


def _number(params: dict[str, Any], name: str, default: float | None, low: float, high: float,
            low_open: bool = False) -> float | None:
    value = params.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not (low < value if low_open else low <= value) or value > high:
        bounds = f"above {low:g} and at most {high:g}" if low_open else f"from {low:g} to {high:g}"
        raise ValueError(f"[invalid_parameters] `{name}` must be a number {bounds}; got {value!r}.")
    return float(value)


def check_caption_params(params: dict[str, Any]) -> CaptionParams:
    """The request's generation parameters with their defaults, or ValueError naming the one that is wrong."""
    beam_width = _integer(params, "beam_width", DEFAULT_BEAM_WIDTH, 1, MAX_BEAM_WIDTH)
    num_captions = _integer(params, "num_captions", 1, 1, MAX_BEAM_WIDTH)
    if num_captions > beam_width:
        raise ValueError(f"[invalid_parameters] `num_captions` ({num_captions}) must be at most `beam_width` "
                         f"({beam_width}): each caption is one beam; raise beam_width or ask for fewer captions.")
    max_length = _integer(params, "max_length", DEFAULT_MAX_LENGTH, 1, MAX_NEW_TOKENS)
    min_length = _integer(params, "min_length", 1, 0, MAX_NEW_TOKENS)
    if min_length > max_length:
        raise ValueError(f"[invalid_parameters] `min_length` ({min_length}) must be at most `max_length` "
                         f"({max_length}).")
    seed = params.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"[invalid_parameters] `seed` must be a whole number from 0; got {seed!r}.")
    length_penalty = _number(params, "length_penalty", 1.0, -MAX_LENGTH_PENALTY, MAX_LENGTH_PENALTY)
    assert length_penalty is not None
    return CaptionParams(
        beam_width=beam_width, num_captions=num_captions, max_length=max_length, min_length=min_length,
        length_penalty=length_penalty,
        no_repeat_ngram_size=_integer(params, "no_repeat_ngram_size", 0, 0, max_length),
        temperature=_number(params, "temperature", None, 0.0, MAX_TEMPERATURE, low_open=True), seed=seed)


# --------------------------------------------------------------------------- loading

@dataclass
class LoadedCheckpoint:
    """A checkpoint in memory, ready to caption."""

    model: Any  # a transformers PreTrainedModel with `generate`
    image_processor: Any
    tokenizer: Any
    architecture: str
    files: list[str]
    device: Device
    dtype: torch.dtype
    # Special tokens other than the end token (padding, start, unknown, mask): never part of a caption, and
    # decoded to nothing, so generating one would only shorten or empty a caption.
    suppressed_tokens: list[int] = field(default_factory=list)

    @property
    def input_size(self) -> int | None:
        """The fewest pixels on each side the processor resizes to (None when it does not say)."""
        size = getattr(self.image_processor, "size", None)
        if size is None:
            return None
        values = dict(size) if not isinstance(size, int) else {"shortest_edge": size}
        sides = [values.get(key) for key in ("height", "width", "shortest_edge")]
        known = [side for side in sides if isinstance(side, int) and side > 0]
        return min(known) if known else None


def checkpoint_architecture(config: dict[str, Any]) -> str:
    """The supported architecture config.json declares, or ValueError naming what it declares instead."""
    declared = config.get("architectures") or []
    for name in declared:
        if name in ARCHITECTURES:
            return name
    by_type = {model_type: name for name, model_type in ARCHITECTURES.items()}
    if not declared and config.get("model_type") in by_type:
        return by_type[config["model_type"]]
    what = ", ".join(map(str, declared)) or f"model_type {config.get('model_type')!r}"
    raise invalid_checkpoint(f"Unsupported architecture {what}: Percept imports image-to-text checkpoints of "
                             f"{' or '.join(ARCHITECTURES)}.")


def _check_files(files: list[str]) -> None:
    present = set(files)
    if not present & set(_WEIGHTS_FILES):
        raise invalid_checkpoint("The checkpoint has no weights file (model.safetensors or pytorch_model.bin, or "
                                 "their .index.json for sharded weights) beside config.json.")
    if not present & {"preprocessor_config.json", "processor_config.json"}:
        raise invalid_checkpoint("The checkpoint has no preprocessor_config.json (nor processor_config.json): its "
                                 "image processor is missing; save it with `save_pretrained` into the same "
                                 "directory.")
    if not present & set(_TOKENIZER_FILES):
        raise invalid_checkpoint("The checkpoint has no tokenizer files (tokenizer.json, or tokenizer_config.json "
                                 "with its vocabulary): save the tokenizer with `save_pretrained` into the same "
                                 "directory.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def load_checkpoint(archive: bytes, device: Device) -> LoadedCheckpoint:
    """Unpack, check and load a checkpoint zip onto `device` (fp16 on CUDA); ValueError if it is not one."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="percept-checkpoint-") as unpacked:
        directory = Path(unpacked)
        # 1. Unpack and check what the directory must hold
        files = unpack_checkpoint(archive, directory)
        try:
            config = json.loads((directory / "config.json").read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise invalid_checkpoint(f"config.json is not valid JSON ({exc}).") from None
        if not isinstance(config, dict):
            raise invalid_checkpoint("config.json is not a JSON object.")
        architecture = checkpoint_architecture(config)
        _check_files(files)

        # 2. Load the model, its image processor and its tokenizer, from this directory only
        model_class = getattr(transformers, architecture)
        try:
            model, loading = model_class.from_pretrained(directory, local_files_only=True, trust_remote_code=False,
                                                         output_loading_info=True)
        except Exception as exc:  # noqa: BLE001 - any failure to load is the checkpoint's
            raise invalid_checkpoint(f"The {architecture} weights do not load ({_first_line(exc)}).") from None
        missing = sorted(loading.get("missing_keys") or []) + sorted(loading.get("mismatched_keys") or [])
        if missing:
            raise invalid_checkpoint(f"The weights do not match config.json: {len(missing)} parameters are missing "
                                     f"or of another shape (e.g. {missing[0]!s}).")
        try:
            image_processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True,
                                                                 trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001
            raise invalid_checkpoint(f"The image processor does not load ({_first_line(exc)}).") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001
            raise invalid_checkpoint(f"The tokenizer does not load ({_first_line(exc)}).") from None

    # 3. Onto the device: half precision on a GPU (twice the throughput, half the memory)
    dtype = torch.float16 if device.is_cuda else torch.float32
    model = model.to(device=device.name, dtype=dtype).eval()
    end_tokens = _eos_ids(model)
    suppressed = sorted(set(getattr(tokenizer, "all_special_ids", [])) - end_tokens)
    return LoadedCheckpoint(model, image_processor, tokenizer, architecture, files, device, dtype, suppressed)


# --------------------------------------------------------------------------- captioning

@contextmanager
def _seeded(seed: int | None, device: Device) -> Iterator[None]:
    """Sampling with a seed draws from a generator state of its own: the process's stays untouched."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device.name] if device.is_cuda else []):
        torch.manual_seed(seed)
        yield


def _log_probs(output: Any, eos_ids: set[int]) -> list[tuple[float, int]]:
    """(log-probability, tokens) of each generated sequence, up to and with its first end token: the model's
    own log-probabilities (raw logits, before temperature or n-gram bans), summed along its beam."""
    log_probs = torch.stack([torch.log_softmax(step.float(), dim=-1) for step in output.logits], dim=1)
    steps = log_probs.shape[1]
    generated = output.sequences[:, -steps:].tolist()
    beams = getattr(output, "beam_indices", None)
    rows = beams[:, :steps].tolist() if beams is not None else [[i] * steps for i in range(len(generated))]
    found = []
    for tokens, path in zip(generated, rows, strict=True):
        total, length = 0.0, 0
        for step, (token, row) in enumerate(zip(tokens, path, strict=True)):
            if row < 0:  # the beam had finished
                break
            total += float(log_probs[row, step, token])
            length += 1
            if token in eos_ids:
                break
        found.append((total, length))
    return found


def _eos_ids(model: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = getattr(getattr(model.config, "text_config", None), "sep_token_id", None)
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def caption_images(loaded: LoadedCheckpoint, images: list[Image.Image], params: CaptionParams
                   ) -> list[dict[str, Any]]:
    """One output per image: up to `num_captions` distinct captions, best first (see the module docstring)."""
    # 1. Preprocess as the checkpoint's image processor says
    pixels = loaded.image_processor(images=images, return_tensors="pt")["pixel_values"]
    pixels = pixels.to(device=loaded.device.name, dtype=loaded.dtype)

    # 2. Generate every beam of every image in one call
    sampling = params.temperature is not None
    options: dict[str, Any] = {
        "num_beams": params.beam_width, "num_return_sequences": params.beam_width,
        "max_new_tokens": params.max_length, "min_new_tokens": params.min_length,
        "length_penalty": params.length_penalty, "no_repeat_ngram_size": params.no_repeat_ngram_size,
        "do_sample": sampling, "output_logits": True, "output_scores": True, "return_dict_in_generate": True,
    }
    if loaded.suppressed_tokens:
        options["suppress_tokens"] = loaded.suppressed_tokens
    if sampling:
        options["temperature"] = params.temperature
        options["top_k"] = 0  # sample from the whole distribution, as the temperature shapes it
    if params.beam_width > 1:
        options["early_stopping"] = True
    with torch.inference_mode(), _seeded(params.seed, loaded.device):
        output = loaded.model.generate(pixel_values=pixels, **options)

    # 3. Decode, score (as beam search ranks: log_prob / length ** length_penalty), keep the best distinct
    texts = [" ".join(text.split()) for text in
             loaded.tokenizer.batch_decode(output.sequences, skip_special_tokens=True)]
    scored = [(text, log_prob, log_prob / max(length, 1) ** params.length_penalty)
              for text, (log_prob, length) in zip(texts, _log_probs(output, _eos_ids(loaded.model)), strict=True)]
    results = []
    per_image = params.beam_width
    for index in range(len(images)):
        candidates = sorted(scored[index * per_image:(index + 1) * per_image], key=lambda candidate: -candidate[2])
        captions: list[dict[str, Any]] = []
        for text, log_prob, score in candidates:
            if text and len(captions) < params.num_captions and all(text != c["text"] for c in captions):
                captions.append({"text": text, "tokens": text.split(), "log_prob": round(log_prob, 6),
                                 "score": round(score, 6)})
        results.append({"captions": captions})
    return results


class HFCaptioner(BasePredictor):
    """Serves an imported Hugging Face image-to-text checkpoint (see the module docstring for its inputs and
    outputs). Constructed by the runtime with the registered artifact: the checkpoint's zip."""

    def __init__(self, artifact: bytes, name: str = "imported-captioner", version: str = "1") -> None:
        super().__init__()
        self._artifact: bytes | None = artifact
        self.name, self.version = name, version
        self._loaded: LoadedCheckpoint | None = None
        self._generate_lock = threading.Lock()

    def load(self) -> ModelInfo:
        assert self._artifact is not None
        sha256 = hashlib.sha256(self._artifact).hexdigest()
        device = torch_device()
        self._loaded = load_checkpoint(self._artifact, device)
        self._artifact = None  # up to gigabytes; the model in memory is all serving needs
        self.input_size = self._loaded.input_size
        return ModelInfo(self.name, self.version, sha256, device.description, library_versions(*LIBRARIES))

    def predict(self, requests: list[PredictRequest], on_step: StepCallback | None = None
                ) -> list[dict[str, Any]]:
        # 1. Check inputs: every request before any work, so a bad one fails alone (the runtime retries the rest)
        checked = []
        for request in requests:
            if len(request.images) != 1:
                raise ValueError(f"[invalid_input] A caption request takes exactly one image; got "
                                 f"{len(request.images)}.")
            checked.append(check_caption_params(request.params))
        self.setup()
        assert self._loaded is not None

        # 2. Requests with the same parameters share one generate() call; a seeded sample runs alone, so its
        # caption does not depend on its batch neighbours
        groups: dict[Any, list[int]] = {}
        for index, params in enumerate(checked):
            key = (index,) if params.temperature is not None else tuple(asdict(params).values())
            groups.setdefault(key, []).append(index)
        outputs: list[dict[str, Any] | None] = [None] * len(requests)
        for done, indices in enumerate(groups.values()):
            with self._generate_lock:
                captions = caption_images(self._loaded, [requests[i].images[0] for i in indices], checked[indices[0]])
            for index, output in zip(indices, captions, strict=True):
                outputs[index] = output
            report_step(on_step, done + 1, len(groups))
        return [output for output in outputs if output is not None]


def _test_image() -> Image.Image:
    """A gradient with a square on it: any picture will do, the check is that captioning runs."""
    image = Image.linear_gradient("L").resize((_TEST_IMAGE_SIZE, _TEST_IMAGE_SIZE)).convert("RGB")
    image.paste((200, 40, 40), (16, 16, 48, 48))
    return image


class CheckpointImporter:
    """The `import_captioner` job: validate an uploaded checkpoint zip by loading it exactly as HFCaptioner
    does and captioning a test picture, then register the zip itself as the model's artifact."""

    def train(self, data: TrainingData, params: dict[str, Any], on_step: StepCallback) -> TrainingResult:
        if not data.archive:
            raise invalid_checkpoint("The import has no checkpoint zip.")
        device = torch_device()
        report_step(on_step, 0, 2, {"stage": "loading"})
        # 1. Load it as serving will (a broken checkpoint fails this job, not a user's first caption)
        loaded = load_checkpoint(data.archive, device)
        report_step(on_step, 1, 2, {"stage": "test caption"})
        # 2. Caption a picture
        try:
            [test] = caption_images(loaded, [_test_image()], CaptionParams(beam_width=1, max_length=_TEST_TOKENS))
        except Exception as exc:  # noqa: BLE001 - a checkpoint that loads but cannot caption is invalid too
            raise invalid_checkpoint(f"The checkpoint loads but fails to caption a test image "
                                     f"({_first_line(exc)}).") from None
        report_step(on_step, 2, 2)
        files = loaded.files
        card = {"type": "huggingface", "architecture": loaded.architecture, "pipeline": "image-to-text",
                "files": files[:_MAX_LISTED_FILES], "input_size": loaded.input_size,
                "parameters": sum(p.numel() for p in loaded.model.parameters()),
                "test_caption": test["captions"][0]["text"] if test["captions"] else ""}
        return TrainingResult(metrics={}, card=card, artifact=data.archive, predictor=PREDICTOR,
                              model_kind="caption", output={"architecture": loaded.architecture},
                              device=device.description)

