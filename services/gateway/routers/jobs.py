"""Jobs: read, list, long-poll, stream and cancel."""

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from percept.db.models import Job, JobStatus
from percept.infra import Infra
from percept.schemas import ErrorOut, JobOut, JobPage, Responses
from services.gateway.deps import EventsDep, InfraDep, SessionDep, TenantDep
from services.gateway.events import JobEvents, wait_for_change
from services.gateway.openapi import without_null
from services.gateway.transaction import commit, has_work
from services.gateway.usecases import jobs

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ERRORS: Responses = {401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 503: {"model": ErrorOut}}
JOB_ERRORS: Responses = {**ERRORS, 409: {"model": ErrorOut}, 413: {"model": ErrorOut}, 415: {"model": ErrorOut},
              422: {"model": ErrorOut}, 429: {"model": ErrorOut}}
# A job POST answers 202 while its job is queued or running; with `Prefer: wait=N`, a job that ended within
# the wait is answered with its final state as RFC 7240 describes (201 new, 200 an idempotent replay).
_LOCATION = {"Location": {"description": "`/v1/jobs/{id}`", "schema": {"type": "string"}}}
_APPLIED = {**_LOCATION, "Preference-Applied": {"description": "`wait=N`", "schema": {"type": "string"}}}
JOB_RESPONSES: Responses = {
    200: {"model": JobOut, "headers": _APPLIED,
          "description": "`Prefer: wait=N` and the job ended within it: an idempotent replay's final state"},
    201: {"model": JobOut, "headers": _APPLIED,
          "description": "`Prefer: wait=N` and the job ended within it: the new job's final state"},
    202: {"headers": _LOCATION, "description": "The job, queued or running: follow `Location`"},
    **JOB_ERRORS}
PreferHeader = Annotated[str | None, Header(description="`no-reuse`: run the model even if an equal earlier job's "
                                                        "result could answer; "
                                                        "`wait=N`: hold the answer up to N s (max 60) for the "
                                                        "job to end")]
IdempotencyHeader = Annotated[str | None, Header(max_length=200,
                                                 description="Same key + same body: the same job (a key stays "
                                                             "bound to its first job)")]


async def cancel_after_header(session: SessionDep, cancel_after: Annotated[str | None, Header(
        alias="Cancel-After", max_length=40, json_schema_extra={"pattern": r"^[0-9]+(\.[0-9]+)?$"},
        description="Seconds (> 0, at most 7 days): a job still queued or "
        "running this long after it was submitted is canceled, with the error code `deadline_exceeded`")] = None,
                        ) -> None:
    jobs.set_cancel_after(session, cancel_after)


async def prefer_no_reuse(request: Request, session: SessionDep) -> None:
    # `Prefer` itself is declared by each route (PreferHeader); this reads its `no-reuse`.
    jobs.set_reuse(session, request.headers.get("prefer"))


# Every job-creating POST takes `Cancel-After` and `Prefer: no-reuse` (its route's `dependencies`); both only note
# the header on the session, so they are async: no trip to a worker thread.
CANCEL_AFTER = [Depends(cancel_after_header), Depends(prefer_no_reuse)]


def image_job_body(*fields: str, params: type[BaseModel], json_too: bool = False) -> dict[str, Any]:
    """The OpenAPI request body of a job POST with image fields: multipart (files or image ids), and with
    `json_too` also JSON (image ids)."""
    params_schema = params.model_json_schema()

    def schema(image: dict[str, str], form: bool) -> dict[str, Any]:
        properties = {name: without_null(p) if form else p for name, p in params_schema["properties"].items()}
        return {"type": "object", "required": [*fields, *params_schema.get("required", ())],
                "properties": {**{name: image for name in fields}, **properties},
                # The parameter models refuse fields they do not know (extra="forbid").
                "additionalProperties": params_schema.get("additionalProperties", True)}

    content = {"multipart/form-data": {"schema": schema(
        {"type": "string", "format": "binary", "description": "file, or an image id"}, form=True)}}
    if json_too:
        content["application/json"] = {"schema": schema({"type": "string", "description": "an image id"}, form=False)}
    return {"requestBody": {"required": True, "content": content}}


async def submit(session: Session, infra: Infra, tenant_id: str, request: jobs.JobRequest,
                 prefer: str | None) -> tuple[Job, bool]:
    """submit_job in one trip to a worker thread; when the answer will wait for the job (`Prefer: wait=N`), it is
    committed and sent in the same trip (accepted() then has no commit of its own to make)."""
    wait = jobs.parse_wait(prefer, infra.settings.max_wait.total_seconds())

    def submit_and_commit() -> tuple[Job, bool]:
        submitted = jobs.submit_job(session, infra, tenant_id, request)
        if wait > 0:
            commit(session)
        return submitted

    return await run_in_threadpool(submit_and_commit)


async def accepted(response: Response, session: Session, infra: Infra, events: JobEvents, tenant_id: str,
                   submitted: tuple[Job, bool], prefer: str | None) -> JobOut:
    """The answer of every job-creating POST: Location, and the job after an optional long-poll; 202, or
    201/200 when the job ended within the wait (see JOB_RESPONSES).

    A job just created is known as committed, so it is not read back; an idempotent replay is.
    """
    job, created = submitted
    wait = jobs.parse_wait(prefer, infra.settings.max_wait.total_seconds())
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    known = JobOut.of(job) if created else None
    if wait > 0 and has_work(session):
        # A job can only be waited for once it is committed and sent: that happens now (unless submit() did)
        # rather than when the route returns (the session dependency's commit then has nothing left to do).
        await run_in_threadpool(commit, session)
    out = await jobs.wait_for_job(infra, events, tenant_id, job.id, wait, known=known)
    if _applied_wait(response, wait, out):
        response.status_code = 201 if created else 200
    return out


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS)
async def get_job(job_id: str, response: Response, infra: InfraDep, events: EventsDep, tenant_id: TenantDep,
                  prefer: PreferHeader = None) -> JobOut:
    """A job; with `Prefer: wait=N` the answer waits until the job is terminal or N seconds pass."""
    wait = jobs.parse_wait(prefer, infra.settings.max_wait.total_seconds())
    out = await jobs.wait_for_job(infra, events, tenant_id, job_id, wait)
    _applied_wait(response, wait, out)
    return out


def _applied_wait(response: Response, wait: float, job: JobOut) -> bool:
    """Say `Preference-Applied: wait=N` when the answer waited for a job that is now terminal."""
    if wait > 0 and JobStatus(job.status).is_terminal():
        response.headers["Preference-Applied"] = f"wait={wait:g}"
        return True
    return False


@router.get("", response_model=JobPage, responses=ERRORS)
def list_jobs(session: SessionDep, tenant_id: TenantDep, kind: str | None = None,
              status: Literal["queued", "running", "succeeded", "failed", "canceled"] | None = None,
              model: str | None = None, q: Annotated[str | None, Query(max_length=200)] = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50, cursor: str | None = None) -> JobPage:
    """Jobs, newest first; `q` searches labels, captions and prompts; `cursor` is the last page's next_cursor."""
    return jobs.list_jobs(session, tenant_id, kind=kind, status=status, model=model, q=q, limit=limit,
                          cursor=cursor)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=ERRORS)
def cancel(job_id: str, session: SessionDep, infra: InfraDep, tenant_id: TenantDep) -> JobOut:
    """Cancel: a queued job at once, a running one at its next step boundary. Terminal jobs stay as they are."""
    return jobs.cancel_job(session, infra, tenant_id, job_id)


@router.get("/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}, **ERRORS})
async def job_events(job_id: str, infra: InfraDep, events: EventsDep, tenant_id: TenantDep):
    """Server-sent events: one `job` event per status or progress change, until the job is terminal."""
    first = await run_in_threadpool(jobs.look_up_job, infra.database_url, tenant_id, job_id)  # 404 before the stream

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
                job = await run_in_threadpool(jobs.look_up_job, infra.database_url, tenant_id, job_id)

    return EventSourceResponse(stream(), ping=15)
