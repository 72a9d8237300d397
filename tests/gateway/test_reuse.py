"""Result reuse: an equal deterministic request of the same tenant is answered from the earlier job's result,
with no model run; `Prefer: no-reuse` and `reuse: false` run the model again."""

import httpx
import pytest
from PIL import Image
from sqlalchemy import select

from percept.db.models import JobStatus, WebhookDelivery
from percept.db.session import session_scope
from tests.conftest import image_bytes, job_answer, wait_for_job
from tests.own_platform import OwnPlatform, own_platform

COFFEE = image_bytes(Image.new("RGB", (96, 80), (120, 70, 30)), "JPEG")


@pytest.fixture(scope="module")
def plat(tmp_path_factory) -> OwnPlatform:
    with own_platform(tmp_path_factory.mktemp("reuse"), PERCEPT_RESULT_REUSE="true") as plat:
        plat.start_worker("classifier", "classifier")
        yield plat


def classify(client: httpx.Client, image: str, prefer: str = "wait=30", **params) -> httpx.Response:
    return client.post("/v1/classify", json={"image": image, **params}, headers={"Prefer": prefer})


def test_an_equal_request_is_answered_from_the_first_job(plat: OwnPlatform):
    client = plat.client(plat.new_key())
    image = client.post("/v1/images", files={"file": ("coffee.jpg", COFFEE)}).json()["id"]
    first = job_answer(classify(client, image))
    assert first["status"] == "succeeded" and "reused_from" not in first["provenance"]

    # No wait asked: answered ended at once, from the first job's result, no worker involved.
    answer = classify(client, image, prefer="respond-async")
    again = answer.json()
    assert answer.status_code == 202 and again["status"] == "succeeded"
    assert again["id"] != first["id"] and again["provenance"]["reused_from"] == first["id"]
    assert again["output"] == first["output"]
    row = plat.job_row(again["id"])
    assert row.status is JobStatus.SUCCEEDED and row.worker is None and row.attempts == 0

    # A reuse of a reuse names the job whose model run made the result.
    third = job_answer(classify(client, image))
    assert third["provenance"]["reused_from"] == first["id"]
    # A multipart upload of the same bytes is the same input.
    uploaded = client.post("/v1/classify", files={"image": ("c.jpg", COFFEE)}, headers={"Prefer": "wait=30"})
    assert job_answer(uploaded)["provenance"]["reused_from"] == first["id"]

    metrics = client.get("/metrics").text
    assert 'percept_jobs_reused_total{kind="classify"} 3.0' in metrics


def test_different_parameters_or_inputs_or_tenants_run_the_model(plat: OwnPlatform):
    client = plat.client(plat.new_key())
    image = client.post("/v1/images", files={"file": ("coffee.jpg", COFFEE)}).json()["id"]
    job_answer(classify(client, image))
    other_k = job_answer(classify(client, image, top_k=2))
    assert "reused_from" not in other_k["provenance"] and len(other_k["output"]["labels"]) == 2
    red = image_bytes(Image.new("RGB", (64, 64), (200, 30, 30)), "PNG")
    other = client.post("/v1/images", files={"file": ("red.png", red)}).json()
    assert "reused_from" not in job_answer(classify(client, other["id"]))["provenance"]
    stranger = plat.client(plat.new_key("stranger"))
    their_image = stranger.post("/v1/images", files={"file": ("coffee.jpg", COFFEE)}).json()["id"]
    assert "reused_from" not in job_answer(classify(stranger, their_image))["provenance"]


def test_prefer_no_reuse_and_reuse_false_run_the_model_again(plat: OwnPlatform):
    client = plat.client(plat.new_key())
    image = client.post("/v1/images", files={"file": ("coffee.jpg", COFFEE)}).json()["id"]
    first = job_answer(classify(client, image))
    fresh = job_answer(classify(client, image, prefer="wait=30, no-reuse"))
    assert "reused_from" not in fresh["provenance"] and fresh["provenance"]["attempt"] == 1
    unreused = job_answer(classify(client, image, reuse=False))
    assert "reused_from" not in unreused["provenance"]
    assert "reuse" not in unreused["params"]
    # Both fresh runs are reusable in turn: the newest succeeded one answers.
    latest = job_answer(classify(client, image))
    assert latest["provenance"]["reused_from"] in (fresh["id"], unreused["id"])
    assert latest["provenance"]["reused_from"] != first["id"]


def test_a_reused_job_fires_its_webhook_and_is_listed(plat: OwnPlatform):
    client = plat.client(plat.new_key("hooked"))
    assert client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"}).status_code == 201
    image = client.post("/v1/images", files={"file": ("coffee.jpg", COFFEE)}).json()["id"]
    job_answer(classify(client, image))
    reused = classify(client, image, prefer="respond-async").json()
    assert reused["provenance"].get("reused_from")
    assert wait_for_job(client, reused["id"])["status"] == "succeeded"
    listed = client.get("/v1/jobs", params={"kind": "classify", "limit": 1}).json()["data"][0]
    assert listed["id"] == reused["id"] and listed["status"] == "succeeded"
    with session_scope(plat.database_url) as session:  # the outbox row, written with the job's insert
        events = list(session.scalars(select(WebhookDelivery.event).where(WebhookDelivery.job_id == reused["id"])))
    assert events == ["job.succeeded"]
