"""The web console (/console) in a real browser: Debian's chromium driven by Playwright, against a platform of the
module's own (gateway, Postgres, Redis, and classifier, training, face and diffusion workers; a tiny Stable
Diffusion pipeline imported over HTTP). Each scenario asserts what the page shows, and writes screenshots to
build/console-screenshots/ (gitignored).

- sign in (a wrong key is refused on the page, the right one opens the console)
- Try: classify the coffee photo (espresso); detect the astronaut's face (one box drawn, with its expression)
- Faces: a collection, a subject, an enrolled face, identify with distances
- Train: a dataset's report with its leakage warning, a classifier's live curves, per-class metrics, heat map
- Generate: a 2 x 2 grid followed cell by cell, its images and contact sheets in the gallery, an image's page
  with reproduce and copy-as-curl
- Jobs: a queued job canceled from its page; another followed to its end over SSE (queued -> running ->
  succeeded); the list; the models
- every page at a phone's width (390 px) without horizontal overflow
"""

import io
import json
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ROOT, image_bytes, job_answer, wait_for_job
from tests.diffusion_pipelines import tiny_pipeline_zip
from tests.own_platform import OwnPlatform, own_platform
from tests.synthetic import make_samples, write_zip

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "build" / "console-screenshots"
WAIT = {"Prefer": "wait=60"}
LONG = 90_000  # ms: what a page may take to show a job's end on this 2-core machine
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
WORKERS = {"classifier-worker": "classifier", "face-worker": "facerec", "diffusion-worker": "diffusion",
           "train-worker": "classifier-train"}
# Ids made by earlier scenarios, for the phone-width pass over the same pages.
made: dict[str, str] = {}


def _playwright():
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail("chromium is missing: `make test` installs it (apt-get install chromium)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: `make test` installs it (pip install -e '.[dev]')", pytrace=False)
    return sync_playwright


@pytest.fixture(scope="module")
def sync_playwright():
    return _playwright()  # before any platform starts: a missing browser fails in a second, not after a minute


@pytest.fixture(scope="module")
def pipeline_zip() -> Iterator[Future]:
    """The tiny pipeline's zip, built in a thread while the platform starts (the test process is idle then)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(tiny_pipeline_zip)


@pytest.fixture(scope="module")
def plat(tmp_path_factory, sync_playwright, pipeline_zip) -> Iterator[OwnPlatform]:
    with own_platform(tmp_path_factory.mktemp("console"), HF_HUB_OFFLINE="1", PERCEPT_CPU_THREADS="1",
                      PERCEPT_MAX_PENDING_JOBS_PER_TENANT="50") as platform:
        for name, service in WORKERS.items():
            platform.start_worker(name, service)
        yield platform
        for name in WORKERS:  # idle by now: no warm shutdown to wait for (the gateway still stops gracefully)
            platform.kill(name)


@pytest.fixture(scope="module")
def key(plat, pipeline_zip, coffee, astronaut) -> str:
    # Each worker loads its models with its first job: give every one a job now (as another tenant, so the
    # console's lists hold only the scenarios' own), and they load side by side while the pipeline is imported.
    with plat.client(plat.new_key("warm-up")) as warm:
        for path, files, data in (("/v1/classify", {"image": ("coffee.jpg", coffee, "image/jpeg")}, {}),
                                  ("/v1/faces/detect", {"image": ("astronaut.jpg", astronaut, "image/jpeg")},
                                   {"expressions": "true"}),
                                  ("/v1/datasets", {"file": ("warm.zip", shapes_zip(seed=4), "application/zip")}, {})):
            assert warm.post(path, files=files, data=data).status_code == 202
    key = plat.new_key("console")
    # The tiny pipeline, imported as a user would: a zip posted to /v1/models/import.
    with plat.client(key) as client:
        archive = ("pipeline.zip", pipeline_zip.result(), "application/zip")
        answer = client.post("/v1/models/import", files={"file": archive},
                             data={"kind": "text-to-image", "name": "tiny-sd"}, headers=WAIT)
        job = job_answer(answer)
        job = job if job["status"] in ("succeeded", "failed") else wait_for_job(client, job["id"], 180)
        assert job["status"] == "succeeded", job
    return key


@pytest.fixture(scope="module")
def browser(sync_playwright):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield browser
        browser.close()


class Console:
    """A browser tab on the console, signed in through sessionStorage (as the sign-in form leaves it), that
    records uncaught script errors."""

    def __init__(self, browser, base: str, key: str | None, viewport: dict):
        self.context = browser.new_context(viewport=viewport, base_url=base)
        if key:
            # about:blank (between pages) has no storage of its own: only the console's origin gets the key.
            self.context.add_init_script(f"if (location.protocol.startsWith('http')) "
                                         f"sessionStorage.setItem('percept.api-key', {json.dumps(key)})")
        self.page = self.context.new_page()
        self.page.set_default_timeout(LONG)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda message: self.errors.append(message.text) if message.type == "error"
                     and "Failed to load resource" not in message.text else None)

    def open(self, hash_route: str):
        """A fresh load of the console at `hash_route` (a hash change alone would leave the old page's heading
        on screen for a moment)."""
        self.page.goto("about:blank")
        self.page.goto(f"/console/{hash_route}")
        self.page.locator("main h1").first.wait_for()
        return self.page

    def shot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self):
        self.context.close()
        assert not self.errors, self.errors


@pytest.fixture
def console(browser, plat, key) -> Iterator[Console]:
    tab = Console(browser, plat.url, key, DESKTOP)
    yield tab
    tab.close()


def expect(locator):
    """Playwright's assertion, retried until LONG (a worker's first job loads its models)."""
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=LONG)
    return playwright_expect(locator)


def photo_file(name: str, data: bytes, mime: str = "image/jpeg") -> dict:
    return {"name": name, "mimeType": mime, "buffer": data}


@pytest.fixture(scope="module")
def coffee() -> bytes:
    from skimage import data

    return image_bytes(data.coffee(), "JPEG", quality=95)


@pytest.fixture(scope="module")
def astronaut() -> bytes:
    from skimage import data

    return image_bytes(data.astronaut(), "JPEG", quality=95)


# --- sign in -----------------------------------------------------------------------------------------------------


def test_sign_in_refuses_a_wrong_key_and_opens_the_console_with_the_right_one(browser, plat, key):
    tab = Console(browser, plat.url, None, DESKTOP)
    page = tab.page
    page.goto("/console")  # redirected to /console/
    assert page.url.endswith("/console/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("API key").fill("pk_not-a-key")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("not accepted")
    assert page.evaluate("sessionStorage.getItem('percept.api-key')") is None
    tab.shot("sign-in")

    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("heading", name="Try")).to_be_visible()
    expect(page.get_by_role("navigation", name="Console").get_by_role("link", name="Try")).to_have_attribute(
        "aria-current", "page")
    # The key is the tab's: sessionStorage only, no cookie, no localStorage.
    assert page.evaluate("sessionStorage.getItem('percept.api-key')") == key
    assert page.evaluate("localStorage.length") == 0 and tab.context.cookies() == []

    page.get_by_role("button", name="Sign out", exact=True).click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('percept.api-key')") is None
    tab.errors = [e for e in tab.errors if "401" not in e]
    tab.close()


# --- Try ---------------------------------------------------------------------------------------------------------


def test_try_classifies_the_coffee_photo_as_espresso(console, coffee):
    page = console.open("#/try")
    page.locator("input[name=photo]").set_input_files(photo_file("coffee.jpg", coffee))
    page.get_by_role("radio", name=re.compile("^Classify")).check()
    page.get_by_label("Expected label").fill("espresso")
    page.get_by_role("button", name="Run", exact=True).click()
    labels = page.locator("ol.labels li")
    expect(labels.first).to_contain_text("espresso")
    expect(page.locator(".verdict-match")).to_contain_text("match")
    expect(page.locator(".provenance")).to_contain_text("imagenet-efficientnet-lite0")
    expect(page.locator(".job-line .status")).to_have_text("succeeded")
    made["classify_job"] = page.locator(".job-line a").first.inner_text()
    console.shot("try-classify")


def test_try_draws_exactly_one_box_on_the_astronaut(console, astronaut):
    page = console.open("#/try?task=faces")
    page.locator("input[name=photo]").set_input_files(photo_file("astronaut.jpg", astronaut))
    expect(page.get_by_label("Read expressions")).to_be_checked()
    page.get_by_role("button", name="Run", exact=True).click()
    boxes = page.locator("figure.stage svg .face-box")
    expect(boxes).to_have_count(1)
    expect(page.locator("figure.stage svg .landmark")).to_have_count(5)
    # The box sits on her face: inside the photo, in its pixel coordinates (512 x 512).
    assert page.locator("figure.stage svg").get_attribute("viewBox") == "0 0 512 512"
    x, y, w, h = (float(boxes.get_attribute(a)) for a in ("x", "y", "width", "height"))
    assert 100 < x < 300 and 0 < y < 200 and 50 < w < 250 and 50 < h < 250, (x, y, w, h)
    label = page.locator("figure.stage svg .face-label").text_content()
    assert label.startswith("1 · ") and len(label) > 4, label  # the face's expression
    expect(page.locator(".result table")).to_contain_text("1 face")
    console.shot("try-faces")


def test_try_makes_a_meme_and_says_plainly_when_there_is_no_captioner(console, astronaut):
    page = console.open("#/try")
    page.locator("input[name=photo]").set_input_files(photo_file("astronaut.jpg", astronaut))
    page.get_by_role("radio", name=re.compile("^Caption")).check()
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator(".result [role=alert]")).to_contain_text("no_captioner")  # the API's own error, shown
    page.get_by_role("radio", name=re.compile("^Meme")).check()
    page.get_by_label("Bottom text").fill("one small step")
    page.get_by_role("button", name="Run", exact=True).click()
    meme = page.locator("figure.meme img")
    expect(meme).to_have_attribute("src", re.compile("^blob:"))
    expect(page.locator("figure.meme figcaption")).to_contain_text("Expression:")
    assert page.evaluate("document.querySelector('figure.meme img').naturalWidth") == 512
    console.shot("try-meme")


# --- Faces -------------------------------------------------------------------------------------------------------


def test_faces_enrolls_a_subject_and_identifies_her(console, astronaut):
    page = console.open("#/faces")
    page.get_by_label("Name").fill("crew")
    page.get_by_role("button", name="Create", exact=True).click()
    page.get_by_role("link", name="crew").click()
    expect(page.get_by_role("heading", name="Collection crew")).to_be_visible()
    page.get_by_role("textbox", name="New subject").fill("eileen")
    page.get_by_role("button", name="Add", exact=True).click()
    row = page.locator("tr[data-subject=eileen]")
    expect(row.locator(".face-count")).to_have_text("0")
    row.locator("input[type=file]").set_input_files(photo_file("astronaut.jpg", astronaut))
    expect(page.locator(".enroll-status")).to_contain_text("Enrolled: eileen has 1 face")
    expect(page.locator("tr[data-subject=eileen] .face-count")).to_have_text("1")

    page.locator("input[name=identify]").set_input_files(photo_file("astronaut.jpg", astronaut))
    page.get_by_role("button", name="Identify", exact=True).click()
    expect(page.locator(".identify-result svg .face-box")).to_have_count(1)
    expect(page.locator(".identify-result .match-subject").first).to_have_text("eileen")
    distance = float(page.locator(".identify-result tr.first-match td.num").inner_text())
    assert 0 <= distance < 0.6
    console.shot("faces")


# --- Train -------------------------------------------------------------------------------------------------------


def shapes_zip(seed: int = 3) -> bytes:
    """Two classes of synthetic shapes, and one image copied under the other class (a leak the report names)."""
    samples = make_samples({"red-circle": 8, "blue-square": 8}, seed=seed, size=64)
    red = next(image for image, label in samples if label == "red-circle")
    samples.append((red, "blue-square"))
    buffer = io.BytesIO()
    write_zip(samples, buffer)
    return buffer.getvalue()


def test_train_shows_the_report_the_live_curves_and_the_metrics(console):
    page = console.open("#/train")
    page.locator("input[name=dataset]").set_input_files(
        {"name": "shapes.zip", "mimeType": "application/zip", "buffer": shapes_zip()})
    page.get_by_role("button", name="Upload and analyse", exact=True).click()
    expect(page.get_by_role("heading", name="Report")).to_be_visible()
    expect(page.locator(".warnings .leakage")).to_contain_text("more than one class")
    expect(page.locator(".report table")).to_contain_text("red-circle")
    made["dataset"] = page.url.rsplit("/", 1)[1]
    console.shot("train-dataset")

    page.get_by_label("Model name").fill("shapes")
    page.get_by_label("Epochs").fill("6")
    page.get_by_role("button", name="Start training", exact=True).click()
    expect(page.get_by_role("heading", name="Training", exact=True)).to_be_visible()
    expect(page.locator(".job-line .status")).to_have_text("succeeded")
    # The curves: one point per epoch run, loss and accuracy (from the live events, then the job's history)
    epochs = int(page.locator(".charts").get_attribute("data-epochs"))
    assert epochs >= 1
    expect(page.locator(".charts figure")).to_have_count(2)
    expect(page.locator(".charts figure").first.locator(".series-0 circle")).to_have_count(epochs)
    expect(page.locator("table.per-class tbody tr")).to_have_count(2)
    expect(page.locator("table.heatmap tbody td")).to_have_count(4)
    expect(page.locator(".training-results")).to_contain_text("shapes version 1")
    made["training"] = page.url.rsplit("/", 1)[1]
    console.shot("train")


# --- Generate ----------------------------------------------------------------------------------------------------


def test_a_grid_is_followed_cell_by_cell_and_lands_in_the_gallery(console):
    page = console.open("#/generate")
    single = page.get_by_role("form", name="Generate from a prompt")
    single.get_by_label("Prompt", exact=True).fill("a lighthouse at dawn")
    single.get_by_label("Seed").fill("5")
    single.get_by_label("Steps").fill("2")
    single.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator(".live .image-card img")).to_have_attribute("src", re.compile("^blob:"))
    expect(page.locator(".live .job-line .status")).to_have_text("succeeded")
    expect(page.locator(".live .image-card")).to_contain_text("seed 5")

    grid = page.get_by_role("form", name="Generate a grid")
    grid.get_by_label("Subjects").fill("a fox\na lighthouse")
    grid.get_by_label("Styles").fill("watercolor\npixel art")
    grid.get_by_label("Seed").fill("7")
    grid.get_by_label("Steps").fill("2")
    grid.get_by_label("Width").fill("64")
    grid.get_by_label("Height").fill("64")
    grid.get_by_role("button", name="Generate grid", exact=True).click()
    cells = page.locator("table.grid-cells td.cell")
    expect(cells).to_have_count(4)
    expect(page.locator(".grid-gallery-link")).to_be_visible()
    expect(page.locator("table.grid-cells td.cell[data-status=succeeded]")).to_have_count(4)
    expect(page.locator("table.grid-cells td.cell img.thumb")).to_have_count(4)
    expect(page.locator(".sheets figure")).to_have_count(3)  # a contact sheet per style, and the index
    console.shot("generate-grid")

    page.locator(".grid-gallery-link").click()
    expect(page.get_by_role("heading", name="Gallery")).to_be_visible()
    cards = page.locator(".gallery .image-card")
    expect(cards).to_have_count(4)
    expect(page.locator(".gallery")).to_contain_text("a fox, in the style of watercolor")
    for i in range(4):  # every card's picture loaded (fetched with the key, shown from a blob URL)
        expect(cards.nth(i).locator("img")).to_have_attribute("src", re.compile("^blob:"))
    console.shot("gallery")
    page.get_by_label("Kind").select_option("card")  # the grid's filter stays in the form
    page.get_by_role("button", name="Filter", exact=True).click()
    expect(page.locator(".gallery .image-card")).to_have_count(3)
    expect(page.locator(".gallery")).to_contain_text("contact sheet: pixel art")

    page.goto(page.url.split("#")[0] + "#/gallery?style=watercolor&subject=a%20fox")
    expect(page.locator(".gallery .image-card")).to_have_count(1)
    page.locator(".gallery .image-card a").first.click()
    expect(page.locator(".provenance")).to_contain_text("a fox, in the style of watercolor")
    expect(page.locator(".provenance")).to_contain_text("tiny-sd v1")
    made["image"] = page.url.rsplit("/", 1)[1]
    page.get_by_role("button", name="Reproduce", exact=True).click()
    expect(page.locator(".reproduce-result [data-identical=true]")).to_contain_text("Identical")
    page.get_by_role("button", name="Copy as curl", exact=True).click()
    curl = page.locator("pre.curl")
    expect(curl).to_be_visible()
    expect(curl).to_contain_text("/v1/generate")
    expect(curl).to_contain_text('"model":"tiny-sd:1"')
    expect(curl).to_contain_text("$PERCEPT_KEY")
    console.shot("image")


# --- Jobs --------------------------------------------------------------------------------------------------------


def test_the_job_page_cancels_a_job_and_follows_another_to_its_end(console, plat, key):
    with plat.client(key) as client:
        # The one diffusion worker renders one job at a time: the others wait behind the first.
        # (The tiny pipeline takes about 0.15 s a step at 64 x 64 on one thread.)
        ahead = client.post("/v1/generate", json={"prompt": "a longer render", "seed": 1, "steps": 24})
        followed = client.post("/v1/generate", json={"prompt": "a red cat", "seed": 2, "steps": 8})
        doomed = client.post("/v1/generate", json={"prompt": "never drawn", "seed": 3, "steps": 2})
        assert ahead.status_code == followed.status_code == doomed.status_code == 202
        job_id, doomed_id = followed.json()["id"], doomed.json()["id"]

        page = console.open(f"#/job/{doomed_id}")
        expect(page.locator(".job-header")).to_have_attribute("data-status", "queued")
        page.get_by_role("button", name="Cancel", exact=True).click()
        expect(page.locator(".job-header")).to_have_attribute("data-status", "canceled")
        expect(page.get_by_role("button", name="Cancel", exact=True)).to_have_count(0)
        assert client.get(f"/v1/jobs/{doomed_id}").json()["status"] == "canceled"

    page = console.open(f"#/job/{job_id}")
    header = page.locator(".job-header")
    expect(header).to_have_attribute("data-status", "succeeded")
    seen = page.locator(".view").get_attribute("data-seen").split()
    assert seen[0] in ("queued", "running") and seen[-1] == "succeeded", seen
    assert "running" in seen, seen  # progress events came in while it ran
    expect(page.locator(".provenance")).to_contain_text("tiny-sd v1")
    expect(page.locator("section[aria-label=Output] img")).to_have_count(1)
    made["job"] = job_id
    console.shot("job")

    page = console.open("#/jobs?kind=generate")
    expect(page.locator(f"tr[data-job='{job_id}']")).to_contain_text("succeeded")
    expect(page.locator(f"tr[data-job='{doomed_id}']")).to_contain_text("canceled")
    console.shot("jobs")
    page = console.open("#/models")
    expect(page.locator("[data-model=tiny-sd]")).to_contain_text("text-to-image")
    expect(page.locator("[data-model=shapes]")).to_contain_text("macro F1")
    expect(page.locator("[data-model=imagenet-efficientnet-lite0]")).to_contain_text("cpu")
    console.shot("models")


# --- phone width -------------------------------------------------------------------------------------------------


def test_every_page_fits_a_phone(browser, plat, key):
    routes = {"try": "#/try", "faces": "#/faces", "collection": "#/faces/crew", "train": "#/train",
              "generate": "#/generate", "gallery": "#/gallery", "jobs": "#/jobs", "models": "#/models"}
    if "dataset" in made:
        routes["dataset"] = f"#/train/dataset/{made['dataset']}"
    if "training" in made:
        routes["training"] = f"#/train/job/{made['training']}"
    if "image" in made:
        routes["image"] = f"#/image/{made['image']}"
    if "job" in made:
        routes["job"] = f"#/job/{made['job']}"
    overflowing = {}
    signed_out = Console(browser, plat.url, None, PHONE)
    signed_out.open("")
    signed_out.shot("phone-sign-in")
    overflowing["sign-in"] = _overflow(signed_out.page)
    signed_out.close()
    tab = Console(browser, plat.url, key, PHONE)
    for name, route in routes.items():
        page = tab.open(route)
        page.locator("[aria-busy=true]").first.wait_for(state="detached")
        overflowing[name] = _overflow(page)
        tab.shot(f"phone-{name}")
    tab.close()
    assert not any(overflowing.values()), {name: width for name, width in overflowing.items() if width}


def _overflow(page) -> int:
    """How many CSS pixels the page is wider than the viewport (0: no horizontal scrolling)."""
    return page.evaluate("Math.max(0, document.documentElement.scrollWidth - window.innerWidth)")

