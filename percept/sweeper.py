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
        resend = [(job.kind, job.id) for job in stale + requeued]
        ended_ids = [(job.id, job.status.value) for job in ended]
        # Parents whose last child ended where no worker woke them (a lost worker, a give-up, a cancel)
        woken = [(parent.kind, parent.id, status)
                 for parent, status in job_repo.wake_parents(session, job_repo.waiting_parents_done(session))]
        session.commit()
    # Send after the commit: a failed send leaves the job queued for the next sweep.
    sent = 0
    for kind, job_id in resend:
        try:
            send_job(broker_url, kind, job_id)
            sent += 1
        except DependencyUnavailable:
            log.warning("broker unavailable; job %s stays queued for the next sweep", job_id)
            break
        except KeyError:  # a kind only some processes declare (PERCEPT_EXTRA_SERVICES): theirs to send
            log.warning("job %s is of kind %r, which no service declares here; left queued", job_id, kind)
    for job_id, status in ended_ids:
        publish_job_event(broker_url, job_id, status)
    for kind, job_id, parent_status in woken:
        if parent_status is JobStatus.QUEUED:
            resend_parent(broker_url, kind, job_id)
        publish_job_event(broker_url, job_id, parent_status.value)
    if resend or ended_ids:
        log.info("sweep: resent %d of %d (stale queued %d, lost workers %d), ended %d",
                 sent, len(resend), len(stale), len(requeued), len(ended_ids))
    return {"resent": sent, "stale_queued": len(stale), "lost": len(requeued), "ended": len(ended_ids),
            "parents_woken": len(woken)}


def resend_parent(broker_url: str, kind: str, job_id: str) -> None:
    try:
        send_job(broker_url, kind, job_id)
    except (DependencyUnavailable, KeyError):
        log.warning("parent job %s stays queued for the next sweep", job_id)
