"""What an operator relies on to scale and stop workers, on real worker processes: the backlog gauges count what
is queued and running from the job records; SIGTERM lets a worker finish its job and take no other, or hand a job
that would outlast the grace period back; `Cancel-After` ends a job past its deadline; a high-priority tenant's
jobs overtake a low-priority backlog.

The jobs are of the test-only `tick` kind (tests/blocking_service): a prefork pool, like a generation, whose
predictor sleeps in 0.1 s steps and reports each one.
"""

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from percept.db import jobs as job_repo
from percept.db import registry
from percept.db.models import Job, JobStatus, Priority
from percept.db.session import session_scope
from percept.db.tenants import set_priority, tenant_id_for_key
from percept.queue import PRIORITIES, priority_lists, producer, redis_client
from percept.services import load_services
from tests.conftest import wait_until
from tests.own_platform import OwnPlatform, own_platform

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BLOCKING = "tests.blocking_service.service"
POOL = "ticking"


@pytest.fixture(scope="module")
def plat(tmp_path_factory):
    """A platform declaring the blocking service; each test starts the ticking workers it needs."""
    with own_platform(tmp_path_factory.mktemp("queueing"), PERCEPT_EXTRA_SERVICES=BLOCKING) as plat:
        with session_scope(plat.database_url) as session:  # what `percept migrate` seeds from the declaration
            registry.seed_builtin(session, load_services((BLOCKING,))[-1].models)
            session.commit()
        yield plat


def tenant(plat: OwnPlatform, priority: Priority = Priority.NORMAL) -> tuple[str, str]:
    """(api key, tenant id) of a new tenant at `priority`."""
    name = f"tenant-{time.monotonic_ns()}"
    key = plat.new_key(name)
    with session_scope(plat.database_url) as session:
        assert set_priority(session, name, priority)
        session.commit()
        tenant_id = tenant_id_for_key(session, key)
    assert tenant_id is not None
    return key, tenant_id


def submit_tick(plat: OwnPlatform, tenant_id: str, seconds: float, deadline_at: datetime | None = None) -> str:
    """A `tick` job (no route in the gateway), recorded as the gateway records a job, at the tenant's priority."""
    (_, kind) = load_services((BLOCKING,))[-1].job_kinds
    with session_scope(plat.database_url) as session:
        job = job_repo.queued_job(tenant_id, kind.name, kind.queue, {"model": "tiny-ticker:1", "seconds": seconds}, [],
                                  priority=job_repo.tenant_priority(session, tenant_id), deadline_at=deadline_at)
        job_repo.add_job(session, job)
        session.commit()
        job_id, priority = job.id, job.priority
    # As send_job sends it (this process's catalog does not declare the test service)
    producer(plat.broker_url).send_task(kind.task, args=[job_id], queue=kind.queue, priority=PRIORITIES[priority])
    return job_id


def ended(plat: OwnPlatform, job_id: str, timeout: float = 60) -> Job:
    return wait_until(lambda: (job := plat.job_row(job_id)).status.is_terminal() and job, timeout=timeout,
                      interval=0.1, what=f"job {job_id} to end")


def running(plat: OwnPlatform, job_id: str, timeout: float = 60) -> Job:
    return wait_until(lambda: (job := plat.job_row(job_id)).status is JobStatus.RUNNING and job.worker and job,
                      timeout=timeout, interval=0.05, what=f"job {job_id} to run")


def scrape(plat: OwnPlatform) -> dict[str, list]:
    text = httpx.get(f"{plat.url}/metrics", timeout=30).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def backlog(plat: OwnPlatform, queue: str = POOL) -> dict[str, float]:
    samples = scrape(plat)
    found = {s.labels["state"]: s.value for s in samples["percept_queue_jobs"] if s.labels["queue"] == queue}
    found["oldest"] = next(s.value for s in samples["percept_queue_oldest_queued_seconds"]
                           if s.labels["queue"] == queue)
    return found


def stop(process, timeout: float = 60) -> int:
    """SIGTERM to the worker process alone, as Kubernetes and Docker send it to a container's first process."""
    os.kill(process.pid, signal.SIGTERM)
    return process.wait(timeout)


def test_the_backlog_gauges_count_queued_and_running_jobs_and_drop_when_they_end(plat):
    _, tenant_id = tenant(plat)
    assert backlog(plat) == {"queued": 0, "running": 0, "oldest": 0}
    # No worker yet: both wait in the queue, however long the broker has held them
    first, second = submit_tick(plat, tenant_id, 3), submit_tick(plat, tenant_id, 0.3)
    time.sleep(1.2)
    waiting = backlog(plat)
    assert waiting["queued"] == 2 and waiting["running"] == 0 and waiting["oldest"] >= 1.0, waiting

    worker = plat.start_worker("tick-gauges", POOL)
    running(plat, first)
    during = backlog(plat)
    assert during["queued"] == 1 and during["running"] == 1, during  # one held by the worker, one behind it

    ended(plat, second)
    assert backlog(plat) == {"queued": 0, "running": 0, "oldest": 0}
    # The ended jobs are in the per-kind histograms, from their provenance timings
    samples = scrape(plat)["percept_job_duration_seconds"]
    count = next(s.value for s in samples if s.name == "percept_job_duration_seconds_count"
                 and s.labels == {"kind": "tick", "model": "tiny-ticker"})
    assert count >= 2
    assert stop(worker) == 0


def test_sigterm_lets_the_running_job_finish_takes_no_other_and_exits_0(plat):
    _, tenant_id = tenant(plat)
    worker = plat.start_worker("tick-drain", POOL)
    long_job = submit_tick(plat, tenant_id, 4)
    running(plat, long_job)
    behind = submit_tick(plat, tenant_id, 0.2)
    time.sleep(0.5)  # the second is in the broker, behind the first, while the worker holds the first
    assert plat.job_row(behind).status is JobStatus.QUEUED

    assert stop(worker) == 0
    done = plat.job_row(long_job)
    assert done.status is JobStatus.SUCCEEDED and done.output == {"ticks": 40}, (done.status, done.error)
    assert done.attempts == 1
    left = plat.job_row(behind)
    assert left.status is JobStatus.QUEUED and left.attempts == 0 and left.worker is None

    # Nothing lost: the next worker runs it
    worker = plat.start_worker("tick-after-drain", POOL)
    assert ended(plat, behind).status is JobStatus.SUCCEEDED
    assert stop(worker) == 0


def test_a_job_that_would_outlast_the_grace_period_is_handed_back_queued(plat):
    _, tenant_id = tenant(plat)
    # 5 s between SIGTERM and SIGKILL, hand-back 3 s before (time for the process to exit): an 8 s job cannot
    # finish in time
    worker = plat.start_worker("tick-handback", POOL, PERCEPT_SHUTDOWN_GRACE="5", PERCEPT_HANDBACK_MARGIN="3")
    job_id = submit_tick(plat, tenant_id, 8)
    running(plat, job_id)
    signalled = time.monotonic()
    assert stop(worker, timeout=5) == 0  # within the grace period: never SIGKILLed
    assert time.monotonic() - signalled < 5
    back = plat.job_row(job_id)
    # Queued again at once, not `running` until its lease runs out; and sent again
    assert back.status is JobStatus.QUEUED and back.worker is None and back.error is None, back.status
    assert back.attempts == 1
    assert "grace period ends" in (plat.data_dir / "tick-handback.log").read_text()

    worker = plat.start_worker("tick-after-handback", POOL)
    done = ended(plat, job_id)
    assert done.status is JobStatus.SUCCEEDED and done.attempts == 2
    assert stop(worker) == 0


def test_cancel_after_ends_a_queued_job_with_deadline_exceeded(plat, coffee_jpeg):
    key, _ = tenant(plat)
    with plat.client(key) as client:
        # No classifier worker on this platform: the job can only wait, until its deadline
        answer = client.post("/v1/classify", files={"image": ("coffee.jpg", coffee_jpeg, "image/jpeg")},
                             headers={"Cancel-After": "1.5"})
        assert answer.status_code == 202, answer.text
        job = answer.json()
        assert job["deadline_at"] is not None
        final = wait_until(lambda: (j := client.get(f"/v1/jobs/{job['id']}").json())["status"] != "queued" and j,
                           timeout=30, interval=0.2, what="the job to end at its deadline")
    assert final["status"] == "canceled"
    assert final["error"]["code"] == "deadline_exceeded" and "Cancel-After" in final["error"]["message"]
    created, finished = (datetime.fromisoformat(final[k]) for k in ("created_at", "finished_at"))
    assert finished - created >= timedelta(seconds=1.5)


def test_cancel_after_stops_a_running_job_at_its_next_step(plat):
    _, tenant_id = tenant(plat)
    worker = plat.start_worker("tick-deadline", POOL)
    assert ended(plat, submit_tick(plat, tenant_id, 0.1)).status is JobStatus.SUCCEEDED  # the worker is up
    job_id = submit_tick(plat, tenant_id, 30, deadline_at=datetime.now(UTC) + timedelta(seconds=2))
    running(plat, job_id)
    done = ended(plat, job_id, timeout=20)  # long before its 30 s
    assert done.status is JobStatus.CANCELED and done.error["code"] == "deadline_exceeded", (done.status, done.error)
    assert done.output is None and "running at its deadline" in done.error["message"]
    assert stop(worker) == 0


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan", "700000"])
def test_a_bad_cancel_after_is_refused_with_what_to_send(plat, value, coffee_jpeg):
    key, _ = tenant(plat)
    with plat.client(key) as client:
        answer = client.post("/v1/classify", files={"image": ("coffee.jpg", coffee_jpeg, "image/jpeg")},
                             headers={"Cancel-After": value})
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_cancel_after" and "Cancel-After: 30" in error["message"]


def set_priority_by_cli(plat: OwnPlatform, name: str, priority: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "percept.cli", "tenant-priority", name, priority], env=plat.env(),
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_tenants_priority_is_the_jobs_and_the_brokers(plat, coffee_jpeg):
    name = f"tenant-{time.monotonic_ns()}"
    key = plat.new_key(name)
    assert set_priority_by_cli(plat, name, "high").returncode == 0
    missing = set_priority_by_cli(plat, "no-such-tenant", "high")
    assert missing.returncode == 1 and "no tenant named" in missing.stdout
    assert set_priority_by_cli(plat, name, "urgent").returncode == 2  # not a priority: typer's usage error
    client_redis = redis_client(plat.broker_url)
    high_list, normal_list = priority_lists("classifier")[0], priority_lists("classifier")[1]
    before = client_redis.llen(high_list), client_redis.llen(normal_list)
    with plat.client(key) as client:
        answer = client.post("/v1/classify", files={"image": ("coffee.jpg", coffee_jpeg, "image/jpeg")},
                             headers={"Cancel-After": "5"})  # no classifier worker here: let it go on its own
    assert answer.status_code == 202, answer.text
    assert answer.json()["priority"] == "high"
    assert (client_redis.llen(high_list), client_redis.llen(normal_list)) == (before[0] + 1, before[1])


def test_high_priority_jobs_overtake_a_low_priority_backlog(plat):
    _, low = tenant(plat, Priority.LOW)
    _, high = tenant(plat, Priority.HIGH)
    _, normal = tenant(plat, Priority.NORMAL)
    backlog_ids = [submit_tick(plat, low, 0.2) for _ in range(6)]  # queued first, no worker yet
    normal_ids = [submit_tick(plat, normal, 0.2) for _ in range(2)]
    high_ids = [submit_tick(plat, high, 0.2) for _ in range(3)]
    worker = plat.start_worker("tick-priority", POOL)
    jobs = [ended(plat, job_id) for job_id in backlog_ids + normal_ids + high_ids]
    assert all(job.status is JobStatus.SUCCEEDED for job in jobs)
    order = [job.id for job in sorted(jobs, key=lambda job: job.started_at)]
    # Every high job before any normal one, every normal one before any low one; first in, first out within each
    assert order == high_ids + normal_ids + backlog_ids, order
    assert stop(worker) == 0
