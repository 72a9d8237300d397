"""Custom classifiers end to end over HTTP: dataset upload -> training job -> registered model ->
classify with it (labels, unknown, category verdicts) -> ensembles, and the CLI."""

import io
import json
import subprocess
import sys
import zipfile

import pytest

from services.classifier.synthetic import make_samples, write_zip
from tests.conftest import ROOT, wait_for_job

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


@pytest.fixture(scope="module")
def trained(platform):
    """One tenant, one dataset (with a corrupt file), one model trained twice (versions 1 and 2)."""
    client = platform.client(platform.new_key())
    dataset = client.post("/v1/datasets", files={"file": ("shapes.zip", dataset_zip(corrupt=1))})
    assert dataset.status_code == 201, dataset.text
    dataset = dataset.json()
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
    yield {"client": client, "dataset": dataset, "jobs": jobs, "events": events}
    client.close()


def test_dataset_upload_reports_counts_and_the_corrupt_file(trained):
    listed = trained["client"].get("/v1/datasets").json()
    assert [d["id"] for d in listed] == [trained["dataset"]["id"]]
    summary = trained["dataset"]["summary"]
    assert summary["classes"] == CLASSES
    assert summary["undecodable"]["count"] == 1
    assert len(trained["dataset"]["sha256"]) == 64


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


def test_ensemble_of_trained_models_is_served_like_any_model(trained):
    client = trained["client"]
    created = client.post("/v1/models/ensembles", json={"name": "shapes-vote", "members": ["shapes:1", "shapes:2"]})
    assert created.status_code == 201, created.text
    assert created.json()["versions"][0]["card"]["members"] == ["shapes:1", "shapes:2"]
    held_out = make_samples({label: 2 for label in CLASSES}, seed=7, size=64)
    jobs = [classify(client, image, model="shapes-vote") for image, _ in held_out]
    assert all(job["provenance"]["model"]["name"] == "shapes-vote" for job in jobs)
    right = sum(job["output"]["labels"][0]["label"] == label for job, (_, label) in zip(jobs, held_out, strict=True))
    assert right >= 4  # chance is 2 of 6
    bad = client.post("/v1/models/ensembles",
                      json={"name": "e", "members": ["shapes:1", "imagenet-efficientnet-lite0"]})
    assert bad.status_code == 404


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


def test_hostile_and_unusable_datasets_are_refused(api):
    image = png_of(make_samples({"red-circle": 1}, size=32)[0][0])
    cases = {
        "zip slip": (_zip({"a/1.png": image, "../evil.png": image, "b/1.png": image}), 422, "unsafe_zip_path"),
        "not a zip": (b"definitely not a zip file", 415, "not_a_zip"),
        "one class": (_zip({"a/1.png": image, "a/2.png": image}), 422, "too_few_classes"),
    }
    for name, (data, status, code) in cases.items():
        response = api.post("/v1/datasets", files={"file": ("d.zip", data)})
        assert response.status_code == status, (name, response.text)
        assert response.json()["error"]["code"] == code, name
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a/1.png", image)
        with archive.open("b/bomb.png", "w", force_zip64=True) as member:
            for _ in range(300):
                member.write(bytes(2**20))  # 300 MB of zeros: about 300 KB compressed
    response = api.post("/v1/datasets", files={"file": ("bomb.zip", bomb.getvalue())})
    assert response.status_code == 413 and response.json()["error"]["code"] == "zip_too_large"


def test_bad_training_parameters(api):
    dataset = api.post("/v1/datasets", files={"file": ("d.zip", dataset_zip({"a": 3, "b": 3}))}).json()
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
