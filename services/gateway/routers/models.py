"""The model registry as clients see it, ensembles of the tenant's trained classifiers, and imported
checkpoints."""

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from percept.schemas import EnsembleIn, ErrorOut, JobOut, ModelImportParams, ModelOut, Responses
from services.gateway.deps import EventsDep, InfraDep, SessionDep, TenantDep
from services.gateway.intake import file_part, parse_params
from services.gateway.routers.jobs import CANCEL_AFTER, JOB_RESPONSES, IdempotencyHeader, PreferHeader, accepted
from services.gateway.usecases import models

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=list[ModelOut], responses={401: {"model": ErrorOut}})
def list_models(session: SessionDep, tenant_id: TenantDep) -> list[ModelOut]:
    """Built-in models and the tenant's own, with their versions."""
    return models.list_models(session, tenant_id)


@router.post("/ensembles", status_code=202, response_model=JobOut, responses=JOB_RESPONSES, dependencies=CANCEL_AFTER)
async def create_ensemble(body: EnsembleIn, response: Response, session: SessionDep, infra: InfraDep,
                          events: EventsDep, tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                          prefer: PreferHeader = None) -> JobOut:
    """A job that registers an ensemble of your trained classifiers as `name` (votes weighted per class by
    each member's validation F1); its output names the model. Serve it with `/v1/classify` like any model."""
    submitted = await run_in_threadpool(models.create_ensemble, session, infra, tenant_id, body.name, body.members,
                                        idempotency_key)
    return await accepted(response, session, infra, events, tenant_id, submitted, prefer)


IMPORT_RESPONSES: Responses = {**JOB_RESPONSES, 409: {"model": ErrorOut}, 413: {"model": ErrorOut},
                               415: {"model": ErrorOut}}


@router.post("/import", status_code=202, response_model=JobOut, responses=IMPORT_RESPONSES, dependencies=CANCEL_AFTER,
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["file", *ModelImportParams.model_json_schema()["required"]],
                 "properties": {"file": {"type": "string", "format": "binary", "description": "the zip"},
                                **ModelImportParams.model_json_schema()["properties"]}}}}}})
async def import_model(request: Request, response: Response, session: SessionDep, infra: InfraDep,
                       events: EventsDep, tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                       prefer: PreferHeader = None) -> JobOut:
    """Import a checkpoint directory, zipped (multipart `file`, with `name` and optional `kind`): `caption` (the
    default; a Hugging Face image-to-text checkpoint, loaded in a captioner worker, which captions a test picture;
    served by `/v1/caption`) or `text-to-image` (a diffusers pipeline, loaded in a diffusion worker, which renders
    a test image; served by `/v1/generate`). The job registers `name` version N+1. Over the size limit: 413
    `import_too_large`; not a zip: 415 `not_a_zip`; a built-in name: 409."""
    # The file part is spooled to a temporary file as it streams in (on disk past 1 MB); it is hashed and
    # stored from there in chunks, never read whole. Closing the form deletes it.
    async with request.form(max_files=1, max_fields=10) as form:
        upload = file_part(form, "checkpoint zip", code="missing_file")
        params = parse_params(ModelImportParams, {key: value for key, value in form.multi_items() if key != "file"})
        submitted = await run_in_threadpool(models.import_model, session, infra, tenant_id, params, upload.file,
                                            upload.size or 0, idempotency_key)
    return await accepted(response, session, infra, events, tenant_id, submitted, prefer)


@router.get("/{name}", response_model=ModelOut, responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}})
def get_model(name: str, session: SessionDep, tenant_id: TenantDep) -> ModelOut:
    """One model: kind, versions, weights sha256, metrics and model card."""
    return models.find_model(session, tenant_id, name)
