"""Jobs: read, list, long-poll, stream and cancel."""

import json
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from percept.db import jobs as job_repo
from percept.db.models import Job, JobStatus
from percept.db.session import session_scope
from percept.errors import InvalidInput
from percept.infra import Infra
from services.gateway.deps import EventsDep, InfraDep, TenantDep
from services.gateway.events import JobEvents, wait_for_change
from services.gateway.schemas import ErrorOut, JobOut, JobPage
from services.gateway.usecases import cancel_job, parse_wait, read_job, wait_for_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ERRORS = {401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 503: {"model": ErrorOut}}
JOB_ERRORS = {**ERRORS, 409: {"model": ErrorOut}, 413: {"model": ErrorOut}, 415: {"model": ErrorOut},
              422: {"model": ErrorOut}, 429: {"model": ErrorOut}}
PreferHeader = Annotated[str | None, Header(description="`wait=N`: hold the answer up to N s (max 60)")]


async def accepted(response: Response, infra: Infra, events: JobEvents, tenant_id: str, job: Job, created: bool,
                   prefer: str | None) -> JobOut:
    """The 202 of every job-creating POST: Location, and the job after an optional long-poll.

    A job just created is known as committed, so it is not read back; an idempotent replay is.
    """
    wait = parse_wait(prefer, infra.settings.max_wait.total_seconds())
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return await wait_for_job(infra, events, tenant_id, job.id, wait, known=JobOut.of(job) if created else None)


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS)
async def get_job(job_id: str, infra: InfraDep, events: EventsDep, tenant_id: TenantDep,
                  prefer: PreferHeader = None) -> JobOut:
    """A job; with `Prefer: wait=N` the answer waits until the job is terminal or N seconds pass."""
    wait = parse_wait(prefer, infra.settings.max_wait.total_seconds())
    return await wait_for_job(infra, events, tenant_id, job_id, wait)


@router.get("", response_model=JobPage, responses=ERRORS)
async def list_jobs(infra: InfraDep, tenant_id: TenantDep, kind: str | None = None,
                    status: Literal["queued", "running", "succeeded", "failed", "canceled"] | None = None,
                    model: str | None = None, q: Annotated[str | None, Query(max_length=200)] = None,
                    limit: Annotated[int, Query(ge=1, le=200)] = 50, cursor: str | None = None) -> JobPage:
    """Jobs, newest first; `q` searches labels, captions and prompts; `cursor` is the last page's next_cursor."""
    if cursor is not None and not cursor.startswith("job_"):
        raise InvalidInput("`cursor` must be the `next_cursor` of a previous page.", code="invalid_cursor")

    def page() -> JobPage:
        with session_scope(infra.database_url) as session:
            rows = job_repo.list_jobs(session, tenant_id, kind=kind, status=status, model=model, q=q,
                                      limit=limit + 1, before_id=cursor)
            data = [JobOut.of(job) for job in rows[:limit]]
        return JobPage(data=data, next_cursor=data[-1].id if len(rows) > limit else None)

    return await run_in_threadpool(page)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=ERRORS)
async def cancel(job_id: str, infra: InfraDep, tenant_id: TenantDep) -> JobOut:
    """Cancel: a queued job at once, a running one at its next step boundary. Terminal jobs stay as they are."""
    return await run_in_threadpool(cancel_job, infra, tenant_id, job_id)


@router.get("/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}, **ERRORS})
async def job_events(job_id: str, infra: InfraDep, events: EventsDep, tenant_id: TenantDep):
    """Server-sent events: one `job` event per status or progress change, until the job is terminal."""
    first = await run_in_threadpool(read_job, infra, tenant_id, job_id)  # 404 before the stream opens

    async def stream():
        last = None
        job = first
        async with events.watch(job_id) as changed:
            while True:
                state = (job.status, json.dumps(job.progress, sort_keys=True))
                if state != last:
                    last = state
                    yield {"event": "job", "id": f"{job.status}:{state[1]}", "data": job.model_dump_json()}
                if JobStatus(job.status).is_terminal():
                    return
                await wait_for_change(changed, 15.0)
                job = await run_in_threadpool(read_job, infra, tenant_id, job_id)

    return EventSourceResponse(stream(), ping=15)
