"""The sweeper: sends again what a crash left behind. Safe to run in every gateway replica at once
(row locks are taken with SKIP LOCKED) and idempotent (workers claim jobs atomically)."""

import logging
from datetime import UTC, datetime

from percept.config import Settings
from percept.db import jobs as job_repo
from percept.db.models import JobStatus
from percept.db.session import session_scope
from percept.errors import DependencyUnavailable
from percept.queue import publish_job_event, send_job

log = logging.getLogger(__name__)


def sweep_once(settings: Settings, database_url: str, broker_url: str) -> dict[str, int]:
    now = datetime.now(UTC)
    with session_scope(database_url) as session:
        stale = job_repo.take_stale_queued(session, now - settings.requeue_after)
        requeued, ended = job_repo.take_expired_running(session, now - settings.job_lease,
                                                        settings.max_attempts)
        # Past their Cancel-After: queued jobs end now, running ones stop at their next step
        overdue, flagged = job_repo.expire_deadlines(session)
        resend = [(job.kind, job.id, job.priority) for job in stale + requeued]
        ended_ids = [(job.id, job.status.value) for job in ended + overdue]
        # Parents whose last child ended where no worker woke them (a lost worker, a give-up, a cancel)
        woken = [(parent.kind, parent.id, parent.priority, status)
                 for parent, status in job_repo.wake_parents(session, job_repo.waiting_parents_done(session))]
        session.commit()
    # Send after the commit: a failed send leaves the job queued for the next sweep.
    sent = 0
    for kind, job_id, priority in resend:
        try:
            send_job(broker_url, kind, job_id, priority)
            sent += 1
        except DependencyUnavailable:
            log.warning("broker unavailable; job %s stays queued for the next sweep", job_id)
            break
        except KeyError:  # a kind only some processes declare (PERCEPT_EXTRA_SERVICES): theirs to send
            log.warning("job %s is of kind %r, which no service declares here; left queued", job_id, kind)
    for job_id, status in ended_ids:
        publish_job_event(broker_url, job_id, status)
    for kind, job_id, priority, parent_status in woken:
        if parent_status is JobStatus.QUEUED:
            resend_parent(broker_url, kind, job_id, priority)
        publish_job_event(broker_url, job_id, parent_status.value)
    if resend or ended_ids or flagged:
        log.info("sweep: resent %d of %d (stale queued %d, lost workers %d), ended %d (%d past their deadline), "
                 "%d running past their deadline told to stop", sent, len(resend), len(stale), len(requeued),
                 len(ended_ids), len(overdue), len(flagged))
    return {"resent": sent, "stale_queued": len(stale), "lost": len(requeued), "ended": len(ended_ids),
            "parents_woken": len(woken), "deadline_exceeded": len(overdue) + len(flagged)}


def resend_parent(broker_url: str, kind: str, job_id: str, priority: str) -> None:
    try:
        send_job(broker_url, kind, job_id, priority)
    except (DependencyUnavailable, KeyError):
        log.warning("parent job %s stays queued for the next sweep", job_id)
