"""Jobs: submit one (any kind, from the services' declarations), read, list, cancel and wait for them."""

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from prometheus_client import Counter
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from percept.db import jobs as job_repo
from percept.db.models import Job, JobStatus
from percept.db.session import session_scope
from percept.errors import Conflict, DependencyUnavailable, InvalidInput, NotFound, QuotaExceeded
from percept.infra import Infra
from percept.predictor import parse_model_ref
from percept.queue import publish_job_event, send_job
from percept.schemas import JobOut, JobPage
from percept.services import catalog
from services.gateway.events import JobEvents, wait_for_change
from services.gateway.transaction import after_commit, commit
from services.gateway.usecases.images import as_inputs, job_images

# Jobs answered from an earlier job's result, by kind (this gateway process's count; sum the replicas).
REUSED = Counter("percept_jobs_reused_total", "Jobs answered from an earlier equal job's result, no model run",
                 ["kind"], registry=None)
CANCEL_AFTER = "percept.cancel_after"  # session.info key: the request's `Cancel-After` seconds
NO_REUSE = "percept.no_reuse"  # session.info key: the request said `Prefer: no-reuse`
MAX_CANCEL_AFTER_SECONDS = 7 * 24 * 3600


@dataclass
class JobRequest:
    kind: str
    params: dict[str, Any]  # normalised: every default filled in
    # What the job reads, resolved and checked against the tenant by the caller: {"image_id", "sha256"},
    # {"dataset_id", "sha256"} or {"model_id", "ref", "sha256"} items.
    inputs: list[dict[str, Any]] = field(default_factory=list)
    # As asked: `name` or `name:version`, resolved against the registry; None: the kind's default model.
    model: str | None = None
    idempotency_key: str | None = None
    # Parameters the platform chose for the caller (a random seed): recorded with the job, but not part of the
    # request a replay must match.
    chosen: dict[str, Any] = field(default_factory=dict)
    # Images as the request sent them, uploaded bytes or image ids (read_job_request): submit_job stores or checks
    # them as the tenant's, and they become the job's first inputs.
    images: list[bytes | str] = field(default_factory=list)
    # Where the input images' bytes are (object keys): sent with the task, so the worker can read them while it
    # claims the job (percept.queue.send_job).
    image_keys: list[str] = field(default_factory=list)

    def reuse_key(self, params: dict[str, Any]) -> str:
        """What makes a deterministic job's result: its kind, resolved parameters (the model's version, the seed)
        and input sha256s."""
        body = {"kind": self.kind, "params": params, "inputs": [i["sha256"] for i in self.inputs]}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def fingerprint(self) -> str:
        body = {"kind": self.kind, "params": self.params, "inputs": [i["sha256"] for i in self.inputs]}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def submit_job(session: Session, infra: Infra, tenant_id: str, request: JobRequest) -> tuple[Job, bool]:
    """Record the job; its task is sent once the request commits. Returns (job, created): an idempotent
    replay is not created, and nothing is sent for it.

    A deterministic kind's job equal to one the tenant ran before (same reuse key) is answered from that job's
    result at once, with no model run, unless the request says `Prefer: no-reuse` or `reuse: false`."""
    kind = catalog().kind(request.kind)
    if request.images:
        found = job_images(session, infra, tenant_id, request.images)
        request.inputs, request.image_keys = [*as_inputs(found), *request.inputs], [image.object_key for image in found]
        request.images = []
    reuse = (request.params.pop("reuse", True) is not False and not session.info.get(NO_REUSE)
             and infra.settings.result_reuse)
    fingerprint = request.fingerprint()  # of the request as sent: a replay matches after a new model version
    params = {**request.params, **request.chosen}
    requested = request.model or kind.default_model
    ref = parse_model_ref(requested) if requested is not None else None
    # Held until the request commits: the quota check and the insert are one step for the tenant. Taken
    # before the replay lookup, so a request that waited here sees the job of one with its key.
    priority, versions = job_repo.lock_submissions(session, tenant_id, (ref[0], kind.serves) if ref else None)
    if ref is not None:
        params["model"] = _resolve_model(kind.serves, *ref, versions)
    # A seed the platform chose makes every request different: nothing to reuse, nor to be reused.
    reuse_key = request.reuse_key(params) if kind.deterministic and not request.chosen else None
    if request.idempotency_key:
        existing = job_repo.find_by_idempotency_key(session, tenant_id, request.idempotency_key)
        if existing is not None:
            return _replay(existing, fingerprint), False
    original = job_repo.find_reusable(session, tenant_id, reuse_key) if reuse and reuse_key else None
    cancel_after = session.info.get(CANCEL_AFTER)
    job = job_repo.queued_job(tenant_id, request.kind, kind.queue, params, request.inputs,
                              idempotency_key=request.idempotency_key, request_hash=fingerprint,
                              priority=priority,
                              deadline_at=datetime.now(UTC) + timedelta(seconds=cancel_after) if cancel_after else None,
                              reuse_key=reuse_key)
    if original is not None:
        job_repo.reused_job(job, original)
    # A reused job runs nothing: it counts against no quota. Any other is inserted only below the quota.
    limit = infra.settings.max_pending_jobs_per_tenant
    added = job_repo.add_job(session, job, pending_limit=None if original is not None else limit)
    if added is job_repo.Added.QUOTA_FULL:
        pending = job_repo.count_pending(session, tenant_id)
        raise QuotaExceeded(f"You have {pending} jobs queued or running, the most allowed; wait for some to finish.",
                            details={"pending": pending, "limit": limit})
    if added is job_repo.Added.KEY_TAKEN:  # the key's job appeared after the lookup (another transaction)
        existing = job_repo.find_by_idempotency_key(session, tenant_id, request.idempotency_key or "")
        if existing is None:
            raise Conflict("This Idempotency-Key is in use by a request still being recorded; retry shortly.",
                           code="idempotency_key_in_use")
        return _replay(existing, fingerprint), False
    if original is not None:  # ended already: its waiters and webhooks are told, nothing is sent
        REUSED.labels(job.kind).inc()
        after_commit(session, partial(publish_job_event, infra.broker_url, job.id, job.status.value))
        return job, True
    after_commit(session, partial(_send, session, infra.broker_url, job.kind, job.id, job.priority, request.image_keys))
    return job, True


def set_cancel_after(session: Session, header: str | None) -> None:
    """`Cancel-After: N` on a job-creating request: the job it creates is canceled (`deadline_exceeded`) if it
    is still queued or running N seconds after it was submitted. Kept with the request's session, which
    `submit_job` reads; an idempotent replay keeps its job's own deadline."""
    if header is None:
        return
    try:
        seconds = float(header)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= MAX_CANCEL_AFTER_SECONDS:
        raise InvalidInput(f"`Cancel-After` takes a number of seconds above 0 and at most {MAX_CANCEL_AFTER_SECONDS}"
                           f" (7 days), e.g. `Cancel-After: 30`; got {header[:40]!r}.", code="invalid_cancel_after")
    session.info[CANCEL_AFTER] = seconds


def set_reuse(session: Session, prefer: str | None) -> None:
    """`Prefer: no-reuse` on a job-creating request: run the model even if an equal earlier job's result could
    answer it (kept with the request's session, which `submit_job` reads)."""
    if any(part.strip().lower() == "no-reuse" for part in (prefer or "").split(",")):
        session.info[NO_REUSE] = True


def _send(session: Session, broker_url: str, kind: str, job_id: str, priority: str,
          image_keys: list[str] | None = None) -> None:
    """Send the committed job's task (with its images' keys, when known). If the broker refuses it, the job is
    ended (so a late delivery does not run what the client is told failed) and the 503 goes to the client."""
    try:
        send_job(broker_url, kind, job_id, priority, image_keys=image_keys)
    except DependencyUnavailable:
        job_repo.fail_unsent(session, job_id, "The job queue was unreachable; nothing was run.")
        commit(session)
        raise


def _resolve_model(kind: str, name: str, version: str | None, versions: list[str]) -> str:
    """`name` (latest version) or `name:version` -> `name:version`, checked against the registry's `versions` of
    the model (oldest first)."""
    if not versions:
        raise NotFound(f"No {kind} model named {name!r}; GET /v1/models lists them.", code="model_not_found")
    if version and version not in versions:
        raise NotFound(f"Model {name!r} has no version {version!r}; it has {', '.join(versions)}.",
                       code="model_version_not_found")
    return f"{name}:{version or versions[-1]}"


def _replay(existing: Job, fingerprint: str) -> Job:
    if existing.request_hash != fingerprint:
        raise Conflict("This Idempotency-Key was used with a different request (a key stays bound to its "
                       "first job); use a new key for a new request.", code="idempotency_key_reused",
                       details={"job_id": existing.id})
    return existing


def job_out(session: Session, job: Job) -> JobOut:
    kind = catalog().job_kinds.get(job.kind)
    return JobOut.of(job, job_repo.child_ids(session, job.id) if kind is not None and kind.has_children else [])


def read_job(session: Session, tenant_id: str, job_id: str) -> JobOut:
    job = job_repo.get_job(session, tenant_id, job_id)
    if job is None:
        raise NotFound(f"No job {job_id!r}.", code="job_not_found")
    return job_out(session, job)


def look_up_job(database_url: str, tenant_id: str, job_id: str) -> JobOut:
    """The job as committed now, read in a short session of its own. Waiters (long-polls, event streams)
    look at every wake-up: none holds a database connection while it waits."""
    with session_scope(database_url, autocommit=True) as session:
        return read_job(session, tenant_id, job_id)


def list_jobs(session: Session, tenant_id: str, *, kind: str | None, status: str | None, model: str | None,
              q: str | None, limit: int, cursor: str | None) -> JobPage:
    """Newest first; `cursor` is the previous page's `next_cursor`."""
    if cursor is not None and not cursor.startswith("job_"):
        raise InvalidInput("`cursor` must be the `next_cursor` of a previous page.", code="invalid_cursor")
    rows = job_repo.list_jobs(session, tenant_id, kind=kind, status=status, model=model, q=q, limit=limit + 1,
                              before_id=cursor)
    data = [job_out(session, job) for job in rows[:limit]]
    return JobPage(data=data, next_cursor=data[-1].id if len(rows) > limit else None)


def cancel_job(session: Session, infra: Infra, tenant_id: str, job_id: str) -> JobOut:
    """A queued job ends at once; a running one is flagged and stops at its next step boundary. A parent's
    children that have not ended are canceled with it."""
    job = job_repo.get_job(session, tenant_id, job_id)
    if job is None:
        raise NotFound(f"No job {job_id!r}.", code="job_not_found")
    # Children before their parent: the order a worker ending a child takes their row locks in
    ended_children = job_repo.cancel_children(session, job.id)
    job_repo.cancel(session, job)
    woken = job_repo.wake_parents(session, [job.id, *([job.parent_id] if job.parent_id else [])])
    session.refresh(job)
    out = job_out(session, job)
    # Waiters (and the webhook sender, on a job that ended here) wake once the cancel is committed.
    for child_id in ended_children:
        after_commit(session, partial(publish_job_event, infra.broker_url, child_id, JobStatus.CANCELED.value))
    after_commit(session, partial(publish_job_event, infra.broker_url, job_id, out.status))
    for parent, status in woken:
        if status is JobStatus.QUEUED:  # its last child was this one: the parent gathers the others now
            after_commit(session, partial(_send, session, infra.broker_url, parent.kind, parent.id,
                                          parent.priority))
        elif parent.id != job_id:
            after_commit(session, partial(publish_job_event, infra.broker_url, parent.id, status.value))
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

    `known` is the job as its submitter just committed it: it stands in for the first look (a change
    made before the watch began still wakes it, see JobEvents.watch).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    async with events.watch(job_id, only_terminal=True) as changed:
        job = known
        while True:
            if job is None:
                job = events.result(job_id, tenant_id)  # the end's event brought the job: no read
                if job is None:
                    job = await run_in_threadpool(look_up_job, infra.database_url, tenant_id, job_id)
            remaining = deadline - loop.time()
            if JobStatus(job.status).is_terminal() or remaining <= 0:
                return job
            await wait_for_change(changed, remaining)
            job = None
