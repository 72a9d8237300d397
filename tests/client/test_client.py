"""The typed client (percept.client) against the real platform: every kind of image input, sync and async, waiting,
long-polling and events, listing, typed errors, and retries through a flaky proxy that still make one job."""

import asyncio
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

from percept.client import (
    AsyncPercept,
    ImageInput,
    InvalidRequest,
    JobFailed,
    NotFound,
    Percept,
    PerceptError,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from percept.config import get_settings
from percept.schemas import DatasetOut, ImageOut, JobOut, JobPage
from tests.conftest import Platform, free_port
from tests.synthetic import make_samples

pytestmark = pytest.mark.integration


@pytest.fixture
def key(platform: Platform) -> str:
    return platform.new_key()  # a fresh tenant: its job list holds only this test's jobs


@pytest.fixture
def percept(platform: Platform, key: str) -> Iterator[Percept]:
    with Percept(key, platform.url) as client:
        yield client


@pytest.fixture
def coffee_file(tmp_path: Path, coffee_jpeg: bytes) -> Path:
    path = tmp_path / "coffee.jpg"
    path.write_bytes(coffee_jpeg)
    return path


def coffee_inputs(coffee_file: Path, coffee_jpeg: bytes) -> dict[str, ImageInput]:
    """Every kind of image input, but the uploaded id (a test adds it)."""
    return {"str path": str(coffee_file), "Path": coffee_file, "bytes": coffee_jpeg,
            "PIL image": Image.open(io.BytesIO(coffee_jpeg))}


def assert_espresso(job: JobOut, top_k: int = 3) -> None:
    assert isinstance(job, JobOut) and job.status == "succeeded", job
    assert job.output is not None and len(job.output["labels"]) == top_k
    assert job.output["labels"][0]["label"] == "espresso"
    assert job.output["match"]["verdict"] == "match"


def input_of(job: JobOut) -> dict[str, str]:
    assert job.provenance is not None
    return job.provenance["inputs"][0]


def test_classify_every_kind_of_image_input_and_wait_for_the_answer(percept, coffee_file, coffee_jpeg):
    uploaded = percept.upload_image(coffee_file)
    assert isinstance(uploaded, ImageOut) and uploaded.id.startswith("img_") and uploaded.format == "JPEG"
    assert uploaded.bytes == len(coffee_jpeg)

    jobs = {name: percept.classify(image, wait=True, top_k=3, expected_label="espresso")
            for name, image in {**coffee_inputs(coffee_file, coffee_jpeg), "image id": uploaded.id}.items()}
    for job in jobs.values():
        assert_espresso(job)
    # The file's bytes, sent as they are, are the uploaded image; a PIL image goes as a PNG of its pixels.
    for name in ("str path", "Path", "bytes", "image id"):
        assert input_of(jobs[name]) == {"image_id": uploaded.id, "sha256": uploaded.sha256}, name
    sent = percept.get_image(input_of(jobs["PIL image"])["image_id"])
    assert sent.format == "PNG" and (sent.width, sent.height) == (uploaded.width, uploaded.height)
    assert percept.download_image(uploaded.id) == coffee_jpeg


def test_the_async_client_does_the_same(platform, key, coffee_file, coffee_jpeg):
    async def scenario() -> tuple[dict[str, JobOut], str, list[JobOut]]:
        async with AsyncPercept(key, platform.url) as percept:
            uploaded = await percept.upload_image(coffee_jpeg)
            inputs = {**coffee_inputs(coffee_file, coffee_jpeg), "image id": uploaded.id}
            answers = await asyncio.gather(*(percept.classify(image, wait=True, top_k=3, expected_label="espresso")
                                             for image in inputs.values()))
            queued = await percept.classify(uploaded.id)
            seen = [job async for job in percept.events(queued.id)]
            return dict(zip(inputs, answers, strict=True)), uploaded.id, seen

    jobs, image_id, seen = asyncio.run(scenario())
    for job in jobs.values():
        assert_espresso(job)
    assert input_of(jobs["image id"])["image_id"] == input_of(jobs["Path"])["image_id"] == image_id
    assert seen and seen[-1].status == "succeeded" and all(job.status != "succeeded" for job in seen[:-1])
    assert seen[-1].output is not None and seen[-1].output["labels"][0]["label"] == "espresso"


def test_submit_then_wait_for_the_job_and_follow_its_events(percept, coffee_file):
    job = percept.classify(coffee_file)
    assert job.status == "queued" and job.output is None  # answered at once, not waited for

    seen = list(percept.events(job.id))
    assert all(isinstance(state, JobOut) and state.id == job.id for state in seen)
    assert [state.status for state in seen][-1] == "succeeded"
    assert all(state.status in ("queued", "running") for state in seen[:-1])
    assert len({(state.status, json.dumps(state.progress)) for state in seen}) == len(seen)  # each state once

    done = percept.wait_for_job(job.id, timeout=60)
    assert done.status == "succeeded" and done.output == seen[-1].output
    assert [state.status for state in percept.events(job.id)] == ["succeeded"]  # an ended job: its end only
    assert percept.get_job(job.id, wait=5) == done


def test_list_jobs_pages_newest_first(percept, coffee_jpeg):
    first = percept.classify(coffee_jpeg, top_k=1)
    second = percept.classify(coffee_jpeg, top_k=2)
    page = percept.list_jobs()
    assert isinstance(page, JobPage) and [job.id for job in page.data] == [second.id, first.id]
    newest = percept.list_jobs(limit=1)
    assert [job.id for job in newest.data] == [second.id] and newest.next_cursor
    older = percept.list_jobs(limit=1, cursor=newest.next_cursor)
    assert [job.id for job in older.data] == [first.id] and older.next_cursor is None
    percept.wait_for_job(first.id)
    percept.wait_for_job(second.id)
    assert [job.id for job in percept.list_jobs(kind="classify", status="succeeded").data] == [second.id, first.id]
    assert percept.list_jobs(status="failed").data == []


def test_errors_are_typed_with_the_api_code(platform, percept, coffee_jpeg):
    with pytest.raises(NotFound) as missing:
        percept.get_job("job_01NOSUCHJOB")
    assert (missing.value.status, missing.value.code) == (404, "job_not_found") and missing.value.message

    with pytest.raises(InvalidRequest) as invalid:
        percept.classify(coffee_jpeg, top_k=0)
    assert (invalid.value.status, invalid.value.code) == (422, "invalid_parameters")
    assert [error["field"] for error in invalid.value.details["errors"]] == ["top_k"]
    assert percept.list_jobs().data == []  # nothing was submitted

    with Percept("not-a-key", platform.url) as stranger, pytest.raises(Unauthorized) as refused:
        stranger.list_jobs()
    assert isinstance(refused.value, InvalidRequest)
    assert (refused.value.status, refused.value.code) == (401, "invalid_api_key")


def test_a_job_that_ends_canceled_raises_job_failed_when_waited_for(percept, tmp_path):
    """A checkpoint import waits for a captioner worker, which this platform does not run: it stays queued until
    canceled. The directory is zipped by the client; the caller's Idempotency-Key names the job."""
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"model_type": "vision-encoder-decoder"}')
    job = percept.import_model(checkpoint, "client-import", idempotency_key="import-1")
    assert job.status == "queued" and job.kind == "import_captioner"
    assert percept.import_model(checkpoint, "client-import", idempotency_key="import-1").id == job.id

    assert percept.cancel_job(job.id).status == "canceled"
    with pytest.raises(JobFailed) as failed:
        percept.wait_for_job(job.id)
    assert failed.value.code == "canceled" and failed.value.job.id == job.id and failed.value.message


def test_upload_a_dataset_directory_and_wait_for_its_analysis(percept, tmp_path):
    for n, (image, label) in enumerate(make_samples({"circle": 3, "square": 3}, size=32)):
        (tmp_path / "photos" / label).mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / "photos" / label / f"{n}.png")
    dataset = percept.upload_dataset(tmp_path / "photos", wait=True)
    assert isinstance(dataset, DatasetOut) and dataset.status == "ready", dataset
    assert dataset.report is not None and percept.get_dataset(dataset.id) == dataset


def test_defaults_are_the_settings_and_the_dev_key_file(platform, key, monkeypatch, tmp_path):
    monkeypatch.setenv("PERCEPT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PERCEPT_API_URL", platform.url)
    monkeypatch.delenv("PERCEPT_API_KEY", raising=False)
    get_settings.cache_clear()
    try:
        with pytest.raises(ValueError, match="No API key"):
            Percept()
        (tmp_path / "dev-api-key").write_text(key + "\n")
        with Percept() as percept:
            assert percept.list_jobs().data == []
    finally:
        get_settings.cache_clear()


# --- retries --------------------------------------------------------------------------------------------------

@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    received: float  # time.monotonic()
    answered: float = 0.0
    status: int = 0
    gateway_answer: dict | None = None  # what the gateway answered, when the proxy sent something else


@dataclass
class FlakyProxy:
    """An HTTP proxy in front of the real gateway. It answers the first POST to `path` with `status` and
    `Retry-After` instead of the gateway's answer: after forwarding it (`forward`: the gateway acted on it, and
    its answer was lost), or without (a real 429 comes before the gateway does anything)."""

    gateway: str
    path: str
    status: int
    retry_after: str
    forward: bool
    seen: list[Seen] = field(default_factory=list)

    def posts(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST" and s.path == self.path]

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        headers = {k.lower(): v for k, v in handler.headers.items()
                   if k.lower() not in ("host", "content-length", "connection")}
        seen = Seen(handler.command, handler.path.partition("?")[0], headers, time.monotonic())
        self.seen.append(seen)
        faulty = seen.method == "POST" and seen.path == self.path and len(self.posts()) == 1
        if not faulty or self.forward:
            with httpx.Client(base_url=self.gateway, timeout=90) as upstream:
                answer = upstream.request(handler.command, handler.path, content=body, headers=headers)
        if faulty:
            seen.gateway_answer = answer.json() if self.forward else None
            error = {"error": {"code": "flaky", "message": "The proxy lost the answer.", "details": {}}}
            answer = httpx.Response(self.status, json=error, headers={"Retry-After": self.retry_after})
        seen.status, seen.answered = answer.status_code, time.monotonic()
        handler.send_response(answer.status_code)
        for name in ("content-type", "retry-after", "location", "preference-applied"):
            if name in answer.headers:
                handler.send_header(name, answer.headers[name])
        handler.send_header("Content-Length", str(len(answer.content)))
        handler.end_headers()
        handler.wfile.write(answer.content)


@pytest.fixture
def proxied(platform: Platform) -> Iterator[Callable]:
    """Starts a FlakyProxy(platform gateway, ...); returns it and its URL."""
    servers: list[ThreadingHTTPServer] = []

    def start(**fault) -> tuple[FlakyProxy, str]:
        proxy = FlakyProxy(platform.url, **fault)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                proxy.answer(self)

            do_POST = do_GET

            def log_message(self, *args) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return proxy, f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def record_pauses(client: Percept | AsyncPercept, monkeypatch) -> list[float]:
    """The seconds the client sleeps before its retries (it still sleeps them)."""
    pauses: list[float] = []
    pause = client._pause

    def recorded(seconds: float):
        pauses.append(seconds)
        return pause(seconds)

    monkeypatch.setattr(client, "_pause", recorded)
    return pauses


def test_a_submit_whose_answer_is_lost_is_retried_into_the_same_job(proxied, key, coffee_file, monkeypatch):
    proxy, url = proxied(path="/v1/classify", status=503, retry_after="0.1", forward=True)
    with Percept(key, url) as percept:
        pauses = record_pauses(percept, monkeypatch)
        job = percept.classify(coffee_file, wait=True, top_k=3, expected_label="espresso")
        jobs = percept.list_jobs()

    assert_espresso(job)
    lost, retried = proxy.posts()
    assert lost.status == 503 and retried.status == 200  # 200: the idempotent replay of the ended job
    assert lost.gateway_answer is not None and lost.gateway_answer["id"] == job.id  # the gateway made it first
    assert lost.headers["idempotency-key"] == retried.headers["idempotency-key"]
    assert [j.id for j in jobs.data] == [job.id]  # one job
    assert pauses == [0.1] and retried.received - lost.answered >= 0.1


def test_a_rate_limited_submit_is_retried_after_retry_after(proxied, key, coffee_jpeg, monkeypatch):
    proxy, url = proxied(path="/v1/classify", status=429, retry_after="0.2", forward=False)

    async def scenario() -> tuple[JobOut, JobPage, list[float]]:
        async with AsyncPercept(key, url) as percept:
            pauses = record_pauses(percept, monkeypatch)
            job = await percept.classify(coffee_jpeg)
            return await percept.wait_for_job(job.id, timeout=60), await percept.list_jobs(), pauses

    job, jobs, pauses = asyncio.run(scenario())
    limited, retried = proxy.posts()
    assert (limited.status, retried.status) == (429, 202)
    assert limited.headers["idempotency-key"] == retried.headers["idempotency-key"]
    assert job.status == "succeeded" and [j.id for j in jobs.data] == [job.id]
    assert pauses == [0.2] and retried.received - limited.answered >= 0.2


def test_retries_end_with_a_typed_error(proxied, key, coffee_jpeg, monkeypatch):
    """Past max_retries the last answer is raised: a 429 as RateLimited with its Retry-After, no answer at all
    (nothing listens) as Unavailable with status 0 after backing off ever longer."""
    _, url = proxied(path="/v1/classify", status=429, retry_after="0", forward=False)
    with Percept(key, url, max_retries=0) as percept, pytest.raises(RateLimited) as limited:
        percept.classify(coffee_jpeg)
    assert (limited.value.status, limited.value.code, limited.value.retry_after) == (429, "flaky", 0.0)

    with Percept(key, f"http://127.0.0.1:{free_port()}", max_retries=2) as percept:
        pauses = record_pauses(percept, monkeypatch)
        with pytest.raises(Unavailable) as unreachable:
            percept.list_jobs()
    assert (unreachable.value.status, unreachable.value.code) == (0, "connection_error")
    assert isinstance(unreachable.value, PerceptError) and len(pauses) == 2 and pauses[0] < pauses[1]
