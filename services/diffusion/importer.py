"""The `import_pipeline` job: a diffusers text-to-image pipeline directory, uploaded as a zip, validated by
loading it exactly as `TextToImagePredictor` will and rendering a tiny test image, then registered as is.

Input: `TrainingData.archive`, the zip of the directory `save_pretrained` wrote (model_index.json at its top or in
its one top folder; see pipelines.py for what is supported and what is never loaded). Params are not read (the
runtime takes the model's name from them).

Output: a `TrainingResult` whose artifact is the zip itself, served by TextToImagePredictor, with the card
    {"type": "diffusers", "pipeline": "StableDiffusionPipeline", "default_scheduler": "PNDM",
     "default_size": [512, 512], "components": {"unet": "UNet2DConditionModel", ...}, "parameters": 1066235307,
     "files": [the first 200 paths], "safety_checker": "removed" | "none", "attention": "sdpa", "dtype": "float16",
     "test_image_sha256": "<hex of the test PNG>"}
and the job output {"pipeline", "default_scheduler", "default_size"}. A zip that is not a loadable text-to-image
pipeline fails the job with ValueError("[invalid_checkpoint] ...") (or "[not_a_zip]", "[unsafe_zip_path]").
"""

import hashlib
from typing import Any

from percept.checkpoints import invalid_checkpoint
from percept.predictor import StepCallback, TrainingData, TrainingResult, report_step
from services.diffusion.device import torch_device
from services.diffusion.pipelines import LoadedPipeline, load_pipeline_zip, set_scheduler
from services.diffusion.pngmeta import encode_png
from services.diffusion.predictor import PREDICTOR, GenerationParams, render
from services.diffusion.service import TEXT_TO_IMAGE

_MAX_LISTED_FILES = 200
# The smoke test: the fewest steps and pixels that still run every component (text encoder, UNet, VAE decoder).
_TEST_STEPS = 2
_TEST_PROMPT = "a red circle on a white background"
_TEST_SEED = 0
_TEST_GUIDANCE = 5.0  # above 1, so the negative (empty) prompt is encoded too


def smoke_test_side(loaded: LoadedPipeline) -> int:
    """The side of the test image: 8 latent pixels (64 px for SD), in the multiples the pipeline accepts."""
    side = 8 * loaded.vae_scale_factor
    multiple = loaded.size_multiple
    return -(-side // multiple) * multiple


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


class PipelineImporter:
    """Validates an uploaded pipeline zip and registers the zip itself as the model's artifact."""

    def train(self, data: TrainingData, params: dict[str, Any], on_step: StepCallback) -> TrainingResult:
        if not data.archive:
            raise invalid_checkpoint("The import has no pipeline zip: upload the zip of the directory "
                                     "`save_pretrained` wrote.")
        device = torch_device()
        report_step(on_step, 0, 2, {"stage": "loading"})
        # 1. Load it as serving will (a broken pipeline fails this job, not a user's first generation)
        loaded = load_pipeline_zip(data.archive, device)
        report_step(on_step, 1, 2, {"stage": "test image"})

        # 2. Render a tiny test image with the checkpoint's own scheduler
        side = smoke_test_side(loaded)
        test = GenerationParams(prompt=_TEST_PROMPT, negative_prompt=None, seed=_TEST_SEED, steps=_TEST_STEPS,
                                guidance_scale=_TEST_GUIDANCE,
                                width=side, height=side, num_images=1, scheduler=None, subject=None, style=None)
        scheduler = set_scheduler(loaded, None)
        try:
            image = render(loaded, test, _TEST_SEED, side, side)
        except Exception as exc:  # noqa: BLE001 - a pipeline that loads but cannot render is invalid too
            raise invalid_checkpoint(f"The pipeline loads but fails to render a {side}x{side} test image "
                                     f"({_first_line(exc)}): check that its components belong together (the "
                                     "text encoder's width must match the UNet's cross-attention).") from None
        png = encode_png(image, {"test_image": True, "pipeline": loaded.pipeline_class, "scheduler": scheduler,
                                 "size": [side, side], "steps": _TEST_STEPS, "seed": _TEST_SEED})
        report_step(on_step, 2, 2)

        # 3. The card; the artifact is the upload itself, unpacked again when a worker serves it
        width, height = loaded.default_size
        card = {"type": "diffusers", "pipeline": loaded.pipeline_class, "default_scheduler": loaded.default_scheduler,
                "default_size": [width, height], "components": loaded.components, "parameters": loaded.parameters,
                "files": loaded.files[:_MAX_LISTED_FILES], "safety_checker": loaded.safety_checker,
                "attention": loaded.attention, "dtype": loaded.dtype,
                "test_image_sha256": hashlib.sha256(png).hexdigest()}
        return TrainingResult(metrics={}, card=card, artifact=data.archive, predictor=PREDICTOR,
                              model_kind=TEXT_TO_IMAGE,
                              output={"pipeline": loaded.pipeline_class, "default_scheduler": loaded.default_scheduler,
                                      "default_size": [width, height]},
                              device=device.description)
