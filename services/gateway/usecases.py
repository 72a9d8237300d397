"""Use cases behind the routes: store an image, submit a job, read and wait for jobs.

Each commits in exactly one place; a job's task is sent only after its row is committed.
"""

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from percept.db import datasets as dataset_repo
from percept.db import images as image_repo
from percept.db import jobs as job_repo
from percept.db import registry
from percept.db.ids import new_id
from percept.db.models import Image, Job, JobStatus
from percept.db.session import session_scope
from percept.errors import Conflict, DependencyUnavailable, InvalidInput, NotFound, QuotaExceeded
from percept.imaging import inspect_image
from percept.infra import Infra
from percept.queue import JOB_KINDS, publish_job_event, send_job
from percept.storage import object_key_for
from services.gateway.events import JobEvents, wait_for_change
from services.gateway.schemas import JobOut


def store_image(infra: Infra, tenant_id: str, data: bytes) -> Image:
    """Validate, store the bytes under their sha256 and record the image (same bytes -> same id)."""
    facts = inspect_image(data, infra.settings.max_image_pixels)
    key = object_key_for(facts.sha256)
    if not infra.store.exists(key):
        infra.store.put(key, data, content_type=facts.content_type)
    with session_scope(infra.database_url) as session:
        image = image_repo.add_image(session, Image(
            id=new_id("img"), tenant_id=tenant_id, sha256=facts.sha256, object_key=key, format=facts.format,
            content_type=facts.content_type, width=facts.width, height=facts.height, bytes=facts.bytes))
        session.commit()
    return image


def find_image(infra: Infra, tenant_id: str, image_id: str) -> Image:
    with session_scope(infra.database_url) as session:
        return _tenant_image(session, tenant_id, image_id)


def _tenant_image(session: Session, tenant_id: str, image_id: str) -> Image:
    image = image_repo.get_image(session, tenant_id, image_id)
    if image is None:
        raise NotFound(f"No image {image_id!r}: upload it with POST /v1/images first.", code="image_not_found")
    return image


def _resolve_model(session: Session, tenant_id: str, kind: str, requested: str) -> str:
    """`name` (latest version) or `name:version` -> `name:version`, checked against the registry."""
    name, _, version = requested.partition(":")
    versions = [m for m in registry.model_versions(session, tenant_id, name) if m.kind == kind]
    if not versions:
        raise NotFound(f"No {kind} model named {name!r}; GET /v1/models lists them.", code="model_not_found")
    chosen = versions[-1] if not version else next((m for m in versions if m.version == version), None)
    if chosen is None:
        raise NotFound(f"Model {name!r} has no version {version!r}; it has "
                       f"{', '.join(m.version for m in versions)}.", code="model_version_not_found")
    return f"{chosen.name}:{chosen.version}"


@dataclass
class JobRequest:
    kind: str
    params: dict[str, Any]  # normalised: every default filled in
    images: list[Image | str] = field(default_factory=list)  # stored images, or ids of the tenant's images
    model: str | None = None  # as asked: `name` or `name:version`; resolved against the registry
    dataset: str | None = None  # a dataset id, for training jobs
    idempotency_key: str | None = None

    def fingerprint(self, inputs: list[dict[str, str]]) -> str:
        body = {"kind": self.kind, "params": self.params, "inputs": [i["sha256"] for i in inputs]}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def submit_job(infra: Infra, tenant_id: str, request: JobRequest) -> tuple[Job, bool]:
    """Record the job, commit, then send it. Returns (job, created); an idempotent replay is not created.

    One transaction resolves the images and the model, checks idempotency and the quota, and inserts.
    """
    kind = JOB_KINDS[request.kind]
    with session_scope(infra.database_url) as session:
        images = [image if isinstance(image, Image) else _tenant_image(session, tenant_id, image)
                  for image in request.images]
        inputs = [{"image_id": image.id, "sha256": image.sha256} for image in images]
        if request.dataset is not None:
            dataset = dataset_repo.get_dataset(session, tenant_id, request.dataset)
            if dataset is None:
                raise NotFound(f"No dataset {request.dataset!r}: upload it with POST /v1/datasets first.",
                               code="dataset_not_found")
            inputs.append({"dataset_id": dataset.id, "sha256": dataset.sha256})
        params = dict(request.params)
        if request.model is not None:
            params["model"] = _resolve_model(session, tenant_id, request.kind, request.model)
        fingerprint = request.fingerprint(inputs)
        if request.idempotency_key:
            existing = job_repo.find_by_idempotency_key(session, tenant_id, request.idempotency_key)
            if existing is not None:
                return _replay(existing, fingerprint), False
        pending = job_repo.count_pending(session, tenant_id)
        if pending >= infra.settings.max_pending_jobs_per_tenant:
            raise QuotaExceeded(
                f"You have {pending} jobs queued or running, the most allowed; wait for some to finish.",
                details={"pending": pending, "limit": infra.settings.max_pending_jobs_per_tenant})
        job = Job(id=new_id("job"), tenant_id=tenant_id, kind=request.kind, queue=kind.queue,
                  status=JobStatus.QUEUED, model_name=params.get("model", params.get("name")), params=params,
                  inputs=inputs,
                  progress={"done": 0, "total": 1}, attempts=0, cancel_requested=False,
                  provenance={"inputs": inputs, "seed": params.get("seed")},
                  idempotency_key=request.idempotency_key, request_hash=fingerprint)
        session.add(job)
        try:
            session.commit()
        except IntegrityError:  # a concurrent request with the same Idempotency-Key won the race
            session.rollback()
            existing = job_repo.find_by_idempotency_key(session, tenant_id, request.idempotency_key or "")
            if existing is None:
                raise
            return _replay(existing, fingerprint), False
    try:
        send_job(infra.broker_url, request.kind, job.id)
    except DependencyUnavailable:
        with session_scope(infra.database_url) as session:
            job_repo.fail_unsent(session, job.id, "The job queue was unreachable; nothing was run.")
            session.commit()
        raise
    return job, True


def _replay(existing: Job, fingerprint: str) -> Job:
    if existing.request_hash != fingerprint:
        raise Conflict("This Idempotency-Key was used with a different request in the last 24 hours; "
                       "use a new key for a new request.", code="idempotency_key_reused",
                       details={"job_id": existing.id})
    return existing


def job_out(session: Session, job: Job) -> JobOut:
    has_children = JOB_KINDS[job.kind].has_children if job.kind in JOB_KINDS else False
    return JobOut.of(job, job_repo.child_ids(session, job.id) if has_children else [])


def read_job(infra: Infra, tenant_id: str, job_id: str) -> JobOut:
    with session_scope(infra.database_url) as session:
        job = job_repo.get_job(session, tenant_id, job_id)
        if job is None:
            raise NotFound(f"No job {job_id!r}.", code="job_not_found")
        return job_out(session, job)


def cancel_job(infra: Infra, tenant_id: str, job_id: str) -> JobOut:
    with session_scope(infra.database_url) as session:
        job = job_repo.get_job(session, tenant_id, job_id)
        if job is None:
            raise NotFound(f"No job {job_id!r}.", code="job_not_found")
        job = job_repo.cancel(session, job)
        session.commit()
        out = job_out(session, job)
    publish_job_event(infra.broker_url, job_id, out.status)
    return out


def parse_wait(prefer: str | None, max_wait: float) -> float:
    """`Prefer: wait=N` -> seconds to hold the response (0 when absent); N above the cap is capped."""
    for part in (prefer or "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value)
            except ValueError:
                raise InvalidInput("`Prefer: wait=N` takes a number of seconds, e.g. `wait=10`.",
                                   code="invalid_prefer_wait") from None
            if not seconds >= 0:  # negative, or NaN
                raise InvalidInput("`Prefer: wait=N` takes a number of seconds >= 0.", code="invalid_prefer_wait")
            return min(seconds, max_wait)
    return 0.0


async def wait_for_job(infra: Infra, events: JobEvents, tenant_id: str, job_id: str, wait: float,
                       known: JobOut | None = None) -> JobOut:
    """The job once terminal, or as it stands when `wait` seconds have passed.

    `known` is the job as its submitter just committed it: it stands in for the first read (a change
    made before the watch began still wakes it, see JobEvents.watch).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    async with events.watch(job_id, only_terminal=True) as changed:
        job = known
        while True:
            if job is None:
                job = await run_in_threadpool(read_job, infra, tenant_id, job_id)
            remaining = deadline - loop.time()
            if JobStatus(job.status).is_terminal() or remaining <= 0:
                return job
            await wait_for_change(changed, remaining)
            job = None
