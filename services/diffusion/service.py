"""The diffusion service declares itself (read by the core, the gateway and the workers; no ML import)."""

from typing import Any

from percept.services import JobKind, Service, WorkerPool

FINALIZERS = "services.diffusion.finalizers"
# The registry kind of a diffusers pipeline: what `model` names in a generation.
TEXT_TO_IMAGE = "text-to-image"


def prompt_text(output: dict[str, Any]) -> str | None:
    """A generation (or a grid) is found by its prompts' words, and a grid by its subjects and styles too."""
    cells = output.get("cells", [])
    words = [output.get("prompt"), output.get("negative_prompt"),
             *(cell.get("prompt") for cell in cells), *(cell.get("subject") for cell in cells),
             *(cell.get("style") for cell in cells)]
    return " ".join(dict.fromkeys(word for word in words if word)) or None


SERVICE = Service(
    name="diffusion",
    job_kinds=(
        # One job renders `num_images` images of one prompt, one seed each; the images and their provenance
        # are stored with the result. No built-in model (no weights ship): the default is the tenant's newest.
        JobKind("generate", queue="diffusion", task="percept.generate", model_kind=TEXT_TO_IMAGE,
                deterministic=True, finalizer=f"{FINALIZERS}:store_generated",
                search_text="services.diffusion.service:prompt_text"),
        # A generated image rendered again from its provenance, and compared byte for byte.
        JobKind("reproduce_image", queue="diffusion", task="percept.reproduce_image", model_kind=TEXT_TO_IMAGE,
                finalizer=f"{FINALIZERS}:store_reproduction"),
        # subjects x styles: one `generate` child per cell on the same queue (N workers, N cells at a time),
        # then the contact sheets once the last cell has ended.
        JobKind("generate_grid", queue="diffusion", task="percept.generate_grid", model_kind=TEXT_TO_IMAGE,
                fan_out="services.diffusion.grid:GridFanOut", finalizer=f"{FINALIZERS}:store_cards",
                search_text="services.diffusion.service:prompt_text"),
        # A diffusers pipeline directory (a zip), validated by loading it and rendering a test image here.
        JobKind("import_pipeline", queue="diffusion", task="percept.import_pipeline",
                trainer="services.diffusion.importer:PipelineImporter"),
    ),
    # Prefork, one job at a time per process: a generation holds the GPU for seconds to minutes, and Celery's
    # time limits (longer than the longest generation the parameter caps allow) need a process pool.
    workers=(WorkerPool("diffusion", queues=("diffusion",), uses_gpu=True),),
    requirements=("requirements.txt",),
    device="services.diffusion.device:serving_device",
)
