"""Nothing is lost: killed workers, unsent jobs, duplicated messages, a stopped database.

These tests stop and kill parts of the platform, so they get a platform of their own.
"""

from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlparse

import pytest
from pgserver._commands import pg_ctl
from skimage import data

from percept.db.ids import new_id
from percept.db.models import Job, JobStatus
from percept.db.session import session_scope
from percept.embedded import start_redis
from percept.queue import send_job
from tests.conftest import Platform, image_bytes, make_infra, wait_for_job, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("resilience")
    handles, database_url, broker_url = make_infra(data_dir)
    plat = Platform(data_dir, database_url, broker_url, (data_dir / "objects").as_uri())
    plat.start_gateway()
    plat.server, plat.redis = handles
    yield plat
    plat.stop_all()
    plat.redis.terminate()
    # The database test restarts Postgres with pg_ctl, so pgserver's handle no longer tracks the server
    # that runs: stop it here, or it outlives the tests.
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=plat.server.pgdata, user=plat.server.system_user)
    handles[0].cleanup()


@pytest.fixture
def client(isolated):
    with isolated.client(isolated.new_key()) as c:
        yield c


def test_queued_jobs_cancel_quota_and_micro_batching(isolated, client):
    """No worker yet: jobs wait in the queue, a queued job cancels at once, the quota holds, and the
    worker, once started, takes the backlog in micro-batches."""
    photos = [image_bytes(data.coffee()), image_bytes(data.chelsea())]
    canceled = client.post("/v1/classify", files={"image": ("c.jpg", photos[0])}).json()
    after_cancel = client.post(f"/v1/jobs/{canceled['id']}/cancel").json()
    assert after_cancel["status"] == "canceled"

    ids = [client.post("/v1/classify", files={"image": ("x.jpg", photos[i % 2])}).json()["id"] for i in range(6)]
    over = client.post("/v1/classify", files={"image": ("c.jpg", photos[0])})
    assert over.status_code == 429 and over.headers["retry-after"]
    assert over.json()["error"]["code"] == "quota_exceeded"

    isolated.start_worker("worker")
    jobs = [wait_for_job(client, job_id) for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 6
    assert max(j["provenance"]["batch_size"] for j in jobs) > 1  # several images in one forward pass
    assert {j["output"]["labels"][0]["label"] for j in jobs[::2]} == {"espresso"}
    still = client.get(f"/v1/jobs/{canceled['id']}").json()
    assert still["status"] == "canceled" and still["attempts"] == 0 and still["output"] is None


def test_sigkilled_worker_loses_no_job(isolated, client):
    # A fresh worker pays the model load inside the job: a window in which the job is surely running.
    isolated.kill("worker")
    isolated.start_worker("doomed")
    job = client.post("/v1/classify", files={"image": ("c.jpg", image_bytes(data.coffee()))}).json()
    wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", timeout=60, interval=0.02,
               what="the job to be claimed")
    isolated.kill("doomed")  # SIGKILL the whole worker: main process and pool child

    isolated.start_worker("worker")
    done = wait_for_job(client, job["id"], timeout=90)
    assert done["status"] == "succeeded"
    assert done["attempts"] == 2  # claimed by the killed worker, then once more: completed exactly once
    assert done["output"]["labels"][0]["label"] == "espresso"
    assert done["provenance"]["attempt"] == 2


def test_cancel_of_a_running_job_stops_it_at_the_next_step(isolated, client):
    isolated.kill("worker")
    isolated.start_worker("worker")  # fresh: the model load keeps the job running for a while
    job = client.post("/v1/classify", files={"image": ("c.jpg", image_bytes(data.coffee()))}).json()
    wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", timeout=60, interval=0.02,
               what="the job to be claimed")
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "running"  # flagged, not yet stopped
    done = wait_for_job(client, job["id"])
    assert done["status"] == "canceled" and done["output"] is None
    assert done["error"]["code"] == "canceled"


def test_duplicate_message_never_reruns_a_finished_job(isolated, client):
    photo = image_bytes(data.coffee())
    first = client.post("/v1/classify", files={"image": ("c.jpg", photo)}, headers={"Prefer": "wait=60"}).json()
    assert first["status"] == "succeeded"
    send_job(isolated.broker_url, "classify", first["id"])  # a redelivered message
    second = client.post("/v1/classify", files={"image": ("c.jpg", photo)}, headers={"Prefer": "wait=60"}).json()
    assert second["status"] == "succeeded"  # the queue has moved past the duplicate
    again = client.get(f"/v1/jobs/{first['id']}").json()
    assert again["attempts"] == 1 and again["finished_at"] == first["finished_at"]


def test_job_committed_but_never_sent_is_swept(isolated, client):
    image = client.post("/v1/images", files={"file": ("c.jpg", image_bytes(data.coffee()))}).json()
    tenant_id = _tenant_of(isolated, image["id"])
    job_id = new_id("job")
    inputs = [{"image_id": image["id"], "sha256": image["sha256"]}]
    with session_scope(isolated.database_url) as session:  # as if the gateway crashed right after its commit
        session.add(Job(id=job_id, tenant_id=tenant_id, kind="classify", queue="classifier", status=JobStatus.QUEUED,
                        model_name="imagenet-efficientnet-lite0:1", inputs=inputs, progress={"done": 0, "total": 1},
                        params={"model": "imagenet-efficientnet-lite0:1", "top_k": 1, "expected_label": None,
                                "unknown_threshold": None},
                        provenance={"inputs": inputs}, attempts=0, cancel_requested=False,
                        queued_at=datetime.now(UTC) - timedelta(minutes=5)))
        session.commit()
    done = wait_for_job(client, job_id, timeout=60)
    assert done["status"] == "succeeded" and done["attempts"] == 1


def _tenant_of(platform: Platform, image_id: str) -> str:
    from percept.db.models import Image

    with session_scope(platform.database_url) as session:
        return session.get(Image, image_id).tenant_id


def test_database_down_gives_503_and_recovers(isolated, client):
    photo = image_bytes(data.coffee())
    assert client.post("/v1/classify", files={"image": ("c.jpg", photo)}).status_code == 202
    server = isolated.server
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
    try:
        down = client.post("/v1/classify", files={"image": ("c.jpg", photo)})
        assert down.status_code == 503 and down.headers["retry-after"]
        assert down.json()["error"]["code"] == "database_unavailable"
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
    finally:
        socket_dir = parse_qs(urlparse(isolated.database_url).query)["host"][0]
        pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(server.log), "start"],
               pgdata=server.pgdata, user=server.system_user)
    back = client.post("/v1/classify", files={"image": ("c.jpg", photo)}, headers={"Prefer": "wait=60"})
    assert back.status_code == 202 and back.json()["status"] == "succeeded"
    assert client.get("/readyz").status_code == 200


def test_broker_down_gives_503_reads_still_work_and_it_recovers(isolated, client):
    photo = image_bytes(data.coffee())
    done = client.post("/v1/classify", files={"image": ("c.jpg", photo)}, headers={"Prefer": "wait=60"}).json()
    assert done["status"] == "succeeded"
    isolated.redis.terminate()
    isolated.redis.wait(10)
    try:
        down = client.post("/v1/classify", files={"image": ("c.jpg", photo)})
        assert down.status_code == 503 and down.headers["retry-after"]
        assert down.json()["error"]["code"] == "broker_unavailable"
        # Reading needs only the database (and the rate limit, kept in Redis, is not enforced meanwhile).
        assert client.get(f"/v1/jobs/{done['id']}").json()["status"] == "succeeded"
        assert client.get("/readyz").status_code == 503
    finally:
        isolated.redis, _ = start_redis(isolated.data_dir / "redis")

    def submitted_and_finished():
        back = client.post("/v1/classify", files={"image": ("c.jpg", photo)}, headers={"Prefer": "wait=30"})
        return back.status_code == 202 and back.json()["status"] == "succeeded"

    # The gateway's and the worker's broker connections come back without a restart.
    wait_until(submitted_and_finished, timeout=90, interval=1, what="a job to run after the broker returned")
    assert client.get("/readyz").status_code == 200
