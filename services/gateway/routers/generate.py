"""Text-to-image: a prompt's images, and subject x style grids fanned out as child jobs."""

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from percept.schemas import GenerateParams, GridParams, JobOut
from services.gateway.deps import EventsDep, InfraDep, SessionDep, TenantDep
from services.gateway.routers.jobs import CANCEL_AFTER, JOB_RESPONSES, IdempotencyHeader, PreferHeader, accepted
from services.gateway.usecases import generation

router = APIRouter(prefix="/v1/generate", tags=["generate"])


@router.post("", status_code=202, response_model=JobOut, responses=JOB_RESPONSES, dependencies=CANCEL_AFTER)
async def generate(body: GenerateParams, response: Response, session: SessionDep, infra: InfraDep,
                   events: EventsDep, tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                   prefer: PreferHeader = None) -> JobOut:
    """Render `num_images` images of `prompt`: output `{"images": [{"image_id", "seed", "sha256"}], ...}`. Progress
    per denoising step (done/total, `eta_seconds`); the seed is random if absent and always recorded. No
    text-to-image model of yours yet: 404 `no_text_to_image_model`."""
    submitted = await run_in_threadpool(generation.generate, session, infra, tenant_id, body, idempotency_key)
    return await accepted(response, session, infra, events, tenant_id, submitted, prefer)


@router.post("/grid", status_code=202, response_model=JobOut, responses=JOB_RESPONSES, dependencies=CANCEL_AFTER)
async def generate_grid(body: GridParams, response: Response, session: SessionDep, infra: InfraDep,
                        events: EventsDep, tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                        prefer: PreferHeader = None) -> JobOut:
    """A subject x style grid: one child job per cell (`children`), each with a seed derived from the grid's seed
    and the cell; progress counts the cells ended. Once the last ends: output `{"cells": [{"subject", "style",
    "prompt", "seed", "job_id", "status", "images", "error"}], "cards": [image ids], "sheets": [...]}`, a contact
    sheet per style and an index sheet of the whole grid. A failed cell fails alone; canceling the grid cancels
    the cells not yet done."""
    submitted = await run_in_threadpool(generation.generate_grid, session, infra, tenant_id, body, idempotency_key)
    return await accepted(response, session, infra, events, tenant_id, submitted, prefer)
