"""The hot path's single statements on a database built by the migrations: a batch's results in one UPDATE (and
the webhook outbox's trigger still firing for each job), an upload's image row in one round trip, the quota checked
inside the job's INSERT; and pooled connections pinged only once they have sat idle."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.pool import NullPool

from percept.cli import replica_threads
from percept.config import Settings
from percept.db import images as image_repo
from percept.db import jobs as job_repo
from percept.db import session as db_session
from percept.db import webhooks as webhook_repo
from percept.db.ids import new_id
from percept.db.models import Image, Job, JobStatus, Webhook, WebhookDelivery
from percept.db.session import session_scope
from percept.db.tenants import create_key
from percept.errors import DependencyUnavailable
from workers.__main__ import framework_environment


def running_job(session, tenant_id: str) -> str:
    job = job_repo.queued_job(tenant_id, "classify", "classifier", {"model": "m:1"}, [])
    session.add(job)
    session.flush()
    return job.id


def test_a_batch_of_results_is_written_in_one_statement_only_for_the_attempts_that_hold_them(database_url):
    with session_scope(database_url) as session:
        tenant, _ = create_key(session, "hot-batch")
        webhook_repo.add_webhook(session, Webhook(id=new_id("whk"), tenant_id=tenant.id, url="http://x/",
                                                  events=["job.succeeded"], secret="s"))
        held, canceled, taken_back = (running_job(session, tenant.id) for _ in range(3))
        job_repo.claim(session, [held, canceled, taken_back], "worker")
        session.get(Job, canceled).cancel_requested = True
        session.flush()
        results = [(job_id, 2 if job_id == taken_back else 1, {"labels": [job_id]}, {"attempt": 1}, f"text {job_id}")
                   for job_id in (held, canceled, taken_back)]
        assert set(job_repo.succeed_many(session, results)) == {held}
        session.commit()
    with session_scope(database_url) as session:
        jobs = {job.id: job for job in session.scalars(select(Job).where(Job.tenant_id == tenant.id))}
        assert jobs[held].status is JobStatus.SUCCEEDED and jobs[held].output == {"labels": [held]}
        assert jobs[held].provenance == {"attempt": 1} and jobs[held].search_text == f"text {held}"
        assert jobs[held].progress == {"done": 1, "total": 1} and jobs[held].finished_at is not None
        # left for finish() one by one: the canceled one ends canceled there, the other attempt's is not touched
        assert jobs[canceled].status is JobStatus.RUNNING and jobs[taken_back].status is JobStatus.RUNNING
        assert [(d.job_id, d.event) for d in session.scalars(select(WebhookDelivery))] == [(held, "job.succeeded")]


def test_an_upload_seen_before_keeps_its_image_row(database_url):
    with session_scope(database_url) as session:
        tenant, _ = create_key(session, "hot-image")
        other, _ = create_key(session, "hot-image-other")

        def add(tenant_id: str) -> Image:
            return image_repo.add_image(session, Image(
                id=new_id("img"), tenant_id=tenant_id, sha256="ab" * 32, object_key="images/ab", format="JPEG",
                content_type="image/jpeg", width=2, height=3, bytes=10))

        first, again, others = add(tenant.id), add(tenant.id), add(other.id)
        assert again.id == first.id and (again.width, again.height) == (2, 3)
        assert others.id != first.id and others.tenant_id == other.id
        # A claim reads where each input's bytes are, in input order; an image deleted meanwhile is left out.
        job = job_repo.queued_job(tenant.id, "classify", "classifier", {}, [
            {"image_id": others.id}, {"image_id": first.id}, {"image_id": "img_deleted"}])
        session.add(job)
        session.flush()
        [claimed] = job_repo.claim(session, [job.id], "worker")
        assert (claimed.id, claimed.attempts, claimed.image_keys) == (job.id, 1, ["images/ab", "images/ab"])


def test_replicas_of_a_pool_share_the_cores():
    assert replica_threads(2, 2, {}) == {"OMP_NUM_THREADS": "1"}
    assert replica_threads(3, 8, {}) == {"OMP_NUM_THREADS": "2"}
    assert replica_threads(4, 2, {}) == {"OMP_NUM_THREADS": "1"}  # never 0
    assert replica_threads(1, 8, {}) == {}  # alone: every core
    assert replica_threads(2, 8, {"OMP_NUM_THREADS": "3"}) == {}  # the user's choice stands


def test_a_job_is_inserted_only_below_the_tenants_pending_limit(database_url):
    with session_scope(database_url) as session:
        tenant, _ = create_key(session, "hot-quota")
        for _ in range(2):
            assert job_repo.add_job(session, job_repo.queued_job(tenant.id, "classify", "classifier", {}, [])) \
                is job_repo.Added.ADDED
        full = job_repo.queued_job(tenant.id, "classify", "classifier", {}, [], idempotency_key="k")
        assert job_repo.add_job(session, full, pending_limit=2) is job_repo.Added.QUOTA_FULL
        assert session.get(Job, full.id) is None and full.created_at is None
        room = job_repo.queued_job(tenant.id, "classify", "classifier", {"model": "m:1"}, [], idempotency_key="k")
        assert job_repo.add_job(session, room, pending_limit=3) is job_repo.Added.ADDED
        assert room.created_at is not None and room.queued_at is not None
        # An ended job leaves room; the key, now taken, is reported as such rather than as the quota.
        session.execute(text("UPDATE jobs SET status = 'succeeded' WHERE id = :id"), {"id": room.id})
        again = job_repo.queued_job(tenant.id, "classify", "classifier", {}, [], idempotency_key="k")
        assert job_repo.add_job(session, again, pending_limit=3) is job_repo.Added.KEY_TAKEN
        assert session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant.id)) == 3


def backend_pid(database_url: str) -> int:
    with session_scope(database_url, autocommit=True) as session:
        return session.scalar(text("SELECT pg_backend_pid()"))


def kill_backend(database_url: str, pid: int) -> None:
    """End a pooled connection's server process, as a database restart does, from a connection outside the pool."""
    engine = create_engine(database_url, poolclass=NullPool)
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    engine.dispose()


def test_a_job_row_is_written_as_given_through_the_driver_sql(database_url):
    """add_job's INSERT is driver SQL (percept.db.driver): JSON columns go as JSON text, the status enum as its value,
    times as they are, and the row read back through the ORM is the job that was added."""
    with session_scope(database_url) as session:
        tenant, _ = create_key(session, "hot-driver")
        deadline = datetime.now(UTC) + timedelta(hours=1)
        params = {"model": "m:1", "nested": {"é": [1, 2.5, None, True]}, "text": "it's 100% \"quoted\""}
        inputs = [{"image_id": "img_x", "sha256": "ab" * 32}]
        queued = job_repo.queued_job(tenant.id, "classify", "classifier", params, inputs, idempotency_key="k-1",
                                     priority="high", deadline_at=deadline, reuse_key="r" * 64)
        assert job_repo.add_job(session, queued, pending_limit=5) is job_repo.Added.ADDED
        ended = job_repo.reused_job(job_repo.queued_job(tenant.id, "classify", "classifier", params, inputs), queued)
        ended.output = {"labels": [{"label": "cup", "score": 0.5}]}
        assert job_repo.add_job(session, ended) is job_repo.Added.ADDED
        session.commit()
    with session_scope(database_url) as session:
        row = session.get(Job, queued.id)
        assert row is not None and row.status is JobStatus.QUEUED and row.created_at == queued.created_at
        assert (row.params, row.inputs, row.provenance) == (params, inputs, {"inputs": inputs, "seed": None})
        assert (row.priority, row.deadline_at, row.idempotency_key, row.output) == ("high", deadline, "k-1", None)
        done = session.get(Job, ended.id)
        assert done is not None and done.status is JobStatus.SUCCEEDED and done.output == ended.output
        assert done.provenance["reused_from"] == queued.id and done.finished_at == ended.finished_at


def test_a_dead_connection_idle_past_the_ping_threshold_is_replaced_before_use(database_url, monkeypatch):
    monkeypatch.setattr(db_session, "PING_AFTER_IDLE_SECONDS", 0.0)
    pid = backend_pid(database_url)
    kill_backend(database_url, pid)
    assert backend_pid(database_url) != pid  # pinged at checkout, found dead, replaced: the caller saw nothing


def test_a_connection_back_in_the_pool_sooner_is_not_pinged_and_a_dead_one_invalidates_the_pool(database_url,
                                                                                               monkeypatch):
    monkeypatch.setattr(db_session, "PING_AFTER_IDLE_SECONDS", 3600.0)
    pid = backend_pid(database_url)
    kill_backend(database_url, pid)
    with pytest.raises(DependencyUnavailable):  # no ping round trip: the statement itself finds it dead
        backend_pid(database_url)
    assert backend_pid(database_url) != pid  # and the pool was thrown away with it


def test_a_worker_sets_the_openmp_spin_and_its_cpu_threads_unless_the_environment_has_its_own():
    assert framework_environment(Settings(), {}) == {"GOMP_SPINCOUNT": "100000"}
    assert framework_environment(Settings(), {"GOMP_SPINCOUNT": "0"}) == {}
    assert framework_environment(Settings(cpu_threads=1), {"GOMP_SPINCOUNT": "0"}) == {
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
