"""Job rows: creation, listing, and the lifecycle transitions workers and the sweeper make.

Every transition is one conditional UPDATE, so two workers (a redelivered or duplicated message)
can never both run a job, and a worker whose lease was taken back cannot write a result.
"""

import enum
import json
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import Float, Row, bindparam, cast, func, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from percept.db import driver
from percept.db.ids import new_id
from percept.db.models import Job, JobStatus, Priority, Tenant
from percept.db.session import rowcount

PENDING = (JobStatus.QUEUED, JobStatus.RUNNING)
# The hot path's statements (a job's submit, claim and write) are SQL for the driver (percept.db.driver), built once;
# the rest are Core or ORM statements. Neither builds ORM objects to write a row.
_JOBS: Any = Job.__table__
# What a new job's INSERT writes (the rest are the server's defaults: created_at, queued_at).
_INSERTED = tuple(column.key for column in _JOBS.columns if column.key not in ("created_at", "queued_at"))
IDEMPOTENCY_KEY_INDEX = "uq_jobs_tenant_id_idempotency_key"


def get_job(session: Session, tenant_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))


def child_ids(session: Session, job_id: str) -> list[str]:
    return list(session.scalars(select(Job.id).where(Job.parent_id == job_id).order_by(Job.id)))


def children_of(session: Session, job_id: str) -> list[Job]:
    """A parent's child jobs in the order its fan-out made them (`child` in their params)."""
    rows = list(session.scalars(select(Job).where(Job.parent_id == job_id)))
    return sorted(rows, key=lambda job: (job.params.get("child", 0), job.id))


def find_by_idempotency_key(session: Session, tenant_id: str, key: str) -> Job | None:
    """The tenant's job of this key, however old: a key stays bound to its job (the unique index says so)."""
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def queued_job(tenant_id: str, kind: str, queue: str, params: dict[str, Any], inputs: list[dict[str, Any]], *,
               idempotency_key: str | None = None, request_hash: str | None = None, priority: str = "normal",
               deadline_at: datetime | None = None, reuse_key: str | None = None) -> Job:
    """A new job row as every submission makes it (the gateway's, and `percept models import`'s), not yet added."""
    return Job(id=new_id("job"), tenant_id=tenant_id, kind=kind, queue=queue, status=JobStatus.QUEUED,
               model_name=params.get("model", params.get("name")), params=params, inputs=inputs,
               progress={"done": 0, "total": 1}, attempts=0, cancel_requested=False,
               provenance={"inputs": inputs, "seed": params.get("seed")},
               idempotency_key=idempotency_key, request_hash=request_hash, priority=priority,
               deadline_at=deadline_at, reuse_key=reuse_key)


def find_reusable(session: Session, tenant_id: str, reuse_key: str) -> Job | None:
    """The tenant's newest succeeded job of this reuse key (see Job.reuse_key)."""
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.reuse_key == reuse_key,
                                            Job.status == JobStatus.SUCCEEDED).order_by(Job.id.desc()).limit(1))


def reused_job(job: Job, original: Job) -> Job:
    """`job` (a new queued row, not yet added) answered from `original`'s result: succeeded at once, with its
    output and provenance, `provenance.reused_from` naming the job whose model run made it."""
    job.status, job.output, job.search_text = JobStatus.SUCCEEDED, original.output, original.search_text
    job.progress = {"done": 1, "total": 1}
    job.started_at = job.finished_at = datetime.now(UTC)
    provenance = dict(original.provenance or {})
    job.provenance = {**provenance, "inputs": job.inputs,
                      "reused_from": provenance.get("reused_from") or original.id}
    return job


def tenant_priority(session: Session, tenant_id: str) -> str:
    """The priority the tenant's new jobs are queued at."""
    return session.scalar(select(Tenant.priority).where(Tenant.id == tenant_id)) or Priority.NORMAL.value


class Added(enum.Enum):
    """What add_job did."""

    ADDED = "added"
    KEY_TAKEN = "key_taken"  # the tenant's Idempotency-Key belongs to another job
    QUOTA_FULL = "quota_full"  # the tenant has `pending_limit` jobs queued or running already


@lru_cache(maxsize=64)
def _insert_job(names: tuple[str, ...], limited: bool) -> str:
    """The INSERT of these columns (driver SQL: percept.db.driver), built once per set of them. `limited`: only while
    the tenant has fewer than `pending_limit` jobs queued or running, counted in the INSERT's own snapshot (after
    lock_submissions' lock: no other submit of the tenant can commit in between), so the quota check costs no round
    trip of its own."""
    columns, row = ", ".join(names), driver.placeholders(_JOBS, names)
    if not limited:
        return f"INSERT INTO jobs ({columns}) VALUES ({row}) RETURNING created_at, queued_at"
    pending = ", ".join(f"'{status.value}'" for status in PENDING)
    return (f"INSERT INTO jobs ({columns}) SELECT {row} WHERE (SELECT count(*) FROM jobs WHERE tenant_id = "
            f"%(tenant_id)s AND status IN ({pending})) < %(pending_limit)s RETURNING created_at, queued_at")


def add_job(session: Session, job: Job, pending_limit: int | None = None) -> Added:
    """Insert the job (one INSERT: `job` stays a plain object, not one the session tracks; it gets the row's
    server defaults). KEY_TAKEN when the tenant's Idempotency-Key is already taken, by a concurrent request too
    (the insert waits for it to commit); only the savepoint is undone then, not the caller's work. Without a key
    nothing can collide: no savepoint round trips. `pending_limit` (under lock_submissions' lock): QUOTA_FULL, and
    nothing inserted, when the tenant already has that many jobs queued or running."""
    values = driver.values(_JOBS, {name: value for name in _INSERTED if (value := getattr(job, name)) is not None})
    statement = _insert_job(tuple(values), pending_limit is not None)
    if pending_limit is not None:
        values["pending_limit"] = pending_limit
    if job.idempotency_key is None:
        row = driver.execute(session, statement, values).first()
    else:
        try:
            with session.begin_nested():
                row = driver.execute(session, statement, values).first()
        except IntegrityError as exc:
            if getattr(getattr(exc.orig, "diag", None), "constraint_name", None) != IDEMPOTENCY_KEY_INDEX:
                raise
            return Added.KEY_TAKEN
    if row is None:
        return Added.QUOTA_FULL
    job.created_at, job.queued_at = row
    return Added.ADDED


# The tenant's submit lock, its priority and (with a model) the versions of that model it may use, in one round trip.
_LOCK_SQL = ("SELECT pg_advisory_xact_lock(hashtext(%(lock_key)s)), "
             "(SELECT priority FROM tenants WHERE id = %(tenant_id)s), {versions}")
_VERSIONS = ("(SELECT array_agg(version ORDER BY id) FROM models "
             "WHERE (tenant_id IS NULL OR tenant_id = %(tenant_id)s) AND name = %(name)s AND kind = %(kind)s)")
_LOCK = {False: _LOCK_SQL.format(versions="NULL"), True: _LOCK_SQL.format(versions=_VERSIONS)}
_COUNT_PENDING = select(func.count()).select_from(_JOBS).where(_JOBS.c.tenant_id == bindparam("tenant_id"),
                                                                 _JOBS.c.status.in_(PENDING))


def lock_submissions(session: Session, tenant_id: str, model: tuple[str, str] | None = None
                     ) -> tuple[str, list[str]]:
    """Serialise the tenant's job submissions until this transaction ends: a submit that counts the pending
    jobs and then inserts one must not race another (both would see room under the quota). Other tenants
    are not held up. Returns the priority the tenant's new jobs are queued at and, for `model` (name, kind), the
    versions of it the tenant may use, oldest first, read in the same round trip (nothing the lock guards: the
    pending count must be read after it, in a statement of its own: add_job's `pending_limit`)."""
    params = {"lock_key": f"jobs/{tenant_id}", "tenant_id": tenant_id}
    if model is not None:
        params |= {"name": model[0], "kind": model[1]}
    _, priority, found = driver.execute(session, _LOCK[model is not None], params).one()
    return priority or Priority.NORMAL.value, found or []


def count_pending(session: Session, tenant_id: str) -> int:
    return session.scalar(_COUNT_PENDING, {"tenant_id": tenant_id}) or 0


def list_jobs(session: Session, tenant_id: str, *, kind: str | None = None, status: str | None = None,
              model: str | None = None, q: str | None = None, limit: int = 50,
              before_id: str | None = None) -> list[Job]:
    """Newest first; `before_id` is the cursor (ids sort by creation time)."""
    query = select(Job).where(Job.tenant_id == tenant_id)
    if kind:
        query = query.where(Job.kind == kind)
    if status:
        query = query.where(Job.status == JobStatus(status))
    if model:
        query = query.where(or_(Job.model_name == model, Job.model_name.startswith(model + ":")))
    if q:
        escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(Job.search_text.ilike(f"%{escaped}%"))
    if before_id:
        query = query.where(Job.id < before_id)
    return list(session.scalars(query.order_by(Job.id.desc()).limit(limit)))


# What a claim reads of a job (driver SQL, as every statement of a job's submit, claim and write: percept.db.driver):
# rows, not ORM objects (the hot path builds none). `image_keys`: where the input images' bytes are, in input order
# (an image deleted meanwhile is left out).
CLAIMED_COLUMNS = ("id", "tenant_id", "kind", "attempts", "model_name", "params", "inputs", "created_at",
                   "started_at", "parent_id", "priority", "deadline_at")
_CLAIM = f"""
UPDATE jobs SET status = 'running', attempts = attempts + 1, worker = %(worker)s,
       started_at = coalesce(started_at, now()), heartbeat_at = now()
WHERE id = ANY(%(job_ids)s::varchar[]) AND status = 'queued' AND NOT cancel_requested
  AND (deadline_at IS NULL OR deadline_at > now())
RETURNING {", ".join(CLAIMED_COLUMNS)},
  (SELECT array_agg(images.object_key ORDER BY item.ord) FROM jsonb_array_elements(jobs.inputs)
   WITH ORDINALITY AS item(value, ord) JOIN images ON images.id = item.value ->> 'image_id') AS image_keys"""


def claim(session: Session, job_ids: list[str], worker: str) -> list[Row[Any]]:
    """queued -> running, attempt + 1, in one statement; the claimed jobs' CLAIMED_COLUMNS and image keys. Jobs
    that are not queued (done, running, canceled), or past their deadline (the sweeper ends those), are left out."""
    return list(driver.execute(session, _CLAIM, {"job_ids": job_ids, "worker": worker}))


def heartbeat(session: Session, job_ids: list[str], worker: str) -> None:
    session.execute(update(Job).where(Job.id.in_(job_ids), Job.status == JobStatus.RUNNING,
                                      Job.worker == worker).values(heartbeat_at=func.now()))


def set_progress(session: Session, job_id: str, attempt: int, progress: dict[str, Any]) -> bool:
    """Record progress; False when the job was canceled meanwhile (stop at this step boundary)."""
    row = session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.attempts == attempt)
        .values(progress=progress, heartbeat_at=func.now())
        .returning(Job.cancel_requested)).first()
    return row is not None and not row.cancel_requested


def finish(session: Session, job_id: str, attempt: int, status: JobStatus, *,
           output: dict[str, Any] | None = None, error: dict[str, Any] | None = None,
           provenance: dict[str, Any] | None = None, search_text: str | None = None,
           done: int = 1) -> JobStatus | None:
    """running -> terminal, only for the attempt that holds the job. A success whose cancel was requested
    meanwhile ends canceled (the last step boundary); a success's progress is `done` of `done` (a parent's: its
    children). Returns the status written; None: another attempt owns the job now."""
    assert status.is_terminal()
    holds = (Job.id == job_id, Job.status == JobStatus.RUNNING, Job.attempts == attempt)
    values: dict[str, Any] = {"status": status, "output": output, "error": error, "finished_at": func.now(),
                              "search_text": search_text, "progress": {"done": done, "total": done}}
    if provenance is not None:
        values["provenance"] = provenance
    if status is JobStatus.SUCCEEDED:
        written = session.execute(update(Job).where(*holds, Job.cancel_requested.is_(False)).values(**values))
        if rowcount(written) == 1:
            return status
        status = JobStatus.CANCELED
        values |= {"status": status, "output": None, "search_text": None,
                   "error": {"code": "canceled", "message": "The job was canceled while it ran."}}
    if status is not JobStatus.SUCCEEDED:
        del values["progress"]  # keep the progress the job had reached
    if status is JobStatus.CANCELED:
        values["error"] = cancel_error(values["error"])
    result = session.execute(update(Job).where(*holds).values(**values))
    return status if rowcount(result) == 1 else None


# running -> succeeded for many jobs: one constant statement, the batch as parallel arrays.
_SUCCEED_MANY = """
UPDATE jobs SET status = 'succeeded', output = batch.output, error = NULL, finished_at = now(),
       provenance = batch.provenance, search_text = batch.search_text, progress = '{"done": 1, "total": 1}'
FROM unnest(%(ids)s::varchar[], %(attempts)s::integer[], %(outputs)s::jsonb[], %(provenances)s::jsonb[],
            %(search_texts)s::text[]) AS batch(id, attempt, output, provenance, search_text)
WHERE jobs.id = batch.id AND jobs.status = 'running' AND jobs.attempts = batch.attempt AND NOT jobs.cancel_requested
RETURNING jobs.id, jobs.finished_at"""


def succeed_many(session: Session, results: list[tuple[str, int, dict[str, Any] | None, dict[str, Any], str | None]]
                 ) -> dict[str, datetime]:
    """running -> succeeded for a batch's jobs, (job id, attempt, output, provenance, search text) each, in one
    statement: finish()'s success for many. Returns the ids written, with the time each finished; a job left out
    (its cancel was requested, or another attempt holds it) is the caller's to finish() one by one."""
    if not results:
        return {}
    ids, attempts, outputs, provenances, texts = zip(*results, strict=True)
    return dict(driver.execute(session, _SUCCEED_MANY, {
        "ids": list(ids), "attempts": list(attempts), "outputs": [json.dumps(o) for o in outputs],
        "provenances": [json.dumps(p) for p in provenances], "search_texts": list(texts)}).tuples().all())


def release(session: Session, job_id: str, attempt: int) -> JobStatus | None:
    """running -> queued, for a retryable failure: the job will be sent again. A job whose cancel was
    requested meanwhile ends canceled instead (a queued job with a cancel requested is never claimed).
    Returns the status written; None: another attempt owns the job now."""
    holds = (Job.id == job_id, Job.status == JobStatus.RUNNING, Job.attempts == attempt)
    requeued = session.execute(update(Job).where(*holds, Job.cancel_requested.is_(False))
                               .values(status=JobStatus.QUEUED, queued_at=func.now(), worker=None))
    if rowcount(requeued) == 1:
        return JobStatus.QUEUED
    canceled = session.execute(update(Job).where(*holds).values(
        status=JobStatus.CANCELED, finished_at=func.now(),
        error=cancel_error({"code": "canceled", "message": "The job was canceled while it ran."})))
    return JobStatus.CANCELED if rowcount(canceled) == 1 else None


def cancel(session: Session, job: Job) -> Job:
    """queued -> canceled at once; running -> flagged, the worker stops at its next step boundary."""
    session.execute(
        update(Job).where(Job.id == job.id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELED, cancel_requested=True, finished_at=func.now(),
                error={"code": "canceled", "message": "The job was canceled before it started."}))
    session.execute(update(Job).where(Job.id == job.id, Job.status == JobStatus.RUNNING)
                    .values(cancel_requested=True))
    session.refresh(job)
    return job


def fail_unsent(session: Session, job_id: str, message: str) -> None:
    """The broker refused the job: cancel it so a late delivery does not run what the client was told failed. Its
    Idempotency-Key is freed: the client was told 503, retry, and the retry with that key must run."""
    session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                    .values(status=JobStatus.CANCELED, cancel_requested=True, finished_at=func.now(),
                            idempotency_key=None, error={"code": "broker_unavailable", "message": message}))


def cancel_error(error: dict[str, Any]) -> Any:
    """The error a canceled job ends with: the one its cancel recorded (`deadline_exceeded`), else `error`."""
    return func.coalesce(Job.error, cast(error, JSONB))


def deadline_error(deadline_at: Any, running: bool) -> dict[str, Any]:
    where = "running" if running else "queued"
    return {"code": "deadline_exceeded",
            "message": f"The job was still {where} at its deadline (the request's Cancel-After), so it was "
                       "canceled; give it a longer Cancel-After, or none.",
            "details": {"deadline_at": deadline_at.isoformat()}}


def expire_deadlines(session: Session, limit: int = 500) -> tuple[list[Job], list[Job]]:
    """Jobs past their deadline: a queued one is canceled at once; a running one is flagged, and its worker
    stops it at the next step boundary (or, for a call it cannot interrupt, drops its result), ending it
    canceled with this error. Returns (ended, flagged)."""
    jobs = list(session.scalars(
        select(Job).where(Job.deadline_at.is_not(None), Job.deadline_at <= func.now(), Job.status.in_(PENDING),
                          Job.cancel_requested.is_(False))
        .order_by(Job.deadline_at).limit(limit).with_for_update(skip_locked=True)))
    ended, flagged = [], []
    for job in jobs:
        job.cancel_requested = True
        job.error = deadline_error(job.deadline_at, running=job.status is JobStatus.RUNNING)
        if job.status is JobStatus.QUEUED:
            job.status, job.finished_at = JobStatus.CANCELED, func.now()
            ended.append(job)
        else:
            flagged.append(job)
    session.flush()
    return ended, flagged


def take_stale_queued(session: Session, older_than: datetime, limit: int = 500) -> list[Job]:
    """Queued jobs not sent for a while (a crash between commit and send): mark them re-sent."""
    jobs = list(session.scalars(
        select(Job).where(Job.status == JobStatus.QUEUED, Job.queued_at < older_than)
        .order_by(Job.queued_at).limit(limit).with_for_update(skip_locked=True)))
    for job in jobs:
        job.queued_at = func.now()
    return jobs


def take_expired_running(session: Session, heartbeat_before: datetime, max_attempts: int,
                         limit: int = 500) -> tuple[list[Job], list[Job]]:
    """Running jobs whose worker stopped beating (killed): back to queued, or ended (canceled, or
    failed after max attempts). Returns (requeued, ended)."""
    jobs = list(session.scalars(
        select(Job).where(Job.status == JobStatus.RUNNING, Job.heartbeat_at < heartbeat_before)
        .limit(limit).with_for_update(skip_locked=True)))
    requeued, ended = [], []
    for job in jobs:
        if job.cancel_requested:
            job.status, job.finished_at = JobStatus.CANCELED, func.now()
            job.error = job.error or {"code": "canceled", "message": "The job was canceled while it ran."}
            ended.append(job)
        elif job.attempts >= max_attempts:
            job.status, job.finished_at = JobStatus.FAILED, func.now()
            job.error = {"code": "worker_lost",
                         "message": f"The worker running this job was lost {job.attempts} times; giving up."}
            ended.append(job)
        else:
            job.status, job.queued_at, job.worker = JobStatus.QUEUED, func.now(), None
            requeued.append(job)
    return requeued, ended


# The metrics' running totals (services/gateway/metrics.py) read jobs by ranges of the primary key (ids
# sort by creation time), never the whole table. A total is ((kind, status, model name), values): jobs, jobs
# with an inference time, inference seconds, then for each of TIMED (queue wait, inference, total time) the
# jobs timed, their seconds, and the jobs at or under each of HISTOGRAM_BUCKETS.
METRICS_ID_BATCH = 5000  # ids per `IN (...)`: well under the protocol's 65535 parameters
TIMED = ("queued", "inference", "total")  # provenance.timings_ms
# Seconds: from a 5 ms classification to an 11-minute generation or training.
HISTOGRAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 660.0)
JobTotal = tuple[tuple[str, str, str | None], tuple[float, ...]]


def newest_job_created_before(session: Session, age: timedelta) -> str | None:
    """The newest job id among the jobs created more than `age` ago (read backwards from the newest job)."""
    return session.scalar(select(Job.id).where(Job.created_at < func.now() - age).order_by(Job.id.desc()).limit(1))


def _timings_ms() -> list[Any]:
    return [Job.provenance["timings_ms"][name].astext.cast(Float) for name in TIMED]


def _model() -> Any:
    return Job.provenance["model"]["name"].astext


def job_totals(session: Session, *, after: str | None, upto: str | None = None,
               ended_only: bool = False) -> list[JobTotal]:
    """Totals of the jobs whose id is in (after, upto] (open where None); only ended ones if asked."""
    timings, model = _timings_ms(), _model()
    inference = timings[1]
    columns: list[Any] = [func.count(), func.count(inference), func.sum(inference)]
    for ms in timings:
        columns += [func.count(ms), func.sum(ms), *(func.count().filter(ms <= le * 1000) for le in HISTOGRAM_BUCKETS)]
    query = select(Job.kind, Job.status, model, *columns)
    if after is not None:
        query = query.where(Job.id > after)
    if upto is not None:
        query = query.where(Job.id <= upto)
    if ended_only:
        query = query.where(Job.status.not_in(PENDING))
    totals = []
    for kind, status, name, *values in session.execute(query.group_by(Job.kind, Job.status, model)):
        # sums are in ms (None when nothing was timed): seconds, like every other figure
        totals.append(((kind, status.value, name), tuple(
            (value or 0.0) / 1000 if _is_sum(i) else float(value) for i, value in enumerate(values))))
    return totals


def _is_sum(index: int) -> bool:
    """Whether values[index] is a sum of milliseconds (the others are counts)."""
    per_timing = 2 + len(HISTOGRAM_BUCKETS)
    return index == 2 or (index >= 3 and (index - 3) % per_timing == 1)


def _values_of(timings_ms: list[float | None]) -> tuple[float, ...]:
    """One job's values, as job_totals adds them up."""
    inference = timings_ms[1]
    values: list[float] = [1, int(inference is not None), (inference or 0.0) / 1000]
    for ms in timings_ms:
        values += [int(ms is not None), (ms or 0.0) / 1000,
                   *(int(ms is not None and ms <= le * 1000) for le in HISTOGRAM_BUCKETS)]
    return tuple(values)


def pending_job_ids(session: Session, *, after: str | None, upto: str) -> list[str]:
    """Jobs still queued or running whose id is in (after, upto]."""
    query = select(Job.id).where(Job.status.in_(PENDING), Job.id <= upto)
    if after is not None:
        query = query.where(Job.id > after)
    return list(session.scalars(query))


def job_totals_by_id(session: Session, ids: list[str]) -> list[tuple[str, bool, tuple[str, str, str | None],
                                                                      tuple[float, ...]]]:
    """(id, ended, labels, values) of each of these jobs that still exists."""
    found: list[tuple[str, bool, tuple[str, str, str | None], tuple[float, ...]]] = []
    for start in range(0, len(ids), METRICS_ID_BATCH):
        rows = session.execute(select(Job.id, Job.kind, Job.status, _model(), *_timings_ms())
                               .where(Job.id.in_(ids[start:start + METRICS_ID_BATCH])))
        found.extend((job_id, status.is_terminal(), (kind, status.value, name), _values_of(list(timings)))
                     for job_id, kind, status, name, *timings in rows)
    return found


def backlog(session: Session) -> list[tuple[str, str, int, float]]:
    """(queue, state, jobs, seconds the oldest has waited since it was submitted) for the jobs waiting for or
    held by a worker now: `queued`, and `running` on a worker. A fan-out parent waiting for its children is
    running on none (no worker, no heartbeat) and is not counted: its children are."""
    held = or_(Job.status == JobStatus.QUEUED, Job.worker.is_not(None))
    rows = session.execute(
        select(Job.queue, Job.status, func.count(), func.extract("epoch", func.now() - func.min(Job.created_at)))
        .where(Job.status.in_(PENDING), held).group_by(Job.queue, Job.status))
    return [(queue, status.value, count, float(age or 0.0)) for queue, status, count, age in rows]


# -- fan-out: a parent job waits for its children --------------------------------------------------------------
# A parent that has made its children stays `running` with no lease (no worker, no heartbeat: the sweeper's
# lease check passes it by) while they run; the end of its last child sends it again to gather their results.

def add_children(session: Session, parent_id: str, attempt: int, tenant_id: str,
                 children: list[tuple[str, str, dict[str, Any]]]) -> list[Job] | None:
    """Record a parent's children (kind, queue, params) as queued jobs and set the parent waiting for them, in
    the transaction of the caller; None (and nothing recorded) when this attempt no longer holds the parent."""
    waiting = session.execute(
        update(Job).where(Job.id == parent_id, Job.status == JobStatus.RUNNING, Job.attempts == attempt)
        .values(worker=None, heartbeat_at=None, progress={"done": 0, "total": len(children), "stage": "children"})
        .returning(Job.priority, Job.deadline_at)).first()
    if waiting is None:
        return None
    jobs = []
    for index, (kind, queue, params) in enumerate(children):
        # A child runs at its parent's priority and ends by its parent's deadline.
        job = queued_job(tenant_id, kind, queue, {**params, "child": index}, [], priority=waiting.priority,
                         deadline_at=waiting.deadline_at)
        job.parent_id = parent_id
        session.add(job)
        jobs.append(job)
    session.flush()
    return jobs


def wake_parents(session: Session, parent_ids: list[str]) -> list[tuple[Job, JobStatus]]:
    """After children ended: each waiting parent's progress is brought up to date, and a parent whose children
    have all ended is queued again (to gather them; the caller sends it after the commit), or canceled if its
    cancel was asked for. Returns the parents changed, with the status each has now."""
    changed = []
    for parent_id in sorted(set(parent_ids)):  # a fixed order: two callers never wait on each other's parents
        parent = session.scalar(select(Job).where(Job.id == parent_id).with_for_update())
        if parent is None or parent.status is not JobStatus.RUNNING or parent.heartbeat_at is not None:
            continue  # not waiting: gathering already, or ended
        counts = dict(session.execute(select(Job.status, func.count()).where(Job.parent_id == parent_id)
                                      .group_by(Job.status)).tuples().all())
        total = sum(counts.values())
        ended = sum(n for status, n in counts.items() if status.is_terminal())
        parent.progress = {"done": ended, "total": total, "stage": "children",
                           **{status.value: n for status, n in counts.items() if status.is_terminal()}}
        if ended < total:
            changed.append((parent, JobStatus.RUNNING))
        elif parent.cancel_requested:
            parent.status, parent.finished_at = JobStatus.CANCELED, func.now()
            parent.error = parent.error or {"code": "canceled", "message": "The job was canceled; its children "
                                                                           "that had not ended were canceled with it."}
            changed.append((parent, JobStatus.CANCELED))
        else:
            parent.status, parent.queued_at = JobStatus.QUEUED, func.now()
            changed.append((parent, JobStatus.QUEUED))
    session.flush()
    return changed


def waiting_parents_done(session: Session, limit: int = 500) -> list[str]:
    """Waiting parents none of whose children is pending any more (their last child ended where no one woke
    them: a lost worker, a give-up): the sweeper wakes them."""
    waiting = list(session.scalars(select(Job.id).where(Job.status == JobStatus.RUNNING, Job.heartbeat_at.is_(None))
                                   .limit(limit)))
    if not waiting:
        return []
    busy = set(session.scalars(select(Job.parent_id).where(Job.parent_id.in_(waiting), Job.status.in_(PENDING))))
    return [job_id for job_id in waiting if job_id not in busy]


def cancel_children(session: Session, parent_id: str) -> list[str]:
    """Cancel a parent's children that have not ended (queued: at once; running: at their next step boundary).
    Returns the ids of those canceled at once."""
    ended = list(session.scalars(
        update(Job).where(Job.parent_id == parent_id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELED, cancel_requested=True, finished_at=func.now(),
                error={"code": "canceled", "message": "The job's parent was canceled before this job started."})
        .returning(Job.id)))
    session.execute(update(Job).where(Job.parent_id == parent_id, Job.status == JobStatus.RUNNING)
                    .values(cancel_requested=True))
    return ended
