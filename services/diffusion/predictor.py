"""Text-to-image generation with an imported diffusers pipeline (see services/diffusion/pipelines.py for what
loads), every image reproducible from its record alone.

`TextToImagePredictor` inputs (one `PredictRequest` per job; its images are unused):
    params (other keys, such as `model`, `cell` or `reproduce`, are ignored):
        prompt (str, required, 1..2000 characters): what to draw.
        negative_prompt (str or None): what to steer away from (used when guidance_scale > 1).
        seed (int, required, 0 <= seed < 2**32): image i of the job uses (seed + i) % 2**32.
        steps (int, 1..150, default 30): denoising steps per image.
        guidance_scale (float, 0..30, default 7.5): classifier-free guidance; 1 or less turns it off.
        width, height (int or None): 64..2048, multiples of 8 (and of the model's VAE scale factor); None is the
            model's own size (512 for SD 1.x, 1024 for SDXL).
        num_images (int, 1..8, default 1): images of this prompt, one seed each.
        scheduler (str or None): one of pipelines.SCHEDULERS ("Euler a", "DPM++ 2M Karras", ...); None is the
            checkpoint's own.
        subject, style (str, optional): the grid cell this job renders; recorded with each image.

Each image is rendered on its own (batch 1) from noise drawn by a CPU `torch.Generator` seeded with its seed, so
a seed means the same on every device and an image reproduces without the others of its job.

Output (one dict per request; JSON-able but for each image's `png`, which the finalizer stores and drops):
    {"prompt", "negative_prompt", "seed", "scheduler": the name used, "width", "height", "steps",
     "guidance_scale", "device", "dtype",
     "images": [{"seed": 123, "png": b"...", "sha256": "<hex of png>", "width": 512, "height": 512,
                 "generation": <record>}, ...]}
The record (also the PNG's `percept` chunk, see pngmeta.py) holds what the image is a function of, and nothing
else (no job id, no timing), so rendering it again gives the same PNG, byte for byte:
    {"prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "scheduler",
     "model": {"name", "version", "sha256"}, "pipeline", "device": "cpu" | "cuda (<GPU name>)", "dtype",
     "libraries": {...}, "noise": "cpu-generator", "cpu_threads": torch's thread count (on the CPU only: its
     kernels split reductions by thread, so another count gives pixels that differ in their low bits), and
     "subject", "style" when given}

Progress: `on_step(done, total, info)` after every denoising step, total = steps * num_images, info =
{"image", "images", "step", "steps", "eta_seconds", "steps_per_second"}; a JobCanceled it raises stops the job at
that step. Bad parameters raise ValueError("[invalid_parameters] ...").
"""

import gc
import hashlib
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from percept.predictor import BasePredictor, ModelInfo, PredictRequest, StepCallback, report_step
from percept.version import library_versions
from services.diffusion.device import torch_device
from services.diffusion.pipelines import (
    SCHEDULERS,
    LoadedPipeline,
    check_scheduler,
    load_pipeline_zip,
    set_scheduler,
)
from services.diffusion.pngmeta import encode_png

PREDICTOR = "services.diffusion.predictor:TextToImagePredictor"
LIBRARIES = ("diffusers", "transformers", "torch", "safetensors")
# Where the initial noise comes from: a seeded CPU generator, the same numbers on every device.
NOISE = "cpu-generator"

MAX_PROMPT_CHARS = 2000
SEED_LIMIT = 2**32
DEFAULT_STEPS = 30
MAX_STEPS = 150
DEFAULT_GUIDANCE_SCALE = 7.5
MAX_GUIDANCE_SCALE = 30.0
MIN_SIDE = 64
MAX_SIDE = 2048  # the gateway's bound too
MAX_IMAGES = 8


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    guidance_scale: float
    width: int | None  # None: the model's default
    height: int | None
    num_images: int
    scheduler: str | None
    subject: str | None
    style: str | None


def _invalid(sentence: str) -> ValueError:
    return ValueError(f"[invalid_parameters] {sentence}")


def _integer(params: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(f"`{name}` must be a whole number from {low} to {high}; got {value!r}.")
    return value


def _text(params: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = params.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise _invalid(f"`{name}` must be a text describing the image; got {value!r}." if value is not None else
                       f"`{name}` is required: describe the image to generate.")
    if not value.strip():
        if required:
            raise _invalid(f"`{name}` is empty: describe the image to generate.")
        return None  # an empty negative prompt is no negative prompt (the same image, the same record)
    if len(value) > MAX_PROMPT_CHARS:
        raise _invalid(f"`{name}` is {len(value)} characters long; the limit is {MAX_PROMPT_CHARS} (the text "
                       "encoder reads only its first 77 tokens anyway).")
    return value


def check_generation_params(params: dict[str, Any]) -> GenerationParams:
    """The request's parameters with their defaults (sizes not yet resolved against a model), or ValueError
    naming the one that is wrong."""
    prompt = _text(params, "prompt", required=True)
    assert prompt is not None
    seed = params.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise _invalid(f"`seed` must be a whole number from 0 to {SEED_LIMIT - 1}; got {seed!r}.")
    steps = _integer(params, "steps", DEFAULT_STEPS, 1, MAX_STEPS)
    guidance = params.get("guidance_scale")
    if guidance is None:
        guidance = DEFAULT_GUIDANCE_SCALE
    if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not math.isfinite(guidance) \
            or not 0 <= guidance <= MAX_GUIDANCE_SCALE:
        raise _invalid(f"`guidance_scale` must be a number from 0 to {MAX_GUIDANCE_SCALE:g}; got {guidance!r}.")
    width = _integer(params, "width", None, MIN_SIDE, MAX_SIDE)
    height = _integer(params, "height", None, MIN_SIDE, MAX_SIDE)
    num_images = _integer(params, "num_images", 1, 1, MAX_IMAGES)
    scheduler = params.get("scheduler")
    if scheduler is not None and not isinstance(scheduler, str):
        raise _invalid(f"`scheduler` must be a scheduler's name ({', '.join(SCHEDULERS)}); got {scheduler!r}.")
    labels = {}
    for name in ("subject", "style"):
        label = params.get(name)
        if label is not None and not isinstance(label, str):
            raise _invalid(f"`{name}` must be a text; got {label!r}.")
        labels[name] = label
    assert steps is not None and num_images is not None
    return GenerationParams(prompt=prompt, negative_prompt=_text(params, "negative_prompt"), seed=seed,
                            steps=steps, guidance_scale=float(guidance), width=width, height=height,
                            num_images=num_images, scheduler=scheduler or None, subject=labels["subject"],
                            style=labels["style"])


def resolve_size(loaded: LoadedPipeline, params: GenerationParams) -> tuple[int, int]:
    """(width, height): the request's, checked against what the model's VAE and UNet accept, or the model's own."""
    default_width, default_height = loaded.default_size
    width = default_width if params.width is None else params.width
    height = default_height if params.height is None else params.height
    multiple = loaded.size_multiple
    for name, side, asked in (("width", width, params.width), ("height", height, params.height)):
        if asked is not None and side % multiple:
            raise _invalid(f"`{name}` must be a multiple of {multiple} for this model; got {side} (try "
                           f"{max(multiple, round(side / multiple) * multiple)}).")
    return width, height


def _device_kind(description: str) -> str:
    """The device without its index ("cuda:1 (X)" -> "cuda (X)"): the same GPU model renders the same pixels."""
    return re.sub(r"^cuda:\d+", "cuda", description)


class TextToImagePredictor(BasePredictor):
    """Serves an imported diffusers text-to-image pipeline (see the module docstring for its inputs and outputs).
    Constructed by the runtime with the registered artifact: the pipeline directory's zip."""

    def __init__(self, artifact: bytes, name: str = "imported-pipeline", version: str = "1") -> None:
        super().__init__()
        self._artifact: bytes | None = artifact
        self.name, self.version = name, version
        self._loaded: LoadedPipeline | None = None
        self._device_description = "cpu"
        self._record_base: dict[str, Any] = {}  # the model's part of every image's record
        self._render_lock = threading.Lock()

    def load(self) -> ModelInfo:
        if self._artifact is None:
            raise RuntimeError("This predictor was closed; construct a new one to load the pipeline again.")
        # 1. Unpack into a temporary directory, load, and remove it (the weights are in memory then)
        sha256 = hashlib.sha256(self._artifact).hexdigest()
        device = torch_device()
        self._loaded = load_pipeline_zip(self._artifact, device)
        self._artifact = None  # gigabytes for SDXL; the pipeline in memory is all serving needs
        self._device_description = device.description
        # 2. What the worker's model cache weighs it by
        device_memory = torch.cuda.get_device_properties(device.name).total_memory if device.is_cuda else 0
        self._record_base = {
            "model": {"name": self.name, "version": self.version, "sha256": sha256},
            "pipeline": self._loaded.pipeline_class, "device": _device_kind(device.description),
            "dtype": self._loaded.dtype, "libraries": dict(library_versions(*LIBRARIES)), "noise": NOISE,
        }
        return ModelInfo(self.name, self.version, sha256, device.description, library_versions(*LIBRARIES),
                         memory_bytes=self._loaded.memory_bytes, device_memory_bytes=device_memory)

    def close(self) -> None:
        """Release the pipeline (and the GPU memory it held); the predictor cannot render afterwards."""
        cuda = self._loaded is not None and self._device_description.startswith("cuda")
        self._loaded = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    @property
    def loaded(self) -> LoadedPipeline:
        self.setup()
        if self._loaded is None:
            raise RuntimeError("This predictor was closed; construct a new one to render again.")
        return self._loaded

    def generation_record(self, params: GenerationParams, seed: int, width: int, height: int,
                          scheduler: str) -> dict[str, Any]:
        """What one image is a function of (its PNG's `percept` chunk)."""
        record: dict[str, Any] = {
            "prompt": params.prompt, "negative_prompt": params.negative_prompt, "seed": seed, "steps": params.steps,
            "guidance_scale": params.guidance_scale, "width": width, "height": height, "scheduler": scheduler,
            **self._record_base,
        }
        if record["device"] == "cpu":
            # The CPU kernels' reductions split by thread: another thread count gives other low bits
            record["cpu_threads"] = torch.get_num_threads()
        for name in ("subject", "style"):
            if getattr(params, name) is not None:
                record[name] = getattr(params, name)
        return record

    def predict(self, requests: list[PredictRequest], on_step: StepCallback | None = None
                ) -> list[dict[str, Any]]:
        # 1. Check inputs: every request before any work, so a bad one renders nothing
        checked = [check_generation_params(request.params) for request in requests]
        loaded = self.loaded
        sizes = [resolve_size(loaded, params) for params in checked]
        for params in checked:
            check_scheduler(loaded, params.scheduler)

        outputs = []
        for params, (width, height) in zip(checked, sizes, strict=True):
            with self._render_lock:  # the scheduler is the pipeline's state: one request at a time
                # 2. The scheduler (cached per name)
                scheduler = set_scheduler(loaded, params.scheduler)
                # 3. Each image on its own, from its own seed
                images = []
                progress = _Progress(on_step, params.steps, params.num_images)
                for index in range(params.num_images):
                    seed = (params.seed + index) % SEED_LIMIT
                    image = render(loaded, params, seed, width, height, progress.for_image(index))
                    # 4. The PNG with its record
                    record = self.generation_record(params, seed, width, height, scheduler)
                    png = encode_png(image, record)
                    images.append({"seed": seed, "png": png, "sha256": hashlib.sha256(png).hexdigest(),
                                   "width": image.width, "height": image.height, "generation": record})
            outputs.append({
                "prompt": params.prompt, "negative_prompt": params.negative_prompt, "seed": params.seed,
                "scheduler": scheduler, "width": width, "height": height, "steps": params.steps,
                "guidance_scale": params.guidance_scale, "device": self._device_description,
                "dtype": loaded.dtype, "images": images,
            })
        return outputs


class _Progress:
    """Turns the pipeline's per-timestep callbacks into the job's steps (a scheduler such as Heun or PNDM runs
    more timesteps than steps), with the measured rate and the time left."""

    def __init__(self, on_step: StepCallback | None, steps: int, images: int) -> None:
        self.on_step, self.steps, self.images = on_step, steps, images
        self.total = steps * images
        self.started = time.monotonic()

    def for_image(self, index: int) -> Any:
        def on_timestep(pipe: Any, timestep_index: int, _timestep: Any, callback_kwargs: dict[str, Any]
                        ) -> dict[str, Any]:
            timesteps = max(int(getattr(pipe, "num_timesteps", 0) or self.steps), 1)
            step = min(self.steps, (timestep_index + 1) * self.steps // timesteps)
            done = index * self.steps + step
            elapsed = max(time.monotonic() - self.started, 1e-9)
            rate = done / elapsed
            report_step(self.on_step, done, self.total, {
                "image": index + 1, "images": self.images, "step": step, "steps": self.steps,
                "eta_seconds": round((self.total - done) / rate, 2) if rate > 0 else None,
                "steps_per_second": round(rate, 3)})
            return callback_kwargs

        return on_timestep


def render(loaded: LoadedPipeline, params: GenerationParams, seed: int, width: int, height: int,
           on_timestep: Any = None) -> Image.Image:
    """One image (batch 1) with the pipeline's current scheduler, from noise of a CPU generator seeded `seed`."""
    generator = torch.Generator("cpu").manual_seed(seed)
    result = loaded.pipe(
        prompt=params.prompt, negative_prompt=params.negative_prompt, num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale, width=width, height=height, num_images_per_prompt=1,
        generator=generator, output_type="pil", callback_on_step_end=on_timestep,
        callback_on_step_end_tensor_inputs=[])
    image: Image.Image = result.images[0]
    return image.convert("RGB")
