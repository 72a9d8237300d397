"""The webhook outbox on a database built by the migrations: the trigger that records a delivery in the
transaction that ends a job, and the leasing that lets several gateways send from it."""

from datetime import timedelta

from sqlalchemy import select, update

from percept.db import jobs as job_repo
from percept.db import webhooks as webhook_repo
from percept.db.ids import new_id
from percept.db.models import Job, JobStatus, Webhook, WebhookDelivery
from percept.db.session import session_scope
from percept.db.tenants import create_key

LEASE = timedelta(seconds=30)


def new_job(session, tenant_id: str) -> str:
    job = Job(id=new_id("job"), tenant_id=tenant_id, kind="classify", queue="classifier", status=JobStatus.QUEUED,
              params={}, inputs=[], progress={"done": 0, "total": 1}, attempts=0, cancel_requested=False)
    session.add(job)
    session.flush()
    return job.id


def deliveries(session) -> list[tuple[str, str, str, int]]:
    return [(d.job_id, d.event, d.status, d.attempts)
            for d in session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id))]


def test_a_job_end_records_one_delivery_per_subscribed_webhook(database_url):
    with session_scope(database_url) as session:
        tenant, _ = create_key(session, "outbox-a")
        other, _ = create_key(session, "outbox-b")
        for events in (["job.succeeded", "job.failed"], ["job.failed"]):
            webhook_repo.add_webhook(session, Webhook(id=new_id("whk"), tenant_id=tenant.id, url="http://x/",
                                                      events=events, secret="s"))
        succeeded, failed, others = new_job(session, tenant.id), new_job(session, tenant.id), new_job(session, other.id)
        job_repo.claim(session, [succeeded, failed, others], "worker")  # running: no event
        assert deliveries(session) == []
        job_repo.finish(session, succeeded, 1, JobStatus.SUCCEEDED, output={})
        job_repo.finish(session, failed, 1, JobStatus.FAILED, error={"code": "no_face"})
        job_repo.finish(session, others, 1, JobStatus.SUCCEEDED, output={})  # a tenant without webhooks
        assert sorted(deliveries(session)) == sorted([(succeeded, "job.succeeded", "pending", 0),
                                                      (failed, "job.failed", "pending", 0),
                                                      (failed, "job.failed", "pending", 0)])
        session.rollback()  # the same transaction as the job's end: rolled back together
        assert deliveries(session) == []


def test_due_deliveries_are_leased_and_a_silent_last_attempt_is_failed(database_url):
    with session_scope(database_url) as session:
        tenant, _ = create_key(session, "outbox-c")
        webhook_repo.add_webhook(session, Webhook(id=new_id("whk"), tenant_id=tenant.id, url="http://x/",
                                                  events=["job.canceled"], secret="s"))
        job_id = new_job(session, tenant.id)
        job_repo.cancel(session, session.get(Job, job_id))
        session.commit()

    with session_scope(database_url) as session:
        taken = webhook_repo.take_due(session, LEASE, max_attempts=3)
        session.commit()
    assert [(d.job.id, d.event, d.attempt) for d in taken] == [(job_id, "job.canceled", 1)]
    with session_scope(database_url) as session:
        assert webhook_repo.take_due(session, LEASE, max_attempts=3) == []  # leased: no second sender

        # The sender of the last allowed attempt died before it could record an answer.
        session.execute(update(WebhookDelivery).values(attempts=3, next_attempt_at=WebhookDelivery.created_at))
        assert webhook_repo.take_due(session, LEASE, max_attempts=3) == []
        assert deliveries(session) == [(job_id, "job.canceled", "failed", 3)]
