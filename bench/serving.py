"""The classifier served side by side: Percept's API, the predictor called directly, and the serving frameworks a
user would pick instead (bench/peers: Ray Serve, BentoML, plain FastAPI, each in its own virtualenv), all on the
same EfficientNet-Lite0 predictor and decode, sent the same JPEGs as multipart uploads by one lean load
generator (bench/loadgen.py: each body built once, sent over http.client).

Each run measures every system once, the order reversed on every other run (a shared VM drifts within
minutes); the figures are given as min / median over the runs (issue 13's convention).

Run: .venv/bin/python bench/serving.py [--runs 2] [--seconds 10] [--requests 60] [--systems percept,direct,ray,...]
     [--device auto|cpu|cuda|cuda:N]
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO

import httpx
import psutil
from harness import ROOT, add_device_argument, apply_device, free_port, running_platform
from loadgen import Client, Upload
from PIL import Image
from skimage import data

sys.path.insert(0, str(ROOT))

from bench.peers.run import PEERS, peer_version, running_peer  # noqa: E402

CONCURRENCY = 16
WARM_UP_SECONDS = 3.0  # at c=16, before either measurement (measure_endpoint)
SYSTEMS = ("percept", "percept-2", "direct", "ray", "bentoml", "fastapi")
# How `percept run` is started for each Percept row: one classifier worker on every core, or two sharing them
# (`--workers classifier,classifier`: each model on cores / 2 threads, while one batch runs the other is gathered).
PERCEPT_POOLS = {"percept": "classifier", "percept-2": "classifier,classifier"}
LABELS = {"percept": "Percept API (POST /v1/classify, multipart, `Prefer: wait=30, no-reuse`), one classifier "
                     "worker",
          "percept-2": "Percept API, two classifier workers sharing the cores (`percept run --workers "
                       "classifier,classifier`)",
          "direct": "direct predictor (batch 1 latency / batch 16)",
          **{name: PEERS[name][0] for name in PEERS}}
# Distinct photos (and qualities), so no cache or result reuse can answer a request without the model.
PHOTOS = ("coffee", "chelsea", "astronaut", "rocket")
QUALITIES = (95, 90, 85, 80)


def sample_uploads() -> list[Upload]:
    """sample_jpegs() as multipart bodies, built once (bench/loadgen.py)."""
    return [Upload.of(jpeg) for jpeg in sample_jpegs()]


def sample_jpegs() -> list[bytes]:
    """16 different JPEGs of ordinary photo sizes (300 x 451 to 512 x 512), sent in turn by every client."""
    jpegs = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        for quality in QUALITIES:
            buffer = BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            jpegs.append(buffer.getvalue())
    return jpegs


def warm_up_jpeg() -> bytes:
    """A JPEG none of sample_jpegs() is (another quality): a first request that no later one repeats."""
    buffer = BytesIO()
    Image.fromarray(getattr(data, PHOTOS[0])()).convert("RGB").save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


@dataclass
class Endpoint:
    """How to send one classify request to a system: POST `url + path` with the JPEG as multipart `image`;
    `check` looks at the answer's JSON (raises if it is not a result); `model_ms` reads the model's own time out
    of an answer, where the system records one."""

    url: str
    path: str = "/classify"
    headers: dict[str, str] = field(default_factory=dict)
    check: Callable[[dict], dict] = lambda answer: answer
    model_ms: Callable[[dict], float] | None = None
    # Where the rest of an answer's latency went, by stage in ms, where the system records it (outside_stages)
    stages: Callable[[float, dict], dict[str, float]] | None = None
    # The processes serving it, by part, where the bench started them itself (CPU per image)
    processes: Callable[[], dict[str, list[psutil.Process]]] | None = None


@dataclass
class Figures:
    p50_ms: float
    p99_ms: float
    rate_16: float
    outside_model_ms: float | None = None  # p50 of (latency - the job's own inference time), Percept only
    outside_stages_ms: dict[str, float] = field(default_factory=dict)  # c=1 medians of Endpoint.stages, Percept only
    gateway_rss_mb: float | None = None
    # CPU time per image during the c=16 figure, by part (gateway, workers, postgres, redis, the load generator),
    # in ms: where a 2-core machine's time goes, Percept only
    cpu_ms_per_image: dict[str, float] = field(default_factory=dict)


def percept_answer(job: dict) -> dict:
    if job.get("status") != "succeeded":
        raise RuntimeError(f"job did not succeed: {job}")
    return job


@contextmanager
def percept_endpoint(pools: str = "classifier") -> Iterator[tuple[Endpoint, Callable[[], float]]]:
    """`percept run` with its classifier pool only (`pools`: once, or twice): what a user serving the classifier
    runs (its worker takes the device from PERCEPT_DEVICE, which --device sets); (the endpoint, the gateway's RSS
    in MB)."""
    with running_platform(pools) as (url, key, gateway):
        yield (Endpoint(url, "/v1/classify", {"Authorization": f"Bearer {key}", "Prefer": "wait=30, no-reuse"},
                        percept_answer, lambda job: job["provenance"]["timings_ms"]["inference"],
                        outside_stages, lambda: platform_parts(gateway.parent())),
               lambda: gateway.memory_info().rss / 2**20)


def outside_stages(latency: float, job: dict) -> dict[str, float]:
    """A Percept answer's time outside the model by stage, from its job's own timings (`provenance.timings_ms`,
    whose `total` runs from the submit transaction's start, the job's `created_at`, to when the worker timed the
    job's end, just before writing it):
    - gateway and answer: before that transaction (HTTP, auth, the upload's check and storage) and after the
      worker timed the end (the result's write and event, the gateway's wake-up, the answer);
    - queue: `queued`, the rest of the transaction, the send, the worker's receipt, up to the claim's start;
    - worker: from the claim to the end, less predict() (the claim, the decode).
    """
    timings = job["provenance"]["timings_ms"]
    return {"gateway and answer": latency - timings["total"], "queue": timings["queued"],
            "worker": timings["total"] - timings["queued"] - timings["inference"]}


def platform_parts(run: psutil.Process) -> dict[str, list[psutil.Process]]:
    """`percept run`'s processes by part: the gateway, the workers, Postgres (its server and backends), Redis."""
    parts: dict[str, list[psutil.Process]] = {"gateway": [], "workers": [], "postgres": [], "redis": []}
    for process in run.children(recursive=True):
        try:
            command = " ".join(process.cmdline())
        except psutil.Error:
            continue
        part = ("gateway" if "percept.cli gateway" in command else "workers" if "-m workers" in command
                else "redis" if "redis-server" in command else "postgres" if "postgres" in command else None)
        if part:
            parts[part].append(process)
    return parts


def cpu_seconds(parts: dict[str, list[psutil.Process]]) -> dict[tuple[str, int], float]:
    """User + system CPU seconds of each process so far, by (part, pid)."""
    seconds = {}
    for part, processes in parts.items():
        for process in processes:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            seconds[(part, process.pid)] = times.user + times.system
    return seconds


def cpu_per_image(before: dict[tuple[str, int], float], after: dict[tuple[str, int], float], load: float,
                  images: int) -> dict[str, float]:
    """ms of CPU per image by part between two cpu_seconds() (a process started meanwhile counts whole), with the
    load generator's (this process's) `load` seconds."""
    spent: dict[str, float] = {}
    for (part, pid), seconds in after.items():
        spent[part] = spent.get(part, 0.0) + seconds - before.get((part, pid), 0.0)
    spent["load generator"] = load
    return {part: 1000 * value / max(images, 1) for part, value in spent.items()}


def send(client: Client, endpoint: Endpoint, upload: Upload) -> tuple[float, dict]:
    """One request: (its latency in ms, the checked answer)."""
    latency, answer = client.post(endpoint.path, upload)
    return latency, endpoint.check(answer)


def measure_endpoint(endpoint: Endpoint, uploads: list[Upload], requests_at_1: int, seconds: float) -> Figures:
    """c=1: `requests_at_1` requests one after another; c=16: 16 clients for `seconds`, images/s (each client a
    thread with a keep-alive connection of its own, bench/loadgen.py).

    Both after a warm-up: 8 requests one by one (model load, first-call allocations, connection pools), then
    WARM_UP_SECONDS at c=16. A batching system meets each batch size's first forward pass there, which takes about
    1.5 times as long as later ones (torch sets up its kernels per input shape): 16 batch sizes would otherwise
    cost a batching system about a tenth of a 10 s measurement.
    """
    with Client(endpoint.url, endpoint.headers) as client:
        for upload in uploads[:8]:
            send(client, endpoint, upload)
        run_clients(endpoint, uploads, WARM_UP_SECONDS)
        timed = [send(client, endpoint, uploads[i % len(uploads)]) for i in range(requests_at_1)]
    latencies = sorted(latency for latency, _ in timed)
    outside = (statistics.median(latency - endpoint.model_ms(answer) for latency, answer in timed)
               if endpoint.model_ms else None)
    stages = [endpoint.stages(latency, answer) for latency, answer in timed] if endpoint.stages else []
    stage_medians = ({stage: statistics.median(split[stage] for split in stages) for stage in stages[0]}
                     if stages else {})
    parts = endpoint.processes() if endpoint.processes else {}
    cpu_before, load_before = cpu_seconds(parts), sum(psutil.Process().cpu_times()[:2])
    started = time.perf_counter()
    done = run_clients(endpoint, uploads, seconds)
    rate = done / (time.perf_counter() - started)
    cpu = {}
    if endpoint.processes:  # the processes as they are now: Postgres backends come and go
        load = sum(psutil.Process().cpu_times()[:2]) - load_before
        cpu = cpu_per_image(cpu_before, cpu_seconds(endpoint.processes()), load, done)
    return Figures(percentile(latencies, 50), percentile(latencies, 99), rate, outside, stage_medians,
                   cpu_ms_per_image=cpu)


def run_clients(endpoint: Endpoint, uploads: list[Upload], seconds: float) -> int:
    """CONCURRENCY clients sending `uploads` in turn, each its next request as soon as it has an answer, for
    `seconds`; the number of answers."""
    stop_at = time.perf_counter() + seconds

    def client_loop(offset: int) -> int:
        count = 0
        with Client(endpoint.url, endpoint.headers) as client:
            while time.perf_counter() < stop_at:
                send(client, endpoint, uploads[(offset + count) % len(uploads)])
                count += 1
        return count

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return sum(pool.map(client_loop, range(CONCURRENCY)))


def percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def measure_direct(seconds: float) -> Figures:
    """The predictor in this process (bench/classify.py's functions): one image's latency, batch-16 images/s."""
    import classify

    latency = classify.direct_latency_ms(samples=50)
    return Figures(latency, latency, classify.direct_throughput(16, seconds=seconds))


def measure_system(name: str, uploads: list[Upload], args: argparse.Namespace) -> Figures:
    if name == "direct":
        return measure_direct(min(args.seconds, 5.0))
    if name in PERCEPT_POOLS:
        with percept_endpoint(PERCEPT_POOLS[name]) as (endpoint, gateway_rss):
            figures = measure_endpoint(endpoint, uploads, args.requests, args.seconds)
            figures.gateway_rss_mb = gateway_rss()
            return figures
    with running_peer(name, free_port(), args.device) as url:
        return measure_endpoint(Endpoint(url), uploads, args.requests, args.seconds)


def run_comparison(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, list[Figures]]:
    """Every system once per run, the order reversed every other run; {system: [Figures per run]}."""
    uploads = sample_uploads()
    results: dict[str, list[Figures]] = {name: [] for name in args.systems}
    for run in range(args.runs):
        order = list(args.systems) if run % 2 == 0 else list(reversed(args.systems))
        for name in order:
            log(f"serving run {run + 1}/{args.runs}: {name}")
            figures = measure_system(name, uploads, args)
            log(f"  {name}: c=1 p50 {figures.p50_ms:.1f} ms, c={CONCURRENCY} {figures.rate_16:.1f} images/s")
            results[name].append(figures)
    return results


@dataclass
class ReuseFigures:
    first_p50_ms: float  # each JPEG's first classification: a model run
    repeat_p50_ms: float  # the same JPEGs sent again: answered from the first job
    repeat_p99_ms: float
    repeats: int
    reused: int  # repeats whose provenance.reused_from names an earlier job
    counted: float  # percept_jobs_reused_total{kind="classify"} afterwards


def measure_reuse(repeats: int) -> ReuseFigures:
    """Result reuse: `percept run` with it on (the default), every JPEG classified once, then each sent `repeats`
    more times one after another; the repeats should come back from the first job, with no model run."""
    uploads = sample_uploads()
    with running_platform("classifier", PERCEPT_RESULT_REUSE="true") as (url, key, _):
        endpoint = Endpoint(url, "/v1/classify", {"Authorization": f"Bearer {key}", "Prefer": "wait=30"},
                            percept_answer)
        with Client(url, endpoint.headers) as client:
            send(client, endpoint, Upload.of(warm_up_jpeg()))  # the model's load, not in the figures
            firsts = sorted(send(client, endpoint, upload)[0] for upload in uploads)
            timed = [send(client, endpoint, upload) for _ in range(repeats) for upload in uploads]
        scrape = httpx.get(url + "/metrics", headers=endpoint.headers, timeout=60).text
    counted = sum(float(line.rpartition(" ")[2]) for line in scrape.splitlines()
                  if line.startswith('percept_jobs_reused_total{kind="classify"'))
    latencies = sorted(latency for latency, _ in timed)
    return ReuseFigures(percentile(firsts, 50), percentile(latencies, 50), percentile(latencies, 99), len(timed),
                        sum(1 for _, job in timed if job["provenance"].get("reused_from")), counted)


def min_median(values: list[float], digits: int = 1) -> str:
    """'min / median' over the runs, as issue 13's table gives them (for a rate the min is the worst run)."""
    return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f}"


def comparison_rows(results: dict[str, list[Figures]]) -> list[list[str]]:
    """Table rows: system, c=1 p50, c=1 p99, outside the model at c=1, c=16 images/s, % of direct batch 16."""
    direct = statistics.median(f.rate_16 for f in results["direct"]) if results.get("direct") else None
    rows = []
    for name, runs in results.items():
        label = LABELS[name] + (f" {peer_version(name)}" if name in PEERS else "")
        rates = [f.rate_16 for f in runs]
        share = (f"{100 * min(rates) / direct:.0f}% / {100 * statistics.median(rates) / direct:.0f}%"
                 if direct and name != "direct" else "100%" if name == "direct" else "-")
        outside = [f.outside_model_ms for f in runs if f.outside_model_ms is not None]
        rows.append([label, min_median([f.p50_ms for f in runs]) + " ms",
                     "-" if name == "direct" else min_median([f.p99_ms for f in runs]) + " ms",
                     min_median(outside) + " ms" if outside else "-",
                     min_median(rates), share])
    return rows


def stages_summary(runs: list[Figures]) -> str:
    """'c=1 outside the model by stage (median ms): gateway and answer 10.0, queue 7.4, worker 4.5' (medians over
    the runs), '' without figures."""
    stages = list(dict.fromkeys(stage for f in runs for stage in f.outside_stages_ms))
    if not stages:
        return ""
    medians = {stage: statistics.median(f.outside_stages_ms[stage] for f in runs if stage in f.outside_stages_ms)
               for stage in stages}
    cells = [f"{stage} {value:.1f}" for stage, value in medians.items()]
    return "c=1 outside the model by stage (median ms): " + ", ".join(cells)


def cpu_summary(runs: list[Figures]) -> str:
    """'CPU per image at c=16: gateway 10.1, workers 52.0, ... ms' (medians over the runs), '' without figures."""
    parts = list(dict.fromkeys(part for f in runs for part in f.cpu_ms_per_image))
    if not parts:
        return ""
    cells = [f"{part} {statistics.median(f.cpu_ms_per_image.get(part, 0.0) for f in runs):.1f}" for part in parts]
    return "CPU per image at c=16 (median ms): " + ", ".join(cells)


COMPARISON_HEADER = ["system", "c=1 p50", "c=1 p99", "c=1 outside the model (p50)", f"c={CONCURRENCY} images/s",
                     f"c={CONCURRENCY} / direct batch 16"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=2, help="runs of every system, order reversed every other run")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of the c=16 measurement per system")
    parser.add_argument("--requests", type=int, default=60, help="sequential requests of the c=1 measurement")
    parser.add_argument("--systems", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                        default=list(SYSTEMS), help=f"comma separated, of {', '.join(SYSTEMS)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    add_arguments(parser)
    args = parser.parse_args()
    apply_device(parser, args.device)
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    results = run_comparison(args, lambda line: print(line, file=sys.stderr, flush=True))
    print(markdown_table(COMPARISON_HEADER, comparison_rows(results)))
    for name, runs in results.items():
        if summary := "; ".join(part for part in (stages_summary(runs), cpu_summary(runs)) if part):
            print(f"{LABELS[name]}: {summary}")


if __name__ == "__main__":
    main()
