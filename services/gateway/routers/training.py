"""Datasets and training jobs: bring labelled or captioned photos, get a served classifier or captioner with
honest metrics."""

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from percept.errors import InvalidInput
from percept.schemas import (
    DatasetOut,
    ErrorOut,
    JobOut,
    Responses,
    TrainCaptionerParams,
    TrainClassifierParams,
)
from services.gateway.deps import EventsDep, InfraDep, SessionDep, TenantDep
from services.gateway.intake import file_part, parse_params
from services.gateway.routers.jobs import CANCEL_AFTER, JOB_RESPONSES, IdempotencyHeader, PreferHeader, accepted
from services.gateway.usecases import captions, datasets, models

router = APIRouter(prefix="/v1", tags=["training"])
ERRORS: Responses = {401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 413: {"model": ErrorOut},
          415: {"model": ErrorOut}, 422: {"model": ErrorOut}, 429: {"model": ErrorOut}, 503: {"model": ErrorOut}}


@router.post("/datasets", status_code=202, response_model=DatasetOut, responses=ERRORS,
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["file"], "properties": {
                     "file": {"type": "string", "format": "binary", "description": "the zip"},
                     "name": {"type": "string", "description": "default: the file's name"}}}}}}})
async def upload_dataset(request: Request, response: Response, session: SessionDep, infra: InfraDep,
                         tenant_id: TenantDep) -> DatasetOut:
    """Upload a zip (multipart `file`, optional `name`): one folder per class, or images with captions
    (Flickr8k layout, COCO captions, captions.jsonl/csv). It is analysed by a job:
    `status` is `analyzing`, then `ready` with its report (counts, sizes, undecodable files, duplicates) or
    `failed` with the reason; poll the `Location`."""
    # The file part is spooled to a temporary file as it streams in (on disk past 1 MB); it is hashed
    # and stored from there in chunks, never read whole. Closing the form deletes it.
    async with request.form(max_files=1, max_fields=10) as form:
        upload = file_part(form, "zip", code="missing_file")
        name = str(form.get("name") or upload.filename or "dataset").removesuffix(".zip")[:200]
        dataset = await run_in_threadpool(datasets.upload_dataset, session, infra, tenant_id, name, upload.file,
                                          upload.size or 0)
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return dataset


@router.get("/datasets", response_model=list[DatasetOut], responses=ERRORS)
def list_datasets(session: SessionDep, tenant_id: TenantDep) -> list[DatasetOut]:
    """Your datasets, newest first."""
    return datasets.list_datasets(session, tenant_id)


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, responses=ERRORS)
def get_dataset(dataset_id: str, session: SessionDep, tenant_id: TenantDep) -> DatasetOut:
    """A dataset: its analysis status, and the report once it is ready."""
    return datasets.find_dataset(session, tenant_id, dataset_id)


@router.post("/train/classifier", status_code=202, response_model=JobOut, responses=JOB_RESPONSES,
             dependencies=CANCEL_AFTER,
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": TrainClassifierParams.model_json_schema()}}}})
async def train_classifier(request: Request, response: Response, session: SessionDep, infra: InfraDep,
                           events: EventsDep, tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                           prefer: PreferHeader = None) -> JobOut:
    """Train a classifier on a ready dataset (transfer learning on EfficientNet-Lite0); registers `name`
    version N+1. A dataset still being analysed: 409 `dataset_not_ready`; one that failed: 422; a caption
    dataset: 422 `not_a_class_dataset`."""
    params = parse_params(TrainClassifierParams, await _json_params(request))
    # A caption dataset analyses as ready too; refused here before models.train_classifier reads it again.
    await run_in_threadpool(captions.ready_dataset_of_kind, session, tenant_id, params.dataset,
                            captions.CLASS_DATASET)
    submitted = await run_in_threadpool(models.train_classifier, session, infra, tenant_id, params, idempotency_key)
    return await accepted(response, session, infra, events, tenant_id, submitted, prefer)


@router.post("/train/captioner", status_code=202, response_model=JobOut, responses=JOB_RESPONSES,
             dependencies=CANCEL_AFTER,
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": TrainCaptionerParams.model_json_schema()}}}})
async def train_captioner(request: Request, response: Response, session: SessionDep, infra: InfraDep,
                          events: EventsDep, tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                          prefer: PreferHeader = None) -> JobOut:
    """Train a captioner (CNN encoder + LSTM decoder) on a ready caption dataset; registers `name` version N+1.
    Output: the model, BLEU-1..4 of greedy and beam decoding, and example captions. A dataset still being
    analysed: 409 `dataset_not_ready`; one that failed: 422; a class-folder dataset: 422 `not_a_caption_dataset`."""
    params = parse_params(TrainCaptionerParams, await _json_params(request))
    submitted = await run_in_threadpool(captions.train_captioner, session, infra, tenant_id, params,
                                        idempotency_key)
    return await accepted(response, session, infra, events, tenant_id, submitted, prefer)


async def _json_params(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise InvalidInput("Send the parameters as a JSON object.", code="invalid_json", status=400) from None
    return body if isinstance(body, dict) else {}
