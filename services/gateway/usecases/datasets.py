"""Datasets: a zip of labelled images, streamed to object storage and analysed by a job.

The gateway only checks that the upload is a zip of an acceptable size and stores it without ever
holding it in memory; the hostile-archive checks and the report (counts, duplicates, leakage) are the
`analyze_dataset` job's, run by a worker. A dataset's status is its analysis job's.
"""

import zipfile
from functools import partial
from typing import BinaryIO

from sqlalchemy.orm import Session

from percept.datasets import ANALYZE_DATASET, NotAZip
from percept.db import datasets as dataset_repo
from percept.db.ids import new_id
from percept.db.models import Dataset, Job, JobStatus
from percept.errors import Conflict, ImageTooLarge, InvalidInput, NotFound
from percept.infra import Infra
from percept.schemas import DatasetOut, DatasetStatus
from percept.storage import object_key_for, store_content_addressed
from services.gateway.usecases.jobs import JobRequest, submit_job

_ANALYSIS_MISSING = {"code": "analysis_missing",
                     "message": "This dataset's analysis is gone; upload the zip again to analyse it."}


def dataset_out(dataset: Dataset, analysis: Job | None) -> DatasetOut:
    """The dataset with the status of its analysis: queued or running -> analyzing; succeeded -> ready with
    the job's report; failed or canceled -> failed with the job's error. A dataset analysed at upload
    (before analysis jobs) has no job and is ready with its summary."""
    status: DatasetStatus
    report, error = None, None
    if analysis is None and dataset.summary is not None:
        status, report = "ready", dataset.summary
    elif analysis is None:
        status, error = "failed", _ANALYSIS_MISSING
    elif analysis.status is JobStatus.SUCCEEDED:
        status, report = "ready", (analysis.output or {}).get("report")
    elif analysis.status.is_terminal():
        status, error = "failed", analysis.error
    else:
        status = "analyzing"
    return DatasetOut(id=dataset.id, name=dataset.name, sha256=dataset.sha256, bytes=dataset.bytes, status=status,
                      report=report, error=error, job_id=dataset.analysis_job_id, created_at=dataset.created_at)


def upload_dataset(session: Session, infra: Infra, tenant_id: str, name: str, upload: BinaryIO,
                   size: int) -> DatasetOut:
    """Store the zip (read in chunks from the spooled upload), record the dataset and submit its analysis.

    The same bytes from the same tenant are the same dataset, analysed once; an analysis that did not
    finish (canceled, or deleted) is submitted again.
    """
    # 1. Check what can be checked without unpacking: the size, and that it is a zip at all
    cap = infra.settings.max_dataset_bytes
    if size > cap:
        raise ImageTooLarge(f"The dataset is larger than {cap // 2**20} MB; split it or shrink the images.",
                            code="dataset_too_large", details={"max_bytes": cap})
    if not zipfile.is_zipfile(upload):  # finds the central directory's end record, reading only the tail
        raise NotAZip("The upload is not a readable zip archive: send a .zip with one folder per class, "
                      "e.g. cats/1.jpg and dogs/1.jpg.")

    # 2. Store it under its content address
    sha256, key = store_content_addressed(infra.store, upload, size, partial(object_key_for, prefix="datasets"),
                                          content_type="application/zip")

    # 3. Record it, and have it analysed
    dataset = dataset_repo.add_dataset(session, Dataset(
        id=new_id("ds"), tenant_id=tenant_id, name=name, sha256=sha256, object_key=key, bytes=size))
    analysis = dataset_repo.analysis_of(session, dataset)
    if dataset.summary is None and (analysis is None or analysis.status is JobStatus.CANCELED):
        analysis, _ = submit_job(session, infra, tenant_id, JobRequest(
            kind=ANALYZE_DATASET.name, params={}, inputs=[{"dataset_id": dataset.id, "sha256": sha256}]))
        dataset_repo.set_analysis_job(session, dataset, analysis.id)
    return dataset_out(dataset, analysis)


def find_dataset(session: Session, tenant_id: str, dataset_id: str) -> DatasetOut:
    found = dataset_repo.get_with_analysis(session, tenant_id, dataset_id)
    if found is None:
        raise NotFound(f"No dataset {dataset_id!r}: upload it with POST /v1/datasets first.",
                       code="dataset_not_found")
    return dataset_out(*found)


def list_datasets(session: Session, tenant_id: str) -> list[DatasetOut]:
    return [dataset_out(dataset, job) for dataset, job in dataset_repo.list_with_analysis(session, tenant_id)]


def ready_dataset(session: Session, tenant_id: str, dataset_id: str) -> DatasetOut:
    """The dataset, if training can start on it: 409 while it is analysed, 422 when its analysis failed."""
    dataset = find_dataset(session, tenant_id, dataset_id)
    if dataset.status == "analyzing":
        raise Conflict(f"Dataset {dataset_id!r} is still being analysed; train on it once GET "
                       f"/v1/datasets/{dataset_id} says `ready`.", code="dataset_not_ready",
                       details={"dataset_id": dataset_id, "job_id": dataset.job_id})
    if dataset.status == "failed":
        reason = (dataset.error or {}).get("message", "its analysis failed")
        raise InvalidInput(f"Dataset {dataset_id!r} cannot be trained on: {reason}", code="dataset_invalid",
                           details={"dataset_id": dataset_id, "error": dataset.error})
    return dataset
