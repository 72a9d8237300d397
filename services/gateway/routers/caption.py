"""Image captioning with a tenant's own captioner (trained here or imported): beam search, best first."""

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from percept.schemas import CaptionParams, JobOut
from services.gateway.deps import EventsDep, InfraDep, SessionDep, TenantDep
from services.gateway.intake import read_job_request
from services.gateway.routers.jobs import (
    CANCEL_AFTER,
    JOB_RESPONSES,
    IdempotencyHeader,
    PreferHeader,
    accepted,
    image_job_body,
)
from services.gateway.usecases import captions

router = APIRouter(prefix="/v1", tags=["caption"])


@router.post("/caption", status_code=202, response_model=JobOut, responses=JOB_RESPONSES, dependencies=CANCEL_AFTER,
             openapi_extra=image_job_body("image", params=CaptionParams, json_too=True))
async def caption(request: Request, response: Response, session: SessionDep, infra: InfraDep, events: EventsDep,
                  tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                  prefer: PreferHeader = None) -> JobOut:
    """Caption an image: output `{"captions": [{"text", "log_prob", "tokens"}]}`, best first, distinct. No
    captioner of yours yet: 404 `no_captioner`."""
    params, images = await read_job_request(request, session, infra, tenant_id, CaptionParams, ("image",))
    submitted = await run_in_threadpool(captions.caption, session, infra, tenant_id, params, images,
                                        idempotency_key)
    return await accepted(response, session, infra, events, tenant_id, submitted, prefer)
