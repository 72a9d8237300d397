"""Each worker pool's cold start (process start to its first job's result), its resident memory once warm,
the gateway's, and a custom classifier's training time per 1,000 images through the real training path
(dataset upload -> analysis job -> POST /v1/train/classifier -> the classifier-train worker).

Starts embedded Postgres and Redis and the gateway alone (as bench/gateway_memory.py does), then one pool at a
time: start `python -m workers POOL`, submit that pool's first job at once, time to the job's result; read the
worker's RSS (with its pool's child processes), stop it. Only one pool runs at a time, so the classifier-train
and captioner-train pools (both on the datasets queue) each get their own first job.

First jobs: classifier - classify a JPEG (multipart); facerec - detect faces in one; classifier-train - a
class-folder dataset's analysis; captioner-train - import a tiny image-to-text checkpoint (the worker loads it
to validate it); captioner - caption a JPEG with that checkpoint; diffusion - import the tests' tiny pipeline
(loaded to validate it), then a 64 x 64 generation with it: the time is to the generated image.

Run: .venv/bin/python bench/coldstart.py [--pools classifier,facerec,...] [--train-images 300]
     [--device auto|cpu|cuda|cuda:N]
"""

import argparse
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import psutil
from harness import ROOT, add_device_argument, apply_device, start_gateway

sys.path.insert(0, str(ROOT))

from percept.db.migrate import upgrade  # noqa: E402
from percept.db.session import session_scope  # noqa: E402
from percept.db.tenants import create_key  # noqa: E402
from percept.embedded import start_postgres, start_redis  # noqa: E402

# captioner-train before captioner: its first job imports the captioner that captioner's first job uses.
POOLS = ("classifier", "facerec", "classifier-train", "captioner-train", "captioner", "diffusion")
FIRST_RESULT_TIMEOUT_S = 600


@dataclass
class ColdStart:
    pool: str
    first_job: str
    seconds: float  # process start to the first job's result
    rss_mb: float  # the worker and its pool's children, after the first result


def jpeg_of(name: str) -> bytes:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(getattr(data, name)()).convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def finished(client: httpx.Client, job: dict, timeout: float = FIRST_RESULT_TIMEOUT_S) -> dict:
    """The job once terminal; RuntimeError unless it succeeded."""
    if "id" not in job:
        raise RuntimeError(f"the job was refused: {job}")
    deadline = time.monotonic() + timeout
    while job["status"] in ("queued", "running"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job['id']} did not finish in {timeout:g} s")
        job = client.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=30"}).json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {job['status']}: {job['error']}")
    return job


def dataset_ready(client: httpx.Client, archive: bytes, name: str) -> dict:
    """POST /v1/datasets and wait for its analysis job; the dataset, ready."""
    dataset = client.post("/v1/datasets", files={"file": (name, archive, "application/zip")}).json()
    if "job_id" not in dataset:
        raise RuntimeError(f"the dataset was refused: {dataset}")
    finished(client, {"id": dataset["job_id"], "status": "queued"})
    dataset = client.get(f"/v1/datasets/{dataset['id']}").json()
    if dataset["status"] != "ready":
        raise RuntimeError(f"dataset {dataset['id']} is {dataset['status']}: {dataset.get('error')}")
    return dataset


def shapes_zip(images: int) -> bytes:
    """A class-folder dataset of `images` synthetic photos in 3 classes (tests/synthetic.py), 96 px."""
    from tests.synthetic import make_samples, write_zip

    buffer = io.BytesIO()
    per_class = max(2, images // 3)
    write_zip(make_samples({"red-circle": per_class, "blue-square": per_class, "green-triangle": per_class},
                           seed=0, size=96), buffer)
    return buffer.getvalue()


def tiny_captioner_zip() -> bytes:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # built from config: nothing to download
    from tests.services.captioner.test_hf import tiny_checkpoint_zip

    with tempfile.TemporaryDirectory() as scratch:
        return tiny_checkpoint_zip(Path(scratch))


def first_jobs() -> dict[str, tuple[str, Callable[[httpx.Client], dict]]]:
    """pool -> (what its first job is, a function submitting it and returning the job when it ended)."""
    from tests.diffusion_pipelines import tiny_pipeline_zip

    photo, face = jpeg_of("coffee"), jpeg_of("astronaut")
    captioner, pipeline = tiny_captioner_zip(), tiny_pipeline_zip()

    def image_job(path: str, jpeg: bytes, **fields: str) -> Callable[[httpx.Client], dict]:
        return lambda client: finished(client, client.post(
            path, files={"image": ("photo.jpg", jpeg, "image/jpeg")}, data=fields,
            headers={"Prefer": "wait=60, no-reuse"}).json())

    def import_job(kind: str, name: str, archive: bytes) -> Callable[[httpx.Client], dict]:
        return lambda client: finished(client, client.post(
            "/v1/models/import", data={"kind": kind, "name": name},
            files={"file": ("model.zip", archive, "application/zip")}, headers={"Prefer": "wait=60"}).json())

    def import_then_generate(client: httpx.Client) -> dict:
        import_job("text-to-image", "tiny-sd", pipeline)(client)
        return finished(client, client.post("/v1/generate", json={
            "prompt": "a lighthouse", "model": "tiny-sd", "steps": 4, "seed": 0},
            headers={"Prefer": "wait=60, no-reuse"}).json())

    return {
        "classifier": ("classify a JPEG", image_job("/v1/classify", photo)),
        "facerec": ("detect faces in a JPEG", image_job("/v1/faces/detect", face)),
        "classifier-train": ("analyse a class-folder dataset",
                             lambda client: dataset_ready(client, shapes_zip(24), "shapes.zip")),
        "captioner-train": ("import a tiny image-to-text checkpoint",
                            import_job("caption", "tiny-captioner", captioner)),
        "captioner": ("caption a JPEG", image_job("/v1/caption", photo, model="tiny-captioner", beam_width="1")),
        "diffusion": ("import a tiny pipeline, then generate 64 x 64", import_then_generate),
    }


def tree_rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def start_worker(pool: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("ab") as output:
        return subprocess.Popen([sys.executable, "-m", "workers", pool], cwd=ROOT, env=env, stdout=output,
                                stderr=subprocess.STDOUT)


def stop_worker(worker: subprocess.Popen) -> None:
    worker.send_signal(signal.SIGTERM)  # Celery's warm shutdown
    try:
        worker.wait(60)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait(10)


def training_per_1000(client: httpx.Client, images: int) -> tuple[float, dict]:
    """Seconds per 1,000 dataset images of one POST /v1/train/classifier job at its default parameters,
    from the job's own started_at / finished_at; and the job."""
    dataset = dataset_ready(client, shapes_zip(images), "train.zip")
    job = finished(client, client.post("/v1/train/classifier", json={"dataset": dataset["id"], "name": "bench"}).json())
    seconds = (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()
    return seconds / (3 * max(2, images // 3)) * 1000, job


def measure(pools: list[str], train_images: int, log: Callable[[str], None]) -> dict:
    """{'cold_starts': [ColdStart], 'gateway_rss_mb', 'training_s_per_1000', 'training_job'}."""
    data_dir = Path(tempfile.mkdtemp(prefix="percept-bench-coldstart-"))
    server = redis = gateway = None
    figures: dict = {"cold_starts": []}
    try:
        server, database_url = start_postgres(data_dir)
        redis, broker_url = start_redis(data_dir / "redis")
        upgrade(database_url)
        with session_scope(database_url) as session:
            _, key = create_key(session, "bench")
            session.commit()
        gateway, url = start_gateway(data_dir, database_url, broker_url)
        env = {**os.environ, "PERCEPT_DATA_DIR": str(data_dir), "PERCEPT_DATABASE_URL": database_url,
               "PERCEPT_BROKER_URL": broker_url, "PERCEPT_STORAGE_URL": (data_dir / "objects").as_uri(),
               "PERCEPT_LOG_LEVEL": "WARNING", "PERCEPT_RESULT_REUSE": "false", "HF_HUB_OFFLINE": "1"}
        jobs = first_jobs()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
            for pool in pools:
                what, submit = jobs[pool]
                log(f"cold start: {pool} ({what})")
                started = time.perf_counter()
                worker = start_worker(pool, env, data_dir / f"worker-{pool}.log")
                try:
                    submit(client)
                    seconds = time.perf_counter() - started
                    figures["cold_starts"].append(ColdStart(pool, what, seconds, tree_rss_mb(worker.pid)))
                    log(f"  {seconds:.1f} s, RSS {figures['cold_starts'][-1].rss_mb:.0f} MB")
                    if pool == "classifier-train" and train_images:
                        log(f"training a classifier on {train_images} images through the API")
                        figures["training_s_per_1000"], figures["training_job"] = training_per_1000(
                            client, train_images)
                        figures["worker_rss_after_training_mb"] = tree_rss_mb(worker.pid)
                finally:
                    stop_worker(worker)
            figures["gateway_rss_mb"] = psutil.Process(gateway.pid).memory_info().rss / 2**20
        return figures
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        if redis is not None:
            redis.terminate()
            redis.wait(10)
        if server is not None:
            server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pools", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                        default=list(POOLS), help=f"comma separated, of {', '.join(POOLS)}")
    parser.add_argument("--train-images", type=int, default=300,
                        help="images of the classifier training measurement (0: skip it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    add_arguments(parser)
    args = parser.parse_args()
    apply_device(parser, args.device)
    figures = measure(args.pools, args.train_images, lambda line: print(line, file=sys.stderr, flush=True))
    for cold in figures["cold_starts"]:
        print(f"{cold.pool:<17} cold start {cold.seconds:6.1f} s ({cold.first_job}), RSS {cold.rss_mb:5.0f} MB")
    if "training_s_per_1000" in figures:
        print(f"classifier training: {figures['training_s_per_1000']:.1f} s per 1,000 images")
    print(f"gateway RSS: {figures['gateway_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
