"""The API user's commands (percept/cli_api.py on percept.client), run as a user would run them
(`python -m percept.cli ...`) against the real stack:

- `classify` of a folder, recursively: CSV and JSONL rows, `--json` (and nothing else on stdout), an image the
  API refuses failing alone (exit 1); `caption` without a captioner: 404 no_captioner, exit 1;
- `faces enroll` (collection and subject made once, a job's no_face in the table) and `faces identify`, on the
  session platform's face worker;
- `generate` and `grid` on a platform of their own with a diffusion worker and the tiny pipeline: the PNGs and
  the contact sheets downloaded where the commands say, byte for byte the API's;
- `jobs list|show|watch|cancel`, `models list|show`; bad usage exits 2, the API's errors exit 1."""

import csv
import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageOps
from skimage import data

from tests.conftest import ROOT, Platform, image_bytes, wait_for_job
from tests.diffusion_pipelines import tiny_pipeline_zip
from tests.gateway.test_faces import astronaut, flipped_resized_astronaut
from tests.own_platform import OwnPlatform, own_platform

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST = ["--steps", "2", "--width", "64", "--height", "64"]


def percept(plat: Platform, *args: str, cwd: Path = ROOT, timeout: float = 180,
            **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "percept.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=plat.env(COLUMNS="160", **env))


def percept_on_a_terminal(plat: Platform, *args: str, timeout: float = 180) -> tuple[int, str]:
    """The command with a pseudo-terminal for its output, where rich draws its progress bars live: the exit code
    and every frame it drew (escape codes removed)."""
    terminal, command_side = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "percept.cli", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                               stdout=command_side, stderr=command_side, env=plat.env(COLUMNS="160", TERM="xterm"))
    os.close(command_side)
    drawn, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([terminal], [], [], deadline - time.monotonic())[0]:
                continue
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # EIO: the command has ended and closed its side
                break
            if not chunk:
                break
            drawn += chunk
        code = process.wait(max(deadline - time.monotonic(), 1))
    finally:
        process.kill()
        os.close(terminal)
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn.decode(errors="replace"))


def printed(result: subprocess.CompletedProcess) -> str:
    return " ".join((result.stdout + result.stderr).split())  # rich wraps long lines


def api_args(plat: Platform, key: str) -> list[str]:
    return ["--url", plat.url, "--key", key]


@pytest.fixture(scope="module")
def key(platform) -> str:
    return platform.new_key()


@pytest.fixture(scope="module")
def photos(tmp_path_factory, coffee_jpeg) -> Path:
    """Two coffee photos, one two folders down, and a file that is no image."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "coffee.jpg").write_bytes(coffee_jpeg)
    (folder / "more" / "deeper").mkdir(parents=True)
    (folder / "more" / "deeper" / "coffee.png").write_bytes(image_bytes(Image.open(io.BytesIO(coffee_jpeg)), "PNG"))
    (folder / "notes.txt").write_text("not an image")
    return folder


# --- classify and caption --------------------------------------------------------------------------------------


def test_classify_a_folder_writes_csv_rows_and_ends_with_a_table(platform, key, photos, tmp_path):
    rows_file = tmp_path / "labels.csv"
    result = percept(platform, "classify", str(photos), "--out", str(rows_file), "--concurrency", "2",
                     *api_args(platform, key))
    assert result.returncode == 0, result.stdout + result.stderr
    with rows_file.open(newline="") as written:
        rows = list(csv.DictReader(written))
    assert sorted(Path(row["path"]).relative_to(photos).as_posix() for row in rows) == \
        ["coffee.jpg", "more/deeper/coffee.png"]
    assert list(rows[0]) == ["path", "job_id", "status", "label", "score", "error"]
    assert all(row["status"] == "succeeded" and row["label"] == "espresso" and row["error"] == "" for row in rows)
    assert all(0 < float(row["score"]) <= 1 for row in rows)
    with platform.client(key) as client:  # the rows name the tenant's real jobs
        for row in rows:
            job = client.get(f"/v1/jobs/{row['job_id']}").json()
            assert job["kind"] == "classify" and job["output"]["labels"][0]["label"] == "espresso"
    out = printed(result)
    assert "classifying 2 images" in out and "2/2" in out  # the progress bar, as a pipe sees its end
    assert out.count("espresso") == 2 and "notes.txt" not in out


def test_classify_json_prints_only_json_and_a_refused_image_fails_alone(platform, key, photos, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "coffee.jpg").write_bytes((photos / "coffee.jpg").read_bytes())
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    rows_file = tmp_path / "labels.jsonl"
    result = percept(platform, "classify", str(folder), "--top-k", "3", "--out", str(rows_file), "--json",
                     *api_args(platform, key))
    assert result.returncode == 1, result.stdout + result.stderr
    results = {Path(entry["path"]).name: entry for entry in json.loads(result.stdout)}  # stdout: the JSON alone
    assert set(results) == {"broken.jpg", "coffee.jpg"}
    coffee = results["coffee.jpg"]
    assert coffee["error"] is None and coffee["job"]["status"] == "succeeded"
    assert coffee["job"]["params"]["top_k"] == 3 and len(coffee["job"]["output"]["labels"]) == 3
    assert coffee["job"]["output"]["labels"][0]["label"] == "espresso"
    broken = results["broken.jpg"]
    assert broken["job"] is None and broken["error"]["code"] == "unsupported_image" and broken["error"]["message"]
    assert "1 of 2 images failed" in " ".join(result.stderr.split())
    lines = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert {Path(line["path"]).name: (line["status"], line["label"], line["error"]) for line in lines} == {
        "coffee.jpg": ("succeeded", "espresso", ""), "broken.jpg": ("refused", "", "unsupported_image")}
    assert [line["job_id"] for line in lines if line["status"] == "succeeded"] == [coffee["job"]["id"]]


def test_caption_without_a_captioner_prints_the_apis_error_and_exits_1(platform, key, photos):
    result = percept(platform, "caption", str(photos / "coffee.jpg"), "--beam-width", "2", *api_args(platform, key))
    assert result.returncode == 1
    assert "404 no_captioner" in printed(result) and "captioner" in printed(result).split("no_captioner", 1)[1]


def test_bad_usage_exits_2(platform, key, photos, tmp_path):
    missing = percept(platform, "classify", str(tmp_path / "nowhere"), *api_args(platform, key))
    assert missing.returncode == 2 and "does not exist" in printed(missing)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    empty = percept(platform, "classify", str(tmp_path / "empty"), *api_args(platform, key))
    assert empty.returncode == 2 and "No images" in printed(empty)
    wrong_out = percept(platform, "classify", str(photos), "--out", str(tmp_path / "labels.txt"),
                        *api_args(platform, key))
    assert wrong_out.returncode == 2 and ".csv or a .jsonl" in printed(wrong_out)
    no_key = percept(platform, "jobs", "list", "--url", platform.url, PERCEPT_API_KEY="")
    assert no_key.returncode == 2 and "No API key" in printed(no_key)


def test_the_apis_errors_print_their_code_and_message_and_exit_1(platform, key):
    wrong_key = percept(platform, "jobs", "list", "--url", platform.url, "--key", "pk_not_a_key")
    assert wrong_key.returncode == 1 and "401 invalid_api_key" in printed(wrong_key)
    missing = percept(platform, "jobs", "show", "job_nope", *api_args(platform, key))
    assert missing.returncode == 1 and "404 job_not_found" in printed(missing)
    unreachable = percept(platform, "models", "list", "--url", "http://127.0.0.1:9", "--key", key)
    assert unreachable.returncode == 1 and "connection_error" in printed(unreachable)


# --- faces -----------------------------------------------------------------------------------------------------


def test_faces_enroll_makes_the_collection_once_and_identify_finds_the_person(platform, tmp_path):
    key = platform.new_key()
    (tmp_path / "eileen.png").write_bytes(image_bytes(astronaut(), "PNG"))
    (tmp_path / "coffee.jpg").write_bytes(image_bytes(data.coffee()))
    first = percept(platform, "faces", "enroll", "crew", "eileen", str(tmp_path / "eileen.png"),
                    str(tmp_path / "coffee.jpg"), *api_args(platform, key))
    assert first.returncode == 1, first.stdout + first.stderr  # one of the two images has no face
    out = printed(first)
    assert "collection crew: created" in out and "subject eileen: created" in out
    assert "enrolling 2 faces" in out and "no_face" in out and "1 of 2 images failed" in out

    (tmp_path / "mirrored.png").write_bytes(image_bytes(ImageOps.mirror(astronaut()).resize((480, 480)), "PNG"))
    again = percept(platform, "faces", "enroll", "crew", "eileen", str(tmp_path / "mirrored.png"),
                    *api_args(platform, key))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "collection crew: exists" in printed(again) and "subject eileen: exists" in printed(again)
    with platform.client(key) as client:
        assert {s["name"]: s["faces"] for s in client.get("/v1/collections/crew/subjects").json()} == {"eileen": 2}

    (tmp_path / "who.png").write_bytes(flipped_resized_astronaut())
    shown = percept(platform, "faces", "identify", "crew", "who.png", "coffee.jpg", *api_args(platform, key),
                    cwd=tmp_path)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    [line] = [line for line in shown.stdout.splitlines() if "│ who.png" in line]
    assert "eileen" in line and re.search(r"0\.\d{3}", line)
    assert "no face" in printed(shown)
    found = percept(platform, "faces", "identify", "crew", str(tmp_path / "who.png"), "--json",
                    *api_args(platform, key))
    [entry] = json.loads(found.stdout)
    [face] = entry["job"]["output"]["faces"]
    assert face["matches"][0]["subject"] == "eileen" and face["matches"][0]["distance"] < 0.6


# --- text-to-image, jobs and models on a platform with a diffusion worker -------------------------------------


@pytest.fixture(scope="module")
def studio(tmp_path_factory) -> Iterator[tuple[OwnPlatform, str]]:
    """A platform with a diffusion worker, and the key of a tenant with the tiny pipeline imported over HTTP as
    `tiny-sd`."""
    with ThreadPoolExecutor(1) as build:
        pipeline = build.submit(tiny_pipeline_zip)  # built while the platform starts
        with own_platform(tmp_path_factory.mktemp("cli-art"), HF_HUB_OFFLINE="1", PERCEPT_CPU_THREADS="1") as plat:
            plat.start_worker("diffusion-worker", "diffusion")
            key = plat.new_key()
            with plat.client(key) as client:
                answer = client.post("/v1/models/import", data={"kind": "text-to-image", "name": "tiny-sd"},
                                     files={"file": ("pipeline.zip", pipeline.result(), "application/zip")})
                assert answer.status_code == 202, answer.text
                job = wait_for_job(client, answer.json()["id"], 180)
            assert job["status"] == "succeeded", job
            yield plat, key


@pytest.fixture(scope="module")
def art(studio) -> OwnPlatform:
    return studio[0]


@pytest.fixture(scope="module")
def art_key(studio) -> str:
    return studio[1]


@pytest.fixture
def art_client(art, art_key) -> Iterator[httpx.Client]:
    with art.client(art_key) as client:
        yield client


def submitted(client: httpx.Client, **params) -> str:
    answer = client.post("/v1/generate", json={"width": 64, "height": 64, **params})
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def test_generate_follows_the_steps_and_downloads_the_pngs(art, art_key, art_client, tmp_path):
    result = percept(art, "generate", "a red cat", "--seed", "7", "--num-images", "2", "--steps", "3",
                     "--width", "64", "--height", "64", "--out", str(tmp_path / "cats"), *api_args(art, art_key))
    assert result.returncode == 0, result.stdout + result.stderr
    files = sorted((tmp_path / "cats").glob("*.png"))
    assert len(files) == 2 and all(path.stem.startswith("img_") for path in files)
    out = printed(result)
    assert "generating 2 images" in out and "rendered" in out and "downloading 2 images" in out
    job_id = re.search(r"job (job_\w+): 2 images", out).group(1)
    job = art_client.get(f"/v1/jobs/{job_id}").json()
    assert [image["seed"] for image in job["output"]["images"]] == [7, 8]
    for image in job["output"]["images"]:
        path = tmp_path / "cats" / f"{image['image_id']}.png"
        assert path.read_bytes() == art_client.get(f"/v1/images/{image['image_id']}/content").content
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size == (64, 64)
        [row] = [line for line in result.stdout.splitlines() if image["image_id"] in line and "│" in line]
        assert re.search(rf"│ {image['seed']}\s+│", row)

    as_json = percept(art, "generate", "a red cat", "--seed", "7", *FAST, "--out", str(tmp_path / "json"), "--json",
                      *api_args(art, art_key))
    assert as_json.returncode == 0, as_json.stderr
    shown = json.loads(as_json.stdout)
    [image] = shown["job"]["output"]["images"]
    assert shown["job"]["status"] == "succeeded" and shown["job"]["params"]["steps"] == 2 and image["seed"] == 7
    assert shown["files"] == [str(tmp_path / "json" / f"{image['image_id']}.png")]
    assert Path(shown["files"][0]).is_file()


def test_generate_without_a_text_to_image_model_exits_1_with_the_apis_error(art, tmp_path):
    result = percept(art, "generate", "a cat", *FAST, "--out", str(tmp_path), *api_args(art, art.new_key()))
    assert result.returncode == 1 and "404 no_text_to_image_model" in printed(result)
    assert list(tmp_path.iterdir()) == []


def test_grid_downloads_every_cell_and_the_contact_sheets(art, art_key, art_client, tmp_path):
    out_dir = tmp_path / "grid"
    result = percept(art, "grid", "--subjects", "a fox, a lighthouse", "--styles", "ink,pixel art", "--seed", "3",
                     *FAST, "--out", str(out_dir), *api_args(art, art_key), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = printed(result)
    assert "grid of 4 cells" in out and "4/4 cells" in out
    grid_id = re.search(r"grid (job_\w+):", out).group(1)
    grid = art_client.get(f"/v1/jobs/{grid_id}").json()
    assert grid["kind"] == "generate_grid" and grid["params"]["seed"] == 3
    folders = {"a fox": "a-fox", "a lighthouse": "a-lighthouse"}
    names = {"ink": "ink", "pixel art": "pixel-art"}
    cells = {out_dir / folders[cell["subject"]] / f"{names[cell['style']]}-{image['seed']}.png": image["image_id"]
             for cell in grid["output"]["cells"] for image in cell["images"]}
    cards = {out_dir / "cards" / (sheet["kind"] + (f"-{names[sheet['style']]}" if sheet["style"] else "") + ".png"):
             sheet["image_id"] for sheet in grid["output"]["sheets"]}
    assert len(cells) == 4 and set(cards) == {out_dir / "cards" / name for name in
                                              ("style-ink.png", "style-pixel-art.png", "index.png")}
    assert set(out_dir.rglob("*.png")) == set(cells) | set(cards)
    for path, image_id in [*cells.items(), *cards.items()]:
        assert path.read_bytes() == art_client.get(f"/v1/images/{image_id}/content").content, path
    for cell in grid["output"]["cells"]:  # the table: a row per cell with its seed and status
        assert re.search(rf"{re.escape(cell['style'])}\s+│ {cell['seed']}\s+│ succeeded\s+│ "
                         rf"{folders[cell['subject']]}/{names[cell['style']]}-", result.stdout)


def test_jobs_watch_draws_a_jobs_progress_live_until_it_ends(art, art_key, art_client):
    # 40 steps of the tiny pipeline: about 5 s on a CPU core, its progress written once a second
    job_id = submitted(art_client, prompt="a slow green bird", seed=1, steps=40)
    code, drawn = percept_on_a_terminal(art, "jobs", "watch", job_id, *api_args(art, art_key))
    assert code == 0, drawn
    steps_seen = {int(step) for step in re.findall(r"image 1/1  step (\d+)/40", drawn)}
    assert steps_seen and all(0 < step <= 40 for step in steps_seen), drawn  # frames drawn while it ran
    assert f"generate {job_id}" in drawn and "rendered" in drawn
    assert f"job {job_id} succeeded" in " ".join(drawn.split())
    assert art_client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"


def test_jobs_cancel_stops_a_job_and_watch_then_exits_1(art, art_key, art_client):
    job_id = submitted(art_client, prompt="a very slow render", seed=2, steps=150)
    canceled = percept(art, "jobs", "cancel", job_id, *api_args(art, art_key))
    assert canceled.returncode == 0, canceled.stdout + canceled.stderr
    assert re.search(rf"job {job_id}: (canceled|running, canceling at its next step)", printed(canceled))
    watched = percept(art, "jobs", "watch", job_id, *api_args(art, art_key))
    assert watched.returncode == 1 and f"job {job_id} canceled" in printed(watched)
    job = wait_for_job(art_client, job_id)
    assert job["status"] == "canceled" and job["progress"].get("done", 0) < 150


def test_jobs_list_and_show(art, art_key, art_client):
    job_id = submitted(art_client, prompt="a listed yellow boat", seed=4, steps=2)
    wait_for_job(art_client, job_id)
    listed = percept(art, "jobs", "list", "--kind", "generate", "--q", "yellow boat", *api_args(art, art_key))
    assert listed.returncode == 0, listed.stdout + listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if job_id in line]
    assert "generate" in row and "succeeded" in row and "a listed yellow boat" in row
    page = json.loads(percept(art, "jobs", "list", "--status", "succeeded", "--limit", "2", "--json",
                              *api_args(art, art_key)).stdout)
    assert len(page["data"]) == 2 and all(job["status"] == "succeeded" for job in page["data"])
    assert page["next_cursor"] == page["data"][-1]["id"]

    shown = percept(art, "jobs", "show", job_id, *api_args(art, art_key))
    assert shown.returncode == 0, shown.stdout + shown.stderr
    out = printed(shown)
    assert f"{job_id} generate succeeded" in out
    for section in ("params", "output", "provenance"):
        assert f"{section} ─" in out, section
    assert '"prompt": "a listed yellow boat"' in out and '"name": "tiny-sd"' in out


def test_models_list_and_show(art, art_key):
    listed = percept(art, "models", "list", *api_args(art, art_key))
    assert listed.returncode == 0, listed.stdout + listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if "tiny-sd" in line]
    assert re.search(r"tiny-sd\s+│ text-to-image\s+│ 1\s+│\s+│ cpu", row)
    assert re.search(r"imagenet-efficientnet-lite0\s+│ classify\s+│ \S+\s+│ yes", listed.stdout)
    models = {model["name"]: model for model in json.loads(
        percept(art, "models", "list", "--json", *api_args(art, art_key)).stdout)}
    assert models["tiny-sd"]["kind"] == "text-to-image" and models["tiny-sd"]["builtin"] is False
    assert models["imagenet-efficientnet-lite0"]["builtin"] is True

    shown = percept(art, "models", "show", "tiny-sd", *api_args(art, art_key))
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "tiny-sd text-to-image latest 1" in printed(shown) and "StableDiffusionPipeline" in printed(shown)
