"""Nothing is lost: killed workers, unsent jobs, duplicated messages, a stopped database.

These tests stop and kill parts of the platform, so they get a platform of their own.
"""

import errno
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from pgserver._commands import pg_ctl
from skimage import data

from percept.db.ids import new_id
from percept.db.models import Job, JobStatus
from percept.db.session import session_scope
from percept.embedded import start_redis
from percept.queue import send_job
from percept.storage import object_key_for
from tests.conftest import Platform, image_bytes, job_answer, make_infra, wait_for_job, wait_until

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


def ensure_worker(platform: Platform) -> None:
    """A classifier worker named `worker`, whatever the tests before this one left running."""
    if "worker" not in platform.processes:
        platform.start_worker("worker")


class HeldInput:
    """An uploaded image whose object (in the platform's local object directory) is replaced by a named
    pipe: a worker that claims a job on it blocks reading its input, so the job stays `running` for as long
    as the test needs, however fast the worker loads its model and classifies.

    `release()` feeds the bytes to the worker blocked on the pipe; `restore()` puts the object back as a
    plain file for any later reader.
    """

    def __init__(self, platform: Platform, client, photo: bytes) -> None:
        image = client.post("/v1/images", files={"file": ("held.jpg", photo)}).json()
        self.image_id, self.photo = image["id"], photo
        self.path = Path(platform.data_dir, "objects", object_key_for(image["sha256"]))
        assert self.path.read_bytes() == photo
        self.path.unlink()
        os.mkfifo(self.path)

    def release(self) -> None:
        def reader_waiting() -> int | None:
            try:  # without a reader on the pipe a non-blocking open fails with ENXIO
                return os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                return None

        fd = wait_until(reader_waiting, timeout=60, interval=0.05, what="the worker to read the held input")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "wb") as pipe:
            pipe.write(self.photo)
        self.restore()

    def restore(self) -> None:
        spare = self.path.with_suffix(".restored")
        spare.write_bytes(self.photo)
        os.replace(spare, self.path)


def a_coffee_photo_of_its_own(marker: int) -> bytes:
    """The coffee photo with one pixel changed: its own content address, still an espresso."""
    pixels = data.coffee().copy()
    pixels[0, 0] = (marker % 256, marker // 256 % 256, 7)
    return image_bytes(pixels, quality=95)


def wait_until_running(client, job_id: str) -> None:
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "running", timeout=60, interval=0.05,
               what=f"job {job_id} to be claimed")


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

    # The whole backlog waits in the broker before the worker starts. While messages still wait, a batch
    # keeps taking them in for up to PERCEPT_CLASSIFY_BATCH_GATHER: given ample time, the first batch
    # gathers the backlog however slowly a busy machine lets the worker fetch it.
    isolated.start_worker("worker", PERCEPT_CLASSIFY_BATCH_GATHER="30")
    jobs = [wait_for_job(client, job_id, timeout=120) for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 6
    assert max(j["provenance"]["batch_size"] for j in jobs) > 1  # several images in one forward pass
    assert {j["output"]["labels"][0]["label"] for j in jobs[::2]} == {"espresso"}
    still = client.get(f"/v1/jobs/{canceled['id']}").json()
    assert still["status"] == "canceled" and still["attempts"] == 0 and still["output"] is None


def test_sigkilled_worker_loses_no_job(isolated, client):
    ensure_worker(isolated)
    held = HeldInput(isolated, client, a_coffee_photo_of_its_own(1))
    job = client.post("/v1/classify", json={"image": held.image_id}).json()
    wait_until_running(client, job["id"])  # and it stays running: its worker waits on the held input
    isolated.kill("worker")  # SIGKILL the whole worker: main process and pool child

    held.restore()
    isolated.start_worker("worker")
    done = wait_for_job(client, job["id"], timeout=90)
    assert done["status"] == "succeeded"
    assert done["attempts"] == 2  # claimed by the killed worker, then once more: completed exactly once
    assert done["output"]["labels"][0]["label"] == "espresso"
    assert done["provenance"]["attempt"] == 2


def test_cancel_of_a_running_job_stops_it_at_the_next_step(isolated, client):
    ensure_worker(isolated)
    held = HeldInput(isolated, client, a_coffee_photo_of_its_own(2))
    job = client.post("/v1/classify", json={"image": held.image_id}).json()
    wait_until_running(client, job["id"])
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "running"  # flagged, not yet stopped
    held.release()
    done = wait_for_job(client, job["id"])
    assert done["status"] == "canceled" and done["output"] is None
    assert done["error"]["code"] == "canceled"
    assert done["attempts"] == 1


def test_duplicate_message_never_reruns_a_finished_job(isolated, client):
    photo = image_bytes(data.coffee())
    first = client.post("/v1/classify", files={"image": ("c.jpg", photo)}, headers={"Prefer": "wait=60"}).json()
    assert first["status"] == "succeeded"
    send_job(isolated.broker_url, "classify", first["id"], "normal")  # a redelivered message
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
    assert job_answer(client.post("/v1/classify", files={"image": ("c.jpg", photo)}))["status"] == "queued"
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
    assert job_answer(back)["status"] == "succeeded"
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
        return back.status_code < 300 and job_answer(back)["status"] == "succeeded"

    # The gateway's and the worker's broker connections come back without a restart.
    wait_until(submitted_and_finished, timeout=90, interval=1, what="a job to run after the broker returned")
    assert client.get("/readyz").status_code == 200
