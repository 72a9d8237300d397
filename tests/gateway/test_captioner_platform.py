"""The captioner on a real platform of its own (gateway, captioner and captioner-train workers):

- a Flickr8k-layout dataset uploaded, analysed, trained on through the API and captioned with;
- POST /v1/models/import: the gateway streams the zip to storage, a captioner-train worker loads the
  checkpoint (services/captioner/hf.py) and registers it, and a captioner worker serves it through
  POST /v1/caption."""

import hashlib
import io
import os
import zipfile
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import image_bytes, job_answer, wait_for_dataset, wait_for_job
from tests.own_platform import OwnPlatform, own_platform
from tests.scenes import make_scenes, scenes_zip
from tests.services.captioner.test_hf import picture, tiny_checkpoint_zip

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_IMPORT_BYTES = 1024 * 1024  # the tiny checkpoint zips to about 0.25 MB
WAIT = {"Prefer": "wait=60"}


@pytest.fixture(scope="module")
def captioner_platform(tmp_path_factory) -> Iterator[OwnPlatform]:
    with own_platform(tmp_path_factory.mktemp("captioner"), PERCEPT_MAX_IMPORT_BYTES=str(MAX_IMPORT_BYTES),
                      HF_HUB_OFFLINE="1") as plat:
        plat.start_worker("captioner-train-worker", "captioner-train")
        plat.start_worker("captioner-worker", "captioner")
        yield plat


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> bytes:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return tiny_checkpoint_zip(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture
def client(captioner_platform) -> Iterator[httpx.Client]:
    with captioner_platform.client(captioner_platform.new_key()) as c:
        yield c


def import_zip(client: httpx.Client, archive: bytes, headers: dict[str, str] | None = None,
               **fields: str) -> httpx.Response:
    return client.post("/v1/models/import", files={"file": ("checkpoint.zip", archive, "application/zip")},
                       data=fields, headers=headers or {})


def finished(client: httpx.Client, answer: httpx.Response) -> dict:
    job = job_answer(answer)
    assert answer.headers["location"] == f"/v1/jobs/{job['id']}"
    return job if job["status"] in ("succeeded", "failed", "canceled") else wait_for_job(client, job["id"], 120)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_an_imported_checkpoint_is_registered_as_the_next_version(client, checkpoint, captioner_platform):
    job = finished(client, import_zip(client, checkpoint, WAIT, name="my-vit-gpt2"))
    assert job["status"] == "succeeded", job["error"]
    assert job["kind"] == "import_captioner"
    assert job["params"] == {"name": "my-vit-gpt2", "kind": "caption"}
    sha256 = hashlib.sha256(checkpoint).hexdigest()
    assert [item["sha256"] for item in job["provenance"]["inputs"]] == [sha256]
    assert job["output"]["model"] == {"name": "my-vit-gpt2", "version": "1"}
    assert job["output"]["architecture"] == "VisionEncoderDecoderModel"

    model = client.get("/v1/models/my-vit-gpt2").json()
    assert model["kind"] == "caption" and model["latest"] == "1" and not model["builtin"]
    [version] = model["versions"]
    assert version["weights_sha256"] == sha256  # the zip itself is the artifact
    assert version["card"]["type"] == "huggingface"
    assert version["card"]["pipeline"] == "image-to-text"
    assert "config.json" in version["card"]["files"]

    # `image-to-text` is a synonym of `caption`; another import of the name is version 2
    again = finished(client, import_zip(client, checkpoint, WAIT, name="my-vit-gpt2", kind="image-to-text"))
    assert again["status"] == "succeeded" and again["output"]["model"]["version"] == "2"
    model = client.get("/v1/models/my-vit-gpt2").json()
    assert model["latest"] == "2" and [v["version"] for v in model["versions"]] == ["1", "2"]

    # Models are tenant-private
    with captioner_platform.client(captioner_platform.new_key()) as other:
        assert other.get("/v1/models/my-vit-gpt2").status_code == 404


def test_the_imported_model_captions_through_the_caption_endpoint(client, checkpoint):
    job = finished(client, import_zip(client, checkpoint, WAIT, name="served"))
    assert job["status"] == "succeeded", job["error"]
    image_id = client.post("/v1/images", files={"file": ("p.png", image_bytes(picture(), "PNG"))}).json()["id"]
    answer = client.post("/v1/caption", json={"image": image_id, "model": "served", "beam_width": 4,
                                             "num_captions": 3, "max_length": 5}, headers=WAIT)
    caption = finished(client, answer)
    assert caption["status"] == "succeeded", caption["error"]
    captions = caption["output"]["captions"]
    assert 1 <= len(captions) <= 3
    assert len({c["text"] for c in captions}) == len(captions)
    assert all(1 <= len(c["tokens"]) <= 5 for c in captions)
    assert [c["score"] for c in captions] == sorted((c["score"] for c in captions), reverse=True)
    model = caption["provenance"]["model"]
    assert (model["name"], model["version"]) == ("served", "1")
    assert model["sha256"] == hashlib.sha256(checkpoint).hexdigest()
    assert "transformers" in caption["provenance"]["libraries"]

    # A parameter only the worker can check fails the job with its code
    answer = client.post("/v1/caption", json={"image": image_id, "model": "served", "beam_width": 2,
                                             "num_captions": 3}, headers=WAIT)
    if answer.status_code == 422:  # the gateway checked it first
        return
    bad = finished(client, answer)
    assert bad["status"] == "failed" and bad["error"]["code"] == "invalid_parameters"


def test_the_same_idempotency_key_and_body_give_the_same_job(client, checkpoint):
    headers = {"Idempotency-Key": "import-once"}
    first = job_answer(import_zip(client, checkpoint, headers, name="once"))
    second = import_zip(client, checkpoint, headers, name="once")
    assert second.json()["id"] == first["id"]
    conflict = import_zip(client, checkpoint, headers, name="twice")
    assert error_of(conflict, 409)["code"] == "idempotency_key_reused"


def test_a_zip_that_is_no_checkpoint_fails_the_job_and_registers_nothing(client):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("weights/model.safetensors", b"\x00" * 64)
    job = finished(client, import_zip(client, buffer.getvalue(), WAIT, name="broken"))
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_checkpoint"
    assert "config.json" in job["error"]["message"]
    assert client.get("/v1/models/broken").status_code == 404


def test_an_upload_over_the_import_limit_is_413(client):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("model.safetensors", os.urandom(MAX_IMPORT_BYTES + 1024))
    error = error_of(import_zip(client, buffer.getvalue(), name="too-big"), 413)
    assert error["code"] == "import_too_large"
    assert error["details"]["max_bytes"] == MAX_IMPORT_BYTES


def test_an_upload_that_is_not_a_zip_is_415(client):
    assert error_of(import_zip(client, b"definitely not a zip", name="nozip"), 415)["code"] == "not_a_zip"


def test_a_built_in_name_is_409(client, checkpoint):
    error = error_of(import_zip(client, checkpoint, name="imagenet-efficientnet-lite0"), 409)
    assert error["code"] == "model_name_reserved"


def test_a_name_of_another_kind_is_409(client, checkpoint, captioner_platform):
    from percept.db.models import Model
    from percept.db.session import session_scope
    from percept.db.tenants import tenant_id_for_key

    with session_scope(captioner_platform.database_url) as session:
        tenant_id = tenant_id_for_key(session, client.headers["authorization"].split()[1])
        session.add(Model(tenant_id=tenant_id, name="mine", version="1", kind="classify",
                          predictor="services.classifier.custom:CustomClassifier", status="ready", metrics={},
                          card={}))
        session.commit()
    assert error_of(import_zip(client, checkpoint, name="mine"), 409)["code"] == "model_kind_mismatch"


@pytest.mark.parametrize("fields, code", [
    ({"name": "Not A Valid Name"}, "invalid_parameters"),
    ({"name": "ok", "kind": "sound"}, "invalid_parameters"),
    ({"name": "ok", "epochs": "3"}, "invalid_parameters"),
    ({}, "invalid_parameters"),
])
def test_bad_fields_are_422(client, checkpoint, fields, code):
    assert error_of(import_zip(client, checkpoint, **fields), 422)["code"] == code


def test_without_a_file_part_it_is_422(client):
    response = client.post("/v1/models/import", data={"name": "nofile"},
                           files={"other": ("x.txt", b"x")})
    assert error_of(response, 422)["code"] == "missing_file"


# --- the LSTM captioner trained through the API --------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(captioner_platform) -> dict:
    """A scenes dataset uploaded and analysed, and a merge captioner trained on it (once per module)."""
    with captioner_platform.client(captioner_platform.new_key()) as client:
        archive = scenes_zip(320, seed=0, size=64, split=(240, 40, 40))
        dataset = client.post("/v1/datasets", files={"file": ("scenes.zip", archive, "application/zip")}).json()
        assert dataset["status"] == "analyzing"
        dataset = wait_for_dataset(client, dataset["id"])
        answer = client.post("/v1/train/captioner", json={"dataset": dataset["id"], "name": "scenes", "epochs": 12,
                                                          "beam_width": 3})
        job = wait_for_job(client, job_answer(answer)["id"], timeout=300)
        return {"key": client.headers["authorization"], "dataset": dataset, "job": job}


def test_a_flickr8k_dataset_is_analysed_as_captions(trained):
    report = trained["dataset"]["report"]
    assert trained["dataset"]["status"] == "ready"
    assert report["kind"] == "captions" and report["layout"] == "flickr8k"
    assert report["num_images"] == 320 and report["captions_per_image"]["min"] == report["captions_per_image"]["max"]
    assert report["splits"] == {"dev": 40, "test": 40, "train": 240}
    assert report["missing_images"]["count"] == 0 and report["undecodable"]["count"] == 0


def test_a_captioner_trained_through_the_api_is_registered_with_its_bleu(captioner_platform, trained):
    job = trained["job"]
    assert job["status"] == "succeeded", job["error"]
    bleu = job["output"]["bleu"]
    assert bleu["beam_width"] == 3 and len(bleu["greedy"]) == len(bleu["beam"]) == 4
    # beam >= greedy on held-out scenes is the trainer's test (tests/services/captioner); 40 test images here
    assert bleu["beam"][3] >= 0.6 and bleu["greedy"][3] >= 0.6
    assert job["output"]["model"] == {"name": "scenes", "version": "1"}
    with captioner_platform.client() as client:
        client.headers["authorization"] = trained["key"]
        model = client.get("/v1/models/scenes").json()
    assert model["kind"] == "caption" and model["versions"][0]["device"] == "cpu"
    assert model["versions"][0]["metrics"]["bleu"] == bleu


def test_captions_of_held_out_scenes_name_their_colour_and_shape(captioner_platform, trained):
    held_out = make_scenes(6, seed=5, size=64)
    right = 0
    with captioner_platform.client() as client:
        client.headers["authorization"] = trained["key"]
        for scene in held_out:
            answer = client.post("/v1/caption", files={"image": ("s.jpg", scene.image)},
                                 data={"num_captions": "3", "beam_width": "3"}, headers=WAIT)
            job = job_answer(answer)
            assert job["status"] == "succeeded", job["error"]
            captions = job["output"]["captions"]
            assert len(captions) == 3 and len({c["text"] for c in captions}) == 3
            assert [c["score"] for c in captions] == sorted((c["score"] for c in captions), reverse=True)
            right += scene.colour in captions[0]["text"] and scene.shape in captions[0]["text"]
        assert right >= 4, f"{right} of {len(held_out)} best captions named the colour and shape"
        # the tenant's newest captioner is the default, and captions are searchable
        found = client.get("/v1/jobs", params={"kind": "caption", "q": held_out[0].shape}).json()["data"]
        assert found and all(held_out[0].shape in j["output"]["captions"][0]["text"] or
                             any(held_out[0].shape in c["text"] for c in j["output"]["captions"]) for j in found)


def test_retraining_on_the_same_photos_reads_their_features_from_storage(captioner_platform, trained):
    with captioner_platform.client() as client:
        client.headers["authorization"] = trained["key"]
        answer = client.post("/v1/train/captioner", json={"dataset": trained["dataset"]["id"], "name": "scenes",
                                                          "epochs": 1})
        job = wait_for_job(client, job_answer(answer)["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert job["output"]["dataset"]["feature_cache"] == {"hits": 320, "misses": 0}
    assert job["output"]["model"] == {"name": "scenes", "version": "2"}
