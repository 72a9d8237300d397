"""A job's images are read while its claim runs: the gateway's task message names where they are, and the worker
starts reading them from that hint before the claim reads the job's row. The row stays the truth: a hint that names
other images, or a model that needs another size, is read again, and a job's result is the same either way.

Until the last test no worker runs on this platform: the test's own runtime (the one every worker runs) takes the
jobs the gateway queued, as a worker would from the messages it sent. The last test starts a classifier worker."""

import base64
import json
import re

import httpx
import pytest
from skimage import data

from percept.config import Settings
from percept.infra import resolve_infra
from percept.queue import priority_lists, redis_client
from percept.storage import object_key_for
from tests.conftest import free_port, image_bytes, wait_until
from tests.own_platform import own_platform
from workers.runtime import JobRuntime

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def plat(tmp_path_factory):
    # The sweeper is not under test here, and must not act on what the tests hold: a job the test's runtime has
    # claimed beats on the runtime's own (default) lease, not the 3 s the test default gives the platform, and the
    # messages read are the gateway's own (the sweeper would send a queued job again after 3 s, with no keys).
    with own_platform(tmp_path_factory.mktemp("early-reads"), PERCEPT_JOB_LEASE="600",
                      PERCEPT_REQUEUE_AFTER="600") as plat:
        yield plat


@pytest.fixture(scope="module")
def runtime(plat):
    return JobRuntime(resolve_infra(Settings(database_url=plat.database_url, broker_url=plat.broker_url,
                                             storage_url=plat.storage_url)))


@pytest.fixture
def key(plat):
    """A tenant of each test's own: the jobs a test leaves queued or running count against no other's quota."""
    return plat.new_key()


def classify(plat, key: str, photo: bytes) -> dict:
    with plat.client(key) as client:
        answer = client.post("/v1/classify", files={"image": ("photo.jpg", photo, "image/jpeg")},
                             headers={"Prefer": "no-reuse"})
    assert answer.status_code == 202, answer.text
    return answer.json()


def message_of(plat, job_id: str) -> tuple[list, dict]:
    """The (args, kwargs) of the job's task message, as it waits in the broker."""
    for name in priority_lists("classifier"):
        for raw in redis_client(plat.broker_url).lrange(name, 0, -1):
            args, kwargs, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
            if args == [job_id]:
                return args, kwargs
    raise AssertionError(f"no message for job {job_id}")


PHOTOS = {name: image_bytes(getattr(data, name)(), "JPEG", quality=90) for name in ("coffee", "chelsea", "rocket")}


def test_the_task_message_names_where_the_jobs_image_is(plat, key):
    job = classify(plat, key, PHOTOS["coffee"])
    sha256 = job["provenance"]["inputs"][0]["sha256"]
    assert message_of(plat, job["id"]) == ([job["id"]], {"image_keys": [object_key_for(sha256)]})


def test_an_early_read_is_taken_when_the_claim_agrees_and_read_again_when_it_does_not(plat, key, runtime):
    first, right, wrong = (classify(plat, key, PHOTOS[name]) for name in ("coffee", "chelsea", "rocket"))
    hint = {job["id"]: message_of(plat, job["id"])[1]["image_keys"] for job in (first, right, wrong)}
    # Before a first classification the size the model decodes at is unknown: nothing is read early.
    runtime.read_early("classify", first["id"], hint[first["id"]])
    assert runtime._early == {}
    runtime.run([first["id"]])
    assert plat.job_row(first["id"]).status.value == "succeeded"

    # Now it is known; the `wrong` job's message names another job's image (a stale or forged message).
    runtime.read_early("classify", right["id"], hint[right["id"]])
    runtime.read_early("classify", wrong["id"], hint[first["id"]])
    early, runtime._early = runtime._early, {}  # as run() takes them
    assert set(early) == {right["id"], wrong["id"]}
    jobs = {job.id: job for job in runtime._claim([right["id"], wrong["id"]])}
    size = runtime._load_model(jobs[right["id"]].model_row).predictor.input_size
    runtime._load_inputs(list(jobs.values()), size, early)
    right_request, wrong_request = jobs[right["id"]].request, jobs[wrong["id"]].request
    assert right_request is not None and wrong_request is not None
    assert right_request.images is early[right["id"]].pictures.result()  # taken as read
    assert wrong_request.images is not early[wrong["id"]].pictures.result()  # read again, from the job's own row
    rocket = runtime._read_images(jobs[wrong["id"]].image_keys, size)[0]
    assert wrong_request.images[0].tobytes() == rocket.tobytes()
    # At another size than the model's, a read that names the right image is not taken either.
    assert early[right["id"]].serves(jobs[right["id"]], size)
    assert not early[right["id"]].serves(jobs[right["id"]], size * 2)


def test_a_job_run_from_a_wrong_hint_has_the_result_of_its_own_image(plat, key, runtime):
    plain, misled, coffee = (classify(plat, key, PHOTOS[name]) for name in ("rocket", "rocket", "coffee"))
    runtime.run([coffee["id"]])  # nothing read early, as for a job the sweeper sends again (no keys)
    runtime.read_early("classify", plain["id"], message_of(plat, plain["id"])[1]["image_keys"])
    runtime.run([plain["id"]])
    runtime.read_early("classify", misled["id"], message_of(plat, coffee["id"])[1]["image_keys"])
    runtime.run([misled["id"]])
    rows = {name: plat.job_row(job["id"]) for name, job in (("plain", plain), ("misled", misled), ("coffee", coffee))}
    assert {name: row.status.value for name, row in rows.items()} == dict.fromkeys(rows, "succeeded")
    assert rows["misled"].output == rows["plain"].output != rows["coffee"].output


def early_reads(metrics: str) -> dict[str, float]:
    found = re.findall(r'^percept_worker_early_reads_total\{kind="classify",outcome="(\w+)"\} (\S+)$', metrics,
                       re.MULTILINE)
    return {outcome: float(value) for outcome, value in found}


def test_a_batching_worker_reads_its_jobs_images_early_from_their_messages(plat, key):
    """The classifier worker (celery-batches, solo pool) begins each job's read from its message, as its claim runs."""
    port = free_port()
    plat.start_worker("classifier-worker", "classifier", PERCEPT_WORKER_HTTP_PORT=str(port))
    with plat.client(key) as client:
        for name in ("coffee", "chelsea", "rocket"):  # the first finds the decode size; the others are read early
            answer = client.post("/v1/classify", files={"image": ("photo.jpg", PHOTOS[name], "image/jpeg")},
                                 headers={"Prefer": "wait=60, no-reuse"})
            assert answer.status_code == 201 and answer.json()["status"] == "succeeded", answer.text
    counts = wait_until(lambda: (found := early_reads(httpx.get(f"http://127.0.0.1:{port}/metrics").text))
                        .get("taken", 0) >= 2 and found, timeout=30, what="the worker's early reads in /metrics")
    assert counts.get("read_again", 0) == 0
