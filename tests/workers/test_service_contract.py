"""The service contract: services declare themselves, and the core, the gateway and the workers need
nothing else to run them, on the device PERCEPT_DEVICE names."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from percept.db.ids import new_id
from percept.db.models import Job, JobStatus
from percept.db.session import session_scope
from percept.queue import producer
from percept.services import catalog, import_by_name, load_services
from tests.conftest import ROOT, image_bytes, wait_for_job, wait_until

pytestmark = [pytest.mark.integration]
TINY = "tests.tiny_service.service"


def _tenant_of(platform, image_id: str) -> str:
    from percept.db.models import Image as ImageRow

    with session_scope(platform.database_url) as session:
        return session.get(ImageRow, image_id).tenant_id


def test_a_service_declared_outside_the_platform_runs_a_job_end_to_end(platform, api):
    """tests/tiny_service is a new service: a declaration, a predictor, nothing in workers/ or percept/."""
    extra = {"PERCEPT_EXTRA_SERVICES": TINY}
    # 1. Its built-in model is seeded by the migration, from the declaration
    migrate = subprocess.run([sys.executable, "-m", "percept.cli", "migrate"], env=platform.env(**extra), cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert api.get("/v1/models/tiny-colour-stats").json()["kind"] == "colour_stats"

    # 2. Its worker pool is started by name, like the platform's own
    platform.start_worker("tiny-worker", "tiny", **extra)
    try:
        red = image_bytes(Image.new("RGB", (640, 480), (200, 30, 40)), "PNG")
        image = api.post("/v1/images", files={"file": ("red.png", red)}).json()
        (tiny,) = load_services((TINY,))[-1:]
        kind = tiny.job_kinds[0]
        job_id = new_id("job")
        inputs = [{"image_id": image["id"], "sha256": image["sha256"]}]
        with session_scope(platform.database_url) as session:
            session.add(Job(id=job_id, tenant_id=_tenant_of(platform, image["id"]), kind=kind.name, queue=kind.queue,
                            status=JobStatus.QUEUED, model_name="tiny-colour-stats:1", inputs=inputs, params={},
                            progress={"done": 0, "total": 1}, provenance={"inputs": inputs}, attempts=0,
                            cancel_requested=False))
            session.commit()
        producer(platform.broker_url).send_task(kind.task, args=[job_id], queue=kind.queue)

        # 3. The generic runtime ran its predictor and wrote the output and provenance
        job = wait_for_job(api, job_id, timeout=90)
        assert job["status"] == "succeeded", job
        assert job["output"]["dominant"] == "red"
        assert job["output"]["mean_rgb"] == pytest.approx([200, 30, 40], abs=1)
        assert job["provenance"]["model"]["name"] == "tiny-colour-stats"
        assert job["provenance"]["worker"]["device"] == "cpu"
        # its declared search text is what `q` finds
        found = api.get("/v1/jobs", params={"q": "red", "kind": "colour_stats"}).json()["data"]
        assert [j["id"] for j in found] == [job_id]
    finally:
        platform.kill("tiny-worker")


def test_every_declared_entry_point_resolves_inside_its_own_service():
    for service in catalog().services:
        home = "percept." if service.name == "platform" else f"services.{service.name}."
        paths = [service.device] if service.device else []
        for kind in service.job_kinds:
            paths += [p for p in (kind.trainer, kind.finalizer, kind.search_text) if p]
        paths += [model.predictor for model in service.models]
        for path in paths:
            assert path.startswith(home), f"{service.name} declares {path}, outside its own package"
            assert callable(import_by_name(path)), path
        assert all((ROOT / "services" / service.name / name).is_file() for name in service.requirements)


def test_each_built_in_model_answers_a_declared_kind_and_kinds_are_consistent():
    kinds = catalog().job_kinds
    for model in catalog().models:
        assert model.kind in kinds
    for kind in kinds.values():
        assert kind.default_model is None or any(m.name == kind.default_model for m in catalog().models), kind.name
        assert any(kind.queue in pool.queues for _, pool in catalog().worker_pools.values()), \
            f"no worker pool consumes {kind.queue!r}, the queue of {kind.name}"


def test_declarations_import_no_ml_framework():
    code = ("import sys; from percept.services import catalog; c = catalog(); "
            "bad = [m for m in ('torch', 'tensorflow', 'numpy', 'dlib', 'cv2') if m in sys.modules]; "
            "print(len(c.job_kinds), bad); sys.exit(1 if bad or not c.job_kinds else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("pool", "device", "says"), [
    ("classifier", "cuda", "no CUDA device is visible"),
    ("classifier-train", "cuda:1", "no CUDA device is visible"),
    ("facerec", "cuda:0", "runs on the CPU only"),
])
def test_a_worker_asked_for_a_device_it_cannot_have_stops_at_start_up(platform, pool, device, says):
    result = subprocess.run([sys.executable, "-m", "workers", pool], env=platform.env(PERCEPT_DEVICE=device),
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert says in result.stderr and f"PERCEPT_DEVICE={device}" in result.stderr


def test_a_malformed_device_setting_is_refused():
    result = subprocess.run([sys.executable, "-m", "workers", "classifier"], env={"PERCEPT_DEVICE": "gpu0",
                            "PATH": "/usr/bin:/bin"}, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "PERCEPT_DEVICE must be auto, cpu, cuda or cuda:N" in result.stderr


def test_the_device_used_is_recorded_in_provenance_and_the_registry(api, coffee_jpeg):
    job = api.post("/v1/classify", files={"image": ("c.jpg", coffee_jpeg)}, headers={"Prefer": "wait=60"}).json()
    assert job["status"] == "succeeded"
    assert job["provenance"]["worker"]["device"] == "cpu"
    model = wait_until(lambda: (m := api.get("/v1/models/imagenet-efficientnet-lite0").json())["versions"][0].get(
        "device") and m, timeout=30, what="the registry to record the device")
    assert model["versions"][0]["device"] == "cpu"


def test_migrations_insert_no_models():
    """Built-in models come from the declarations, never from migration files."""
    for migration in (Path(ROOT) / "percept/db/migrations/versions").glob("*.py"):
        text = migration.read_text()
        assert "bulk_insert(models" not in text and "services." not in text, migration.name
