"""Custom classifiers end to end over HTTP: dataset upload -> analysis job -> training job -> registered
model -> classify with it (labels, unknown, category verdicts) -> ensembles (a job too), and the CLI."""

import io
import json
import signal
import subprocess
import sys
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, wait_for_dataset, wait_for_job
from tests.synthetic import make_samples, write_zip

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLASSES = {"red-circle": 14, "blue-square": 14, "green-triangle": 14}


def dataset_zip(counts=None, seed=0, corrupt=0) -> bytes:
    buffer = io.BytesIO()
    write_zip(make_samples(counts or CLASSES, seed=seed, size=64), buffer, corrupt=corrupt)
    return buffer.getvalue()


def png_of(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def upload(client, data: bytes, name: str = "d.zip") -> dict:
    """POST /v1/datasets: 202 with the dataset, analysing; returns it once its analysis ended."""
    answer = client.post("/v1/datasets", files={"file": (name, data)})
    assert answer.status_code == 202, answer.text
    assert answer.headers["location"] == f"/v1/datasets/{answer.json()['id']}"
    return wait_for_dataset(client, answer.json()["id"])


@pytest.fixture(scope="module")
def trained(platform):
    """One tenant, one dataset (with a corrupt file), one model trained twice (versions 1 and 2)."""
    client = platform.client(platform.new_key())
    shapes_zip = dataset_zip(corrupt=1)  # once: zip entries carry the time they were written
    answer = client.post("/v1/datasets", files={"file": ("shapes.zip", shapes_zip)})
    assert answer.status_code == 202, answer.text
    accepted = answer.json()
    dataset = wait_for_dataset(client, accepted["id"])
    assert dataset["status"] == "ready", dataset["error"]
    body = {"dataset": dataset["id"], "name": "shapes", "epochs": 8, "balance": "class_weight",
            "target_precision": 0.9, "seed": 1}
    first = client.post("/v1/train/classifier", json=body)
    assert first.status_code == 202, first.text
    events = []
    with client.stream("GET", f"/v1/jobs/{first.json()['id']}/events", timeout=300) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    second = client.post("/v1/train/classifier", json=body | {"augment": True, "epochs": 4})
    jobs = [events[-1], wait_for_job(client, second.json()["id"], timeout=300)]
    yield {"client": client, "zip": shapes_zip, "accepted": accepted, "dataset": dataset, "jobs": jobs,
           "events": events}
    client.close()


def test_dataset_upload_is_analysed_by_a_job_and_becomes_ready_with_its_report(platform, trained):
    accepted, dataset = trained["accepted"], trained["dataset"]
    # The upload answered at once: stored and recorded, its analysis queued as a job.
    assert accepted["status"] == "analyzing" and accepted["report"] is None and accepted["error"] is None
    assert accepted["job_id"].startswith("job_") and accepted["id"] == dataset["id"]
    analysis = trained["client"].get(f"/v1/jobs/{accepted['job_id']}").json()
    assert analysis["kind"] == "analyze_dataset" and analysis["status"] == "succeeded"
    assert analysis["provenance"]["inputs"] == [{"dataset_id": dataset["id"], "sha256": dataset["sha256"]}]

    report = dataset["report"]
    assert report["classes"] == CLASSES
    assert report["undecodable"]["count"] == 1
    assert report == analysis["output"]["report"]
    listed = trained["client"].get("/v1/datasets").json()
    assert [(d["id"], d["status"], d["report"]) for d in listed] == [(dataset["id"], "ready", report)]
    # Stored as uploaded (streamed to storage, never read whole): the object is the zip's bytes.
    key = Path(platform.data_dir, "objects", "datasets", dataset["sha256"][:2], dataset["sha256"][2:4],
               dataset["sha256"])
    assert key.read_bytes() == trained["zip"] and dataset["bytes"] == len(trained["zip"])


def test_the_same_bytes_are_the_same_dataset_analysed_once(trained):
    again = trained["client"].post("/v1/datasets", files={"file": ("other-name.zip", trained["zip"])})
    assert again.status_code == 202
    assert again.json()["id"] == trained["dataset"]["id"]
    assert again.json()["job_id"] == trained["accepted"]["job_id"] and again.json()["status"] == "ready"
    analyses = trained["client"].get("/v1/jobs", params={"kind": "analyze_dataset"}).json()["data"]
    assert [job["id"] for job in analyses] == [trained["accepted"]["job_id"]]


def test_training_job_reports_epochs_and_registers_versions(trained):
    client, (first, second) = trained["client"], trained["jobs"]
    assert first["status"] == "succeeded", first["error"]
    assert second["status"] == "succeeded", second["error"]
    assert first["output"]["model"] == {"name": "shapes", "version": "1"}
    assert second["output"]["model"] == {"name": "shapes", "version": "2"}
    metrics = first["output"]["metrics"]
    assert set(metrics["per_class"]) == set(CLASSES)
    assert {"precision", "recall", "f1", "support"} <= set(metrics["per_class"]["red-circle"])
    assert 0 <= metrics["macro_f1"] <= 1 and 0 <= metrics["threshold"] <= 1
    assert len(metrics["confusion_matrix"]["matrix"]) == 3
    assert first["output"]["dataset"]["skipped_files"] == 1
    # per-epoch progress was visible while it ran
    epochs = [e["progress"] for e in trained["events"] if e["status"] == "running" and "loss" in e["progress"]]
    assert epochs and all({"done", "total", "loss", "val_loss"} <= set(p) for p in epochs)

    model = client.get("/v1/models/shapes").json()
    assert [v["version"] for v in model["versions"]] == ["1", "2"] and model["latest"] == "2"
    card = model["versions"][0]["card"]
    assert card["dataset"]["sha256"] == trained["dataset"]["sha256"]
    assert card["training"]["params"]["balance"] == "class_weight"
    assert len(model["versions"][0]["weights_sha256"]) == 64
    assert model["versions"][0]["metrics"]["threshold"] == metrics["threshold"]


def classify(client, image, **fields) -> dict:
    job = client.post("/v1/classify", files={"image": ("x.png", png_of(image))}, data=fields,
                      headers={"Prefer": "wait=60"}).json()
    assert job["status"] == "succeeded", job["error"]
    return job


def test_classify_with_the_trained_model_and_category_verdicts(trained):
    client = trained["client"]
    held_out = make_samples({label: 3 for label in CLASSES}, seed=99, size=64)
    jobs = [classify(client, image, model="shapes", top_k="10") for image, _ in held_out]
    for job in jobs:
        assert len(job["output"]["labels"]) == 3  # top_k is clipped to the model's classes
        assert {x["label"] for x in job["output"]["labels"]} == set(CLASSES)
        assert job["provenance"]["model"] | {"sha256": None} == {"name": "shapes", "version": "2", "sha256": None}
    predicted = [job["output"]["labels"][0]["label"] for job in jobs]
    assert sum(p == label for p, (_, label) in zip(predicted, held_out, strict=True)) >= 6  # chance is 3 of 9

    image, label = next(s for s, p in zip(held_out, predicted, strict=True) if s[1] == p)
    pinned = classify(client, image, model="shapes:1", expected_label=label)
    assert pinned["provenance"]["model"]["version"] == "1"
    verdict = classify(client, image, model="shapes", expected_label=label)["output"]
    assert verdict["match"]["verdict"] == ("unknown" if verdict["unknown"] else "match")
    other = next(c for c in CLASSES if c != label)
    mismatch = classify(client, image, model="shapes", expected_label=other)["output"]
    assert mismatch["match"]["verdict"] == ("unknown" if mismatch["unknown"] else "mismatch")
    assert mismatch["match"]["predicted"] == label
    unknown = classify(client, image, model="shapes", expected_label=label, unknown_threshold="0.9999")["output"]
    assert unknown["unknown"] is True and unknown["match"]["verdict"] == "unknown"


def test_ensemble_of_trained_models_is_built_by_a_job_and_served_like_any_model(trained):
    client = trained["client"]
    body = {"name": "shapes-vote", "members": ["shapes:1", "shapes"]}
    created = client.post("/v1/models/ensembles", json=body, headers={"Idempotency-Key": "vote-1"})
    assert created.status_code == 202, created.text
    job = created.json()
    assert created.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["kind"] == "build_ensemble" and job["status"] in ("queued", "running", "succeeded")
    assert job["params"] == {"name": "shapes-vote", "members": ["shapes:1", "shapes:2"]}  # `shapes`: its latest
    assert [i["ref"] for i in job["provenance"]["inputs"]] == ["shapes:1", "shapes:2"]
    replay = client.post("/v1/models/ensembles", json=body, headers={"Idempotency-Key": "vote-1"})
    assert replay.json()["id"] == job["id"]

    done = wait_for_job(client, job["id"], timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["output"]["model"] == {"name": "shapes-vote", "version": "1"}
    card = client.get("/v1/models/shapes-vote").json()["versions"][0]["card"]
    assert card["type"] == "ensemble" and card["members"] == ["shapes:1", "shapes:2"]

    held_out = make_samples({label: 2 for label in CLASSES}, seed=7, size=64)
    jobs = [classify(client, image, model="shapes-vote") for image, _ in held_out]
    assert all(job["provenance"]["model"]["name"] == "shapes-vote" for job in jobs)
    right = sum(job["output"]["labels"][0]["label"] == label for job, (_, label) in zip(jobs, held_out, strict=True))
    assert right >= 4  # chance is 2 of 6

    # An ensemble is not a member: recognised by its card, whatever serves it.
    nested = client.post("/v1/models/ensembles", json={"name": "e", "members": ["shapes-vote", "shapes:1"]})
    assert nested.status_code == 422 and nested.json()["error"]["code"] == "invalid_ensemble_member"


def test_ensembles_are_checked_before_any_job_is_made(trained):
    client = trained["client"]
    before = client.get("/v1/jobs", params={"kind": "build_ensemble"}).json()["data"]
    cases = {
        "a built-in member": (["shapes:1", "imagenet-efficientnet-lite0"], "e", 404, "model_not_found"),
        "an unknown version": (["shapes:1", "shapes:9"], "e", 404, "model_not_found"),
        "the same model twice": (["shapes:2", "shapes"], "e", 422, "invalid_ensemble_member"),
        "a built-in name": (["shapes:1", "shapes:2"], "imagenet-efficientnet-lite0", 409, "model_name_reserved"),
        "one member": (["shapes:1"], "e", 422, "invalid_parameters"),
    }
    for case, (members, name, status, code) in cases.items():
        answer = client.post("/v1/models/ensembles", json={"name": name, "members": members})
        assert answer.status_code == status and answer.json()["error"]["code"] == code, (case, answer.text)
    assert client.get("/v1/jobs", params={"kind": "build_ensemble"}).json()["data"] == before


def test_models_and_datasets_are_per_tenant(platform, trained):
    with platform.client(platform.new_key()) as other:
        assert other.get("/v1/models/shapes").status_code == 404
        image = png_of(make_samples({"red-circle": 1}, size=64)[0][0])
        refused = other.post("/v1/classify", files={"image": ("x.png", image)}, data={"model": "shapes"})
        assert refused.status_code == 404
        assert other.get(f"/v1/datasets/{trained['dataset']['id']}").status_code == 404
        steal = other.post("/v1/train/classifier", json={"dataset": trained["dataset"]["id"], "name": "mine"})
        assert steal.status_code == 404 and steal.json()["error"]["code"] == "dataset_not_found"


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_hostile_and_unusable_datasets_end_as_failed_datasets(api):
    image = png_of(make_samples({"red-circle": 1}, size=32)[0][0])
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a/1.png", image)
        with archive.open("b/bomb.png", "w", force_zip64=True) as member:
            for _ in range(300):
                member.write(bytes(2**20))  # 300 MB of zeros: about 300 KB compressed
    cases = {
        "zip slip": (_zip({"a/1.png": image, "../x.jpg": image, "b/1.png": image}), "unsafe_zip_path"),
        "one class": (_zip({"a/1.png": image, "a/2.png": image}), "too_few_classes"),
        "zip bomb": (bomb.getvalue(), "zip_too_large"),
    }
    for name, (data, code) in cases.items():
        dataset = upload(api, data)
        assert dataset["status"] == "failed" and dataset["report"] is None, (name, dataset)
        assert dataset["error"]["code"] == code and dataset["error"]["message"], name
        # Training on it is refused with the analysis' reason.
        refused = api.post("/v1/train/classifier", json={"dataset": dataset["id"], "name": "x"})
        assert refused.status_code == 422, (name, refused.text)
        assert refused.json()["error"]["code"] == "dataset_invalid"
        assert refused.json()["error"]["details"]["error"]["code"] == code
    # What is not a zip at all is refused at upload, before anything is stored or queued.
    response = api.post("/v1/datasets", files={"file": ("d.zip", b"definitely not a zip file")})
    assert response.status_code == 415 and response.json()["error"]["code"] == "not_a_zip"
    missing = api.post("/v1/datasets", data={"name": "nothing"})
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "missing_file"
    assert len(api.get("/v1/datasets").json()) == len(cases)


def test_training_on_a_dataset_still_being_analysed_is_a_409(platform, api):
    """The dataset's analysis job is queued and not sent yet (as it stands just after an upload)."""
    from percept.db.ids import new_id
    from percept.db.models import Dataset, Job, JobStatus
    from percept.db.session import session_scope
    from percept.db.tenants import tenant_id_for_key

    key = api.headers["authorization"].split()[1]
    with session_scope(platform.database_url) as session:
        tenant_id = tenant_id_for_key(session, key)
        dataset_id, job_id = new_id("ds"), new_id("job")
        inputs = [{"dataset_id": dataset_id, "sha256": "0" * 64}]
        # Its queued_at lies ahead, so the sweeper leaves it be during the test.
        session.add(Job(id=job_id, tenant_id=tenant_id, kind="analyze_dataset", queue="datasets",
                        status=JobStatus.QUEUED, params={}, inputs=inputs, provenance={"inputs": inputs},
                        progress={"done": 0, "total": 1}, attempts=0, cancel_requested=False,
                        queued_at=datetime.now(UTC) + timedelta(hours=1)))
        session.flush()
        session.add(Dataset(id=dataset_id, tenant_id=tenant_id, name="pending", sha256="0" * 64,
                            object_key="datasets/00/00/" + "0" * 64, bytes=1, analysis_job_id=job_id))
        session.commit()
    assert api.get(f"/v1/datasets/{dataset_id}").json()["status"] == "analyzing"
    refused = api.post("/v1/train/classifier", json={"dataset": dataset_id, "name": "early"})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "dataset_not_ready"
    assert refused.json()["error"]["details"]["job_id"] == job_id
    assert api.get("/v1/jobs", params={"kind": "train_classifier"}).json()["data"] == []


def test_a_dataset_over_the_size_cap_is_a_413_and_not_recorded(platform, api):
    small = platform.start_replica("small-datasets", PERCEPT_MAX_DATASET_BYTES=str(256 * 1024))
    try:
        data = _zip({"a/1.bin": bytes(300 * 1024), "b/1.bin": b"x"})
        answer = httpx.post(small + "/v1/datasets", files={"file": ("big.zip", data)}, headers=api.headers)
        assert answer.status_code == 413 and answer.json()["error"]["code"] == "dataset_too_large"
        assert answer.json()["error"]["details"]["max_bytes"] == 256 * 1024
        assert api.get("/v1/datasets").json() == []
    finally:
        platform.kill("small-datasets", signal.SIGTERM)


def test_bad_training_parameters(api):
    dataset = upload(api, dataset_zip({"a": 3, "b": 3}))
    assert dataset["status"] == "ready", dataset["error"]
    for body, code in (({"dataset": dataset["id"], "name": "x", "balance": "magic"}, "invalid_parameters"),
                       ({"dataset": dataset["id"], "name": "Bad Name!"}, "invalid_parameters"),
                       ({"dataset": dataset["id"], "name": "x", "epochs": 0}, "invalid_parameters"),
                       ({"dataset": dataset["id"], "name": "imagenet-efficientnet-lite0"}, "model_name_reserved"),
                       ({"dataset": "ds_nope", "name": "x"}, "dataset_not_found")):
        response = api.post("/v1/train/classifier", json=body)
        assert 400 <= response.status_code < 500 and response.json()["error"]["code"] == code, body


def test_cli_trains_with_a_progress_bar_and_prints_metrics(platform, tmp_path):
    key = platform.new_key()
    archive = tmp_path / "listing-photos.zip"
    archive.write_bytes(dataset_zip({"phone": 8, "laptop": 8}, seed=3))
    result = subprocess.run(
        [sys.executable, "-m", "percept.cli", "train", "classifier", str(archive), "--name", "listing",
         "--epochs", "4", "--url", platform.url, "--key", key],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=platform.env(COLUMNS="120"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "listing version 1" in result.stdout and "macro F1" in result.stdout
    assert "phone" in result.stdout and "laptop" in result.stdout
