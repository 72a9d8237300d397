"""Jobs over HTTP: classify end to end, provenance, idempotency, long-poll, SSE, listing, auth, tenants."""

import json
import signal
from datetime import timedelta

import httpx
import pytest
from skimage import data
from sqlalchemy import update

from percept.db.models import Job
from percept.db.session import session_scope
from tests.conftest import free_port, image_bytes, job_answer, wait_for_job

pytestmark = pytest.mark.integration


def test_classify_coffee_end_to_end_with_provenance(api, coffee_jpeg):
    upload = api.post("/v1/images", files={"file": ("coffee.jpg", coffee_jpeg)}).json()
    response = api.post("/v1/classify", data={"image": upload["id"], "expected_label": "espresso"})
    assert response.status_code == 202
    assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    job = wait_for_job(api, response.json()["id"])

    assert job["status"] == "succeeded", job
    assert job["output"]["labels"][0]["label"] == "espresso"
    assert job["output"]["unknown"] is False
    assert job["output"]["match"] == {"expected": "espresso", "predicted": "espresso", "verdict": "match"}
    assert job["params"] == {"model": "imagenet-efficientnet-lite0:1", "top_k": 5, "expected_label": "espresso",
                             "unknown_threshold": None}
    provenance = job["provenance"]
    assert provenance["inputs"] == [{"image_id": upload["id"], "sha256": upload["sha256"]}]
    assert provenance["model"]["name"] == "imagenet-efficientnet-lite0" and provenance["model"]["version"] == "1"
    assert len(provenance["model"]["sha256"]) == 64
    assert provenance["worker"]["host"] and provenance["worker"]["device"] == "cpu"
    assert provenance["libraries"]["torch"].startswith("2.13.0")
    assert provenance["code_version"]
    timings = provenance["timings_ms"]
    assert timings["inference"] > 0 and timings["total"] >= timings["queued"] >= 0
    # the registry learned the weights hash from the worker
    model = api.get("/v1/models/imagenet-efficientnet-lite0").json()
    assert model["versions"][0]["weights_sha256"] == provenance["model"]["sha256"]


def test_mismatch_and_unknown_verdicts(api, coffee_jpeg):
    mismatch = api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)},
                        data={"expected_label": "laptop"}, headers={"Prefer": "wait=30"}).json()
    assert mismatch["output"]["match"]["verdict"] == "mismatch"
    assert mismatch["output"]["match"]["predicted"] == "espresso"
    unknown = api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)},
                       data={"expected_label": "espresso", "unknown_threshold": "0.999"},
                       headers={"Prefer": "wait=30"}).json()
    assert unknown["output"]["unknown"] is True and unknown["output"]["match"]["verdict"] == "unknown"


def test_long_poll_answers_with_the_finished_job(api, coffee_jpeg):
    """`Prefer: wait` holds the answer until the job is terminal: the POST answers with the finished job,
    its output and end time, and a long-poll GET of it answers with the same job."""
    answer = api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)}, headers={"Prefer": "wait=45"})
    job = job_answer(answer)
    assert answer.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "succeeded" and job["output"]["labels"][0]["label"] == "espresso"
    assert job["finished_at"] is not None and job["progress"] == {"done": 1, "total": 1}
    polled = api.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=45"})
    assert polled.status_code == 200 and polled.json() == job


def test_idempotency_key(api, coffee_jpeg):
    headers = {"Idempotency-Key": "order-42"}
    first = api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)}, data={"top_k": "3"}, headers=headers)
    again = api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)}, data={"top_k": "3"}, headers=headers)
    assert job_answer(first)["id"] == job_answer(again, replay=True)["id"]
    different = api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)}, data={"top_k": "4"},
                         headers=headers)
    assert different.status_code == 409 and different.json()["error"]["code"] == "idempotency_key_reused"
    assert len(api.get("/v1/jobs").json()["data"]) == 1


def test_an_idempotency_key_stays_bound_to_its_job_long_after(platform, api, coffee_jpeg):
    """A key used months ago replays its job for the same body and is a 409 for another (never a 500)."""
    headers = {"Idempotency-Key": "order-from-march", "Prefer": "wait=45"}
    first = job_answer(api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)}, headers=headers))
    with session_scope(platform.database_url) as session:
        session.execute(update(Job).where(Job.id == first["id"])
                        .values(created_at=Job.created_at - timedelta(days=90)))
        session.commit()
    again = api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)}, headers=headers)
    assert job_answer(again, replay=True)["id"] == first["id"]
    other = api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)}, data={"top_k": "2"}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert other.json()["error"]["details"]["job_id"] == first["id"]


def test_server_sent_events_follow_the_job_to_the_end(api, coffee_jpeg):
    job = api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)}).json()
    statuses = []
    with api.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data:"):
                statuses.append(json.loads(line[5:])["status"])
    assert statuses[-1] == "succeeded"
    assert set(statuses) <= {"queued", "running", "succeeded"}


def test_list_filters_search_and_cursor(api, coffee_jpeg):
    from skimage import data as samples

    cat = image_bytes(samples.chelsea())
    ids = [api.post("/v1/classify", files={"image": ("x.jpg", img)}).json()["id"]
           for img in (coffee_jpeg, cat, coffee_jpeg)]
    for job_id in ids:
        wait_for_job(api, job_id)
    first = api.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2]
    second = api.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [j["id"] for j in second["data"]] == [ids[0]] and second["next_cursor"] is None
    found = api.get("/v1/jobs", params={"q": "espresso"}).json()["data"]
    assert sorted(j["id"] for j in found) == sorted([ids[0], ids[2]])
    assert len(api.get("/v1/jobs", params={"status": "succeeded", "kind": "classify"}).json()["data"]) == 3
    assert api.get("/v1/jobs", params={"status": "failed"}).json()["data"] == []
    assert len(api.get("/v1/jobs", params={"model": "imagenet-efficientnet-lite0"}).json()["data"]) == 3
    assert api.get("/v1/jobs", params={"status": "bogus"}).status_code == 422


def test_auth_is_required_and_tenants_are_isolated(platform, api, coffee_jpeg):
    job = api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)}).json()
    image_id = job["provenance"]["inputs"][0]["image_id"]
    with httpx.Client(base_url=platform.url) as anonymous:
        assert anonymous.get(f"/v1/jobs/{job['id']}").status_code == 401
        wrong = anonymous.get("/v1/jobs", headers={"Authorization": "Bearer pk_wrong"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        key = api.headers["authorization"].split()[1]
        assert anonymous.get(f"/v1/jobs/{job['id']}", headers={"X-API-Key": key}).status_code == 200
    with platform.client(platform.new_key()) as other:
        assert other.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert other.get(f"/v1/images/{image_id}").status_code == 404
        assert other.get(f"/v1/images/{image_id}/content").status_code == 404
        assert other.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
        assert other.post("/v1/classify", json={"image": image_id}).status_code == 404
        assert other.get("/v1/jobs").json()["data"] == []


def test_models_registry(api):
    models = api.get("/v1/models").json()
    assert "imagenet-efficientnet-lite0" in [m["name"] for m in models]
    assert api.get("/v1/models/nope").status_code == 404


def test_health_readiness_metrics_docs(api, coffee_jpeg):
    api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)}, headers={"Prefer": "wait=30"})
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    metrics = api.get("/metrics").text
    assert 'percept_jobs{kind="classify",status="succeeded"}' in metrics
    assert 'percept_queue_depth{queue="classifier"}' in metrics
    assert 'percept_inference_seconds_count{model="imagenet-efficientnet-lite0"}' in metrics
    assert "percept_http_request_seconds_bucket" in metrics
    schema = api.get("/openapi.json").json()
    assert "/v1/classify" in schema["paths"] and api.get("/docs").status_code == 200


def test_cancel_of_a_finished_job_changes_nothing(api, coffee_jpeg):
    job = api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)}, headers={"Prefer": "wait=30"}).json()
    assert job["status"] == "succeeded"
    after = api.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert after["status"] == "succeeded" and after["output"] == job["output"]


def test_batch_of_concurrent_requests_all_succeed(api):
    images = [image_bytes(data.coffee()), image_bytes(data.chelsea()), image_bytes(data.astronaut())]
    ids = [api.post("/v1/classify", files={"image": ("x.jpg", images[i % 3])}).json()["id"] for i in range(6)]
    jobs = [wait_for_job(api, job_id) for job_id in ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    assert jobs[0]["output"]["labels"][0]["label"] == jobs[3]["output"]["labels"][0]["label"] == "espresso"


def test_rate_limit_per_tenant_is_shared_by_gateway_replicas(platform):
    """Two more gateway replicas with a 20-requests-per-minute limit, counting in the same Redis."""
    replicas = [platform.start_replica(name, PERCEPT_RATE_LIMIT="20/minute") for name in ("limited-a", "limited-b")]
    try:
        busy, other = platform.new_key(), platform.new_key()
        answers = [httpx.get(replicas[i % 2] + "/v1/jobs", headers={"Authorization": f"Bearer {busy}"})
                   for i in range(24)]
        assert [a.status_code for a in answers] == [200] * 20 + [429] * 4
        refused = answers[-1]
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert "slow down" in refused.json()["error"]["message"]
        # Another tenant has its own window.
        assert httpx.get(replicas[0] + "/v1/jobs", headers={"Authorization": f"Bearer {other}"}).status_code == 200
    finally:
        for name in ("limited-a", "limited-b"):
            platform.kill(name, signal.SIGTERM)

@pytest.mark.parametrize("prefer", ["wait=abc", "wait=-1", "wait=nan"])
def test_a_malformed_prefer_wait_is_a_422_and_leaves_no_job(api, prefer):
    answer = api.post("/v1/classify", files={"image": ("c.jpg", image_bytes(data.coffee()))},
                      headers={"Prefer": prefer})
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_prefer_wait"
    # The job was added in the request's transaction; the refusal rolled it back before anything was sent.
    assert api.get("/v1/jobs").json()["data"] == []


def test_values_the_database_cannot_hold_are_a_422(api):
    """A NUL byte is valid JSON and a valid form value, but no Postgres text column takes it."""
    for answer in (api.post("/v1/classify", json={"image": "img_\x00"}),
                   api.post("/v1/collections", json={"name": "team\x00"}),
                   api.get("/v1/jobs", params={"q": "espresso\x00"})):
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["code"] == "invalid_value"
        assert "NUL" in answer.json()["error"]["message"]


def test_text_that_is_not_unicode_is_a_422(api):
    """Found by the fuzz (tests/gateway/test_fuzz.py): JSON's `\\ud800` escape decodes to a lone surrogate, which
    no UTF-8 text holds; it reached the database driver and was a 500."""
    for path, body in (("/v1/classify", r'{"image": "\ud800"}'), ("/v1/caption", r'{"image": "x\udfffy"}'),
                       ("/v1/train/classifier", r'{"dataset": "\ud800", "name": "pets"}')):
        answer = api.post(path, content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 422, (path, answer.text)
        assert answer.json()["error"]["code"] == "invalid_value" and "surrogate" in answer.json()["error"]["message"]
    assert api.get("/v1/jobs").json()["data"] == []


def test_the_openapi_schema_declares_every_answer_the_gateway_gives(api):
    """What the fuzz holds the gateway to: the answers of the shared machinery (key check, rate limits, body
    parsing and its size cap, validation, a dependency down) are declared on every route, all as ErrorOut."""
    schema = api.get("/openapi.json").json()
    error = {"$ref": "#/components/schemas/ErrorOut"}
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if path.startswith("/v1/"):
                assert operation["security"] == [{"bearer": []}, {"apiKey": []}], (method, path)
                assert {"401", "429", "503"} <= set(responses), (method, path)
                assert responses["429"]["headers"]["Retry-After"]["required"] is True
            if "requestBody" in operation:
                assert {"400", "413", "422"} <= set(responses), (method, path)
            for status, response in responses.items():
                if status >= "400" and path != "/readyz":
                    assert response["content"]["application/json"]["schema"] == error, (method, path, status)
            for parameter in operation.get("parameters", ()):
                assert {"type": "null"} not in parameter["schema"].get("anyOf", ()), (method, path, parameter)
    for path in ("/v1/images", "/v1/datasets", "/v1/models/import"):
        body = schema["paths"][path]["post"]["requestBody"]
        assert body["required"] and "file" in body["content"]["multipart/form-data"]["schema"]["required"], path
    identify = schema["paths"]["/v1/faces/identify"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert identify["schema"]["required"] == ["image", "collection"]
    assert identify["schema"]["additionalProperties"] is False
    assert "text/plain" in schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "503" in schema["paths"]["/readyz"]["get"]["responses"]


def test_a_camera_sized_photo_is_classified(api):
    """The worker decodes this 3.8-megapixel JPEG at 1/4 scale for the model (short side 400 >= 256; the
    reduction itself is checked in tests/core/test_imaging.py): the answer stays right."""
    from PIL import Image

    big = Image.fromarray(data.coffee()).resize((2400, 1600), Image.Resampling.BICUBIC)
    job = api.post("/v1/classify", files={"image": ("big.jpg", image_bytes(big, quality=85))},
                   headers={"Prefer": "wait=60"}).json()
    assert job["status"] == "succeeded" and job["output"]["labels"][0]["label"] == "espresso"


def test_a_job_the_broker_refuses_is_ended_and_the_client_told_503(platform, api, coffee_jpeg):
    """The job row is committed before its task is sent; when the send then fails, the job is ended (a
    late delivery must not run it) and the client gets 503, not a 202 for a job that will never run."""
    no_broker = platform.start_replica("no-broker", PERCEPT_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    try:
        answer = httpx.post(no_broker + "/v1/classify", files={"image": ("c.jpg", coffee_jpeg)},
                            headers=api.headers, timeout=60)
        assert answer.status_code == 503 and answer.headers["retry-after"]
        assert answer.json()["error"]["code"] == "broker_unavailable"
    finally:
        platform.kill("no-broker", signal.SIGTERM)
    [job] = api.get("/v1/jobs").json()["data"]
    assert job["status"] == "canceled" and job["error"]["code"] == "broker_unavailable"
    assert job["attempts"] == 0 and job["output"] is None
