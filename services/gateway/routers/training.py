"""Datasets and training jobs: bring labelled photos, get a served classifier with honest metrics."""

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from starlette.concurrency import run_in_threadpool

from percept.db import datasets as dataset_repo
from percept.db import registry
from percept.db.session import session_scope
from percept.errors import Conflict, InvalidInput
from services.gateway.datasets import find_dataset, store_dataset
from services.gateway.deps import EventsDep, InfraDep, TenantDep
from services.gateway.intake import file_part, parse_params, read_capped
from services.gateway.routers.jobs import JOB_ERRORS, PreferHeader, accepted
from services.gateway.schemas import DatasetOut, ErrorOut, JobOut, TrainClassifierParams
from services.gateway.usecases import JobRequest, submit_job

router = APIRouter(prefix="/v1", tags=["training"])
ERRORS = {401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 413: {"model": ErrorOut},
          415: {"model": ErrorOut}, 422: {"model": ErrorOut}, 503: {"model": ErrorOut}}


@router.post("/datasets", status_code=201, response_model=DatasetOut, responses=ERRORS)
async def upload_dataset(request: Request, infra: InfraDep, tenant_id: TenantDep) -> DatasetOut:
    """Upload a zip with one folder per class (multipart `file`, optional `name`): counts, sizes, duplicates."""
    form = await request.form(max_files=1, max_fields=10)
    upload = file_part(form, "zip", code="missing_file")
    cap = infra.settings.max_dataset_bytes
    data = await read_capped(upload, cap, f"The dataset is larger than {cap // 2**20} MB; split it or shrink the "
                             "images.", code="dataset_too_large")
    name = str(form.get("name") or upload.filename or "dataset").removesuffix(".zip")[:200]
    dataset = await run_in_threadpool(store_dataset, infra, tenant_id, name, data)
    return DatasetOut.of(dataset)


@router.get("/datasets", response_model=list[DatasetOut], responses=ERRORS)
async def list_datasets(infra: InfraDep, tenant_id: TenantDep) -> list[DatasetOut]:
    """Your datasets, newest first."""
    def load() -> list[DatasetOut]:
        with session_scope(infra.database_url) as session:
            return [DatasetOut.of(d) for d in dataset_repo.list_datasets(session, tenant_id)]
    return await run_in_threadpool(load)


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, responses=ERRORS)
async def get_dataset(dataset_id: str, infra: InfraDep, tenant_id: TenantDep) -> DatasetOut:
    """A dataset and its analysis."""
    return DatasetOut.of(await run_in_threadpool(find_dataset, infra, tenant_id, dataset_id))


@router.post("/train/classifier", status_code=202, response_model=JobOut, responses=JOB_ERRORS)
async def train_classifier(request: Request, response: Response, infra: InfraDep, events: EventsDep,
                           tenant_id: TenantDep, idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
                           prefer: PreferHeader = None) -> JobOut:
    """Train a classifier on a dataset (transfer learning on EfficientNet-Lite0); registers `name` version N+1."""
    try:
        body = await request.json()
    except ValueError:
        raise InvalidInput("Send the parameters as a JSON object.", code="invalid_json", status=400) from None
    params = parse_params(TrainClassifierParams, body if isinstance(body, dict) else {})

    def reserved() -> bool:
        with session_scope(infra.database_url) as session:
            return registry.is_builtin_name(session, params.name)

    if await run_in_threadpool(reserved):
        raise Conflict(f"{params.name!r} is a built-in model; choose another name.", code="model_name_reserved")
    job, created = await run_in_threadpool(submit_job, infra, tenant_id, JobRequest(
        kind="train_classifier", params=params.model_dump(), dataset=params.dataset,
        idempotency_key=idempotency_key))
    return await accepted(response, infra, events, tenant_id, job, created, prefer)
