"""Images: upload once, refer to them by id in any job."""

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from percept.db.generations import ImageFilter
from percept.schemas import ErrorOut, ImageKind, ImageOut, ImagePage, JobOut, Responses
from services.gateway.deps import EventsDep, InfraDep, SessionDep, TenantDep
from services.gateway.intake import file_part, read_image
from services.gateway.routers.jobs import CANCEL_AFTER, JOB_RESPONSES, IdempotencyHeader, PreferHeader, accepted
from services.gateway.usecases import generation, images

router = APIRouter(prefix="/v1/images", tags=["images"])
ERRORS: Responses = {401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 413: {"model": ErrorOut},
          415: {"model": ErrorOut}, 422: {"model": ErrorOut}, 503: {"model": ErrorOut}}


@router.post("", status_code=201, response_model=ImageOut, responses=ERRORS,
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["file"],
                 "properties": {"file": {"type": "string", "format": "binary"}}}}}}})
async def upload_image(request: Request, session: SessionDep, infra: InfraDep, tenant_id: TenantDep) -> ImageOut:
    """Upload an image (multipart `file`); the same bytes give the same id."""
    form = await request.form(max_files=1, max_fields=10)
    data = await read_image(infra, file_part(form, "image", code="missing_image"))
    return ImageOut.of(await run_in_threadpool(images.store_image, session, infra, tenant_id, data))


@router.get("", response_model=ImagePage, responses=ERRORS)
def list_images(session: SessionDep, tenant_id: TenantDep,
                q: Annotated[str | None, Query(max_length=200, description="Words of the prompt")] = None,
                subject: Annotated[str | None, Query(max_length=200)] = None,
                style: Annotated[str | None, Query(max_length=200)] = None,
                model: Annotated[str | None, Query(max_length=200, description="`name` or `name:version`")] = None,
                job: Annotated[str | None, Query(max_length=40, description="The job that made them")] = None,
                grid: Annotated[str | None, Query(max_length=40, description="A grid's job id")] = None,
                kind: ImageKind | None = None,
                created_after: datetime | None = None, created_before: datetime | None = None,
                limit: Annotated[int, Query(ge=1, le=200)] = 50,
                cursor: Annotated[str | None, Query(max_length=40)] = None) -> ImagePage:
    """Your images, newest first; generated ones carry their generation parameters (`generation`)."""
    where = ImageFilter(q=q, subject=subject, style=style, model=model, job=job, grid=grid, kind=kind,
                        created_after=generation.as_utc(created_after),
                        created_before=generation.as_utc(created_before))
    return generation.list_images(session, tenant_id, where, limit, cursor)


@router.get("/{image_id}", response_model=ImageOut, responses=ERRORS)
def get_image(image_id: str, session: SessionDep, tenant_id: TenantDep) -> ImageOut:
    """An image's metadata, and for a generated image what made it (`generation`)."""
    return generation.image_details(session, tenant_id, image_id)


@router.post("/{image_id}/reproduce", status_code=202, response_model=JobOut, responses=JOB_RESPONSES,
             dependencies=CANCEL_AFTER)
async def reproduce_image(image_id: str, response: Response, session: SessionDep, infra: InfraDep,
                          events: EventsDep, tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                          prefer: PreferHeader = None) -> JobOut:
    """Render a generated image again from its provenance: output `{"image_id", "sha256", "original_image_id",
    "original_sha256", "identical"}` (identical bytes give the same image id). Not a generated image: 422
    `not_a_generated_image`."""
    submitted = await run_in_threadpool(generation.reproduce, session, infra, tenant_id, image_id, idempotency_key)
    return await accepted(response, session, infra, events, tenant_id, submitted, prefer)


@router.get("/{image_id}/content", responses={200: {"content": {"image/*": {}}}, **ERRORS})
def get_image_content(image_id: str, session: SessionDep, infra: InfraDep, tenant_id: TenantDep) -> Response:
    """The image's original bytes."""
    image, data = images.image_content(session, infra, tenant_id, image_id)
    return Response(data, media_type=image.content_type,
                    headers={"ETag": f'"{image.sha256}"', "Cache-Control": "private, max-age=31536000, immutable"})
