"""The inference deadline: a predict() call that blocks past it (on a batching worker's solo pool, where
Celery's time limits do not reach) has its jobs given up, tried again, and failed with a clear code once
they have used their attempts, rather than left running forever."""

import pytest

from percept.db import registry
from percept.db.ids import new_id
from percept.db.models import Job, JobStatus
from percept.db.session import session_scope
from percept.db.tenants import tenant_id_for_key
from percept.queue import producer
from percept.services import load_services
from tests.conftest import wait_until
from tests.own_platform import OwnPlatform, own_platform

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BLOCKING = "tests.blocking_service.service"
DEADLINE = 2  # seconds
# The worker gives its jobs up at the deadline; the sweeper, which would take them back once their heartbeat
# is this old, is only the backstop. A lease well past the deadline keeps it out of this test's way.
LEASE = 6
MAX_ATTEMPTS = 3  # the default


@pytest.fixture(scope="module")
def blocking(tmp_path_factory):
    """A platform declaring the blocking service, with its worker running under a 2 s inference deadline."""
    env = {"PERCEPT_EXTRA_SERVICES": BLOCKING, "PERCEPT_INFERENCE_DEADLINE": str(DEADLINE),
           "PERCEPT_JOB_LEASE": str(LEASE)}
    with own_platform(tmp_path_factory.mktemp("deadlines"), **env) as plat:
        with session_scope(plat.database_url) as session:  # what `percept migrate` seeds from the declaration
            registry.seed_builtin(session, load_services((BLOCKING,))[-1].models)
            session.commit()
        plat.start_worker("blocking-worker", "blocking")
        yield plat


def submit(plat: OwnPlatform, tenant_id: str, block_seconds: float) -> str:
    """A job of the blocking kind (no route in the gateway: recorded and sent as the gateway would)."""
    kind = load_services((BLOCKING,))[-1].job_kinds[0]  # `block`
    job_id = new_id("job")
    params = {"model": "tiny-blocker:1", "block_seconds": block_seconds}
    with session_scope(plat.database_url) as session:
        session.add(Job(id=job_id, tenant_id=tenant_id, kind=kind.name, queue=kind.queue, status=JobStatus.QUEUED,
                        model_name="tiny-blocker:1", params=params, inputs=[], progress={"done": 0, "total": 1},
                        provenance={"inputs": []}, attempts=0, cancel_requested=False))
        session.commit()
    producer(plat.broker_url).send_task(kind.task, args=[job_id], queue=kind.queue)
    return job_id


def test_a_batch_that_blocks_past_the_deadline_is_retried_then_failed(blocking):
    key = blocking.new_key()
    with session_scope(blocking.database_url) as session:
        tenant_id = tenant_id_for_key(session, key)
    assert tenant_id is not None
    # Each attempt blocks the worker's only thread for 3 deadlines: its heartbeat would beat all along.
    job_id = submit(blocking, tenant_id, block_seconds=3 * DEADLINE)

    wait_until(lambda: blocking.job_row(job_id).attempts >= 2, timeout=60, interval=0.1,
               what="the job to be taken back from its first attempt and tried again")
    ended = wait_until(lambda: (job := blocking.job_row(job_id)).status.is_terminal() and job, timeout=90,
                       interval=0.2, what="the job to end")
    assert ended.status is JobStatus.FAILED, (ended.status, ended.error)
    assert ended.error["code"] == "inference_timeout" and f"{DEADLINE} s" in ended.error["message"]
    assert ended.attempts == MAX_ATTEMPTS and ended.output is None
    assert "inference deadline" in (blocking.data_dir / "blocking-worker.log").read_text()

    # The worker serves on: a job that does not block succeeds there.
    quick = submit(blocking, tenant_id, block_seconds=0)
    done = wait_until(lambda: (job := blocking.job_row(quick)).status.is_terminal() and job, timeout=60,
                      interval=0.2, what="the quick job to end")
    assert done.status is JobStatus.SUCCEEDED and done.output == {"blocked_seconds": 0.0}
    assert done.attempts == 1
