"""Reading a job request: multipart form (image files or ids) or a JSON body (image ids)."""

from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import FormData, UploadFile

from percept.errors import ImageTooLarge, InvalidInput, PerceptError
from percept.infra import Infra

P = TypeVar("P", bound=BaseModel)


def validation_message(exc: ValidationError | list) -> tuple[str, list[dict]]:
    errors = exc.errors() if isinstance(exc, ValidationError) else exc
    parts, details = [], []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "header"))
        message = error.get("msg", "is invalid")
        if error.get("type") == "extra_forbidden":
            message = "is not a parameter of this endpoint"
        parts.append(f"`{where}` {message[:1].lower() + message[1:]}" if where else message)
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


async def read_image(infra: Infra, upload: UploadFile) -> bytes:
    cap = infra.settings.max_image_bytes
    return await read_capped(upload, cap, f"The image is larger than {cap // 2**20} MB; send a smaller file.",
                             code="image_too_large")


async def read_job_request(request: Request, session: Session, infra: Infra, tenant_id: str, params_model: type[P],
                           image_fields: tuple[str, ...]) -> tuple[P, list[bytes | str]]:
    """The validated parameters, and the job's images in the order of `image_fields`: uploaded bytes or image ids,
    which submit_job stores or checks as the tenant's (JobRequest.images) in the request's one trip to a worker
    thread."""
    content_type = request.headers.get("content-type", "")
    raw: dict = {}
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
    images: list[bytes | str] = []
    for field in image_fields:
        value = raw.pop(field, None)
        if isinstance(value, UploadFile):
            images.append(await read_image(infra, value))
        elif isinstance(value, str) and value.strip():
            images.append(value.strip())
        else:
            raise InvalidInput(f"`{field}` is required: a file part, or an image id from POST /v1/images.",
                               code="missing_image", details={"field": field})
    return parse_params(params_model, raw), images
