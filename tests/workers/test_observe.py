"""A worker's HTTP endpoint (/healthz, /readyz, /metrics) and its JSON logs, on real worker processes: ready only
once the Celery consumer is up and the pool's default model is loaded, its first job finding that model warm,
and every line a job causes carrying the job's id, tenant and kind."""

import json
import logging
import re

import httpx
import pytest

from percept.db import registry
from percept.db.ids import new_id
from percept.db.models import Job, JobStatus
from percept.db.session import session_scope
from percept.db.tenants import tenant_id_for_key
from percept.queue import producer
from percept.services import load_services
from tests.conftest import free_port, wait_until
from tests.own_platform import OwnPlatform, own_platform
from workers.observe import CeleryTaskFields

OBSERVED = "tests.workers.observed_service"
MODEL = "tiny-announcer:1"


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """A platform declaring the observed service; its model is not seeded until a test does it."""
    with own_platform(tmp_path_factory.mktemp("observe"), PERCEPT_EXTRA_SERVICES=OBSERVED) as plat:
        yield plat


def seed_models(plat: OwnPlatform) -> None:
    """What `percept migrate` seeds from the declaration."""
    with session_scope(plat.database_url) as session:
        registry.seed_builtin(session, load_services((OBSERVED,))[-1].models)
        session.commit()


def start_observed_worker(plat: OwnPlatform, pool: str) -> str:
    """The pool's worker with its endpoint on a free port and JSON logs; the endpoint's URL."""
    port = free_port()
    plat.start_worker(f"{pool}-worker", pool, PERCEPT_WORKER_HTTP_PORT=str(port), PERCEPT_LOG_FORMAT="json",
                      PERCEPT_LOG_LEVEL="INFO")
    return f"http://127.0.0.1:{port}"


def get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None


def submit(plat: OwnPlatform, kind_name: str) -> tuple[str, str]:
    """A job of the observed service (no route in the gateway: recorded and sent as the gateway would);
    (job id, tenant id)."""
    with session_scope(plat.database_url) as session:
        tenant_id = tenant_id_for_key(session, plat.new_key())
    assert tenant_id is not None
    kind = next(k for k in load_services((OBSERVED,))[-1].job_kinds if k.name == kind_name)
    job_id = new_id("job")
    with session_scope(plat.database_url) as session:
        session.add(Job(id=job_id, tenant_id=tenant_id, kind=kind.name, queue=kind.queue, status=JobStatus.QUEUED,
                        model_name=MODEL, params={"model": MODEL}, inputs=[], progress={"done": 0, "total": 1},
                        provenance={"inputs": []}, attempts=0, cancel_requested=False))
        session.commit()
    producer(plat.broker_url).send_task(kind.task, args=[job_id], queue=kind.queue)
    return job_id, tenant_id


def ended(plat: OwnPlatform, job_id: str) -> Job:
    def terminal() -> Job | None:
        with session_scope(plat.database_url) as session:
            job = session.get(Job, job_id)
            return job if job is not None and job.status.is_terminal() else None
    return wait_until(terminal, timeout=60, what=f"job {job_id} to end")


def log_records(plat: OwnPlatform, name: str) -> list[dict]:
    """The worker's log, every line of which is one JSON object."""
    lines = [line for line in (plat.data_dir / f"{name}.log").read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def load_count(metrics: str) -> float:
    found = re.search(r'^percept_model_load_seconds_count\{device="cpu",model="tiny-announcer:1"\} (\S+)$', metrics,
                      re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.mark.integration
@pytest.mark.slow
def test_a_prefork_worker_is_ready_once_its_model_is_loaded_and_its_first_job_finds_it_warm(observed):
    url = start_observed_worker(observed, "observed")
    wait_until(lambda: (answer := get(url + "/healthz")) is not None and answer.status_code == 200, timeout=60,
               what="the worker to answer /healthz")

    # 1. Consumer up, but the pool's model is not in the registry yet: not ready, and /readyz says why
    waiting = wait_until(lambda: (answer := get(url + "/readyz")) is not None and answer.status_code == 503
                         and "tiny-announcer" in answer.text and answer, timeout=60,
                         what="/readyz to name the model it waits for")
    assert waiting.json()["status"] == "warming_up" and "not in the registry" in waiting.json()["reason"]

    # 2. Once it is, the warm-up (tried again every few seconds) loads it and the worker is ready
    seed_models(observed)
    ready = wait_until(lambda: (answer := get(url + "/readyz")) is not None and answer.status_code == 200
                       and answer, timeout=60, what="/readyz to answer 200")
    assert ready.json() == {"status": "ready", "models": {MODEL: "loaded"}}
    metrics = httpx.get(url + "/metrics", timeout=5)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert load_count(metrics.text) == 1.0, metrics.text
    assert re.search(r"^percept_worker_jobs_running 0\.0$", metrics.text, re.MULTILINE), metrics.text

    # 3. The first job finds the model loaded (load time 0), and the model was not loaded again
    job_id, tenant_id = submit(observed, "announce")
    job = ended(observed, job_id)
    assert job.status is JobStatus.SUCCEEDED, job.error
    assert job.provenance is not None and job.provenance["timings_ms"]["load"] == 0.0
    assert load_count(httpx.get(url + "/metrics", timeout=5).text) == 1.0
    assert get(url + "/nothing-here").status_code == 404  # type: ignore[union-attr]

    # 4. JSON logs: the predictor's line in the pool process, and Celery's own lines, name the job
    records = log_records(observed, "observed-worker")
    assert all({"timestamp", "level", "logger", "message", "process"} <= record.keys() for record in records)
    (announced,) = [r for r in records if r["message"] == "announcing 1 requests"]
    assert (announced["job_id"], announced["tenant_id"], announced["kind"]) == (job_id, tenant_id, "announce")
    assert announced["logger"] == OBSERVED and announced["level"] == "INFO"
    celery_lines = [r for r in records if r["logger"].startswith("celery.") and r.get("job_id") == job_id]
    assert any(r["message"].endswith("received") for r in celery_lines), celery_lines
    assert any(" succeeded in " in r["message"] for r in celery_lines), celery_lines
    assert all(r["kind"] == "announce" for r in celery_lines)
    warmed = [r for r in records if r["message"] == f"warm-up: {MODEL} loaded"]
    assert len(warmed) == 1 and warmed[0]["process"] == announced["process"]  # the pool child's
    assert not any("job_id" in r for r in warmed)


@pytest.mark.integration
@pytest.mark.slow
def test_a_solo_worker_warms_up_in_its_own_process_and_a_pool_without_models_is_ready_when_consuming(observed):
    seed_models(observed)
    solo, idle = start_observed_worker(observed, "observed-solo"), start_observed_worker(observed, "observed-idle")
    for url in (solo, idle):
        wait_until(lambda url=url: (answer := get(url + "/readyz")) is not None and answer.status_code == 200,
                   timeout=60, what=f"{url}/readyz to answer 200")
    assert httpx.get(solo + "/readyz").json()["models"] == {MODEL: "loaded"}
    assert httpx.get(idle + "/readyz").json() == {"status": "ready", "models": {}}
    assert load_count(httpx.get(solo + "/metrics").text) == 1.0
    assert load_count(httpx.get(idle + "/metrics").text) == 0.0

    job_id, tenant_id = submit(observed, "announce_batched")
    assert ended(observed, job_id).status is JobStatus.SUCCEEDED
    records = log_records(observed, "observed-solo-worker")
    (announced,) = [r for r in records if r["message"] == "announcing 1 requests"]
    assert (announced["job_id"], announced["tenant_id"], announced["kind"]) == (job_id, tenant_id, "announce_batched")
    assert {r["process"] for r in records} == {announced["process"]}  # solo: one process does everything


def test_celery_task_lines_name_the_job_from_the_task_arguments():
    fields = CeleryTaskFields({"percept.classify": "classify"})
    record = logging.LogRecord("celery.worker.strategy", logging.INFO, __file__, 1, "Task %(name)s[%(id)s] received",
                               None, None)
    record.data = {"id": "c0ffee", "name": "percept.classify", "args": "['job_01ABC']", "kwargs": "{}"}
    assert fields.filter(record) and (record.job_id, record.kind) == ("job_01ABC", "classify")

    other = logging.LogRecord("celery.app.trace", logging.INFO, __file__, 1, "message", None, None)
    other.data = {"name": "celery.backend_cleanup", "args": "()"}
    assert fields.filter(other) and not hasattr(other, "job_id")
