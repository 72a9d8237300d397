"""The chaos suite's one implementation, run small by tests/test_chaos.py and in full by bench/chaos.py.

`percept run` (its supervisor restarts what dies) with several workers per service; concurrent clients submit a
planned mix of jobs through the API, with Idempotency-Keys, honouring 503/429 Retry-After, and long-poll each
job to its end; meanwhile the fault injector SIGKILLs random worker processes and the embedded Redis and
Postgres (the supervisor brings them back). Then it audits what really happened, from the database:

- every job ended (none left queued or running: "lost");
- each job's end was written exactly once: a trigger installed on the real `jobs` table appends a row to
  `chaos_job_writes` each time a job's status becomes terminal or a terminal job's output or error changes;
- no output duplicated: face embeddings per enrollment, generated images per generation, registered models per
  import or training;
- webhooks: after dedup by delivery id, exactly one delivery per job end, with the right event;
- every HTTP status the clients saw: never a 5xx other than 503, and every 503 with Retry-After.

`ChaosReport.problems()` lists what broke a promise; `ChaosReport.table()` prints the figures.
"""

import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psutil
from PIL import Image, ImageOps
from sqlalchemy import text

from percept.db.session import get_engine, session_scope
from percept.db.tenants import create_key

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = ("succeeded", "failed", "canceled")
NO_ANSWER = "no answer"
OWN_MODEL_KINDS = ("caption", "generate", "train_classifier")  # need a model or dataset of the first tenant's
# Short clocks, as the tests use: a killed worker's job is taken back within seconds, an unsent one re-sent.
CLOCKS = {"PERCEPT_JOB_LEASE": "3", "PERCEPT_SWEEP_INTERVAL": "0.5", "PERCEPT_REQUEUE_AFTER": "3",
          "PERCEPT_WEBHOOK_RETRY_BASE": "0.3", "PERCEPT_WEBHOOK_MAX_ATTEMPTS": "8",
          "PERCEPT_WEBHOOK_ALLOW": "127.0.0.0/8", "PERCEPT_RESULT_REUSE": "false",
          "PERCEPT_MAX_PENDING_JOBS_PER_TENANT": "10000", "PERCEPT_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}
WAIT_SECONDS = 20  # each long-poll (Prefer: wait=N)
RETRY_AFTER_CAP = 1.0  # a client honours Retry-After, but polls a restarting dependency at least this often

AUDIT_SQL = """
CREATE TABLE IF NOT EXISTS chaos_job_writes (
    id bigserial PRIMARY KEY, job_id varchar(40) NOT NULL, status text NOT NULL, has_output boolean NOT NULL,
    written_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE OR REPLACE FUNCTION chaos_audit_job_write() RETURNS trigger AS $$
BEGIN
    IF NEW.status::text IN ('succeeded', 'failed', 'canceled') AND (TG_OP = 'INSERT'
            OR OLD.status IS DISTINCT FROM NEW.status OR OLD.output IS DISTINCT FROM NEW.output
            OR OLD.error IS DISTINCT FROM NEW.error) THEN
        INSERT INTO chaos_job_writes (job_id, status, has_output)
        VALUES (NEW.id, NEW.status::text, NEW.output IS NOT NULL);
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS chaos_audit_job_write ON jobs;
CREATE TRIGGER chaos_audit_job_write AFTER INSERT OR UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION chaos_audit_job_write();
"""


@dataclass
class ChaosPlan:
    jobs: int = 100
    clients: int = 16
    # `percept run --workers`: a pool named twice runs twice
    workers: tuple[str, ...] = ("classifier", "classifier", "facerec", "facerec")
    # Job kinds and their share of the jobs; `generate`, `caption` and `train_classifier` need the workers of
    # their services (and set up a tiny model first).
    mix: dict[str, float] = field(default_factory=lambda: {"classify": 0.55, "faces_detect": 0.2,
                                                           "faces_identify": 0.15, "faces_enroll": 0.1})
    trainings: int = 0  # train_classifier jobs (added to `jobs`)
    worker_kills: int = 2
    redis_restarts: int = 1
    postgres_restarts: int = 0
    tenants: int = 4
    seed: int = 0
    job_timeout: float = 150  # a job not ended this long after its submission is lost
    env: dict[str, str] = field(default_factory=dict)  # more settings for every process


@dataclass
class JobRecord:
    kind: str
    tenant: int
    submitted_at: float  # monotonic, first attempt
    id: str | None = None
    status: str = "unsubmitted"
    error_code: str | None = None
    ended_at: float | None = None
    submit_attempts: int = 0
    detail: str = ""
    probe: bool = False  # submitted by the fault injector right after a fault, to time the recovery


@dataclass
class Fault:
    what: str  # kill worker | restart redis | restart postgres
    target: str
    at: float  # seconds into the run
    back_after: float | None = None  # the process is running again (new pid; a server answers)
    recovered_after: float | None = None  # jobs flow again: the killed worker's jobs ended, or a probe job succeeded
    held_jobs: int = 0


@dataclass
class Response:
    at: float
    method: str
    route: str
    status: int  # 0: no HTTP answer (connection refused or reset)
    retry_after: str | None


@dataclass
class ChaosReport:
    plan: ChaosPlan
    jobs: list[JobRecord]
    responses: list[Response]
    faults: list[Fault]
    writes: dict[str, int]  # job id -> terminal writes
    statuses: dict[str, str]  # job id -> status in the database at the end
    duplicated_outputs: list[str]
    deliveries: dict[str, list[tuple[str, str]]]  # job id -> [(delivery id, event)] as received (with repeats)
    stray_jobs: list[str]  # rows of the tenants' that no client was answered with
    wall_seconds: float
    restarts: dict[str, float] = field(default_factory=dict)  # percept_process_restarts_total, at the end

    def submitted(self) -> list[JobRecord]:
        return [job for job in self.jobs if job.id is not None]

    def lost(self) -> list[JobRecord]:
        return [job for job in self.submitted() if self.statuses.get(job.id or "") not in TERMINAL]

    def duplicated(self) -> list[str]:
        return [job_id for job_id, count in self.writes.items() if count > 1] + self.duplicated_outputs

    def latencies(self) -> list[float]:
        return sorted(job.ended_at - job.submitted_at for job in self.submitted() if job.ended_at is not None)

    def problems(self) -> list[str]:
        found = []
        unsubmitted = [job for job in self.jobs if job.id is None]
        if unsubmitted:
            found.append(f"{len(unsubmitted)} jobs never accepted: {[j.detail for j in unsubmitted[:5]]}")
        if self.lost():
            found.append(f"lost (not ended): {[(j.id, self.statuses.get(j.id or '')) for j in self.lost()[:10]]}")
        for job in self.submitted():
            assert job.id is not None
            if self.writes.get(job.id, 0) != 1 and self.statuses.get(job.id) in TERMINAL:
                found.append(f"job {job.id} ({job.kind}) ended with {self.writes.get(job.id, 0)} writes")
        found += [f"duplicated output: {what}" for what in self.duplicated_outputs]
        if self.stray_jobs:
            found.append(f"job rows no client was answered with: {self.stray_jobs[:10]}")
        for job in self.submitted():
            assert job.id is not None
            received = self.deliveries.get(job.id, [])
            distinct = {delivery for delivery, _ in received}
            events = {event for _, event in received}
            status = self.statuses.get(job.id)
            if status in TERMINAL and (len(distinct) != 1 or events != {f"job.{status}"}):
                found.append(f"job {job.id} ({status}): webhook deliveries {sorted(distinct)} events {sorted(events)}")
        bad = [r for r in self.responses if r.status >= 500 and r.status != 503]
        if bad:
            found.append(f"{len(bad)} 5xx answers other than 503: {Counter((r.route, r.status) for r in bad)}")
        bare = [r for r in self.responses if r.status == 503 and not r.retry_after]
        if bare:
            found.append(f"{len(bare)} 503 answers without Retry-After: {Counter(r.route for r in bare)}")
        for fault in self.faults:
            if fault.recovered_after is None:
                found.append(f"no recovery after {fault.what} {fault.target} at {fault.at:.1f} s")
        return found

    def table(self) -> str:
        submitted = self.submitted()
        by_status = Counter(self.statuses.get(job.id or "", "lost") for job in submitted)
        failed = Counter(job.error_code or "?" for job in submitted
                         if self.statuses.get(job.id or "") in ("failed", "canceled"))
        latencies = self.latencies()

        def quantile(q: float) -> str:
            if not latencies:
                return "-"
            return f"{latencies[min(len(latencies) - 1, int(q * len(latencies)))]:.2f} s"

        kinds = Counter(job.kind for job in submitted if not job.probe)
        probes = sum(1 for job in submitted if job.probe)
        codes = Counter(r.status for r in self.responses)
        with_retry = sum(1 for r in self.responses if r.status == 503 and r.retry_after)
        ours = [self.deliveries.get(job.id or "", []) for job in submitted]
        deliveries = sum(len(v) for v in ours)
        distinct = sum(len({d for d, _ in v}) for v in ours)
        lines = [
            f"chaos: {self.plan.jobs + self.plan.trainings} jobs from {self.plan.clients} clients, workers "
            f"{','.join(self.plan.workers)}; {len(self.faults)} faults; {self.wall_seconds:.0f} s",
            f"  kinds        {', '.join(f'{kind} {n}' for kind, n in sorted(kinds.items()))}"
            f"{f', and {probes} classify probes after the faults' if probes else ''}",
            "",
            "| submitted | succeeded | failed (by code) | lost | duplicated | p50 latency | p99 latency |",
            "|---|---|---|---|---|---|---|",
            f"| {len(submitted)} | {by_status['succeeded']} | "
            f"{sum(failed.values())}{' (' + ', '.join(f'{c} {n}' for c, n in failed.items()) + ')' if failed else ''}"
            f" | {len(self.lost())} | {len(self.duplicated())} | {quantile(0.5)} | {quantile(0.99)} |",
            "",
            "| fault | at | back after | jobs flowing after |",
            "|---|---|---|---|",
        ]
        for fault in self.faults:
            flowing = (f"{fault.recovered_after:.1f} s" if fault.recovered_after is not None else "never")
            if fault.what == "kill worker":
                flowing += f" ({fault.held_jobs} held job{'s' if fault.held_jobs != 1 else ''} ended)"
            back = f"{fault.back_after:.1f} s" if fault.back_after is not None else "never"
            lines.append(f"| {fault.what} {fault.target} | {fault.at:.1f} s | {back} | {flowing} |")
        refused = Counter(job.detail.split(" ", 1)[0] or "no answer" for job in self.jobs if job.id is None)
        lines += [
            "",
            *([f"  not accepted {', '.join(f'{why} x{n}' for why, n in refused.items())}"] if refused else []),
            f"  HTTP answers {', '.join(f'{code or NO_ANSWER} x{n}' for code, n in sorted(codes.items()))}"
            f" (503 with Retry-After: {with_retry})",
            f"  job writes   {sum(self.writes.values())} terminal writes for {len(submitted)} jobs",
            f"  webhooks     {distinct} deliveries after dedup by delivery id ({deliveries} received) for "
            f"{sum(1 for job in submitted if self.statuses.get(job.id or '') in TERMINAL)} job ends",
            f"  restarts     {', '.join(f'{name} {n:g}' for name, n in sorted(self.restarts.items()) if n)}"
            " (percept_process_restarts_total)",
        ]
        return "\n".join(lines)


# --- inputs -------------------------------------------------------------------------------------------------

def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@dataclass
class Inputs:
    photos: list[bytes]  # for classify
    face: bytes  # one large face: enrollment
    faces: list[bytes]  # for detect and identify

    @classmethod
    def make(cls) -> "Inputs":
        from skimage import data

        pictures = [Image.fromarray(data.coffee()), Image.fromarray(data.chelsea()), Image.fromarray(data.rocket()),
                    Image.fromarray(data.astronaut())]
        photos = [_jpeg(ImageOps.mirror(p) if i % 2 else p.resize((p.width * 3 // 4, p.height * 3 // 4)))
                  for i, p in enumerate(pictures * 2)]
        astronaut = Image.fromarray(data.astronaut())
        faces = [_png(astronaut), _png(ImageOps.mirror(astronaut).resize((384, 384))), _jpeg(astronaut)]
        return cls(photos, _png(astronaut), faces)


# --- the platform ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningPlatform:
    """`percept run` in a data dir of its own, seen from outside: its URL, its processes, its database."""

    data_dir: Path
    url: str
    run: subprocess.Popen
    log_path: Path

    def log_tails(self, chars: int = 2500) -> str:
        """The end of `percept run`'s output and of each process's log: what a failure message should carry, since
        the data dir (and its logs) goes with the platform."""
        logs = [self.log_path, *sorted((self.data_dir / "logs").glob("*.log"))]
        return "\n".join(f"--- {log.name}:\n{log.read_text(errors='replace')[-chars:]}" for log in logs if log.exists())

    @property
    def database_url(self) -> str:
        lines = (self.data_dir / "postgres" / "postmaster.pid").read_text().splitlines()
        return f"postgresql+psycopg://postgres@/postgres?host={lines[4].strip()}"

    def processes(self) -> dict[str, list[int]]:
        """pids by role: worker pools by name (workers named twice give two pids), gateway, redis, postgres."""
        found: dict[str, list[int]] = defaultdict(list)
        for child in psutil.Process(self.run.pid).children():
            try:
                command = child.cmdline()
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                continue
            if command and "redis-server" in command[0]:  # redis sets its title: "redis-server unixsocket:..."
                found["redis"].append(child.pid)
            elif command[-2:] == ["percept.cli", "gateway"]:
                found["gateway"].append(child.pid)
            elif len(command) >= 4 and command[1:3] == ["-m", "workers"]:
                found[f"worker-{command[3]}"].append(child.pid)
        try:
            found["postgres"].append(int((self.data_dir / "postgres" / "postmaster.pid").read_text().split()[0]))
        except (OSError, IndexError, ValueError):
            pass
        return dict(found)

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/readyz", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    def restart_counts(self) -> dict[str, float]:
        text_ = httpx.get(self.url + "/metrics", timeout=30).text
        return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text_.splitlines()
                if line.startswith("percept_process_restarts_total{")}


@contextmanager
def running_platform(workers: tuple[str, ...], env: dict[str, str], keep: Path | None = None
                     ) -> Iterator[RunningPlatform]:
    """`percept run --workers ...` with `env`, ready; stopped (Ctrl-C) and its data removed at the end (kept
    under `keep` if given)."""
    data_dir = Path(tempfile.mkdtemp(prefix="percept-chaos-")) if keep is None else keep
    port = _free_port()
    full_env = {**os.environ, **CLOCKS, **env, "PERCEPT_DATA_DIR": str(data_dir), "PORT": str(port)}
    for name in ("PERCEPT_DATABASE_URL", "PERCEPT_BROKER_URL", "PERCEPT_STORAGE_URL"):
        full_env.pop(name, None)
    log_path = data_dir.parent / f"{data_dir.name}-run.log"
    with log_path.open("wb") as log:
        run = subprocess.Popen([sys.executable, "-m", "percept.cli", "run", "--workers", ",".join(workers)],
                               env=full_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    platform = RunningPlatform(data_dir, f"http://127.0.0.1:{port}", run, log_path)
    try:
        deadline = time.monotonic() + 240
        while not platform.ready():
            if run.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"percept run did not become ready: {log_path.read_text()[-2000:]}")
            time.sleep(0.3)
        yield platform
    finally:
        os.killpg(run.pid, signal.SIGINT)
        try:
            run.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
        get_engine.cache_clear()
        if keep is None:
            shutil.rmtree(data_dir, ignore_errors=True)


# --- webhooks -------------------------------------------------------------------------------------------------

class WebhookReceiver:
    """A local HTTP server that takes every delivery (200) and records its delivery id, job and event."""

    def __init__(self) -> None:
        self.received: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    receiver.received[body["job"]["id"]].append((self.headers["Percept-Delivery"], body["event"]))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the run --------------------------------------------------------------------------------------------------

class Chaos:
    def __init__(self, plan: ChaosPlan, platform: RunningPlatform, log: Callable[[str], None]) -> None:
        self.plan, self.platform, self.log = plan, platform, log
        self.rng = random.Random(plan.seed)
        self.inputs = Inputs.make()
        self.started = time.monotonic()
        self.responses: list[Response] = []
        self.records: list[JobRecord] = []
        self.begun = 0  # jobs the clients have started to submit
        self.setup_job_ids: list[str] = []
        self.lock = threading.Lock()
        self.keys: list[str] = []
        self.tenant_ids: list[str] = []
        self.subjects: list[list[str]] = []  # per tenant, subject names not enrolled yet
        self.models: dict[str, str] = {}  # kind -> the tiny model's name, for the kinds that need one
        self.dataset: dict[int, str] = {}  # tenant -> dataset id for training
        self.trained_names: list[tuple[int, str]] = []
        self.faults: list[Fault] = []
        self.receiver = WebhookReceiver()

    def now(self) -> float:
        return time.monotonic() - self.started

    # 1. Set up: the audit trigger, tenants with webhooks, collections, the tiny models the mix needs

    def set_up(self) -> None:
        with get_engine(self.platform.database_url).begin() as connection:
            connection.execute(text(AUDIT_SQL))
        with session_scope(self.platform.database_url) as session:
            for index in range(self.plan.tenants):
                tenant, key = create_key(session, f"chaos-{index}-{uuid.uuid4().hex[:6]}")
                self.keys.append(key)
                self.tenant_ids.append(tenant.id)
            session.commit()
        enrollments = round(self.plan.jobs * self.plan.mix.get("faces_enroll", 0))
        for index, key in enumerate(self.keys):
            with self.client(key) as api:
                self.checked(api.post("/v1/webhooks", json={"url": self.receiver.url}), 201)
                self.checked(api.post("/v1/collections", json={"name": "crew"}), 201)
                names = [f"person-{index}-{n}" for n in range(enrollments)]  # enough whichever tenant asks
                for name in names:
                    self.checked(api.post("/v1/collections/crew/subjects", json={"name": name}), 201)
                self.subjects.append(names)
        with self.client(self.keys[0]) as api:
            if "caption" in self.plan.mix:
                self.models["caption"] = self.import_model(api, "caption", "tiny-captioner", _tiny_captioner_zip())
            if "generate" in self.plan.mix:
                self.models["generate"] = self.import_model(api, "text-to-image", "tiny-sd", _tiny_pipeline_zip())
        if self.plan.trainings:
            with self.client(self.keys[0]) as api:
                dataset = self.checked(api.post("/v1/datasets", files={"file": ("shapes.zip", _shapes_zip())},
                                                data={"name": "shapes"}), 202)
                deadline = time.monotonic() + 180
                while dataset["status"] == "analyzing" and time.monotonic() < deadline:
                    time.sleep(0.5)
                    dataset = self.checked(api.get(f"/v1/datasets/{dataset['id']}"), 200)
                if dataset["status"] != "ready":
                    raise RuntimeError(f"the training dataset was not analysed: {dataset}")
                self.dataset[0] = dataset["id"]

    def import_model(self, api: httpx.Client, kind: str, name: str, archive: bytes) -> str:
        job = self.checked(api.post("/v1/models/import", files={"file": ("model.zip", archive, "application/zip")},
                                    data={"kind": kind, "name": name}, headers={"Prefer": "wait=60"}), 201, 202)
        job = self.finished(api, job["id"], 300)
        if job["status"] != "succeeded":
            raise RuntimeError(f"importing {name} failed: {job['error']}")
        self.setup_job_ids.append(job["id"])
        return name

    def checked(self, answer: httpx.Response, *expected: int) -> dict:
        if answer.status_code not in expected:
            raise RuntimeError(f"{answer.request.method} {answer.request.url.path}: {answer.status_code} "
                               f"{answer.text[:300]}")
        return answer.json()

    def finished(self, api: httpx.Client, job_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.checked(api.get(f"/v1/jobs/{job_id}", headers={"Prefer": f"wait={WAIT_SECONDS}"}), 200)
            if job["status"] in TERMINAL or time.monotonic() > deadline:
                return job

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.platform.url, headers={"Authorization": f"Bearer {key}"},
                            timeout=WAIT_SECONDS + 30)

    # 2. Warm up: one job of each kind, so model loading is not what the faults interrupt first

    def warm_up(self) -> None:
        with self.client(self.keys[0]) as api:
            for kind in self.plan.mix:
                if kind in ("faces_enroll", "train_classifier"):
                    continue
                job = self.submit_and_wait(api, JobRecord(kind, 0, time.monotonic()), keep=False)
                if job.status != "succeeded":
                    raise RuntimeError(f"warm-up {kind} job did not succeed: {job}\n{self.platform.log_tails()}")
                self.setup_job_ids.append(job.id or "")

    # 3. The clients

    def plan_jobs(self) -> list[JobRecord]:
        kinds = list(self.plan.mix)
        weights = [self.plan.mix[k] for k in kinds]
        counts = {kind: int(self.plan.jobs * w / sum(weights)) for kind, w in zip(kinds, weights, strict=True)}
        counts[kinds[0]] += self.plan.jobs - sum(counts.values())
        planned = [kind for kind, n in counts.items() for _ in range(n)]
        self.rng.shuffle(planned)
        # Trainings early enough to be running while faults land
        for i in range(self.plan.trainings):
            planned.insert(min(len(planned), self.plan.jobs // 5 * (i + 1)), "train_classifier")
        # The imported models and the training dataset are the first tenant's (tenant-private)
        return [JobRecord(kind, 0 if kind in OWN_MODEL_KINDS else i % self.plan.tenants, 0.0)
                for i, kind in enumerate(planned)]

    def request(self, api: httpx.Client, record: JobRecord) -> httpx.Request:
        kind, tenant = record.kind, record.tenant
        photo = self.rng.choice(self.inputs.photos)
        if kind == "classify":
            return api.build_request("POST", "/v1/classify", files={"image": ("photo.jpg", photo)},
                                     data={"top_k": "3"})
        if kind == "faces_detect":
            return api.build_request("POST", "/v1/faces/detect", files={"image": ("face.png",
                                                                                  self.rng.choice(self.inputs.faces))})
        if kind == "faces_identify":
            return api.build_request("POST", "/v1/faces/identify",
                                     files={"image": ("face.png", self.rng.choice(self.inputs.faces))},
                                     data={"collection": "crew"})
        if kind == "faces_enroll":
            with self.lock:
                subject = self.subjects[tenant].pop()
            return api.build_request("POST", f"/v1/collections/crew/subjects/{subject}/faces",
                                     files={"image": ("face.png", self.inputs.face)})
        if kind == "caption":
            return api.build_request("POST", "/v1/caption", files={"image": ("photo.jpg", photo)},
                                     data={"model": self.models["caption"], "beam_width": "2"})
        if kind == "generate":
            return api.build_request("POST", "/v1/generate", json={
                "prompt": self.rng.choice(["a red circle", "a blue square", "a lighthouse at dawn"]),
                "model": self.models["generate"], "seed": self.rng.randrange(2**31), "steps": 2, "width": 64,
                "height": 64})
        if kind == "train_classifier":
            name = f"shapes-{uuid.uuid4().hex[:6]}"
            with self.lock:
                self.trained_names.append((tenant, name))
            return api.build_request("POST", "/v1/train/classifier", json={
                "dataset": self.dataset[0], "name": name, "epochs": 1, "val_fraction": 0.25})
        raise ValueError(f"no request for job kind {kind!r}")

    def note(self, method: str, route: str, status: int, retry_after: str | None) -> None:
        with self.lock:
            self.responses.append(Response(self.now(), method, route, status, retry_after))

    def submit_and_wait(self, api: httpx.Client, record: JobRecord, *, keep: bool = True) -> JobRecord:
        """Submit (again on 503/429/409-in-use/no answer, with the same Idempotency-Key and body), then long-poll
        the job until it ends or the plan's job timeout passes."""
        if keep:
            with self.lock:
                self.begun += 1
        try:
            return self._submit_and_wait(api, record)
        finally:
            if keep:
                with self.lock:
                    self.records.append(record)

    def _submit_and_wait(self, api: httpx.Client, record: JobRecord) -> JobRecord:
        record.submitted_at = time.monotonic()
        deadline = record.submitted_at + self.plan.job_timeout
        key = f"chaos-{uuid.uuid4().hex}"
        request = self.request(api, record)
        route = request.url.path if "/collections/" not in request.url.path else "/v1/collections/.../faces"
        request.headers["Idempotency-Key"] = key
        request.headers["Prefer"] = f"wait={WAIT_SECONDS}"
        job: dict | None = None
        while job is None and time.monotonic() < deadline:
            record.submit_attempts += 1
            try:
                answer = api.send(request)
            except httpx.TransportError as exc:  # the gateway restarting, or a reset while it wrote the answer
                self.note("POST", route, 0, None)
                record.detail = f"{exc.__class__.__name__}"
                time.sleep(0.5)
                continue
            self.note("POST", route, answer.status_code, answer.headers.get("retry-after"))
            if answer.status_code in (200, 201, 202):
                job = answer.json()
            elif answer.status_code in (503, 429) or (answer.status_code == 409 and
                                                      "idempotency_key_in_use" in answer.text):
                time.sleep(min(float(answer.headers.get("retry-after") or 1), RETRY_AFTER_CAP))
            else:
                record.status, record.detail = "rejected", f"{answer.status_code} {answer.text[:200]}"
                return record
        if job is None:
            return record
        record.id = job["id"]
        while job["status"] not in TERMINAL and time.monotonic() < deadline:
            try:
                answer = api.get(f"/v1/jobs/{record.id}", headers={"Prefer": f"wait={WAIT_SECONDS}"})
            except httpx.TransportError:
                self.note("GET", "/v1/jobs/{id}", 0, None)
                time.sleep(0.5)
                continue
            self.note("GET", "/v1/jobs/{id}", answer.status_code, answer.headers.get("retry-after"))
            if answer.status_code == 200:
                job = answer.json()
            else:
                time.sleep(min(float(answer.headers.get("retry-after") or 1), RETRY_AFTER_CAP))
        record.status = job["status"]
        if record.status in TERMINAL:
            record.ended_at = time.monotonic()
            record.error_code = (job.get("error") or {}).get("code")
        return record

    def run_clients(self, planned: list[JobRecord]) -> None:
        pending = list(reversed(planned))

        def work(index: int) -> None:
            clients = {tenant: self.client(key) for tenant, key in enumerate(self.keys)}
            try:
                while True:
                    with self.lock:
                        if not pending:
                            return
                        record = pending.pop()
                    try:
                        self.submit_and_wait(clients[record.tenant], record)
                    except Exception as exc:  # a fault of the harness: reported as a job never accepted
                        record.detail = f"harness error: {exc!r}"
            finally:
                for api in clients.values():
                    api.close()

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(self.plan.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def submitted_count(self) -> int:
        with self.lock:
            return self.begun

    # 4. The faults, spread over the run, each after the one before has recovered

    def inject_faults(self, total: int, done: threading.Event) -> None:
        """The faults at evenly spread points of the run (by jobs begun), each once the one before is back (its
        process running again); how long the jobs take to flow again is watched alongside."""
        faults = (["kill worker"] * self.plan.worker_kills + ["restart redis"] * self.plan.redis_restarts
                  + ["restart postgres"] * self.plan.postgres_restarts)
        self.rng.shuffle(faults)
        watchers = []
        for index, what in enumerate(faults):
            threshold = int(total * (0.05 + 0.6 * index / max(1, len(faults))))
            while self.submitted_count() < threshold and not done.is_set():
                time.sleep(0.1)
            if done.is_set():
                self.log(f"chaos: the jobs ended before fault {index + 1} ({what}); injecting it anyway")
            fault, recovery = self.kill_worker() if what == "kill worker" else self.restart_server(what.split()[1])
            self.faults.append(fault)
            watchers.append(threading.Thread(target=self._watch, args=(fault, recovery), daemon=True))
            watchers[-1].start()
        for watcher in watchers:
            watcher.join()

    def _watch(self, fault: Fault, recovery: Callable[[], float | None]) -> None:
        fault.recovered_after = recovery()
        self.log(f"chaos: {fault.what} {fault.target} at {fault.at:.1f} s: back after {fault.back_after} s, "
                 f"jobs flowing after {fault.recovered_after} s")

    def kill_worker(self) -> tuple[Fault, Callable[[], float | None]]:
        processes = self.platform.processes()
        name = self.rng.choice(sorted(role for role in processes if role.startswith("worker-")))
        pid = self.rng.choice(processes[name])
        group = [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
        with session_scope(self.platform.database_url) as session:
            held = [row[0] for row in session.execute(
                text("SELECT id FROM jobs WHERE status = 'running' AND worker = ANY(:workers)"),
                {"workers": [f"{socket.gethostname()}:{p}" for p in group]})]
        os.kill(pid, signal.SIGKILL)
        fault = Fault("kill worker", f"{name} (pid {pid})", self.now(), held_jobs=len(held))
        started = time.monotonic()
        count = len(processes[name])
        while time.monotonic() < started + 120:
            now_running = self.platform.processes().get(name, [])
            if len(now_running) == count and pid not in now_running:
                fault.back_after = round(time.monotonic() - started, 1)
                break
            time.sleep(0.1)

        def recovery() -> float | None:  # the jobs it held ended (run again by another worker, or by it)
            while time.monotonic() < started + self.plan.job_timeout:
                if self.ended(held):
                    return round(max(time.monotonic() - started, fault.back_after or 0), 1)
                time.sleep(0.1)
            return None

        return fault, recovery

    def ended(self, job_ids: list[str]) -> bool:
        if not job_ids:
            return True
        try:
            with session_scope(self.platform.database_url) as session:
                statuses = [row[0] for row in session.execute(
                    text("SELECT status::text FROM jobs WHERE id = ANY(:ids)"), {"ids": job_ids})]
        except Exception:
            return False
        return all(status in TERMINAL for status in statuses)

    def restart_server(self, server: str) -> tuple[Fault, Callable[[], float | None]]:
        [pid] = self.platform.processes()[server]
        os.kill(pid, signal.SIGKILL)
        fault = Fault(f"restart {server}", f"(pid {pid})", self.now())
        started = time.monotonic()
        # A probe job, submitted from the moment of the fault: jobs flow again when it has succeeded.
        probe: dict[str, JobRecord] = {}

        def run_probe() -> None:
            with self.client(self.keys[0]) as api:
                while time.monotonic() < started + 120:
                    probe["job"] = self.submit_and_wait(api, JobRecord("classify", 0, time.monotonic(), probe=True))
                    # Sent while the broker was down, the job was canceled unrun (the 503's retry, with the same
                    # Idempotency-Key, is answered with that canceled job): a user submits it again.
                    if probe["job"].error_code != "broker_unavailable":
                        return

        prober = threading.Thread(target=run_probe, daemon=True)
        prober.start()
        while time.monotonic() < started + 120:
            running = self.platform.processes().get(server, [])
            if running and pid not in running and self.platform.ready():
                fault.back_after = round(time.monotonic() - started, 1)
                break
            time.sleep(0.1)

        def recovery() -> float | None:
            prober.join(130)
            job = probe.get("job")
            if job is None or job.status != "succeeded":
                return None
            return round((job.ended_at or 0) - started, 1)

        return fault, recovery

    # 5. The audit

    def wait_for_webhooks(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with session_scope(self.platform.database_url) as session:
                pending = session.execute(text(
                    "SELECT count(*) FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id "
                    "WHERE w.tenant_id = ANY(:tenants) AND d.status = 'pending'"),
                    {"tenants": self.tenant_ids}).scalar_one()
            if pending == 0:
                return
            time.sleep(0.5)

    def audit(self) -> tuple[dict[str, int], dict[str, str], list[str], list[str]]:
        ids = [record.id for record in self.records if record.id]
        with session_scope(self.platform.database_url) as session:
            writes = dict(session.execute(text(
                "SELECT job_id, count(*) FROM chaos_job_writes WHERE job_id = ANY(:ids) GROUP BY job_id"),
                {"ids": ids}).all())
            statuses = dict(session.execute(text("SELECT id, status::text FROM jobs WHERE id = ANY(:ids)"),
                                            {"ids": ids}).all())
            known = set(ids) | set(self.setup_job_ids)
            rows = session.execute(text(
                "SELECT id, kind, parent_id, error->>'code' FROM jobs WHERE tenant_id = ANY(:tenants)"),
                {"tenants": self.tenant_ids}).all()
            # Jobs the platform makes itself: a dataset's analysis, a grid's cells
            analyses = {row[0] for row in session.execute(text(
                "SELECT analysis_job_id FROM datasets WHERE tenant_id = ANY(:tenants)"), {"tenants": self.tenant_ids})}
            # A job the gateway could not send was answered with a 503 (its client retried, making a new job).
            stray = [row[0] for row in rows if row[0] not in known and row[0] not in analyses and row[2] is None
                     and row[3] != "broker_unavailable"]
            duplicated = []
            for record in self.records:
                if record.id is None or statuses.get(record.id) != "succeeded":
                    continue
                if record.kind == "faces_enroll":
                    n = session.execute(text("SELECT count(*) FROM face_embeddings WHERE job_id = :id"),
                                        {"id": record.id}).scalar_one()
                    if n != 1:
                        duplicated.append(f"{record.id}: {n} face embeddings for one enrollment")
                if record.kind == "generate":
                    n = session.execute(text("SELECT count(*) FROM images WHERE source_job_id = :id"),
                                        {"id": record.id}).scalar_one()
                    g = session.execute(text("SELECT count(*) FROM generations WHERE job_id = :id"),
                                        {"id": record.id}).scalar_one()
                    if n != 1 or g != 1:
                        duplicated.append(f"{record.id}: {n} images, {g} generations for one image")
            for tenant, name in self.trained_names:
                n = session.execute(text("SELECT count(*) FROM models WHERE tenant_id = :t AND name = :n"),
                                    {"t": self.tenant_ids[tenant], "n": name}).scalar_one()
                if n > 1:
                    duplicated.append(f"model {name}: {n} versions registered by one training")
            for name in self.models.values():
                n = session.execute(text("SELECT count(*) FROM models WHERE tenant_id = :t AND name = :n"),
                                    {"t": self.tenant_ids[0], "n": name}).scalar_one()
                if n != 1:
                    duplicated.append(f"model {name}: {n} versions registered by one import")
        return writes, statuses, duplicated, stray


def run_chaos(plan: ChaosPlan, log: Callable[[str], None] = print, keep: Path | None = None) -> ChaosReport:
    """The whole suite: start the platform, set up, warm up, run the clients under the faults, audit."""
    with running_platform(plan.workers, plan.env, keep) as platform:
        chaos = Chaos(plan, platform, log)
        try:
            started = time.monotonic()
            chaos.set_up()
            chaos.warm_up()
            log(f"chaos: set up and warmed up in {time.monotonic() - started:.1f} s")
            planned = chaos.plan_jobs()
            chaos.started = time.monotonic()
            done = threading.Event()
            injector = threading.Thread(target=chaos.inject_faults, args=(len(planned), done), daemon=True)
            injector.start()
            chaos.run_clients(planned)
            done.set()
            injector.join()
            wall = time.monotonic() - chaos.started
            chaos.wait_for_webhooks()
            writes, statuses, duplicated, stray = chaos.audit()
            with chaos.receiver.lock:
                deliveries = {job: list(got) for job, got in chaos.receiver.received.items()}
            report = ChaosReport(plan, chaos.records, chaos.responses, chaos.faults, writes, statuses, duplicated,
                                 deliveries, stray, wall, platform.restart_counts())
        finally:
            chaos.receiver.close()
    return report


# --- tiny models, built as the tests build them ----------------------------------------------------------------

def _tiny_captioner_zip() -> bytes:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # built from config: nothing to download
    from tests.services.captioner.test_hf import tiny_checkpoint_zip

    with tempfile.TemporaryDirectory() as scratch:
        return tiny_checkpoint_zip(Path(scratch))


def _tiny_pipeline_zip() -> bytes:
    from tests.diffusion_pipelines import tiny_pipeline_zip

    return tiny_pipeline_zip()


def _shapes_zip() -> bytes:
    from tests.synthetic import make_samples, write_zip

    buffer = io.BytesIO()
    write_zip(make_samples({"circle": 12, "square": 12}, seed=0, size=64), buffer)
    return buffer.getvalue()
