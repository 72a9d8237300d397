"""Image classification: ImageNet or a tenant's own classifiers, with a category match check."""

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from starlette.concurrency import run_in_threadpool

from services.gateway.deps import EventsDep, InfraDep, TenantDep
from services.gateway.intake import read_job_request
from services.gateway.routers.jobs import JOB_ERRORS, accepted
from services.gateway.schemas import ClassifyParams, JobOut
from services.gateway.usecases import JobRequest, submit_job

router = APIRouter(prefix="/v1", tags=["classify"])


@router.post("/classify", status_code=202, response_model=JobOut, responses=JOB_ERRORS,
             openapi_extra={"requestBody": {"content": {
                 "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                     "image": {"type": "string", "format": "binary", "description": "file, or an image id"},
                     **ClassifyParams.model_json_schema()["properties"]}}},
                 "application/json": {"schema": {"type": "object", "required": ["image"], "properties": {
                     "image": {"type": "string", "description": "an image id"},
                     **ClassifyParams.model_json_schema()["properties"]}}}}}})
async def classify(request: Request, response: Response, infra: InfraDep, events: EventsDep,
                   tenant_id: TenantDep, idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
                   prefer: Annotated[str | None, Header()] = None) -> JobOut:
    """Classify an image: top-k labels, `unknown` under the threshold, and a verdict on `expected_label`."""
    params, images = await read_job_request(request, infra, tenant_id, ClassifyParams, ("image",))
    # unknown_threshold stays null unless given: each model applies its own (a trained model's is
    # calibrated on its validation set; ImageNet's is 0.25).
    job, created = await run_in_threadpool(submit_job, infra, tenant_id, JobRequest(
        kind="classify", params=params.model_dump(), images=[images["image"]], model=params.model,
        idempotency_key=idempotency_key))
    return await accepted(response, infra, events, tenant_id, job, created, prefer)
