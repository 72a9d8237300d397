"""Image classification: ImageNet or a tenant's own classifiers, with a category match check."""

from fastapi import APIRouter, Request, Response

from percept.schemas import ClassifyParams, JobOut
from services.gateway.deps import EventsDep, InfraDep, SessionDep, TenantDep
from services.gateway.intake import read_job_request
from services.gateway.routers.jobs import (
    CANCEL_AFTER,
    JOB_RESPONSES,
    IdempotencyHeader,
    PreferHeader,
    accepted,
    image_job_body,
    submit,
)
from services.gateway.usecases.jobs import JobRequest

router = APIRouter(prefix="/v1", tags=["classify"])


@router.post("/classify", status_code=202, response_model=JobOut, responses=JOB_RESPONSES, dependencies=CANCEL_AFTER,
             openapi_extra=image_job_body("image", params=ClassifyParams, json_too=True))
async def classify(request: Request, response: Response, session: SessionDep, infra: InfraDep, events: EventsDep,
                   tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                   prefer: PreferHeader = None) -> JobOut:
    """Classify an image: top-k labels, `unknown` under the threshold, and a verdict on `expected_label`."""
    params, images = await read_job_request(request, session, infra, tenant_id, ClassifyParams, ("image",))
    # unknown_threshold stays null unless given: each model applies its own (a trained model's is
    # calibrated on its validation set; ImageNet's is 0.25).
    submitted = await submit(session, infra, tenant_id, JobRequest(
        kind="classify", params=params.model_dump(), images=images, model=params.model,
        idempotency_key=idempotency_key), prefer)
    return await accepted(response, session, infra, events, tenant_id, submitted, prefer)
