"""Images: upload once, refer to them by id in any job."""

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from services.gateway.deps import InfraDep, SessionDep, TenantDep
from services.gateway.intake import file_part, read_image
from services.gateway.schemas import ErrorOut, ImageOut, Responses
from services.gateway.usecases import images

router = APIRouter(prefix="/v1/images", tags=["images"])
ERRORS: Responses = {401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 413: {"model": ErrorOut},
          415: {"model": ErrorOut}, 422: {"model": ErrorOut}, 503: {"model": ErrorOut}}


@router.post("", status_code=201, response_model=ImageOut, responses=ERRORS)
async def upload_image(request: Request, session: SessionDep, infra: InfraDep, tenant_id: TenantDep) -> ImageOut:
    """Upload an image (multipart `file`); the same bytes give the same id."""
    form = await request.form(max_files=1, max_fields=10)
    data = await read_image(infra, file_part(form, "image", code="missing_image"))
    return ImageOut.of(await run_in_threadpool(images.store_image, session, infra, tenant_id, data))


@router.get("/{image_id}", response_model=ImageOut, responses=ERRORS)
def get_image(image_id: str, session: SessionDep, tenant_id: TenantDep) -> ImageOut:
    """An image's metadata."""
    return ImageOut.of(images.find_image(session, tenant_id, image_id))


@router.get("/{image_id}/content", responses={200: {"content": {"image/*": {}}}, **ERRORS})
def get_image_content(image_id: str, session: SessionDep, infra: InfraDep, tenant_id: TenantDep) -> Response:
    """The image's original bytes."""
    image, data = images.image_content(session, infra, tenant_id, image_id)
    return Response(data, media_type=image.content_type,
                    headers={"ETag": f'"{image.sha256}"', "Cache-Control": "private, max-age=31536000, immutable"})
