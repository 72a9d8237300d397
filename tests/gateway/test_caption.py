"""Captioning over HTTP, as far as the gateway goes: POST /v1/caption (the default captioner, every parameter
check) and POST /v1/train/captioner (parameters and dataset kinds). The jobs are accepted, not run here:
the captioner's own tests run them."""

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from percept.db.ids import new_id
from percept.db.models import Dataset, Job, JobStatus, Model
from percept.db.session import session_scope
from percept.db.tenants import tenant_id_for_key
from tests.conftest import Platform, job_answer

pytestmark = pytest.mark.integration

PREDICTOR = "services.captioner.predictor:LSTMCaptioner"
CAPTION_REPORT = {"kind": "captions", "images": 40, "captions": 200, "splits": {"train": 32, "dev": 8}}
CLASS_REPORT = {"kind": "classes", "classes": {"a": 3, "b": 3}}
DEFAULTS = {"beam_width": 3, "num_captions": 1, "max_length": None, "min_length": None, "length_penalty": None,
            "no_repeat_ngram_size": 0, "temperature": None}


def tenant_of(platform: Platform, client: httpx.Client) -> str:
    with session_scope(platform.database_url) as session:
        tenant_id = tenant_id_for_key(session, client.headers["authorization"].split()[1])
    assert tenant_id is not None
    return tenant_id


def add_captioner(platform: Platform, tenant_id: str, name: str, created_at: datetime | None = None,
                  version: str = "1") -> None:
    """A registered caption model row, as a captioner training would leave it (no artifact is read here)."""
    with session_scope(platform.database_url) as session:
        session.add(Model(tenant_id=tenant_id, name=name, version=version, kind="caption", predictor=PREDICTOR,
                          artifact_key=f"models/{name}/{version}.zip", weights_sha256="c" * 64, status="ready",
                          metrics={}, card={}, **({"created_at": created_at} if created_at else {})))
        session.commit()


def add_dataset(platform: Platform, tenant_id: str, status: JobStatus, report: dict[str, Any] | None = None,
                error: dict[str, Any] | None = None) -> str:
    """A dataset and its analysis job, ended as `status` (or queued: its queued_at lies ahead, so the sweeper
    leaves it be), as the analysis of an upload leaves them."""
    dataset_id, job_id = new_id("ds"), new_id("job")
    sha256 = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    inputs = [{"dataset_id": dataset_id, "sha256": sha256}]
    ended = datetime.now(UTC) if status.is_terminal() else None
    with session_scope(platform.database_url) as session:
        session.add(Job(id=job_id, tenant_id=tenant_id, kind="analyze_dataset", queue="datasets", status=status,
                        params={}, inputs=inputs, provenance={"inputs": inputs}, progress={"done": 1, "total": 1},
                        output={"report": report} if report is not None else None, error=error, attempts=1,
                        cancel_requested=False, finished_at=ended,
                        queued_at=datetime.now(UTC) + (timedelta(0) if ended else timedelta(hours=1))))
        session.flush()
        session.add(Dataset(id=dataset_id, tenant_id=tenant_id, name="inserted", sha256=sha256,
                            object_key=f"datasets/{sha256[:2]}/{sha256[2:4]}/{sha256}", bytes=1,
                            analysis_job_id=job_id))
        session.commit()
    return dataset_id


@pytest.fixture
def image_id(api, coffee_jpeg) -> str:
    return api.post("/v1/images", files={"file": ("coffee.jpg", coffee_jpeg)}).json()["id"]


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_without_a_captioner_caption_is_a_404_that_says_how_to_get_one(api, image_id, coffee_jpeg):
    for response in (api.post("/v1/caption", json={"image": image_id}),
                     api.post("/v1/caption", files={"image": ("c.jpg", coffee_jpeg)}, data={"beam_width": "2"})):
        error = error_of(response, 404)
        assert error["code"] == "no_captioner"
        assert "POST /v1/train/captioner" in error["message"] and "POST /v1/models/import" in error["message"]
    # A classifier is not a captioner, and nothing was recorded.
    error = error_of(api.post("/v1/caption", json={"image": image_id, "model": "imagenet-efficientnet-lite0"}), 404)
    assert error["code"] == "model_not_found"
    assert api.get("/v1/jobs", params={"kind": "caption"}).json()["data"] == []


def test_every_bad_caption_parameter_is_a_422_with_its_code(platform, api, image_id):
    add_captioner(platform, tenant_of(platform, api), "cap")  # so only the parameter can be what is wrong
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"beam_width": 0}, "invalid_parameters", "beam_width"),
        ({"beam_width": 21}, "invalid_parameters", "beam_width"),
        ({"num_captions": 0}, "invalid_parameters", "num_captions"),
        ({"num_captions": 4}, "num_captions_over_beam_width", ""),
        ({"num_captions": 2, "beam_width": 1}, "num_captions_over_beam_width", ""),
        ({"max_length": 0}, "invalid_parameters", "max_length"),
        ({"max_length": 101}, "invalid_parameters", "max_length"),
        ({"min_length": -1}, "invalid_parameters", "min_length"),
        ({"min_length": 6, "max_length": 5}, "min_length_over_max_length", ""),
        ({"length_penalty": -0.5}, "invalid_parameters", "length_penalty"),
        ({"length_penalty": 5.5}, "invalid_parameters", "length_penalty"),
        ({"no_repeat_ngram_size": -1}, "invalid_parameters", "no_repeat_ngram_size"),
        ({"no_repeat_ngram_size": 11}, "invalid_parameters", "no_repeat_ngram_size"),
        ({"temperature": 0}, "invalid_parameters", "temperature"),
        ({"temperature": -1.0}, "invalid_parameters", "temperature"),
        ({"model": "x" * 201}, "invalid_parameters", "model"),
        # wrong types
        ({"beam_width": "wide"}, "invalid_parameters", "beam_width"),
        ({"beam_width": 2.5}, "invalid_parameters", "beam_width"),
        ({"length_penalty": "long"}, "invalid_parameters", "length_penalty"),
        ({"temperature": [1]}, "invalid_parameters", "temperature"),
        ({"num_captions": {"n": 1}}, "invalid_parameters", "num_captions"),
        # not a parameter of this endpoint
        ({"top_k": 5}, "invalid_parameters", "top_k"),
    ]
    for fields, code, field in cases:
        error = error_of(api.post("/v1/caption", json={"image": image_id, **fields}), 422)
        assert error["code"] == code, (fields, error)
        if field:
            assert [e["field"] for e in error["details"]["errors"]] == [field], (fields, error)
    # The same checks on form fields (strings), where `inf` would otherwise pass as a temperature.
    for fields, code in (({"beam_width": "0"}, "invalid_parameters"), ({"temperature": "inf"}, "invalid_parameters"),
                         ({"temperature": "nan"}, "invalid_parameters"),
                         ({"num_captions": "5", "beam_width": "4"}, "num_captions_over_beam_width"),
                         ({"beam_search": "yes"}, "invalid_parameters")):
        assert error_of(api.post("/v1/caption", data={"image": image_id, **fields}), 422)["code"] == code, fields
    over = error_of(api.post("/v1/caption", json={"image": image_id, "num_captions": 4, "beam_width": 3}), 422)
    assert over["details"] == {"num_captions": 4, "beam_width": 3}
    assert error_of(api.post("/v1/caption", json={"beam_width": 2}), 422)["code"] == "missing_image"
    assert error_of(api.post("/v1/caption", json={"image": "img_nope"}), 404)["code"] == "image_not_found"
    assert api.get("/v1/jobs", params={"kind": "caption"}).json()["data"] == []


def test_a_caption_job_with_a_named_captioner_is_accepted_with_its_normalised_params(platform, api, image_id,
                                                                                     coffee_jpeg):
    tenant_id = tenant_of(platform, api)
    add_captioner(platform, tenant_id, "flickr-cap")
    add_captioner(platform, tenant_id, "flickr-cap", version="2")
    body = {"image": image_id, "model": "flickr-cap:1", "beam_width": 5, "num_captions": 2, "max_length": 12,
            "min_length": 3, "length_penalty": 0.7, "no_repeat_ngram_size": 2, "temperature": 0.8}
    response = api.post("/v1/caption", json=body, headers={"Idempotency-Key": "cap-1", "Prefer": "wait=0.5"})
    job = job_answer(response)  # no captioner worker here: still queued after the wait, so a 202
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["kind"] == "caption" and job["status"] == "queued"
    assert job["params"] == {key: value for key, value in body.items() if key != "image"}
    sha256 = hashlib.sha256(coffee_jpeg).hexdigest()
    assert job["provenance"]["inputs"] == [{"image_id": image_id, "sha256": sha256}]
    replay = api.post("/v1/caption", json=body, headers={"Idempotency-Key": "cap-1"})
    assert job_answer(replay, replay=True)["id"] == job["id"]
    changed = api.post("/v1/caption", json=body | {"beam_width": 6}, headers={"Idempotency-Key": "cap-1"})
    assert error_of(changed, 409)["code"] == "idempotency_key_reused"

    # A name alone is its latest version; an uploaded file works as well as an image id; defaults filled in.
    upload = api.post("/v1/caption", files={"image": ("c.jpg", coffee_jpeg)}, data={"model": "flickr-cap"})
    latest = job_answer(upload)
    assert latest["params"] == DEFAULTS | {"model": "flickr-cap:2"}
    assert latest["provenance"]["inputs"][0]["sha256"] == sha256
    assert error_of(api.post("/v1/caption", json={"image": image_id, "model": "flickr-cap:9"}), 404)["code"] == \
        "model_version_not_found"
    listed = api.get("/v1/jobs", params={"kind": "caption"}).json()["data"]
    assert [j["id"] for j in listed] == [latest["id"], job["id"]]


def test_the_default_captioner_is_the_tenants_newest(platform, api, image_id):
    tenant_id = tenant_of(platform, api)
    now = datetime.now(UTC)
    # Inserted first but created later: the default goes by creation time, not by row order.
    add_captioner(platform, tenant_id, "newer", created_at=now - timedelta(minutes=1))
    add_captioner(platform, tenant_id, "older", created_at=now - timedelta(hours=2))
    # Another tenant's captioner, newer still, is not this tenant's to use.
    with platform.client(platform.new_key()) as other:
        add_captioner(platform, tenant_of(platform, other), "someone-elses", created_at=now)
    job = job_answer(api.post("/v1/caption", json={"image": image_id}))
    assert job["kind"] == "caption" and job["params"] == DEFAULTS | {"model": "newer:1"}


def test_bad_captioner_training_parameters(platform, api):
    dataset = add_dataset(platform, tenant_of(platform, api), JobStatus.SUCCEEDED, report=CAPTION_REPORT)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"architecture": "transformer"}, "architecture"), ({"epochs": 0}, "epochs"), ({"epochs": 501}, "epochs"),
        ({"min_word_count": 0}, "min_word_count"), ({"min_word_count": 1001}, "min_word_count"),
        ({"max_length": 2}, "max_length"), ({"max_length": 101}, "max_length"),
        ({"embedding_dim": 7}, "embedding_dim"), ({"embedding_dim": 1025}, "embedding_dim"),
        ({"hidden_size": 7}, "hidden_size"), ({"hidden_size": 2049}, "hidden_size"),
        ({"dropout": -0.1}, "dropout"), ({"dropout": 0.95}, "dropout"),
        ({"batch_size": 0}, "batch_size"), ({"batch_size": 4097}, "batch_size"),
        ({"learning_rate": 0}, "learning_rate"), ({"learning_rate": 1.5}, "learning_rate"),
        ({"beam_width": 0}, "beam_width"), ({"beam_width": 21}, "beam_width"), ({"seed": -1}, "seed"),
        ({"val_fraction": 0}, "val_fraction"), ({"val_fraction": 0.5}, "val_fraction"), ({"patience": 0}, "patience"),
        ({"epochs": "many"}, "epochs"), ({"dropout": "some"}, "dropout"),
        ({"name": "Bad Name!"}, "name"), ({"balance": "oversample"}, "balance"),  # a classifier's, not ours
    ]
    for fields, field in cases:
        error = error_of(api.post("/v1/train/captioner", json={"dataset": dataset, "name": "cap", **fields}), 422)
        assert error["code"] == "invalid_parameters", (fields, error)
        assert [e["field"] for e in error["details"]["errors"]] == [field], (fields, error)
    missing = error_of(api.post("/v1/train/captioner", json={"name": "cap"}), 422)
    assert missing["code"] == "invalid_parameters" and missing["details"]["errors"][0]["field"] == "dataset"
    assert error_of(api.post("/v1/train/captioner", content=b"{", headers={"Content-Type": "application/json"}),
                    400)["code"] == "invalid_json"
    reserved = api.post("/v1/train/captioner", json={"dataset": dataset, "name": "imagenet-efficientnet-lite0"})
    assert error_of(reserved, 409)["code"] == "model_name_reserved"
    assert error_of(api.post("/v1/train/captioner", json={"dataset": "ds_nope", "name": "cap"}), 404)["code"] == \
        "dataset_not_found"
    assert api.get("/v1/jobs", params={"kind": "train_captioner"}).json()["data"] == []


def test_training_routes_take_only_their_kind_of_ready_dataset(platform, api):
    tenant_id = tenant_of(platform, api)
    captions = add_dataset(platform, tenant_id, JobStatus.SUCCEEDED, report=CAPTION_REPORT)
    classes = add_dataset(platform, tenant_id, JobStatus.SUCCEEDED, report=CLASS_REPORT)
    legacy = add_dataset(platform, tenant_id, JobStatus.SUCCEEDED, report={"classes": {"a": 3, "b": 3}})
    analysing = add_dataset(platform, tenant_id, JobStatus.QUEUED)
    failed = add_dataset(platform, tenant_id, JobStatus.FAILED,
                         error={"code": "no_captions", "message": "The zip has no captions file."})

    refused = error_of(api.post("/v1/train/classifier", json={"dataset": captions, "name": "shapes"}), 422)
    assert refused["code"] == "not_a_class_dataset" and "caption dataset" in refused["message"]
    assert "POST /v1/train/captioner" in refused["message"]
    assert refused["details"] == {"dataset_id": captions, "kind": "captions"}
    for dataset in (classes, legacy):
        refused = error_of(api.post("/v1/train/captioner", json={"dataset": dataset, "name": "cap"}), 422)
        assert refused["code"] == "not_a_caption_dataset" and "class-folder dataset" in refused["message"]
        assert refused["details"] == {"dataset_id": dataset, "kind": "classes"}
        # A class dataset passes the classifier's kind check (the reserved name is what stops this one).
        reserved = api.post("/v1/train/classifier", json={"dataset": dataset, "name": "imagenet-efficientnet-lite0"})
        assert error_of(reserved, 409)["code"] == "model_name_reserved"
    not_ready = error_of(api.post("/v1/train/captioner", json={"dataset": analysing, "name": "cap"}), 409)
    assert not_ready["code"] == "dataset_not_ready"
    invalid = error_of(api.post("/v1/train/captioner", json={"dataset": failed, "name": "cap"}), 422)
    assert invalid["code"] == "dataset_invalid" and "no captions file" in invalid["message"]
    assert api.get("/v1/jobs", params={"kind": "train_captioner"}).json()["data"] == []
    assert api.get("/v1/jobs", params={"kind": "train_classifier"}).json()["data"] == []

    # A ready caption dataset: a train_captioner job reading it, every default filled in.
    job = job_answer(api.post("/v1/train/captioner", json={"dataset": captions, "name": "flickr-cap", "epochs": 3}))
    assert job["kind"] == "train_captioner" and job["status"] == "queued"
    assert job["params"] == {"dataset": captions, "name": "flickr-cap", "architecture": "merge", "epochs": 3,
                             "min_word_count": 2, "max_length": None, "embedding_dim": 128, "hidden_size": 256,
                             "dropout": 0.3, "batch_size": 64, "learning_rate": 0.003, "beam_width": 3, "seed": 0,
                             "val_fraction": 0.1, "patience": 5, "encoder": "efficientnet-lite0",
                             "glove": None}
    assert job["provenance"]["inputs"][0]["dataset_id"] == captions
    assert job["provenance"]["seed"] == 0


def test_a_captioner_cannot_take_the_name_of_another_kind_of_model(platform, api):
    tenant_id = tenant_of(platform, api)
    captions = add_dataset(platform, tenant_id, JobStatus.SUCCEEDED, report=CAPTION_REPORT)
    with session_scope(platform.database_url) as session:
        session.add(Model(tenant_id=tenant_id, name="shapes", version="1", kind="classify",
                          predictor="services.classifier.custom:CustomClassifier", metrics={}, card={}))
        session.commit()
    taken = error_of(api.post("/v1/train/captioner", json={"dataset": captions, "name": "shapes"}), 409)
    assert taken["code"] == "model_name_in_use" and taken["details"] == {"name": "shapes", "kind": "classify"}


def test_openapi_lists_the_caption_routes_with_their_request_bodies(api):
    paths = api.get("/openapi.json").json()["paths"]
    caption = paths["/v1/caption"]["post"]
    for content in ("multipart/form-data", "application/json"):
        schema = caption["requestBody"]["content"][content]["schema"]
        assert schema["required"] == ["image"]
        assert set(DEFAULTS) | {"image", "model", "reuse"} == set(schema["properties"])
    assert {"202", "404", "422"} <= set(caption["responses"])
    train = paths["/v1/train/captioner"]["post"]
    schema = train["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["required"]) == {"dataset", "name"}
    assert schema["properties"]["architecture"]["enum"] == ["merge", "inject"]
    assert schema["additionalProperties"] is False
    assert {"202", "409", "422"} <= set(train["responses"])
