"""Text-to-image through the real stack: a gateway, Postgres, Redis and two diffusion worker processes, with a
tiny Stable Diffusion pipeline built from config and imported over HTTP like any diffusers checkpoint.

- POST /v1/models/import (kind text-to-image): a diffusion worker loads the zip and renders a test image, and
  the registry holds the pipeline's class, default scheduler and size and the artifact's sha256.
- POST /v1/generate: seeded renders are byte-identical; a missing seed is chosen, recorded and reproducible;
  each PNG carries its parameters (A1111 `parameters`) and its provenance (`percept` JSON); progress per step;
  cancel stops a running generation.
- POST /v1/generate/grid: one child job per cell with distinct derived seeds, contact sheets when the last ends,
  a canceled cell fails alone, canceling the grid cancels the cells not done.
- GET /v1/images (search), POST /v1/images/{id}/reproduce, and every bad parameter.
"""

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from tests.conftest import image_bytes, job_answer, wait_for_job, wait_until
from tests.diffusion_pipelines import tiny_pipeline_zip
from tests.own_platform import OwnPlatform, own_platform

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_PIPELINE_IMPORT_BYTES = 12 * 1024 * 1024  # the tiny pipeline zips to about 8 MB
# Image-to-text checkpoints' cap, far below the pipeline: the pipeline's own, larger cap is the one that applies
MAX_IMPORT_BYTES = 1024 * 1024
WAIT = {"Prefer": "wait=60"}
FAST = {"steps": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def diffusion_platform(tmp_path_factory) -> Iterator[OwnPlatform]:
    # Two workers on this 2-core machine: one CPU thread each (PERCEPT_CPU_THREADS), as an operator would set it
    with own_platform(tmp_path_factory.mktemp("diffusion"), HF_HUB_OFFLINE="1", PERCEPT_CPU_THREADS="1",
                      PERCEPT_MAX_PIPELINE_IMPORT_BYTES=str(MAX_PIPELINE_IMPORT_BYTES),
                      PERCEPT_MAX_IMPORT_BYTES=str(MAX_IMPORT_BYTES)) as plat:
        plat.start_worker("diffusion-worker-1", "diffusion")
        plat.start_worker("diffusion-worker-2", "diffusion")
        yield plat


@pytest.fixture(scope="module")
def pipeline_zip() -> bytes:
    return tiny_pipeline_zip()


@pytest.fixture(scope="module")
def key(diffusion_platform) -> str:
    return diffusion_platform.new_key()


@pytest.fixture
def client(diffusion_platform, key) -> Iterator[httpx.Client]:
    with diffusion_platform.client(key) as c:
        yield c


def import_zip(client: httpx.Client, archive: bytes, headers: dict[str, str] | None = None,
               **fields: str) -> httpx.Response:
    return client.post("/v1/models/import", files={"file": ("pipeline.zip", archive, "application/zip")},
                       data={"kind": "text-to-image", **fields}, headers=headers or {})


@pytest.fixture(scope="module")
def imported(diffusion_platform, key, pipeline_zip) -> dict:
    """The tiny pipeline imported as `tiny-sd` for the module's tenant: the import job, finished."""
    with diffusion_platform.client(key) as c:
        job = job_answer(import_zip(c, pipeline_zip, WAIT, name="tiny-sd"))
        return job if job["status"] != "running" and job["status"] != "queued" else wait_for_job(c, job["id"], 120)


def generated(client: httpx.Client, **params) -> dict:
    job = job_answer(client.post("/v1/generate", json=params, headers=WAIT))
    if job["status"] not in ("succeeded", "failed", "canceled"):
        job = wait_for_job(client, job["id"], 120)
    assert job["status"] == "succeeded", job
    return job


def content(client: httpx.Client, image_id: str) -> bytes:
    answer = client.get(f"/v1/images/{image_id}/content")
    assert answer.status_code == 200, answer.text
    return answer.content


def png_text(data: bytes) -> dict[str, str]:
    with Image.open(io.BytesIO(data)) as image:
        return dict(image.text)  # type: ignore[attr-defined]


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# --- import -----------------------------------------------------------------------------------------------------


def test_an_imported_pipeline_is_registered_with_what_it_is(client, imported, pipeline_zip):
    assert len(pipeline_zip) > MAX_IMPORT_BYTES  # under the pipelines' cap, over the image-to-text one
    assert imported["status"] == "succeeded", imported
    assert imported["kind"] == "import_pipeline"
    assert imported["output"]["model"] == {"name": "tiny-sd", "version": "1"}
    model = client.get("/v1/models/tiny-sd").json()
    assert model["kind"] == "text-to-image" and model["builtin"] is False
    version = model["versions"][0]
    assert version["weights_sha256"] == hashlib.sha256(pipeline_zip).hexdigest()
    assert version["card"]["pipeline"] == "StableDiffusionPipeline"
    assert version["card"]["default_scheduler"] == "PNDM"
    assert version["card"]["default_size"] == [64, 64]
    assert version["device"] == "cpu"


def test_a_zip_that_is_no_pipeline_fails_its_import_with_what_to_fix(client):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("config.json", json.dumps({"architectures": ["BertModel"]}))
    job = job_answer(import_zip(client, archive.getvalue(), WAIT, name="not-a-pipeline"))
    job = job if job["status"] == "failed" else wait_for_job(client, job["id"], 120)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_checkpoint"
    assert "model_index.json" in job["error"]["message"]
    assert client.get("/v1/models/not-a-pipeline").status_code == 404


def test_a_pipeline_over_the_cap_is_413_before_any_job(client):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        z.writestr("model_index.json", "{}")
        z.writestr("unet/diffusion_pytorch_model.safetensors", b"\0" * (MAX_PIPELINE_IMPORT_BYTES + 1))
    error = error_of(import_zip(client, archive.getvalue(), name="too-big"), 413)
    assert error["code"] == "import_too_large"


# --- generate ---------------------------------------------------------------------------------------------------


def test_the_same_seed_gives_byte_identical_pngs_carrying_their_provenance(client, imported):
    first = generated(client, prompt="a red cat", seed=1234, **FAST)
    second = generated(client, prompt="a red cat", seed=1234, **FAST)
    assert first["id"] != second["id"]
    [a], [b] = first["output"]["images"], second["output"]["images"]
    assert a["seed"] == b["seed"] == 1234
    data = content(client, a["image_id"])
    assert data == content(client, b["image_id"])  # same bytes: the same image of the tenant, too
    assert a["image_id"] == b["image_id"] and a["sha256"] == hashlib.sha256(data).hexdigest()
    text = png_text(data)
    assert text["parameters"].startswith("a red cat\n")
    assert "Seed: 1234" in text["parameters"] and "Steps: 3" in text["parameters"]
    assert "Size: 64x64" in text["parameters"] and "Model: tiny-sd" in text["parameters"]
    record = json.loads(text["percept"])
    assert record["seed"] == 1234 and record["prompt"] == "a red cat" and record["steps"] == 3
    assert record["model"]["name"] == "tiny-sd" and record["model"]["version"] == "1"
    assert record["model"]["sha256"] == client.get("/v1/models/tiny-sd").json()["versions"][0]["weights_sha256"]
    assert record["device"] == "cpu" and record["dtype"] == "float32" and "diffusers" in record["libraries"]
    assert record["cpu_threads"] == 1  # PERCEPT_CPU_THREADS reached the worker's torch
    other = generated(client, prompt="a red cat", seed=1235, **FAST)
    assert content(client, other["output"]["images"][0]["image_id"]) != data


def test_a_missing_seed_is_chosen_recorded_and_reproducible(client, imported):
    job = generated(client, prompt="a blue dog", **FAST)
    seed = job["params"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    assert job["output"]["images"][0]["seed"] == seed and job["provenance"]["seed"] == seed
    again = generated(client, prompt="a blue dog", seed=seed, **FAST)
    assert again["output"]["images"][0]["image_id"] == job["output"]["images"][0]["image_id"]


def test_a_retried_submit_without_seed_is_the_same_job(client, imported):
    headers = {"Idempotency-Key": "blue-dog-once"}
    first = client.post("/v1/generate", json={"prompt": "a blue dog", **FAST}, headers=headers)
    second = client.post("/v1/generate", json={"prompt": "a blue dog", **FAST}, headers=headers)
    assert first.status_code == 202 and second.status_code in (200, 202), second.text
    assert first.json()["id"] == second.json()["id"]
    assert first.json()["params"]["seed"] == second.json()["params"]["seed"]


def test_several_images_take_consecutive_seeds_and_each_reproduces_alone(client, imported):
    job = generated(client, prompt="a green bird", seed=77, num_images=2, **FAST)
    first, second = job["output"]["images"]
    assert (first["seed"], second["seed"]) == (77, 78)
    assert first["image_id"] != second["image_id"]
    alone = generated(client, prompt="a green bird", seed=78, **FAST)
    assert alone["output"]["images"][0]["image_id"] == second["image_id"]


def test_a_generated_image_records_its_job_and_parameters(client, imported):
    job = generated(client, prompt="a yellow boat", negative_prompt="blurry", seed=5, scheduler="Euler a",
                    guidance_scale=5.0, **FAST)
    image = client.get(f"/v1/images/{job['output']['images'][0]['image_id']}").json()
    assert image["kind"] == "generated" and image["source_job_id"] == job["id"]
    generation = image["generation"]
    assert generation["job_id"] == job["id"] and generation["grid_id"] is None
    assert (generation["prompt"], generation["negative_prompt"], generation["scheduler"]) == \
        ("a yellow boat", "blurry", "Euler a")
    assert generation["guidance_scale"] == 5.0 and (generation["width"], generation["height"]) == (64, 64)
    assert job["output"]["scheduler"] == "Euler a"
    assert job["provenance"]["model"]["name"] == "tiny-sd"


def test_reproduce_renders_the_same_bytes_again(client, imported):
    job = generated(client, prompt="a purple house", seed=9, scheduler="DPM++ 2M", **FAST)
    image_id = job["output"]["images"][0]["image_id"]
    answer = job_answer(client.post(f"/v1/images/{image_id}/reproduce", headers=WAIT))
    reproduced = answer if answer["status"] == "succeeded" else wait_for_job(client, answer["id"], 120)
    assert reproduced["kind"] == "reproduce_image" and reproduced["status"] == "succeeded", reproduced
    output = reproduced["output"]
    assert output["identical"] is True
    assert output["image_id"] == output["original_image_id"] == image_id
    assert output["sha256"] == output["original_sha256"]


def test_only_generated_images_can_be_reproduced(client):
    uploaded = client.post("/v1/images", files={"file": ("x.png", image_bytes(Image.new("RGB", (8, 8)), "PNG"))})
    error = error_of(client.post(f"/v1/images/{uploaded.json()['id']}/reproduce"), 422)
    assert error["code"] == "not_a_generated_image"
    assert error_of(client.post("/v1/images/img_nope/reproduce"), 404)["code"] == "image_not_found"


def test_a_running_generation_streams_step_progress_and_stops_when_canceled(client, imported):
    # 150 steps of the tiny pipeline: ~20 s on a CPU core (its attention at 128 px and above is far slower)
    answer = client.post("/v1/generate", json={"prompt": "a slow render", "seed": 1, "steps": 150,
                                               "width": 64, "height": 64})
    job_id = answer.json()["id"]
    events, canceled = [], False
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:  # until the job ends
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            events.append(event)
            if not canceled and event["status"] == "running" and event["progress"].get("done", 0) > 0:
                assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
                canceled = True
    assert canceled
    stepping = [e["progress"] for e in events if e["status"] == "running" and e["progress"].get("done", 0) > 0]
    progress = stepping[0]
    assert progress["total"] == 150 and 0 < progress["done"] < 150
    assert progress["eta_seconds"] > 0 and progress["steps"] == 150 and progress["image"] == 1
    assert events[-1]["status"] == "canceled"
    ended = wait_for_job(client, job_id, 60)
    assert ended["status"] == "canceled" and ended["progress"]["done"] < 150
    assert client.get("/v1/images", params={"job": job_id}).json()["data"] == []


def test_an_operator_imports_a_pipeline_from_the_object_storage_without_an_upload(diffusion_platform,
                                                                                  tmp_path):
    import subprocess
    import sys

    from percept.storage import object_store_from_url
    from tests.diffusion_pipelines import build_tiny_pipeline

    store = object_store_from_url(diffusion_platform.storage_url)
    directory = build_tiny_pipeline(tmp_path / "pipeline", seed=1)
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            store.put(f"checkpoints/tiny-one/{path.relative_to(directory).as_posix()}", path.read_bytes())
    result = subprocess.run([sys.executable, "-m", "percept.cli", "models", "import", "store:checkpoints/tiny-one",
                             "--name", "from-store", "--kind", "text-to-image", "--tenant", "ops-art",
                             "--timeout", "300"], capture_output=True, text=True, timeout=400,
                            env=diffusion_platform.env(COLUMNS="160"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "from-store version 1" in " ".join(result.stdout.split())
    with diffusion_platform.client(diffusion_platform.new_key("ops-art")) as ops:
        model = ops.get("/v1/models/from-store").json()
        assert model["kind"] == "text-to-image" and model["versions"][0]["card"]["pipeline"] == \
            "StableDiffusionPipeline"
        job = generated(ops, prompt="a cat", seed=1, **FAST)
        assert job["provenance"]["model"]["name"] == "from-store"
    missing = subprocess.run([sys.executable, "-m", "percept.cli", "models", "import", "store:checkpoints/nothing",
                              "--name", "nothing", "--kind", "text-to-image", "--tenant", "ops-art"],
                             capture_output=True, text=True, timeout=120, env=diffusion_platform.env(COLUMNS="160"))
    assert missing.returncode == 2 and "No objects under" in missing.stdout


# --- grids ------------------------------------------------------------------------------------------------------

SUBJECTS = ["a lighthouse", "a fox"]
STYLES = ["watercolor", "pixel art", "charcoal"]


@pytest.fixture(scope="module")
def grid(diffusion_platform, key, imported) -> dict:
    with diffusion_platform.client(key) as c:
        answer = c.post("/v1/generate/grid", json={"subjects": SUBJECTS, "styles": STYLES, "seed": 42,
                                                   "images_per_prompt": 2, **FAST})
        assert answer.status_code == 202, answer.text
        return wait_for_job(c, answer.json()["id"], 240)


def test_a_grid_fans_out_one_child_per_cell_with_distinct_seeds(client, grid):
    assert grid["status"] == "succeeded", grid
    assert len(grid["children"]) == 6
    children = [client.get(f"/v1/jobs/{child}").json() for child in grid["children"]]
    assert all(child["parent_id"] == grid["id"] and child["kind"] == "generate" for child in children)
    assert {(child["params"]["subject"], child["params"]["style"]) for child in children} == \
        {(s, t) for s in SUBJECTS for t in STYLES}
    assert len({child["params"]["seed"] for child in children}) == 6
    cells = grid["output"]["cells"]
    assert [(c["subject"], c["style"]) for c in cells] == [(s, t) for s in SUBJECTS for t in STYLES]
    assert cells[0]["prompt"] == "a lighthouse, in the style of watercolor"
    assert all(c["status"] == "succeeded" and len(c["images"]) == 2 for c in cells)
    assert grid["progress"] == {"done": 6, "total": 6}


def test_grid_seeds_are_derived_from_the_grid_seed_and_the_cell(client, grid, imported):
    again = client.post("/v1/generate/grid", json={"subjects": SUBJECTS[:1], "styles": STYLES[:1], "seed": 42,
                                                   "images_per_prompt": 2, **FAST})
    again = wait_for_job(client, again.json()["id"], 120)
    assert again["status"] == "succeeded", again
    assert again["output"]["cells"][0]["seed"] == grid["output"]["cells"][0]["seed"]
    assert again["output"]["cells"][0]["images"] == grid["output"]["cells"][0]["images"]


def test_a_grid_ends_with_contact_sheets_per_style_and_an_index(client, grid):
    sheets = grid["output"]["sheets"]
    assert [s["kind"] for s in sheets].count("style") == 3 and [s["kind"] for s in sheets].count("index") == 1
    assert {s["style"] for s in sheets if s["kind"] == "style"} == set(STYLES)
    assert grid["output"]["cards"] == [s["image_id"] for s in sheets]
    cards = client.get("/v1/images", params={"grid": grid["id"], "kind": "card"}).json()["data"]
    assert {card["id"] for card in cards} == set(grid["output"]["cards"])
    style_sheet = Image.open(io.BytesIO(content(client, sheets[0]["image_id"])))
    # Subjects down, the cell's images across: taller than a single tile, wider than two
    assert style_sheet.height > 2 * 64 and style_sheet.width > 2 * 64


def test_grid_images_are_found_by_style_subject_prompt_and_grid(client, grid):
    by_style = client.get("/v1/images", params={"grid": grid["id"], "style": "pixel art",
                                                "kind": "generated"}).json()["data"]
    assert len(by_style) == 4 and all(i["generation"]["style"] == "pixel art" for i in by_style)
    by_subject = client.get("/v1/images", params={"subject": "a fox", "kind": "generated"}).json()["data"]
    assert len(by_subject) >= 6
    by_prompt = client.get("/v1/images", params={"q": "lighthouse"}).json()["data"]
    assert by_prompt and all("lighthouse" in i["generation"]["prompt"] for i in by_prompt)
    page = client.get("/v1/images", params={"grid": grid["id"], "limit": 5}).json()
    rest = client.get("/v1/images", params={"grid": grid["id"], "limit": 50, "cursor": page["next_cursor"]}).json()
    assert len(page["data"]) == 5 and len(page["data"]) + len(rest["data"]) == 12 + 4
    jobs = client.get("/v1/jobs", params={"q": "lighthouse", "kind": "generate_grid"}).json()["data"]
    assert grid["id"] in [job["id"] for job in jobs]
    uploads = client.get("/v1/images", params={"kind": "uploaded"}).json()["data"]
    assert all(i["generation"] is None for i in uploads)


def test_a_canceled_cell_fails_alone_and_the_cards_still_come(client, diffusion_platform, imported):
    answer = client.post("/v1/generate/grid", json={"subjects": ["a tree", "a car"], "styles": ["ink", "oil"],
                                                    "seed": 3, "steps": 40, "width": 64, "height": 64})
    grid_id = answer.json()["id"]
    children = wait_until(lambda: client.get(f"/v1/jobs/{grid_id}").json()["children"] or None, timeout=60,
                          what="the grid to fan out")
    last = children[-1]
    assert client.post(f"/v1/jobs/{last}/cancel").status_code == 200
    ended = wait_for_job(client, grid_id, 240)
    assert ended["status"] == "succeeded", ended
    cells = ended["output"]["cells"]
    assert [c["status"] for c in cells].count("succeeded") == 3
    [canceled] = [c for c in cells if c["status"] != "succeeded"]
    assert canceled["job_id"] == last and canceled["status"] == "canceled" and canceled["images"] == []
    assert ended["output"]["cells_failed"] == 1 and len(ended["output"]["cards"]) == 3


def test_canceling_a_grid_cancels_the_cells_not_yet_done(client, imported):
    answer = client.post("/v1/generate/grid", json={"subjects": ["a cup", "a hat", "a key"],
                                                    "styles": ["neon", "sepia"], "seed": 8, "steps": 150,
                                                    "width": 64, "height": 64})
    grid_id = answer.json()["id"]
    wait_until(lambda: client.get(f"/v1/jobs/{grid_id}").json()["children"] or None, timeout=60,
               what="the grid to fan out")
    assert client.post(f"/v1/jobs/{grid_id}/cancel").status_code == 200
    ended = wait_for_job(client, grid_id, 120)
    assert ended["status"] == "canceled"
    children = [client.get(f"/v1/jobs/{child}").json() for child in ended["children"]]
    assert len(children) == 6 and all(child["status"] in ("canceled", "succeeded") for child in children)
    assert sum(child["status"] == "canceled" for child in children) >= 4


# --- bad requests -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, code", [
    ({}, "invalid_parameters"),
    ({"prompt": ""}, "invalid_parameters"),
    ({"prompt": "x" * 2001}, "invalid_parameters"),
    ({"prompt": "a cat", "width": 65}, "invalid_parameters"),
    ({"prompt": "a cat", "height": 4096}, "invalid_parameters"),
    ({"prompt": "a cat", "width": 32}, "invalid_parameters"),
    ({"prompt": "a cat", "steps": 0}, "invalid_parameters"),
    ({"prompt": "a cat", "steps": 151}, "invalid_parameters"),
    ({"prompt": "a cat", "guidance_scale": -1}, "invalid_parameters"),
    ({"prompt": "a cat", "num_images": 9}, "invalid_parameters"),
    ({"prompt": "a cat", "num_images": 0}, "invalid_parameters"),
    ({"prompt": "a cat", "scheduler": "Nope"}, "invalid_parameters"),
    ({"prompt": "a cat", "seed": -1}, "invalid_parameters"),
    ({"prompt": "a cat", "seed": 2**32}, "invalid_parameters"),
    ({"prompt": "a cat", "seed": "lucky"}, "invalid_parameters"),
    ({"prompt": "a cat", "colour": "red"}, "invalid_parameters"),
    ({"prompt": "a cat", "width": 2048, "height": 2048}, "generation_too_large"),
])
def test_every_bad_generation_parameter_is_422_with_a_code(client, imported, body, code):
    error = error_of(client.post("/v1/generate", json=body), 422)
    assert error["code"] == code and error["message"]


@pytest.mark.parametrize("body, code", [
    ({"subjects": ["a"], "styles": ["b"], "template": "{subject} alone"}, "invalid_template"),
    ({"subjects": [f"s{i}" for i in range(9)], "styles": [f"t{i}" for i in range(8)]}, "grid_too_large"),
    ({"subjects": ["a", "b"], "styles": ["c"], "images_per_prompt": 4,
      "template": "{subject} {style}"}, None),
    ({"subjects": ["a", "a"], "styles": ["b"]}, "invalid_parameters"),
    ({"subjects": [], "styles": ["b"]}, "invalid_parameters"),
    ({"subjects": ["a"], "styles": [" "]}, "invalid_parameters"),
    ({"subjects": ["a"], "styles": ["b"], "images_per_prompt": 5}, "invalid_parameters"),
    ({"subjects": ["a"], "styles": ["b"], "prompt": "x"}, "invalid_parameters"),
])
def test_every_bad_grid_parameter_is_422_with_a_code(client, imported, body, code):
    if code is None:  # a valid grid, for contrast: accepted
        answer = client.post("/v1/generate/grid", json={**body, **FAST})
        assert answer.status_code == 202, answer.text
        return
    error = error_of(client.post("/v1/generate/grid", json=body), 422)
    assert error["code"] == code and error["message"]


def test_an_unknown_model_is_404_and_a_tenant_without_one_is_told_how_to_get_one(client, diffusion_platform):
    assert error_of(client.post("/v1/generate", json={"prompt": "a", "model": "nope"}), 404)["code"] == \
        "model_not_found"
    with diffusion_platform.client(diffusion_platform.new_key()) as stranger:
        error = error_of(stranger.post("/v1/generate", json={"prompt": "a cat"}), 404)
        assert error["code"] == "no_text_to_image_model" and "/v1/models/import" in error["message"]
        # Another tenant's pipeline is not theirs to name
        assert error_of(stranger.post("/v1/generate", json={"prompt": "a", "model": "tiny-sd"}), 404)["code"] == \
            "model_not_found"


def test_a_bad_image_listing_query_is_422(client):
    assert error_of(client.get("/v1/images", params={"kind": "painted"}), 422)["code"] == "invalid_parameters"
    assert error_of(client.get("/v1/images", params={"cursor": "job_x"}), 422)["code"] == "invalid_cursor"
    assert error_of(client.get("/v1/images", params={"limit": 0}), 422)["code"] == "invalid_parameters"
    assert error_of(client.get("/v1/images", params={"created_after": "2026-12-02", "created_before": "2026-12-01"}),
                    422)["code"] == "invalid_date_range"


def test_a_grid_whose_last_cell_ended_unseen_is_woken_by_the_sweeper(client, diffusion_platform, key, imported):
    """A cell ended where no worker woke its grid (its worker was lost and the sweeper failed it): the sweeper
    finds the waiting grid with no cell pending and sends it to gather what its cells made."""
    from percept.db import jobs as job_repo
    from percept.db.models import JobStatus
    from percept.db.session import session_scope
    from percept.db.tenants import tenant_id_for_key

    with session_scope(diffusion_platform.database_url) as session:
        tenant_id = tenant_id_for_key(session, key)
        params = {"subjects": ["a moon"], "styles": ["ink"], "template": "{subject}, in the style of {style}",
                  "images_per_prompt": 1, "seed": 1, "model": "tiny-sd:1", **FAST}
        parent = job_repo.queued_job(tenant_id, "generate_grid", "diffusion", params, [])
        parent.status, parent.attempts = JobStatus.RUNNING, 1  # waiting: running, with no worker and no heartbeat
        session.add(parent)
        session.flush()
        cell = job_repo.queued_job(tenant_id, "generate", "diffusion",
                                   {"subject": "a moon", "style": "ink", "prompt": "a moon, in the style of ink",
                                    "seed": 5, "child": 0}, [])
        cell.parent_id, cell.status = parent.id, JobStatus.FAILED
        cell.error = {"code": "worker_lost", "message": "The worker running this job was lost 3 times; giving up."}
        session.add(cell)
        session.commit()
    ended = wait_for_job(client, parent.id, 60)
    assert ended["status"] == "failed"
    assert ended["error"]["code"] == "all_cells_failed"
    assert ended["attempts"] == 2  # claimed again after the sweeper queued it


def test_the_api_and_the_service_name_the_same_schedulers():
    from typing import get_args

    from percept.schemas import SchedulerName
    from services.diffusion.pipelines import SCHEDULERS

    assert set(get_args(SchedulerName)) == set(SCHEDULERS)


def test_a_webhook_can_follow_a_generations_steps(client, diffusion_platform, imported):
    from tests.gateway.test_webhooks import Receiver

    hook = Receiver()
    try:
        webhook = client.post("/v1/webhooks", json={"url": hook.url, "events": ["job.progress", "job.succeeded"]})
        assert webhook.status_code == 201, webhook.text
        job = client.post("/v1/generate", json={"prompt": "a webhook", "seed": 2, "steps": 60, **{
            "width": 64, "height": 64}}).json()

        def events() -> list[tuple[str, dict]]:
            return [(headers["percept-event"], json.loads(body)["job"]) for headers, body in hook.calls
                    if json.loads(body)["job"]["id"] == job["id"]]

        wait_until(lambda: any(event == "job.succeeded" for event, _ in events()), timeout=120,
                   what="the generation's job.succeeded delivery")
        progress = [sent for event, sent in events() if event == "job.progress"]
        assert progress, events()
        assert any(sent["status"] == "running" and sent["progress"]["done"] > 0 for sent in progress)
        assert len(progress) < 60  # one pending delivery at a time per job, not one per step
    finally:
        client.delete(f"/v1/webhooks/{webhook.json()['id']}")
        hook.close()
