"""The platform end to end with its objects in an S3 bucket: the gateway and the workers, as processes, get an
s3:// PERCEPT_STORAGE_URL naming a bucket on moto's server, and each flow that writes an object checks it is
in that bucket (listed with the minio client), so a platform that quietly kept its objects in a local
directory fails here.

The other platform tests run on the local directory backend; the store's own behaviour on both backends is
in tests/core/test_storage.py. This module covers what only the running platform exercises over S3: the
gateway storing uploads (streamed multipart for datasets), the workers reading images, dataset zips and
trained artifacts back, and a worker storing what it generated.
"""

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from percept.storage import object_key_for
from tests.conftest import Platform, image_bytes, wait_for_dataset, wait_for_job
from tests.synthetic import make_samples, write_zip

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLASSES = {"red-circle": 10, "blue-square": 10}


@pytest.fixture
def s3_api(s3_platform: Platform):
    with s3_platform.client(s3_platform.new_key()) as client:
        yield client


def stored(platform: Platform, key: str) -> bytes:
    """The object's bytes as the bucket holds them; fails when the key is not in the bucket."""
    assert platform.bucket is not None
    assert key in platform.bucket.keys(key.rsplit("/", 1)[0]), f"{key} is not in bucket {platform.bucket.name}"
    return platform.bucket.get(key)


def test_nothing_is_kept_in_a_local_directory_and_readiness_checks_the_bucket(s3_platform, s3_api):
    assert s3_platform.storage_url.startswith("s3://") and s3_platform.bucket.name in s3_platform.storage_url
    ready = s3_api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["storage"] == "ok"
    assert not (s3_platform.data_dir / "objects").exists()


def test_an_upload_is_stored_in_the_bucket_downloaded_and_classified_with_provenance(s3_platform, s3_api,
                                                                                    coffee_jpeg):
    upload = s3_api.post("/v1/images", files={"file": ("coffee.jpg", coffee_jpeg)})
    assert upload.status_code == 201, upload.text
    image = upload.json()
    assert stored(s3_platform, object_key_for(image["sha256"])) == coffee_jpeg
    assert s3_api.get(f"/v1/images/{image['id']}/content").content == coffee_jpeg

    job = wait_for_job(s3_api, s3_api.post("/v1/classify", json={"image": image["id"]}).json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["output"]["labels"][0]["label"] == "espresso"  # the worker read the photo from the bucket
    provenance = job["provenance"]
    assert provenance["inputs"] == [{"image_id": image["id"], "sha256": image["sha256"]}]
    assert provenance["model"]["name"] == "imagenet-efficientnet-lite0" and len(provenance["model"]["sha256"]) == 64
    assert provenance["worker"]["host"] and provenance["attempt"] == 1
    assert not (s3_platform.data_dir / "objects").exists()


def test_a_dataset_in_the_bucket_is_analysed_trained_on_and_its_model_served_from_the_bucket(s3_platform, s3_api):
    buffer = io.BytesIO()
    write_zip(make_samples(CLASSES, seed=3, size=64), buffer)
    archive = buffer.getvalue()
    answer = s3_api.post("/v1/datasets", files={"file": ("shapes.zip", archive)})
    assert answer.status_code == 202, answer.text
    # 1. The gateway streamed the zip to the bucket; the analysis worker read it back from there
    dataset = wait_for_dataset(s3_api, answer.json()["id"])
    assert dataset["status"] == "ready", dataset["error"]
    assert dataset["report"]["classes"] == CLASSES
    assert stored(s3_platform, object_key_for(dataset["sha256"], prefix="datasets")) == archive

    # 2. The training worker read the dataset from the bucket and stored the model's artifact there
    body = {"dataset": dataset["id"], "name": "s3-shapes", "epochs": 3, "seed": 1}
    trained = wait_for_job(s3_api, s3_api.post("/v1/train/classifier", json=body).json()["id"], timeout=300)
    assert trained["status"] == "succeeded", trained["error"]
    assert trained["output"]["model"] == {"name": "s3-shapes", "version": "1"}
    weights = s3_api.get("/v1/models/s3-shapes").json()["versions"][0]["weights_sha256"]
    assert len(stored(s3_platform, object_key_for(weights, prefix="models"))) > 0

    # 3. A classifier worker loads that artifact from the bucket to serve the model
    [(circle, _)] = make_samples({"red-circle": 1}, seed=99, size=64)
    answer = s3_api.post("/v1/classify", files={"image": ("x.png", image_bytes(circle, "PNG"))},
                         data={"model": "s3-shapes"})
    job = wait_for_job(s3_api, answer.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["provenance"]["model"] == {"name": "s3-shapes", "version": "1", "sha256": weights}
    assert job["output"]["labels"][0]["label"] == "red-circle"


def test_faces_are_detected_and_a_meme_the_worker_rendered_is_stored_in_the_bucket(s3_platform, s3_api):
    astronaut = image_bytes(data.astronaut(), "PNG")
    detect = s3_api.post("/v1/faces/detect", files={"image": ("a.png", astronaut)}, data={"expressions": "true"})
    assert detect.status_code == 202, detect.text
    faces = wait_for_job(s3_api, detect.json()["id"], timeout=120)
    assert faces["status"] == "succeeded", faces["error"]
    [face] = faces["output"]["faces"]
    assert face["expression"]["label"] == "happy"

    memed = s3_api.post("/v1/memes", files={"image": ("a.png", astronaut)}, data={"seed": "7"})
    meme_job = wait_for_job(s3_api, memed.json()["id"], timeout=120)
    assert meme_job["status"] == "succeeded", meme_job["error"]
    meme = s3_api.get(f"/v1/images/{meme_job['output']['image_id']}").json()
    rendered = stored(s3_platform, object_key_for(meme["sha256"]))
    assert s3_api.get(f"/v1/images/{meme['id']}/content").content == rendered
    picture = Image.open(io.BytesIO(rendered)).convert("RGB")
    assert picture.size == (512, 512)
    assert np.abs(np.asarray(picture, dtype=int) - data.astronaut().astype(int)).mean() > 1  # text was drawn
    # The meme's provenance names the photo it was made from, as the bucket holds it.
    [source] = meme_job["provenance"]["inputs"]
    assert meme_job["output"]["source_image_id"] == source["image_id"]
    assert stored(s3_platform, object_key_for(source["sha256"])) == astronaut
    assert not (s3_platform.data_dir / "objects").exists()
