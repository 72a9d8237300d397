"""`Prefer: wait=N` (RFC 7240, API.md's Conventions): a job POST whose job ended within the wait answers
with its final state, 201 for a new job and 200 for an idempotent replay, and `Preference-Applied`; one
still queued or running when the wait ends, 202. `GET /v1/jobs/{id}` answers 200 either way."""

import pytest
from skimage import data

from tests.conftest import image_bytes
from tests.own_platform import own_platform

pytestmark = pytest.mark.integration

JOB_POSTS = ["/v1/classify", "/v1/faces/detect", "/v1/faces/verify", "/v1/faces/identify", "/v1/memes",
             "/v1/collections/{collection}/subjects/{subject}/faces", "/v1/train/classifier",
             "/v1/models/ensembles"]


@pytest.fixture(scope="module")
def no_workers(tmp_path_factory):
    """A gateway whose jobs no worker takes: they stay queued."""
    with own_platform(tmp_path_factory.mktemp("prefer")) as plat:
        yield plat


def test_a_job_that_ends_within_the_wait_is_answered_201_and_its_replay_200(api, coffee_jpeg):
    photo, key = {"image": ("c.jpg", coffee_jpeg)}, {"Idempotency-Key": "prefer-1"}
    created = api.post("/v1/classify", files=photo, headers={"Prefer": "wait=60", **key})
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["status"] == "succeeded" and job["output"]["labels"][0]["label"] == "espresso"
    assert created.headers["preference-applied"] == "wait=60"
    assert created.headers["location"] == f"/v1/jobs/{job['id']}"

    replay = api.post("/v1/classify", files=photo, headers={"Prefer": "wait=60", **key})
    assert replay.status_code == 200, replay.text
    assert replay.json()["id"] == job["id"] and replay.json()["status"] == "succeeded"
    assert replay.headers["preference-applied"] == "wait=60"
    assert replay.headers["location"] == f"/v1/jobs/{job['id']}"
    # The wait applied is the capped one (max 60 s).
    capped = api.post("/v1/classify", files=photo, headers={"Prefer": "wait=600", **key})
    assert capped.status_code == 200 and capped.headers["preference-applied"] == "wait=60"
    # Without a wait nothing is preferred: accepted, as ever.
    plain = api.post("/v1/classify", files=photo, headers=key)
    assert plain.status_code == 202 and "preference-applied" not in plain.headers

    read = api.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=5"})
    assert read.status_code == 200 and read.headers["preference-applied"] == "wait=5"
    assert "preference-applied" not in api.get(f"/v1/jobs/{job['id']}").headers


def test_a_job_that_fails_within_the_wait_is_answered_201_too(api):
    """Terminal is terminal: the final state of a failed job is the answer as well."""
    assert api.post("/v1/collections", json={"name": "crew"}).status_code == 201
    assert api.post("/v1/collections/crew/subjects", json={"name": "eileen"}).status_code == 201
    answer = api.post("/v1/collections/crew/subjects/eileen/faces",
                      files={"image": ("c.jpg", image_bytes(data.coffee()))}, headers={"Prefer": "wait=60"})
    assert answer.status_code == 201, answer.text
    assert answer.json()["status"] == "failed" and answer.json()["error"]["code"] == "no_face"
    assert answer.headers["preference-applied"] == "wait=60"


def test_a_job_still_queued_when_the_wait_ends_is_answered_202(no_workers):
    with no_workers.client(no_workers.new_key()) as client:
        answer = client.post("/v1/classify", files={"image": ("c.jpg", image_bytes(data.coffee()))},
                             headers={"Prefer": "wait=1"})
        assert answer.status_code == 202, answer.text
        assert answer.json()["status"] == "queued" and "preference-applied" not in answer.headers
        read = client.get(f"/v1/jobs/{answer.json()['id']}", headers={"Prefer": "wait=1"})
        assert read.status_code == 200 and read.json()["status"] == "queued"
        assert "preference-applied" not in read.headers


def test_the_openapi_schema_lists_200_201_and_202_for_every_job_post(api):
    paths = api.get("/openapi.json").json()["paths"]
    for path in JOB_POSTS:
        responses = paths[path]["post"]["responses"]
        assert {"200", "201", "202"} <= set(responses), path
        assert all(responses[code]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobOut"}
                   for code in ("200", "201", "202")), path
