"""Text-to-image figures: a diffusers pipeline called directly, then the same renders through the API of a
`percept run` platform (the platform's overhead per image), and a subject x style grid's wall time with one and
with two diffusion workers.

Run: .venv/bin/python bench/diffusion.py [--model DIR] [--device auto|cpu|cuda|cuda:N] [--width W --height H]
     [--steps 20] [--images 6] [--grid 2x3] [--scheduler NAME] [--api / --no-api]

Without --model it builds the tests' tiny pipeline (64 x 64, for the platform's overhead, not for image
quality). SD 1.5 on a GPU:
    .venv/bin/python bench/diffusion.py --model /models/stable-diffusion-v1-5 --device cuda \\
        --width 512 --height 512 --steps 50 --images 10 --grid 2x3

Prints: the load time, s/image and images/min of the raw pipeline call and of the predictor (pipeline + PNG
with its provenance chunks); through the API, s/image one job at a time and the platform's overhead per image;
the grid's wall time with 1 and 2 workers, and its speed-up.
"""

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
from harness import add_device_argument, apply_device, running_platform

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "a lighthouse on a cliff at dawn, oil painting"


def zip_directory(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # weights barely compress
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(directory).as_posix())
    return buffer.getvalue()


def direct_figures(archive: bytes, params: dict, images: int) -> float:
    """Prints the direct figures; returns the predictor's seconds per image."""
    from percept.predictor import PredictRequest
    from services.diffusion.predictor import TextToImagePredictor, check_generation_params, render, resolve_size

    predictor = TextToImagePredictor(artifact=archive, name="bench", version="1")
    started = time.perf_counter()
    info = predictor.setup()
    print(f"pipeline {predictor.loaded.pipeline_class} on {info.device} ({predictor.loaded.dtype}), "
          f"{predictor.loaded.parameters / 1e6:.1f} M parameters, loaded in {time.perf_counter() - started:.2f} s")
    request = PredictRequest(images=[], params={**params, "seed": 0, "num_images": 1})
    predictor.predict([request])  # warm-up: first-call allocations and kernels
    checked = check_generation_params(request.params)
    width, height = resolve_size(predictor.loaded, checked)
    raw, full = [], []
    for seed in range(images):
        started = time.perf_counter()
        render(predictor.loaded, checked, seed, width, height)
        raw.append(time.perf_counter() - started)
        started = time.perf_counter()
        predictor.predict([PredictRequest(images=[], params={**params, "seed": seed, "num_images": 1})])
        full.append(time.perf_counter() - started)
    print(f"direct, {width}x{height}, {checked.steps} steps, {images} images:")
    for label, times in (("pipeline call", raw), ("predictor (+ PNG, provenance)", full)):
        median = statistics.median(times)
        print(f"  {label:<30} {median:7.3f} s/image (median)   {60 / median:8.1f} images/min")
    predictor.close()
    return statistics.median(full)


def wait(client: httpx.Client, job: dict, timeout: float = 3600) -> dict:
    deadline = time.monotonic() + timeout
    while job["status"] in ("queued", "running"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job['id']} did not finish in {timeout:g} s")
        job = client.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=30"}).json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {job['status']}: {job['error']}")
    return job


def import_pipeline(client: httpx.Client, archive: bytes) -> None:
    job = client.post("/v1/models/import", data={"name": "bench", "kind": "text-to-image"},
                      files={"file": ("pipeline.zip", archive, "application/zip")}).json()
    if "id" not in job:
        raise RuntimeError(f"the import was refused: {job}")
    wait(client, job)


def api_figures(archive: bytes, params: dict, images: int, direct: float, subjects: int, styles: int
                ) -> dict[str, float]:
    """Prints the API figures; returns `api_s_per_image`, `overhead_ms` and `grid_{1,2}_workers_s`."""
    grid_times, figures = {}, {}
    for workers in (1, 2):
        pools = ",".join(["diffusion"] * workers)
        # The cores shared out between the workers: two workers of two threads on two cores spin against each other
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        with running_platform(pools, PERCEPT_MAX_PIPELINE_IMPORT_BYTES=str(max(len(archive) + 1, 16 * 1024**3)),
                              PERCEPT_CPU_THREADS=threads) as (url, key, _):
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
                import_pipeline(client, archive)
                if workers == 1:
                    wait(client, client.post("/v1/generate", json={**params, "seed": 0}).json())  # warm the model
                    times = []
                    for seed in range(images):
                        started = time.perf_counter()
                        job = client.post("/v1/generate", json={**params, "seed": seed},
                                          headers={"Prefer": "wait=60"}).json()
                        wait(client, job)
                        times.append(time.perf_counter() - started)
                    median = figures["api_s_per_image"] = statistics.median(times)
                    figures["overhead_ms"] = (median - direct) * 1000
                    print(f"through the API (POST /v1/generate, one job at a time, {images} jobs):")
                    print(f"  {median:7.3f} s/image (median)   {60 / median:8.1f} images/min   platform overhead "
                          f"{(median - direct) * 1000:7.1f} ms/image over the predictor")
                grid = {"subjects": [f"subject {i}" for i in range(subjects)],
                        "styles": [f"style {j}" for j in range(styles)], "seed": 1,
                        **{k: v for k, v in params.items() if k != "prompt"}}
                # Warm-up: a cell per worker, so each has loaded the model before the clock starts
                warm_up = {**grid, "subjects": ["warm-up"], "styles": [f"w{i}" for i in range(workers)]}
                wait(client, client.post("/v1/generate/grid", json=warm_up).json())
                started = time.perf_counter()
                job = wait(client, client.post("/v1/generate/grid", json=grid).json())
                grid_times[workers] = figures[f"grid_{workers}_workers_s"] = time.perf_counter() - started
                cells = len(job["output"]["cells"])
                print(f"grid {subjects}x{styles} ({cells} child jobs, {len(job['output']['cards'])} cards), "
                      f"{workers} worker{'s' if workers > 1 else ''} ({threads} CPU threads each): "
                      f"{grid_times[workers]:7.2f} s wall, {grid_times[workers] / cells:6.3f} s/cell")
    print(f"grid speed-up with 2 workers: {grid_times[1] / grid_times[2]:.2f}x ({os.cpu_count()} cores here; on GPUs "
          "each worker has its own)")
    return figures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    parser.add_argument("--model", type=Path, help="a diffusers pipeline directory (default: the tiny test one)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=6, help="renders per measurement")
    parser.add_argument("--scheduler", help="e.g. 'Euler a', 'DPM++ 2M' (default: the pipeline's own)")
    parser.add_argument("--grid", default="2x3", help="SUBJECTSxSTYLES of the grid measurement")
    parser.add_argument("--api", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure through the API (default: yes)")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    apply_device(parser, args.device)
    measure(args)


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Prints the figures as it goes; returns `direct_s_per_image` (the predictor's) and api_figures' figures."""
    subjects, _, styles = args.grid.partition("x")

    params = {"prompt": PROMPT, "steps": args.steps,
              **{k: v for k, v in (("width", args.width), ("height", args.height), ("scheduler", args.scheduler))
                 if v is not None}}
    with tempfile.TemporaryDirectory(prefix="percept-bench-pipeline-") as scratch:
        if args.model is None:
            from tests.diffusion_pipelines import build_tiny_pipeline

            directory = build_tiny_pipeline(Path(scratch) / "tiny")
        else:
            directory = args.model
        archive = zip_directory(directory)
    print(f"checkpoint: {directory} ({len(archive) / 2**20:.1f} MB zipped)")
    direct = direct_figures(archive, params, args.images)
    figures = {"direct_s_per_image": direct}
    if args.api:
        figures.update(api_figures(archive, params, args.images, direct, int(subjects), int(styles)))
    return figures


if __name__ == "__main__":
    main()
