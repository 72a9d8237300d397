"""Webhook subscriptions and their outbox of deliveries.

Deliveries are written by a trigger when a job ends (migration 0004). Senders take due deliveries with
SKIP LOCKED and push their next attempt out by a lease first, so gateway replicas never send the same
delivery at once, and one that died mid-send leaves it to be sent again when the lease runs out.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from percept.db.models import Job, Webhook, WebhookDelivery


def add_webhook(session: Session, webhook: Webhook) -> Webhook:
    session.add(webhook)
    session.flush()
    return webhook


def list_webhooks(session: Session, tenant_id: str) -> list[Webhook]:
    return list(session.scalars(select(Webhook).where(Webhook.tenant_id == tenant_id).order_by(Webhook.id)))


def get_webhook(session: Session, tenant_id: str, webhook_id: str) -> Webhook | None:
    return session.scalar(select(Webhook).where(Webhook.tenant_id == tenant_id, Webhook.id == webhook_id))


def delete_webhook(session: Session, webhook: Webhook) -> None:
    session.execute(delete(Webhook).where(Webhook.id == webhook.id))


def deliveries_of(session: Session, webhook_id: str, limit: int) -> list[WebhookDelivery]:
    return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
                                .order_by(WebhookDelivery.id.desc()).limit(limit)))


# The metrics' running totals (services/gateway/metrics.py) read deliveries by ranges of the primary key
# (a sequence: ids grow with creation time), never the whole table. A total is ((status,), (deliveries,)).
METRICS_ID_BATCH = 5000  # ids per `IN (...)`: well under the protocol's 65535 parameters


def newest_delivery_created_before(session: Session, age: timedelta) -> int | None:
    """The newest delivery id among those created more than `age` ago (read backwards from the newest)."""
    return session.scalar(select(WebhookDelivery.id).where(WebhookDelivery.created_at < func.now() - age)
                          .order_by(WebhookDelivery.id.desc()).limit(1))


def delivery_totals(session: Session, *, after: int | None, upto: int | None = None,
                    ended_only: bool = False) -> list[tuple[tuple[str], tuple[int]]]:
    """Deliveries by status whose id is in (after, upto] (open where None); only ended ones if asked."""
    query = select(WebhookDelivery.status, func.count())
    if after is not None:
        query = query.where(WebhookDelivery.id > after)
    if upto is not None:
        query = query.where(WebhookDelivery.id <= upto)
    if ended_only:
        query = query.where(WebhookDelivery.status != "pending")
    return [((status,), (count,)) for status, count in session.execute(query.group_by(WebhookDelivery.status))]


def pending_delivery_ids(session: Session, *, after: int | None, upto: int) -> list[int]:
    """Deliveries still pending whose id is in (after, upto]."""
    query = select(WebhookDelivery.id).where(WebhookDelivery.status == "pending", WebhookDelivery.id <= upto)
    if after is not None:
        query = query.where(WebhookDelivery.id > after)
    return list(session.scalars(query))


def delivery_totals_by_id(session: Session, ids: list[int]) -> list[tuple[int, bool, tuple[str], tuple[int]]]:
    """(id, ended, labels, values) of each of these deliveries that still exists."""
    found: list[tuple[int, bool, tuple[str], tuple[int]]] = []
    for start in range(0, len(ids), METRICS_ID_BATCH):
        rows = session.execute(select(WebhookDelivery.id, WebhookDelivery.status)
                               .where(WebhookDelivery.id.in_(ids[start:start + METRICS_ID_BATCH])))
        found.extend((delivery_id, status != "pending", (status,), (1,)) for delivery_id, status in rows)
    return found


@dataclass(frozen=True)
class DueDelivery:
    id: int
    event: str
    attempt: int
    url: str
    secret: str
    job: Job


def any_webhooks(session: Session) -> bool:
    return bool(session.scalar(select(select(Webhook.id).limit(1).exists())))


def take_due(session: Session, lease: timedelta, max_attempts: int, limit: int = 20) -> list[DueDelivery]:
    """Pending deliveries whose time has come, leased to the caller (attempt counted now).

    A delivery whose last allowed attempt never reported back (its sender died) is failed here.
    """
    is_due = (WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= func.now())
    session.execute(update(WebhookDelivery).where(*is_due, WebhookDelivery.attempts >= max_attempts)
                    .values(status="failed", last_error="no answer was recorded for the last attempt"))
    due = (select(WebhookDelivery.id).where(*is_due)
           .order_by(WebhookDelivery.next_attempt_at).limit(limit).with_for_update(skip_locked=True))
    taken = session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id.in_(due.scalar_subquery()))
        .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=func.now() + lease)
        .returning(WebhookDelivery.id, WebhookDelivery.event, WebhookDelivery.attempts,
                   WebhookDelivery.webhook_id, WebhookDelivery.job_id)).all()
    if not taken:
        return []
    hooks = {h.id: h for h in session.scalars(select(Webhook).where(Webhook.id.in_({t.webhook_id for t in taken})))}
    jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_({t.job_id for t in taken})))}
    return [DueDelivery(t.id, t.event, t.attempts, hooks[t.webhook_id].url, hooks[t.webhook_id].secret,
                        jobs[t.job_id]) for t in taken]


def record_attempt(session: Session, delivery_id: int, *, delivered: bool, status_code: int | None,
                   error: str | None, retry_at: datetime | None) -> None:
    """The outcome of one attempt: delivered, retried at `retry_at`, or (no `retry_at`) given up."""
    values: dict = {"last_status_code": status_code, "last_error": error}
    if delivered:
        values |= {"status": "delivered", "delivered_at": func.now()}
    elif retry_at is not None:
        values |= {"next_attempt_at": retry_at}
    else:
        values |= {"status": "failed"}
    session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(**values))
