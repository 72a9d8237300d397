"""Faces over HTTP with the real dlib and FER weights: detect, expressions, verify, collections,
enrollment (and its refusals), identify, subject deletion, memes, tenant isolation."""

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageOps
from skimage import data

from tests.conftest import image_bytes, wait_for_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


def flipped_resized_astronaut() -> bytes:
    image = ImageOps.mirror(astronaut()).resize((384, 384))
    return image_bytes(image, "PNG")


def two_faces() -> bytes:
    left, right = astronaut(), ImageOps.mirror(astronaut())
    canvas = Image.new("RGB", (1024, 512))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (512, 0))
    return image_bytes(canvas, "JPEG")


def run(client, path: str, files: dict, **fields) -> dict:
    response = client.post(path, files=files, data=fields)
    assert response.status_code == 202, response.text
    return wait_for_job(client, response.json()["id"], timeout=120)


def test_detect_one_face_with_its_expression_and_none_on_coffee(api):
    job = run(api, "/v1/faces/detect", {"image": ("a.png", image_bytes(astronaut(), "PNG"))},
              expressions="true", landmarks="68")
    assert job["status"] == "succeeded", job["error"]
    [face] = job["output"]["faces"]  # the mission patch is not a face
    x, y, w, h = face["box"]
    assert 120 < x + w / 2 < 300 and 40 < y + h / 2 < 200  # her face, upper middle of the photo
    assert len(face["landmarks"]) == 68
    assert face["expression"]["label"] == "happy"
    assert set(face["expression"]["scores"]) == {"angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"}
    coffee = run(api, "/v1/faces/detect", {"image": ("c.jpg", image_bytes(data.coffee()))})
    assert coffee["status"] == "succeeded" and coffee["output"]["faces"] == []


def test_verify_same_person(api):
    job = run(api, "/v1/faces/verify", {"image_a": ("a.png", image_bytes(astronaut(), "PNG")),
                                        "image_b": ("b.png", flipped_resized_astronaut())})
    assert job["status"] == "succeeded", job["error"]
    assert job["output"]["same_person"] is True and job["output"]["distance"] < 0.6
    assert job["output"]["threshold"] == 0.6


def test_collections_enroll_identify_and_delete(api):
    assert api.post("/v1/collections", json={"name": "crew"}).status_code == 201
    assert api.post("/v1/collections", json={"name": "crew"}).status_code == 409
    assert api.post("/v1/collections/crew/subjects", json={"name": "eileen"}).status_code == 201
    assert api.post("/v1/collections/crew/subjects", json={"name": "someone"}).status_code == 201

    enrolled = run(api, "/v1/collections/crew/subjects/eileen/faces",
                   {"image": ("a.png", image_bytes(astronaut(), "PNG"))})
    assert enrolled["status"] == "succeeded", enrolled["error"]
    assert enrolled["output"]["faces_enrolled"] == 1 and enrolled["output"]["warnings"] == []

    found = run(api, "/v1/faces/identify", {"image": ("b.png", flipped_resized_astronaut())}, collection="crew")
    assert found["status"] == "succeeded", found["error"]
    [face] = found["output"]["faces"]
    assert face["matches"][0]["subject"] == "eileen" and face["matches"][0]["distance"] < 0.6

    two = run(api, "/v1/collections/crew/subjects/someone/faces", {"image": ("two.jpg", two_faces())})
    assert two["status"] == "failed" and two["error"]["code"] == "multiple_faces"
    none = run(api, "/v1/collections/crew/subjects/someone/faces", {"image": ("c.jpg", image_bytes(data.coffee()))})
    assert none["status"] == "failed" and none["error"]["code"] == "no_face"
    small = run(api, "/v1/collections/crew/subjects/someone/faces", {"image": ("b.png", flipped_resized_astronaut())})
    assert small["status"] == "failed" and small["error"]["code"] == "face_too_small"
    flipped = image_bytes(ImageOps.mirror(astronaut()).resize((480, 480)), "PNG")
    again = run(api, "/v1/collections/crew/subjects/someone/faces", {"image": ("b.png", flipped)})
    assert again["status"] == "succeeded", again["error"]
    assert [w["subject"] for w in again["output"]["warnings"]] == ["eileen"]  # already enrolled as someone else

    subjects = {s["name"]: s["faces"] for s in api.get("/v1/collections/crew/subjects").json()}
    assert subjects == {"eileen": 1, "someone": 1}
    deleted = api.delete("/v1/collections/crew/subjects/eileen").json()
    assert deleted == {"deleted": "eileen", "embeddings_deleted": 1}
    after = run(api, "/v1/faces/identify", {"image": ("b.png", flipped_resized_astronaut())}, collection="crew")
    assert [m["subject"] for m in after["output"]["faces"][0]["matches"]] == ["someone"]
    assert api.delete("/v1/collections/crew/subjects/eileen").status_code == 404


def test_one_name_created_at_once_gives_one_row_and_409s(platform, api):
    """Requests racing on a unique name: one wins, the others get the 409 (not a 500 from the constraint)."""
    key = api.headers["authorization"].split()[1]

    def create(path: str):
        with platform.client(key) as client:
            return client.post(path, json={"name": "race"})

    for path, code in (("/v1/collections", "collection_exists"), ("/v1/collections/race/subjects", "subject_exists")):
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(create, [path] * 8))
        assert sorted(a.status_code for a in answers) == [201] + [409] * 7, [a.text for a in answers]
        assert {a.json()["error"]["code"] for a in answers if a.status_code == 409} == {code}
    assert [c["name"] for c in api.get("/v1/collections").json()] == ["race"]
    assert [s["name"] for s in api.get("/v1/collections/race/subjects").json()] == ["race"]


def test_collections_are_per_tenant(platform, api):
    api.post("/v1/collections", json={"name": "private"})
    with platform.client(platform.new_key()) as other:
        assert other.get("/v1/collections").json() == []
        assert other.get("/v1/collections/private/subjects").status_code == 404
        response = other.post("/v1/faces/identify", files={"image": ("a.png", image_bytes(astronaut(), "PNG"))},
                              data={"collection": "private"})
        assert response.status_code == 404 and response.json()["error"]["code"] == "collection_not_found"


def test_meme_of_the_astronaut(api):
    source = image_bytes(astronaut(), "PNG")
    job = run(api, "/v1/memes", {"image": ("a.png", source)}, seed="7")
    assert job["status"] == "succeeded", job["error"]
    output = job["output"]
    assert output["expression"]["label"] == "happy"
    assert output["caption"]["top"] or output["caption"]["bottom"]
    meme = api.get(f"/v1/images/{output['image_id']}/content")
    assert meme.status_code == 200
    rendered = Image.open(io.BytesIO(meme.content)).convert("RGB")
    assert rendered.size == (512, 512)
    assert np.abs(np.asarray(rendered, dtype=int) - data.astronaut().astype(int)).mean() > 1  # text was drawn
    same_seed = run(api, "/v1/memes", {"image": ("a.png", source)}, seed="7")
    assert same_seed["output"]["caption"] == output["caption"]
    custom = run(api, "/v1/memes", {"image": ("a.png", source)}, top_text="one does not simply", bottom_text="x")
    assert custom["output"]["caption"] == {"top": "one does not simply", "bottom": "x"}
    faceless = run(api, "/v1/memes", {"image": ("c.jpg", image_bytes(data.coffee()))})
    assert faceless["status"] == "failed" and faceless["error"]["code"] == "no_face"
