"""Text-to-image: generate, a subject x style grid (fanned out as child jobs), reproduce a generated image, and
find a tenant's images again."""

import secrets
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from percept.db import generations as generation_repo
from percept.db import registry
from percept.db.generations import ImageFilter
from percept.db.models import Job
from percept.errors import InvalidInput, NotFound
from percept.infra import Infra
from percept.schemas import MAX_SEED, GenerateParams, GenerationSettings, GridParams, ImageOut, ImagePage
from services.gateway.usecases.images import find_image
from services.gateway.usecases.jobs import JobRequest, submit_job

# The job kinds behind these endpoints and the registry kind of the models that serve them; services/diffusion
# declares them.
GENERATE, GENERATE_GRID, REPRODUCE = "generate", "generate_grid", "reproduce_image"
TEXT_TO_IMAGE = "text-to-image"
# A grid's size: its cells run as jobs of their own, and its contact sheets must stay readable.
MAX_GRID_CELLS = 64
MAX_GRID_IMAGES = 128


def _newest_pipeline(session: Session, tenant_id: str) -> str:
    """`name:version` of the tenant's text-to-image model imported last; 404 with how to get one."""
    newest = registry.newest_of_kind(session, tenant_id, TEXT_TO_IMAGE)
    if newest is None:
        raise NotFound("You have no text-to-image model yet: import a diffusers pipeline directory (zipped) with "
                       "POST /v1/models/import and kind `text-to-image`.", code="no_text_to_image_model")
    return f"{newest.name}:{newest.version}"


def _check_size(infra: Infra, settings: GenerationSettings) -> None:
    if settings.width is not None and settings.height is not None:
        pixels, cap = settings.width * settings.height, infra.settings.max_generation_pixels
        if pixels > cap:
            raise InvalidInput(f"{settings.width} x {settings.height} is {pixels:,} pixels, more than the {cap:,} a "
                               "generation may have; ask for a smaller width or height.",
                               code="generation_too_large", details={"pixels": pixels, "max_pixels": cap})


def _submit(session: Session, infra: Infra, tenant_id: str, kind: str, params: GenerationSettings,
            idempotency_key: str | None) -> tuple[Job, bool]:
    """A job of `kind` with the model asked for (or the tenant's newest) and the caller's seed, or one the
    platform picks (recorded in the job's params, outside the request a replay must match)."""
    model = params.model or _newest_pipeline(session, tenant_id)
    chosen = {} if params.seed is not None else {"seed": secrets.randbelow(MAX_SEED + 1)}
    return submit_job(session, infra, tenant_id, JobRequest(
        kind=kind, params=params.model_dump(), model=model, idempotency_key=idempotency_key, chosen=chosen))


def generate(session: Session, infra: Infra, tenant_id: str, params: GenerateParams,
             idempotency_key: str | None) -> tuple[Job, bool]:
    """A generation job: `num_images` images of one prompt, with the model asked for or the tenant's newest."""
    _check_size(infra, params)
    return _submit(session, infra, tenant_id, GENERATE, params, idempotency_key)


def generate_grid(session: Session, infra: Infra, tenant_id: str, params: GridParams,
                  idempotency_key: str | None) -> tuple[Job, bool]:
    """A grid job: its first run makes one `generate` child per (subject, style) cell, its last one the cards."""
    _check_size(infra, params)
    if "{subject}" not in params.template or "{style}" not in params.template:
        raise InvalidInput("`template` must contain both `{subject}` and `{style}`, e.g. "
                           "\"{subject}, in the style of {style}\".", code="invalid_template",
                           details={"template": params.template})
    cells = len(params.subjects) * len(params.styles)
    images = cells * params.images_per_prompt
    if cells > MAX_GRID_CELLS or images > MAX_GRID_IMAGES:
        raise InvalidInput(f"A grid of {len(params.subjects)} subjects x {len(params.styles)} styles x "
                           f"{params.images_per_prompt} images is {cells} cells and {images} images; a grid has at "
                           f"most {MAX_GRID_CELLS} cells and {MAX_GRID_IMAGES} images. Split it into smaller grids.",
                           code="grid_too_large", details={"cells": cells, "images": images,
                                                           "max_cells": MAX_GRID_CELLS, "max_images": MAX_GRID_IMAGES})
    return _submit(session, infra, tenant_id, GENERATE_GRID, params, idempotency_key)


def reproduce(session: Session, infra: Infra, tenant_id: str, image_id: str,
              idempotency_key: str | None) -> tuple[Job, bool]:
    """Render a generated image again from its provenance (same model version, parameters and seed)."""
    image = find_image(session, tenant_id, image_id)
    generation = generation_repo.get_generation(session, tenant_id, image.id)
    if generation is None or generation.role != "image":
        what = "a grid's contact sheet" if generation is not None else "not made by a text-to-image generation"
        raise InvalidInput(f"Image {image_id!r} is {what}: only generated images can be reproduced.",
                           code="not_a_generated_image", details={"image_id": image_id})
    record = generation.record
    params = {key: record.get(key) for key in ("prompt", "negative_prompt", "seed", "steps", "guidance_scale",
                                               "width", "height", "scheduler", "subject", "style")}
    params = {key: value for key, value in params.items() if value is not None or key == "negative_prompt"}
    params |= {"num_images": 1, "reproduce": {"image_id": image.id, "sha256": image.sha256}}
    model = f"{generation.model_name}:{generation.model_version}"
    return submit_job(session, infra, tenant_id, JobRequest(
        kind=REPRODUCE, params=params, model=model, idempotency_key=idempotency_key,
        inputs=[{"image_id": image.id, "sha256": image.sha256}]))


def image_details(session: Session, tenant_id: str, image_id: str) -> ImageOut:
    image = find_image(session, tenant_id, image_id)
    return ImageOut.of(image, generation_repo.get_generation(session, tenant_id, image.id))


def list_images(session: Session, tenant_id: str, where: ImageFilter, limit: int, cursor: str | None) -> ImagePage:
    """The tenant's images newest first, generated ones with their parameters; `cursor` is `next_cursor`."""
    if cursor is not None and not cursor.startswith("img_"):
        raise InvalidInput("`cursor` must be the `next_cursor` of a previous page.", code="invalid_cursor")
    if where.created_after and where.created_before and where.created_after >= where.created_before:
        raise InvalidInput("`created_after` must be earlier than `created_before`.", code="invalid_date_range")
    rows = generation_repo.list_images(session, tenant_id, where, limit=limit + 1, before_id=cursor)
    data = [ImageOut.of(image, generation) for image, generation in rows[:limit]]
    return ImagePage(data=data, next_cursor=data[-1].id if len(rows) > limit else None)


def as_utc(moment: datetime | None) -> datetime | None:
    """A date-range bound without a timezone is read as UTC."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment
