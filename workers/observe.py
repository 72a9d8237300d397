"""What a worker shows its orchestrator and Prometheus, on PERCEPT_WORKER_HTTP_PORT (0: nothing is served):

- `GET /healthz`: 200 while the worker's main process answers (liveness).
- `GET /readyz`: 200 once the Celery consumer is up (`worker_ready`) and every pool process has loaded the
  default built-in models of the job kinds the pool serves (the warm-up, PERCEPT_WORKER_WARM_UP); before,
  503 with the reason. A model that fails to load is logged and tried again (WARM_UP_RETRY_SECONDS): the worker
  stays up, serves its jobs (they load their models as they come) and stays unready until it loads.
- `GET /metrics`: Prometheus text (`Authorization: Bearer` PERCEPT_METRICS_TOKEN when that is set).

Celery's prefork pool runs jobs in child processes, so the metrics use prometheus_client's multiprocess mode,
in a directory made for this worker before the pool forks (`prepare`); each pool process also writes its
warm-up state there (`pool-<pid>.json`), which the main process's /readyz reads.
"""

import ast
import hmac
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)

from percept.config import Settings
from percept.db import registry
from percept.db.session import session_scope
from percept.services import JobKind

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

    from percept.db.models import Model
    from workers.model_cache import ModelSource
    from workers.runtime import JobRuntime

log = logging.getLogger(__name__)

METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it when it makes a metric
# A model loads in 10 ms (the tests' tiny ones) to minutes (an SDXL pipeline from network storage).
LOAD_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
WARM_UP_RETRY_SECONDS = (5, 10, 30, 60)  # after each failed attempt; the last one repeats
# Built-in models have no tenant and no tenant has this id: the registry's lookups for it see the built-ins only.
BUILTIN_ONLY = ""


@dataclass
class _Worker:
    """This worker's observable state (the main process's; a pool process inherits it at the fork)."""

    state_dir: Path | None = None
    main_pid: int = 0
    warm_up: bool = False
    consumer_ready: threading.Event | None = None
    server: ThreadingHTTPServer | None = None


_worker = _Worker()


# 1. Metrics (made on first use: the multiprocess directory must be set before)
@dataclass(frozen=True)
class WorkerMetrics:
    model_load: "Histogram"
    gpu_memory: "Gauge"
    jobs_running: "Gauge"
    early_reads: "Counter"


@cache
def metrics() -> WorkerMetrics:
    from prometheus_client import Counter, Gauge, Histogram

    # Not in the default registry: /metrics collects every process's files (or, with no directory, nothing).
    return WorkerMetrics(
        model_load=Histogram("percept_model_load_seconds", "Time to load a model into a worker process "
                             "(fetch its artifact, set up the predictor), by model and device",
                             ["model", "device"], buckets=LOAD_SECONDS_BUCKETS, registry=None),
        gpu_memory=Gauge("percept_gpu_memory_bytes", "GPU memory the worker's processes hold, by device; "
                         "allocated: by tensors, reserved: by the framework's caching allocator",
                         ["device", "kind"], multiprocess_mode="livesum", registry=None),
        jobs_running=Gauge("percept_worker_jobs_running", "Jobs the worker is running now (each job of a "
                           "micro-batch counts)", multiprocess_mode="livesum", registry=None),
        early_reads=Counter("percept_worker_early_reads_total", "Jobs whose images were read before their claim, "
                            "from the keys the task message named, by kind: taken (the claim agreed) or read again "
                            "(other keys, or the model needed another size)", ["kind", "outcome"], registry=None))


def model_label(source: "ModelSource") -> str:
    """A built-in model's `name:version`; tenants' own models (loaded from an artifact) share one label per
    predictor class, so the series stay as few as the classes."""
    if source.artifact is None:
        return f"{source.name}:{source.version}"
    return "own:" + source.predictor.rpartition(":")[2]


def model_loaded(source: "ModelSource", device: str, seconds: float) -> None:
    """Called by the model cache when it has loaded a model (`device` as ModelInfo says: "cuda:0 (NVIDIA ...)")."""
    metrics().model_load.labels(model_label(source), device.partition(" ")[0]).observe(seconds)
    sample_gpu_memory()


def early_read(kind: str, taken: bool) -> None:
    """Called by the runtime for each job it had begun reading early (workers.runtime.EarlyRead)."""
    metrics().early_reads.labels(kind, "taken" if taken else "read_again").inc()


def sample_gpu_memory() -> None:
    """What this process holds on each GPU, if it uses one. The worker runtime imports no framework: torch is
    looked at only once a predictor has imported it, and CUDA only once that process has started it (starting
    it here, in the parent of a prefork pool, would break the children it forks)."""
    torch: Any = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    gauge = metrics().gpu_memory
    for index in range(torch.cuda.device_count()):
        gauge.labels(f"cuda:{index}", "allocated").set(torch.cuda.memory_allocated(index))
        gauge.labels(f"cuda:{index}", "reserved").set(torch.cuda.memory_reserved(index))


def prepare(settings: Settings) -> Path | None:
    """In the worker's main process, before anything forks: this worker's metrics and pool-state directory,
    when the HTTP endpoint is on (None otherwise). `cleanup` removes it."""
    _worker.main_pid, _worker.warm_up = os.getpid(), settings.worker_warm_up
    if not settings.worker_http_port:
        return None
    _worker.state_dir = Path(tempfile.mkdtemp(prefix="percept-worker-"))
    # prometheus_client and the pool's processes read it from the environment.
    os.environ[METRICS_DIR_VARIABLE] = str(_worker.state_dir)
    if "prometheus_client" in sys.modules:  # imported before: its metrics would keep their values in memory
        from prometheus_client import values

        values.ValueClass = values.get_value_class()
    metrics.cache_clear()
    return _worker.state_dir


def cleanup() -> None:
    if _worker.server is not None:
        _worker.server.shutdown()
        _worker.server.server_close()
    if _worker.state_dir is not None:
        shutil.rmtree(_worker.state_dir, ignore_errors=True)


# 2. Readiness: the consumer (main process) and each pool process's warm-up (its state file)
def _state_file(pid: int) -> Path | None:
    return _worker.state_dir / f"pool-{pid}.json" if _worker.state_dir is not None else None


def _write_state(models: dict[str, str], done: bool) -> None:
    """This pool process's warm-up: each model `loading`, `loaded` or why it failed; written whole (rename)."""
    path = _state_file(os.getpid())
    if path is None:
        return
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps({"pid": os.getpid(), "done": done, "models": models}))
    partial.replace(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pool_states() -> list[dict[str, Any]]:
    """The state of each live pool process; a dead one's file (and its live-gauge values) are dropped."""
    from prometheus_client import multiprocess

    states = []
    assert _worker.state_dir is not None
    for path in sorted(_worker.state_dir.glob("pool-*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _alive(state["pid"]):
            states.append(state)
        else:
            path.unlink(missing_ok=True)
            multiprocess.mark_process_dead(state["pid"], str(_worker.state_dir))
    return states


def readiness() -> tuple[bool, dict[str, Any]]:
    """(ready, what /readyz answers)."""
    if _worker.consumer_ready is None or not _worker.consumer_ready.is_set():
        return False, {"status": "starting", "reason": "the Celery consumer is not up yet"}
    if not _worker.warm_up:
        return True, {"status": "ready"}
    states = _pool_states()
    if not states:
        return False, {"status": "warming_up", "reason": "no pool process has started its warm-up yet"}
    models = {name: status for state in states for name, status in state["models"].items()}
    waiting = {name: status for name, status in models.items() if status != "loaded"}
    if waiting or not all(state["done"] for state in states):
        reason = "; ".join(f"{name}: {status}" for name, status in waiting.items()) or "warming up"
        return False, {"status": "warming_up", "reason": reason, "models": models}
    return True, {"status": "ready", "models": models}


# 3. Warm-up, in each pool process: the first job of each kind finds its default model loaded
def default_models(database_url: str, kinds: list[JobKind]) -> tuple[list["Model"], dict[str, str]]:
    """The registry rows of the served kinds' default built-in models (their latest versions, as the gateway
    resolves a request that names none), and the names it does not have, with why."""
    rows: dict[int, Model] = {}
    missing = {}
    with session_scope(database_url) as session:
        for kind in kinds:
            if kind.default_model is None or kind.trainer is not None or kind.fan_out is not None:
                continue
            versions = [m for m in registry.model_versions(session, BUILTIN_ONLY, kind.default_model)
                        if m.kind == kind.serves]
            if versions:
                rows.setdefault(versions[-1].id, versions[-1])
            else:
                missing[kind.default_model] = "not in the registry (has `percept migrate` run?)"
    return list(rows.values()), missing


def warm_up(runtime: "JobRuntime", kinds: list[JobKind]) -> None:
    """Load the default models through the runtime's own path (its model cache and registry record), until
    each has loaded; a failure is logged and tried again later, the worker serving meanwhile."""
    attempt, loaded = 0, set()
    while True:
        models: dict[str, str] = {}
        try:
            rows, missing = default_models(runtime.infra.database_url, kinds)
        except Exception as exc:  # the database is away: nothing to load yet
            rows, missing = [], {"registry": f"not read ({exc.__class__.__name__}: {exc})"[:300]}
            log.warning("warm-up: could not read the registry (%s); trying again", exc.__class__.__name__)
        for row in rows:
            name = f"{row.name}:{row.version}"
            if row.id not in loaded:
                models[name] = "loading"
                _write_state({**models, **missing}, done=False)
                try:
                    runtime._load_model(row)
                except Exception as exc:
                    log.exception("warm-up: loading %s failed; the worker stays unready and tries again", name)
                    models[name] = f"failed to load ({exc.__class__.__name__}: {exc})"[:300]
                    continue
                loaded.add(row.id)
            models[name] = "loaded"
        for name, why in missing.items():
            log.error("warm-up: model %s is %s; the worker stays unready", name, why)
        models.update(missing)
        done = all(status == "loaded" for status in models.values())
        _write_state(models, done=done)
        sample_gpu_memory()
        if done:
            if models:
                log.info("warm-up: %s loaded", ", ".join(models))
            return
        time.sleep(WARM_UP_RETRY_SECONDS[min(attempt, len(WARM_UP_RETRY_SECONDS) - 1)])
        attempt += 1


# 4. Celery's own lines: through our handler, with the job they are about
class CeleryTaskFields(logging.Filter):
    """Celery's task lines ("Task percept.classify[...] received", "... succeeded in 0.1s") pass the task's
    name and arguments as `data`: every Percept task's argument is a job id, and its name says the kind."""

    def __init__(self, kinds_by_task: dict[str, str]) -> None:
        super().__init__()
        self.kinds_by_task = kinds_by_task

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        if isinstance(data, dict) and not hasattr(record, "job_id"):
            job_id = _first_argument(data.get("args"))
            if job_id:
                record.job_id = job_id
                if kind := self.kinds_by_task.get(str(data.get("name"))):
                    record.kind = kind
        return True


def _first_argument(args: object) -> str | None:
    """The job id in Celery's repr of a task's arguments (`"['job_01...']"`)."""
    try:
        values = ast.literal_eval(args) if isinstance(args, str) else args
    except (ValueError, SyntaxError):
        return None
    if isinstance(values, list | tuple) and values and isinstance(values[0], str):
        return values[0]
    return None


# 5. The endpoint
class _Endpoints(BaseHTTPRequestHandler):
    metrics_token: str | None = None

    def do_GET(self) -> None:  # noqa: N802  # http.server's name
        path = self.path.partition("?")[0]
        if path == "/healthz":
            self._answer(200, {"status": "alive"})
        elif path == "/readyz":
            ready, body = readiness()
            self._answer(200 if ready else 503, body)
        elif path == "/metrics":
            self._metrics()
        else:
            self._answer(404, {"error": {"code": "not_found", "message": "GET /healthz, /readyz or /metrics"}})

    def _metrics(self) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

        if self.metrics_token and not hmac.compare_digest(self.headers.get("Authorization", ""),
                                                          f"Bearer {self.metrics_token}"):
            self._answer(401, {"error": {"code": "unauthorized", "message": "GET /metrics wants the metrics token"}})
            return
        assert _worker.state_dir is not None
        _pool_states()  # forget dead pool processes' live gauges first
        collected = CollectorRegistry()
        multiprocess.MultiProcessCollector(collected, path=str(_worker.state_dir))
        self._send(200, CONTENT_TYPE_LATEST, generate_latest(collected))

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, "application/json", json.dumps(body).encode())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  # probes come every few seconds
        pass


def serve(settings: Settings) -> ThreadingHTTPServer | None:
    """Serve the endpoint from the main process (a daemon thread) on PERCEPT_HOST:PERCEPT_WORKER_HTTP_PORT.

    A port that cannot be had is logged, and the worker runs on without its endpoint: its jobs go on, and the
    orchestrator's probes, which get no answer, say that something is wrong."""
    _Endpoints.metrics_token = settings.metrics_token
    try:
        server = ThreadingHTTPServer((settings.host, settings.worker_http_port), _Endpoints)
    except OSError as exc:
        log.error("worker endpoint not started on %s:%d: %s", settings.host, settings.worker_http_port, exc)
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="worker-http", daemon=True).start()
    _worker.server = server
    log.info("worker endpoint on http://%s:%d (/healthz, /readyz, /metrics)", settings.host, settings.worker_http_port)
    return server


# 6. Wiring, from create_worker_app
def install(app: Celery, kinds: list[JobKind], runtime: Callable[[], "JobRuntime"]) -> None:
    """Connect the worker's signals: Celery's logging left to ours, readiness, warm-up and job metrics."""
    _worker.consumer_ready = threading.Event()
    running: dict[str, int] = {}  # task id -> its jobs, in this process

    @setup_logging.connect(weak=False)
    def _logging_is_ours(**_: Any) -> None:
        # A receiver here makes Celery add no handler of its own (root, celery.task, multiprocessing) whatever
        # --loglevel says: configure_logging's one handler gets every line. Celery then leaves stdout alone;
        # a library's print() still becomes a log line (one JSON object in JSON mode), as Celery would do it.
        if app.conf.worker_redirect_stdouts:
            app.log.redirect_stdouts(app.conf.worker_redirect_stdouts_level)

    @worker_ready.connect(weak=False)
    def _consumer_up(**_: Any) -> None:
        assert _worker.consumer_ready is not None
        _worker.consumer_ready.set()

    @worker_process_init.connect(weak=False)
    def _pool_process_started(**_: Any) -> None:
        # After create_worker_app's own handler (signals run in the order connected): the runtime is this
        # process's. A prefork child is a fork of the main process: the endpoint's socket is not its to hold.
        if os.getpid() != _worker.main_pid and _worker.server is not None:
            _worker.server.socket.close()
        _write_state({}, done=not _worker.warm_up)
        if _worker.warm_up:
            # A thread: Celery kills a pool child that is not up within 4 s, and a model can take minutes. The
            # model cache's lock makes a first job that comes meanwhile wait for the load, not load it again.
            threading.Thread(target=warm_up, args=(runtime(), kinds), name="warm-up", daemon=True).start()

    @worker_process_shutdown.connect(weak=False)
    def _pool_process_ends(pid: int | None = None, **_: Any) -> None:
        path = _state_file(pid or os.getpid())
        if path is not None:
            path.unlink(missing_ok=True)
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid or os.getpid(), str(_worker.state_dir))

    @task_prerun.connect(weak=False)
    def _job_starts(task_id: str = "", args: tuple[Any, ...] = (), **_: Any) -> None:
        # A micro-batch task's one argument is the list of its requests.
        running[task_id] = len(args[0]) if args and isinstance(args[0], list) else 1
        metrics().jobs_running.inc(running[task_id])

    @task_postrun.connect(weak=False)
    def _job_ends(task_id: str = "", **_: Any) -> None:
        metrics().jobs_running.dec(running.pop(task_id, 0))
        sample_gpu_memory()
