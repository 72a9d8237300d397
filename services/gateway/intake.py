"""Reading a job request: multipart form (image files or ids) or a JSON body (image ids)."""

from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from percept.db.models import Image
from percept.errors import ImageTooLarge, InvalidInput, PerceptError
from percept.infra import Infra
from services.gateway.usecases import store_image

P = TypeVar("P", bound=BaseModel)


def validation_message(exc: ValidationError | list) -> tuple[str, list[dict]]:
    errors = exc.errors() if isinstance(exc, ValidationError) else exc
    parts, details = [], []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "header"))
        message = error.get("msg", "is invalid")
        if error.get("type") == "extra_forbidden":
            message = "is not a parameter of this endpoint"
        parts.append(f"`{where}` {message[0].lower() + message[1:]}" if where else message)
        details.append({"field": where, "problem": message})
    return "Invalid parameters: " + "; ".join(parts) + ".", details


def parse_params(model: type[P], raw: dict) -> P:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        message, details = validation_message(exc)
        raise InvalidInput(message, code="invalid_parameters", details={"errors": details}) from None


def file_part(form: FormData, what: str, code: str) -> UploadFile:
    """The multipart file part named `file`, or a 422 that says how to send it."""
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidInput(f"Send the {what} as a multipart file part named `file`.", code=code)
    return upload


async def read_capped(upload: UploadFile, cap: int, too_large: str, code: str) -> bytes:
    """The upload's bytes; past `cap` it is refused without reading further."""
    data = await upload.read(cap + 1)
    if len(data) > cap:
        raise ImageTooLarge(too_large, code=code, details={"max_bytes": cap})
    return data


async def read_upload(infra: Infra, tenant_id: str, upload: UploadFile) -> Image:
    cap = infra.settings.max_image_bytes
    data = await read_capped(upload, cap, f"The image is larger than {cap // 2**20} MB; send a smaller file.",
                             code="image_too_large")
    return await run_in_threadpool(store_image, infra, tenant_id, data)


async def read_job_request(request: Request, infra: Infra, tenant_id: str, params_model: type[P],
                           image_fields: tuple[str, ...]) -> tuple[P, dict[str, Image | str]]:
    """The validated parameters, and per image field the stored upload or the image id given."""
    content_type = request.headers.get("content-type", "")
    raw: dict = {}
    images: dict[str, Image | str] = {}
    if content_type.startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise InvalidInput("The body is not valid JSON.", code="invalid_json", status=400) from None
        if not isinstance(body, dict):
            raise InvalidInput("The JSON body must be an object of parameters.", code="invalid_json", status=400)
        raw = dict(body)
    elif content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form(max_files=len(image_fields), max_fields=100)
        raw = {key: value for key, value in form.multi_items()}
    else:
        raise PerceptError("Send multipart/form-data (with image files) or application/json (with image ids).",
                           code="unsupported_media_type", status=415)
    for field in image_fields:
        value = raw.pop(field, None)
        if isinstance(value, UploadFile):
            images[field] = await read_upload(infra, tenant_id, value)
        elif isinstance(value, str) and value.strip():
            images[field] = value.strip()  # resolved (and its tenant checked) in the job's transaction
        else:
            raise InvalidInput(f"`{field}` is required: a file part, or an image id from POST /v1/images.",
                               code="missing_image", details={"field": field})
    return parse_params(params_model, raw), images
