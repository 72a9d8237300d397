"""The job lifecycle every worker runs: claim, load inputs, predict, write output and provenance.

Tasks are thin: they hand job ids to `JobRuntime.run`. Running the same id twice is harmless:
only a `queued` job can be claimed, and only the attempt that claimed it can write its result.
"""

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any, cast

from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from percept.datasets import DatasetLimits
from percept.db import datasets as dataset_repo
from percept.db import images as image_repo
from percept.db import jobs as job_repo
from percept.db import registry
from percept.db.models import JobStatus, Model
from percept.db.session import session_scope
from percept.errors import DependencyUnavailable, PerceptError
from percept.imaging import decode_rgb
from percept.infra import Infra
from percept.logs import job_context
from percept.predictor import (
    ChildResult,
    JobCanceled,
    ModelArtifact,
    ModelInfo,
    PredictRequest,
    TrainingData,
    parse_model_ref,
)
from percept.queue import publish_job_event, publish_job_events, send_job
from percept.schemas import JobOut, Priority
from percept.services import catalog, import_by_name
from percept.storage import StoredCache, object_key_for
from percept.version import code_version, library_versions
from workers import drain, observe
from workers.model_cache import LoadedModel, ModelCache, ModelSource

log = logging.getLogger(__name__)
HOST = socket.gethostname()
PROGRESS_EVERY_SECONDS = 1.0

# A job kind's finalizer: (infra, session, tenant_id, job_id, params, inputs, output) -> the output to
# write. It runs in the transaction that writes the result (see percept.services.JobKind), in a savepoint
# of the job's own: if it raises, its side effects are undone and only its job fails, with the code of a
# PerceptError or of a ValueError "[code] message", else `internal_error`.
Finalizer = Callable[[Infra, Session, str, str, dict[str, Any], list[dict[str, Any]], dict[str, Any]], dict[str, Any]]


@cache
def decoders() -> ThreadPoolExecutor:
    """This process's threads for decoding a batch's images (one per core, at most 8)."""
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="decode")


@cache
def announcer() -> ThreadPoolExecutor:
    """This process's thread for the claim's `running` events: sent while the jobs go on (JobRuntime._publish)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="announce")


@cache
def beaters() -> ThreadPoolExecutor:
    """This process's threads for the running jobs' heartbeats (Heartbeat), taken from a pool: starting a thread of
    its own for every run waited for that thread's first turn on a core."""
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="heartbeat")


@cache
def finalizer_of(kind: str) -> Finalizer | None:
    path = catalog().kind(kind).finalizer
    return import_by_name(path) if path else None


@cache
def search_text_function(kind: str) -> Callable[[dict[str, Any]], str | None] | None:
    path = catalog().kind(kind).search_text
    return import_by_name(path) if path else None


def is_training(kind: str) -> bool:
    return catalog().kind(kind).trainer is not None


def is_fan_out(kind: str) -> bool:
    return catalog().kind(kind).fan_out is not None


def is_inference(kind: str) -> bool:
    """Served by a model's predictor (neither a trainer nor a fan-out runs it)."""
    return not is_training(kind) and not is_fan_out(kind)


@dataclass
class ClaimedJob:
    id: str
    tenant_id: str
    kind: str
    attempt: int
    model_name: str
    params: dict[str, Any]
    inputs: list[dict[str, Any]]
    created_at: datetime
    started_at: datetime
    parent_id: str | None = None
    priority: str = "normal"  # the tenant's, as the job was submitted: sent again at the same priority
    deadline_at: datetime | None = None
    request: PredictRequest | None = None
    model_info: ModelInfo | None = None
    image_keys: list[str] = field(default_factory=list)  # the input images' object keys
    model_row: Model | None = None  # the registry row of the model that serves it
    register: Model | None = None  # a trained model to register with the result
    device: str | None = None  # where a training job ran
    error: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    claimed_at: float = field(default_factory=time.monotonic)
    waiting: bool = False  # a fan-out parent that made its children (or found some still running): no result yet
    children: int = 0  # a fan-out parent's, once gathered


@dataclass
class EarlyRead:
    """A job's images, read and decoded on the decode threads while its claim runs, from the keys its message named
    and at the size its kind's images were last decoded at. Used only if the claim's own keys and the model's input
    size turn out the same; otherwise they are read again (the same decode as without it)."""
    keys: list[str]
    at_least: int | None
    pictures: Future[list[Image.Image]]

    def serves(self, job: "ClaimedJob", at_least: int | None) -> bool:
        return self.keys == job.image_keys and self.at_least == at_least


class Heartbeat:
    """Beats for the running jobs every lease/3 so the sweeper knows this worker is alive, and holds the
    predict() call in progress to the inference deadline: past it, the jobs are given up (JobRuntime._give_up)
    and the beating stops. The call itself cannot be stopped (a solo pool runs it on the worker's only
    thread, maybe in C code); whatever it returns then is dropped (`gave_up`)."""

    def __init__(self, runtime: "JobRuntime", jobs: list[ClaimedJob]) -> None:
        self.runtime, self.jobs = runtime, jobs
        self.gave_up = False
        self._predicting: tuple[float, list[ClaimedJob]] | None = None  # (started, its jobs)
        self._lock = threading.Lock()  # the give-up and the end of a call or of the run: one or the other first
        self._stop = threading.Event()

    @contextmanager
    def predicting(self, jobs: list[ClaimedJob]) -> Iterator[None]:
        """Around one predict() call: the inference deadline counts from here."""
        with self._lock:
            self._predicting = (time.monotonic(), jobs)
        try:
            yield
        finally:
            with self._lock:
                self._predicting = None

    def _beat(self) -> None:
        settings = self.runtime.infra.settings
        interval, deadline = settings.job_lease.total_seconds() / 3, settings.inference_deadline.total_seconds()
        while True:
            call = self._predicting
            wait = interval if call is None or not self.runtime.inference_deadline else \
                min(interval, call[0] + deadline - time.monotonic())
            if self._stop.wait(max(wait, 0.0)):
                return
            call = self._predicting
            if call is not None and self.runtime.inference_deadline and time.monotonic() - call[0] >= deadline:
                self._give_up(call, deadline)
                return
            try:
                with session_scope(self.runtime.infra.database_url) as session:
                    job_repo.heartbeat(session, [job.id for job in self.jobs], self.runtime.worker_name)
                    session.commit()
            except PerceptError:
                log.warning("heartbeat failed; will retry")

    def _give_up(self, call: tuple[float, list[ClaimedJob]], deadline: float) -> None:
        with self._lock:
            if self._stop.is_set() or self._predicting is not call:
                return  # the call ended just in time: the run writes its results
            self.gave_up = True
        self.runtime._give_up(self.jobs, overdue=call[1], deadline=deadline)

    def __enter__(self) -> "Heartbeat":
        beaters().submit(self._beat)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._stop.set()


class JobRuntime:
    def __init__(self, infra: Infra, models: ModelCache | None = None, *, inference_deadline: bool = True) -> None:
        """`inference_deadline`: hold each predict() call to PERCEPT_INFERENCE_DEADLINE, for pools Celery's time
        limits do not reach (solo); a prefork pool's jobs have the task time limits instead, long enough for a
        generation of minutes."""
        self.infra = infra
        self.models = models or ModelCache()
        self.inference_deadline = inference_deadline
        self.worker_name = f"{HOST}:{os.getpid()}"
        self._builtin_rows: dict[str, Model] = {}  # "name:version" -> the registry row of a built-in model
        self._announcing: Future[None] | None = None  # the claim's `running` events, on their way
        self._decoded_at: dict[str, int | None] = {}  # job kind -> the input size its images were last decoded at
        self._early: dict[str, EarlyRead] = {}  # by job id: reads begun for messages the next run() takes

    # 1. Claim (one conditional UPDATE, which also reads where the input images are), then the models
    def _claim(self, job_ids: list[str]) -> list[ClaimedJob]:
        with session_scope(self.infra.database_url, autocommit=True) as session:
            claimed = [ClaimedJob(job.id, job.tenant_id, job.kind, job.attempts, job.model_name or "", job.params,
                                  job.inputs, job.created_at, job.started_at or job.created_at, job.parent_id,
                                  job.priority, job.deadline_at, image_keys=job.image_keys or [])
                       for job in job_repo.claim(session, list(dict.fromkeys(job_ids)), self.worker_name)]
            inference = [job for job in claimed if is_inference(job.kind)]
            for job in inference:
                if len(job.image_keys) != len(job.inputs):
                    job.error = {"code": "input_not_found", "message": "An input image of this job was deleted "
                                                                      "before it ran; upload it again."}
            self._find_models(session, inference)
        for job_id in set(job_ids) - {job.id for job in claimed}:
            log.info("job %s is not queued any more; nothing to do", job_id)
        if claimed:
            self._publish([(job.id, "running") for job in claimed], background=True)
        return claimed

    def _publish(self, events: list[tuple[str, str]], results: dict[str, str] | None = None, *,
                 background: bool = False) -> None:
        """Job events (percept.queue.publish_job_events), in the order they happen. A `background` one (the claim's
        `running`: nobody waits on it) goes out on the announcer thread while the jobs go on; a later one is sent
        once that is out, here (the end of a job is what its waiter waits for).

        Only the claim, on the run's own thread, sets `_announcing`; a later event reads it and never clears it, so
        the Heartbeat's thread (a give-up) can publish too without racing the run for it."""
        if background:
            self._announcing = announcer().submit(publish_job_events, self.infra.broker_url, events)
            return
        announcing = self._announcing
        if announcing is not None:
            announcing.result()  # at once when it went out already
        publish_job_events(self.infra.broker_url, events, results)

    def _find_models(self, session: Session, jobs: list[ClaimedJob]) -> None:
        """Each job's registry row, looked up once per (tenant, model name). A built-in model's row is kept for the
        process's life (no tenant can delete or change one); a tenant's is looked up every time, so a job for a
        model deleted meanwhile fails `model_not_found`."""
        rows: dict[tuple[str, str], Model | None] = {}
        for job in jobs:
            ref = (job.tenant_id, job.model_name)
            if ref not in rows:
                row = self._builtin_rows.get(job.model_name) or registry.find_version(
                    session, job.tenant_id, *parse_model_ref(job.model_name))
                if row is not None and row.tenant_id is None:
                    self._builtin_rows[job.model_name] = row
                rows[ref] = row
            job.model_row = rows[ref]

    # 2. Inputs: the images' bytes, decoded at no more than the size the model needs
    def read_early(self, kind: str, job_id: str, image_keys: list[str]) -> None:
        """Begin reading a job's images on the decode threads from the keys its message named (percept.queue.send_job),
        for the next run(), at the size the kind's last jobs needed: not before a first job of the kind has run, as
        that size is unknown until then. Call it on the thread that calls run()."""
        if image_keys and kind in self._decoded_at and job_id not in self._early:
            at_least = self._decoded_at[kind]
            self._early[job_id] = EarlyRead(image_keys, at_least,
                                            decoders().submit(self._read_images, image_keys, at_least))

    def _read_images(self, keys: list[str], at_least: int | None) -> list[Image.Image]:
        return [decode_rgb(self.infra.store.get(key), self.infra.settings.max_image_pixels, at_least=at_least)
                for key in keys]

    def _load_inputs(self, jobs: list[ClaimedJob], input_size: int | None,
                     early: dict[str, EarlyRead] | None = None) -> None:
        """Every job's images read and decoded, a batch's on several threads (Pillow's decoders let go of the GIL:
        on a CPU the decodes run side by side, on a GPU machine they keep the device fed); a job's EarlyRead is
        taken where it serves."""
        early = early or {}
        reads: dict[str, Future[list[Image.Image]]] = {}
        for job in jobs:
            self._decoded_at[job.kind] = input_size
            read = early.get(job.id)
            if read is not None:
                observe.early_read(job.kind, taken=read.serves(job, input_size))
                if read.serves(job, input_size):
                    reads[job.id] = read.pictures
                    continue
            if len(jobs) > 1:  # one job alone is read on this thread (no trip to a decode thread)
                reads[job.id] = decoders().submit(self._read_images, job.image_keys, input_size)
        for job in jobs:
            try:
                read_now = reads.get(job.id)
                pictures = read_now.result() if read_now else self._read_images(job.image_keys, input_size)
                job.request = PredictRequest(images=pictures, params=job.params)
            except DependencyUnavailable:
                raise
            except PerceptError as exc:
                job.error = exc.to_dict()

    def run(self, job_ids: list[str]) -> None:
        """Claim the jobs and run those claimed, taking the reads read_early() began for them."""
        with job_context(job_ids=job_ids, whole_process=True) as log_context:  # every line it causes names the jobs
            early, self._early = self._early, {}
            try:
                jobs = self._claim(job_ids)
                log_context.update(job_ids=[job.id for job in jobs], tenant_ids=[job.tenant_id for job in jobs],
                                   kinds=[job.kind for job in jobs])
                if jobs:
                    self._run_claimed(jobs, early)
            finally:
                for read in early.values():
                    read.pictures.cancel()  # one no job took (not claimed, other keys or size, not run), if not begun

    def _run_claimed(self, jobs: list[ClaimedJob], early: dict[str, EarlyRead] | None = None) -> None:
        with Heartbeat(self, jobs) as heartbeat:
            try:
                for job in jobs:
                    if is_training(job.kind):
                        self._train(job)
                    elif is_fan_out(job.kind):
                        self._fan_out(job)
                for group in self._group_by_model([job for job in jobs if is_inference(job.kind)]):
                    if heartbeat.gave_up:
                        break
                    if drain.handback_due(self.infra.settings):
                        raise JobHandedBack()
                    loaded = self._load_model(group[0].model_row)
                    self._load_inputs(group, getattr(loaded.predictor, "input_size", None), early)
                    self._predict([job for job in group if job.error is None], loaded, heartbeat)
            except DependencyUnavailable as exc:
                self._retry_later(jobs, exc.message)
                return
            except JobHandedBack:
                self._retry_later([job for job in jobs if not job.waiting],
                                  "the worker is shutting down and its grace period ends before they would",
                                  backoff=False)
                return
        if heartbeat.gave_up:
            log.warning("dropped the results of %d jobs given up at the inference deadline", len(jobs))
            return
        try:
            self._write_results(jobs)
        except DependencyUnavailable as exc:  # nothing was written: the transaction was rolled back whole
            self._retry_later(jobs, exc.message)

    @staticmethod
    def _group_by_model(jobs: list[ClaimedJob]) -> list[list[ClaimedJob]]:
        """Jobs by registry row: tenants asking for the same built-in model share one forward pass."""
        groups: dict[int, list[ClaimedJob]] = defaultdict(list)
        for job in jobs:
            if job.error is not None:
                continue
            if job.model_row is None:
                job.error = {"code": "model_not_found", "message": f"Model {job.model_name!r} no longer exists."}
            else:
                groups[job.model_row.id].append(job)
        return list(groups.values())

    def _model_source(self, row: "Model") -> ModelSource:
        artifact = self.infra.store.get(row.artifact_key) if row.artifact_key else None
        return ModelSource(row.name, row.version, row.predictor, artifact)

    # 3b. Train: a dataset (or registered models) in, a registered model version out
    def _training_data(self, job: ClaimedJob) -> TrainingData:
        """The job's dataset zip (or an uploaded archive, `object_key`) and the registered models its inputs
        name, read from storage, and a cache in storage keyed by the job kind's trainer."""
        with session_scope(self.infra.database_url) as session:
            datasets = [dataset_repo.get_dataset_by_id(session, item["dataset_id"])
                        for item in job.inputs if "dataset_id" in item]
            models = [registry.get_model(session, job.tenant_id, item["model_id"])
                      for item in job.inputs if "model_id" in item]
        if None in datasets or None in models:
            raise PerceptError("An input of this job was deleted before it ran.", code="input_not_found")
        dataset = datasets[0] if datasets else None
        uploads = [item["object_key"] for item in job.inputs if "object_key" in item]
        archive_key = dataset.object_key if dataset else uploads[0] if uploads else None
        trainer = catalog().kind(job.kind).trainer or job.kind
        return TrainingData(
            archive=self.infra.store.get(archive_key) if archive_key else None,
            cache=StoredCache(self.infra.store, f"cache/{trainer.replace(':', '.')}"),
            limits=DatasetLimits.from_settings(self.infra.settings),
            models=[ModelArtifact(f"{m.name}:{m.version}", self.infra.store.get(m.artifact_key) if m.artifact_key
                                  else b"", m.metrics, m.card) for m in models if m is not None],
            dataset={"id": dataset.id, "sha256": dataset.sha256} if dataset else {})

    def _train(self, job: ClaimedJob) -> None:
        kind = catalog().kind(job.kind)
        assert kind.trainer is not None
        started = time.perf_counter()
        try:
            # 1. Inputs: the dataset's bytes and any models it starts from
            data = self._training_data(job)
            load_ms = (time.perf_counter() - started) * 1000
            # 2. Train, reporting every step; a cancel stops it at the next step boundary
            started = time.perf_counter()
            result = import_by_name(kind.trainer)().train(data, job.params, self._step_reporter([job], every=0.0))
        except (DependencyUnavailable, JobHandedBack):
            raise
        except JobCanceled:
            job.error = {"code": "canceled", "message": "The job was canceled while it ran."}
            return
        except ValueError as exc:
            job.error = input_error(exc)
            return
        except PerceptError as exc:
            job.error = exc.to_dict()
            return
        except SoftTimeLimitExceeded:
            job.error = {"code": "time_limit", "message": "Training took longer than the worker's time limit; "
                         "use fewer epochs or images, or turn augmentation off."}
            return
        except Exception:
            log.exception("training job %s failed", job.id)
            job.error = {"code": "internal_error", "message": "Training failed unexpectedly; we have the log."}
            return
        job.device = result.device
        job.output = {**({"metrics": result.metrics} if result.metrics else {}), **result.output}
        job.timings = {"load": round(load_ms, 2), "inference": round((time.perf_counter() - started) * 1000, 2)}
        if result.predictor is None:
            return
        # 3. The artifact goes to object storage; the model version is registered with the job's result
        artifact = result.artifact or b""
        sha256 = hashlib.sha256(artifact).hexdigest()
        key = object_key_for(sha256, prefix="models")
        self.infra.store.put(key, artifact)
        card = {**result.card, "dataset": data.dataset or None, "training": {"job_id": job.id, "params": job.params}}
        job.register = Model(name=job.params["name"], kind=result.model_kind or job.kind, status="ready",
                             weights_sha256=sha256, predictor=result.predictor, artifact_key=key,
                             metrics=result.metrics, card=card, device=result.device)

    # 3c. Fan out: make the children (the first run), or gather their results (the run after the last one ended)
    def _fan_out(self, job: ClaimedJob) -> None:
        kind = catalog().kind(job.kind)
        assert kind.fan_out is not None
        fan_out = import_by_name(kind.fan_out)()
        started = time.perf_counter()
        with session_scope(self.infra.database_url) as session:
            children = job_repo.children_of(session, job.id)
            if children and any(not child.status.is_terminal() for child in children):
                # Sent again before its children ended (a duplicate message): wait for them again
                job.waiting = job_repo.add_children(session, job.id, job.attempt, job.tenant_id, []) is not None
                job_repo.wake_parents(session, [job.id])  # the progress, as counted now
                session.commit()
                return
            results = [ChildResult(child.id, child.status.value, child.params, child.output, child.error)
                       for child in children]
            if not children:
                try:
                    made = fan_out.children(job.params)
                except ValueError as exc:
                    job.error = input_error(exc)
                    return
                if not made:
                    job.error = {"code": "no_children", "message": "This job has nothing to do."}
                    return
                rows = job_repo.add_children(session, job.id, job.attempt, job.tenant_id,
                                             [(c.kind, catalog().kind(c.kind).queue, c.params) for c in made])
                session.commit()
                job.waiting = True  # its result is written when it runs again, after its children
                if rows is None:
                    log.warning("job %s attempt %d lost its claim before fanning out", job.id, job.attempt)
                    return
                for row in rows:
                    try:
                        send_job(self.infra.broker_url, row.kind, row.id, row.priority)
                    except DependencyUnavailable:
                        log.warning("broker unavailable; child %s stays queued for the sweeper", row.id)
                        break
                self._publish([(job.id, "running")])
                return
            images = image_repo.get_images(session, [image["image_id"] for child in results if child.output
                                                     for image in child.output.get("images", [])])

        def read_image(image_id: str) -> bytes:
            image = images.get(image_id)
            if image is None or image.tenant_id != job.tenant_id:
                raise ValueError(f"[input_not_found] Image {image_id!r} of a child job no longer exists.")
            return self.infra.store.get(image.object_key)

        job.children = len(results)
        try:
            job.output = fan_out.gather(job.params, results, read_image)
        except DependencyUnavailable:
            raise
        except ValueError as exc:
            job.error = input_error(exc)
        except Exception:
            log.exception("gathering the children of job %s failed", job.id)
            job.error = {"code": "internal_error", "message": "Gathering this job's results failed unexpectedly; "
                                                              "we have the log."}
        job.timings = {"inference": round((time.perf_counter() - started) * 1000, 2)}

    def _load_model(self, row: Model | None) -> LoadedModel:
        """The row's predictor, set up once per process; the registry records the device it runs on."""
        assert row is not None  # _group_by_model failed the jobs without one
        loaded = self.models.get(f"model-{row.id}", lambda: self._model_source(row))
        if loaded.load_ms:  # loaded by this call: say where it runs (and a built-in model's weights)
            with session_scope(self.infra.database_url) as session:
                registry.record_loaded(session, row.id, loaded.info.device,
                                       loaded.info.sha256 if row.tenant_id is None else None)
                session.commit()
        return loaded

    # 3. Predict
    def _predict(self, jobs: list[ClaimedJob], loaded: LoadedModel, heartbeat: Heartbeat) -> None:
        if not jobs:
            return
        row = jobs[0].model_row
        assert row is not None
        model_name = f"{row.name}:{row.version}"
        # Provenance names the registry's model; the predictor supplies what it actually loaded.
        info = ModelInfo(row.name, row.version, loaded.info.sha256, loaded.info.device, loaded.info.libraries)
        started = time.perf_counter()
        outputs: list[dict[str, Any] | None]
        errors: list[dict[str, Any] | None]
        try:
            with heartbeat.predicting(jobs):
                outputs = list(loaded.predictor.predict([job.request for job in jobs if job.request is not None],
                                                        on_step=self._step_reporter(jobs)))
            errors = [None] * len(jobs)
        except JobHandedBack:
            raise
        except JobCanceled:
            outputs, errors = [None] * len(jobs), [{"code": "canceled", "message": "Canceled."}] * len(jobs)
        except ValueError as exc:
            if len(jobs) > 1:  # one bad request must not fail its batch neighbours: run them one by one
                for job in jobs:
                    if not heartbeat.gave_up:
                        self._predict([job], loaded, heartbeat)
                return
            outputs, errors = [None], [input_error(exc)]
        except SoftTimeLimitExceeded:
            outputs = [None] * len(jobs)
            errors = [{"code": "time_limit", "message": "The model ran longer than the worker's time limit on this "
                                                        "job; ask for less work (fewer steps, images or pixels)."}
                      ] * len(jobs)
        except Exception:  # a bug or a broken model: fail these jobs, keep the worker serving
            log.exception("predictor %s failed", model_name)
            outputs = [None] * len(jobs)
            errors = [{"code": "internal_error", "message": "The model failed on this input; we have the log."}
                      ] * len(jobs)
        inference_ms = (time.perf_counter() - started) * 1000
        for job, output, error in zip(jobs, outputs, errors, strict=True):
            job.output, job.error = output, error
            job.timings = {"load": round(loaded.load_ms, 2), "inference": round(inference_ms, 2)}
            job.timings["batch_size"] = len(jobs)
            job.model_info = info

    def _step_reporter(self, jobs: list[ClaimedJob], every: float = PROGRESS_EVERY_SECONDS):
        last_write = min(job.claimed_at for job in jobs)

        def on_step(done: int, total: int, info: dict[str, Any] | None = None) -> None:
            nonlocal last_write
            if drain.handback_due(self.infra.settings):  # SIGTERM came, and the grace ends before the job would
                raise JobHandedBack()
            # Sub-second inference steps are not worth a database write each; finish() still sees a cancel.
            if time.monotonic() - last_write < every:
                return
            last_write = time.monotonic()
            with session_scope(self.infra.database_url) as session:
                alive = [job_repo.set_progress(session, job.id, job.attempt,
                                               {"done": done, "total": total, **(info or {})}) for job in jobs]
                session.commit()
            self._publish([(job.id, "running") for job in jobs])
            if not all(alive):
                raise JobCanceled()
        return on_step

    # 4. Write output and provenance in one transaction, then notify waiters
    def _write_results(self, jobs: list[ClaimedJob]) -> None:
        ending = [job for job in jobs if not job.waiting]
        done = self._write_plain_successes(ending)
        written = [(job_id, JobStatus.SUCCEEDED.value) for job_id in done]
        rest = [job for job in ending if job.id not in done]
        woken: list[tuple[str, str, str, JobStatus]] = []
        if rest:
            with session_scope(self.infra.database_url) as session:
                for job in rest:
                    status = self._write_result(session, job)
                    if status is not None:
                        written.append((job.id, status.value))
                # Children that ended bring their parents' progress up to date, in the same transaction (and wake
                # the parent of a last child), so a parent never misses the end of one.
                parents = job_repo.wake_parents(session, [job.parent_id for job in rest if job.parent_id])
                woken = [(parent.kind, parent.id, parent.priority, status) for parent, status in parents]
                session.commit()
        self._publish(written, done)
        send_woken_parents(self.infra.broker_url, woken)

    def _write_plain_successes(self, jobs: list[ClaimedJob]) -> dict[str, str]:
        """The succeeded jobs with nothing to write beside their row (no finalizer, no model to register, no parent
        to bring up to date: a batch of classifications) in one statement of its own; the ids written. Every
        other job, or all of them if the statement fails, is written one by one (_write_result). Returns each written
        job as the API shows it (JobOut's JSON, with its tenant), by id: its end's event carries it to the waiters."""
        plain = [job for job in jobs if job.error is None and job.output is not None and job.register is None
                 and job.parent_id is None and finalizer_of(job.kind) is None]
        if not plain:
            return {}
        provenances = {job.id: self._provenance(job) for job in plain}
        results = [(job.id, job.attempt, job.output, provenances[job.id], search_text_of(job.kind, job.output))
                   for job in plain]
        with session_scope(self.infra.database_url, autocommit=True) as session:
            try:
                finished = job_repo.succeed_many(session, results)
            except OperationalError:
                raise  # the database is away: session_scope makes it DependencyUnavailable (see run)
            except DBAPIError as exc:  # a value the database refused: nothing was written (one statement)
                if exc.connection_invalidated:
                    raise
                log.warning("writing %d results in one statement failed (%s); writing them one by one",
                            len(plain), exc.__class__.__name__)
                return {}
        return {job.id: self._as_shown(job, finished[job.id], provenances[job.id]) for job in plain
                if job.id in finished}

    @staticmethod
    def _as_shown(job: ClaimedJob, finished_at: datetime, provenance: dict[str, Any]) -> str:
        """A plain job just succeeded, as GET /v1/jobs/{id} shows it (what its row now holds), with its tenant."""
        shown = JobOut(id=job.id, kind=job.kind, status="succeeded", created_at=job.created_at,
                       started_at=job.started_at, finished_at=finished_at, progress={"done": 1, "total": 1},
                       params=job.params, output=job.output, error=None, provenance=provenance, attempts=job.attempt,
                       priority=cast(Priority, job.priority), deadline_at=job.deadline_at, parent_id=None)
        return json.dumps({**shown.model_dump(mode="json"), "tenant_id": job.tenant_id})

    def _write_result(self, session: Session, job: ClaimedJob) -> JobStatus | None:
        """One job's result with its side effects (its finalizer's, a model to register), in a savepoint of
        its own: if they fail, only they are undone and only this job fails; an attempt that lost its claim
        leaves nothing behind. Returns the status written, None for a lost claim."""
        try:
            with session.begin_nested():
                status = self._finish(session, job)
                if status is None:
                    raise _ClaimLost()
            return status
        except _ClaimLost:
            log.warning("job %s attempt %d lost its claim; result dropped", job.id, job.attempt)
            return None
        except (DependencyUnavailable, OperationalError):
            raise  # an outage, not this job's fault: the whole write is tried again (see run)
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise
            job.error = self._finalize_error(job, exc)
        except ValueError as exc:
            job.error = input_error(exc)
        except PerceptError as exc:
            job.error = exc.to_dict()
        except Exception as exc:
            job.error = self._finalize_error(job, exc)
        job.output, job.register = None, None
        return self._finish(session, job)

    @staticmethod
    def _finalize_error(job: ClaimedJob, exc: Exception) -> dict[str, Any]:
        log.error("writing the result of job %s (%s) failed", job.id, job.kind, exc_info=exc)
        return {"code": "internal_error", "message": "Storing this job's result failed unexpectedly; we have the log."}

    def _finish(self, session: Session, job: ClaimedJob) -> JobStatus | None:
        """Run a succeeded job's finalizer and register its model, then write the job's row."""
        canceled = job.error is not None and job.error.get("code") == "canceled"
        status = (JobStatus.CANCELED if canceled else
                  JobStatus.FAILED if job.error is not None else JobStatus.SUCCEEDED)
        finalize = finalizer_of(job.kind)
        if status is JobStatus.SUCCEEDED and finalize is not None and job.output is not None:
            job.output = finalize(self.infra, session, job.tenant_id, job.id, job.params, job.inputs, job.output)
        if status is JobStatus.SUCCEEDED and job.register is not None:
            model = registry.register_version(session, job.tenant_id, job.register)
            job.output = {"model": {"name": model.name, "version": model.version}, **(job.output or {})}
            job.model_info = ModelInfo(model.name, model.version, model.weights_sha256, device=job.device or "cpu")
        return job_repo.finish(session, job.id, job.attempt, status, output=job.output, error=job.error,
                               provenance=self._provenance(job), search_text=search_text_of(job.kind, job.output),
                               done=job.children or 1)

    def _retry_later(self, jobs: list[ClaimedJob], reason: str, backoff: bool = True) -> None:
        """A dependency went away mid-job (or the worker is going away): release the jobs and send them again,
        with backoff unless `backoff` is off."""
        log.warning("retrying %d jobs later: %s", len(jobs), reason)
        try:
            with session_scope(self.infra.database_url) as session:
                released = [(job, job_repo.release(session, job.id, job.attempt)) for job in jobs]
                session.commit()
        except DependencyUnavailable:
            return  # the database itself is gone: the sweeper takes the jobs back by their heartbeat
        for job, status in released:
            if status is JobStatus.CANCELED:
                self._publish([(job.id, status.value)])
            elif status is JobStatus.QUEUED:
                try:
                    send_job(self.infra.broker_url, job.kind, job.id, job.priority,
                             countdown=min(2 ** job.attempt, 60) if backoff else None)
                except DependencyUnavailable:
                    pass  # still queued in the database: the sweeper sends it

    def _give_up(self, jobs: list[ClaimedJob], overdue: list[ClaimedJob], deadline: float) -> None:
        """A predict() call ran past the inference deadline (called from the Heartbeat's thread while the
        call goes on): its jobs fail `inference_timeout` on their last attempt; every other job of the run
        is released for another attempt, on another worker (or on this one, if the call ever returns)."""
        max_attempts = self.infra.settings.max_attempts
        log.error("predict() of %d %s jobs has run past the %g s inference deadline; giving the run's %d jobs up "
                  "(no more heartbeats for them, and the call's results will be dropped)",
                  len(overdue), overdue[0].kind, deadline, len(jobs))
        last = [job for job in overdue if job.attempt >= max_attempts]
        ended = []
        try:
            with session_scope(self.infra.database_url) as session:
                for job in last:
                    error = {"code": "inference_timeout",
                             "message": f"The model was still running this job {deadline:g} s after it started, "
                                        f"past the inference deadline, on the last of its {job.attempt} attempts; "
                                        "it may hang on this input.",
                             "details": {"deadline_seconds": deadline, "attempts": job.attempt}}
                    if job_repo.finish(session, job.id, job.attempt, JobStatus.FAILED, error=error,
                                       provenance=self._provenance(job)):
                        ended.append(job)
                session.commit()
        except DependencyUnavailable:
            return  # with no heartbeat, the sweeper takes them back once the database answers
        self._publish([(job.id, JobStatus.FAILED.value) for job in ended])
        if rest := [job for job in jobs if job not in last]:
            self._retry_later(rest, f"inference ran past the {deadline:g} s deadline")

    def _provenance(self, job: ClaimedJob) -> dict[str, Any]:
        finished = datetime.now(UTC)
        info = job.model_info
        timings = {
            "queued": round((job.started_at - job.created_at).total_seconds() * 1000, 2),
            "load": job.timings.get("load", 0.0),
            "inference": job.timings.get("inference", 0.0),
            "total": round((finished - job.created_at).total_seconds() * 1000, 2),
        }
        return {
            "inputs": job.inputs,
            "model": ({"name": info.name, "version": info.version, "sha256": info.sha256}
                      if info else {"name": job.model_name, "version": None, "sha256": None}),
            "worker": {"host": HOST, "pid": os.getpid(), "device": info.device if info else job.device},
            "code_version": code_version(self.infra.settings.code_version),
            "libraries": {**library_versions("percept", "pillow", "celery"), **(info.libraries if info else {})},
            "seed": job.params.get("seed"),
            "attempt": job.attempt,
            "batch_size": job.timings.get("batch_size", 1),
            "timings_ms": timings,
        }


def send_woken_parents(broker_url: str, woken: list[tuple[str, str, str, JobStatus]]) -> None:
    """After the commit that woke them: a parent queued again is sent (to gather its children; if the broker is
    away the sweeper sends it later), and every changed parent's watchers are told."""
    for kind, job_id, priority, status in woken:
        if status is JobStatus.QUEUED:
            try:
                send_job(broker_url, kind, job_id, priority)
            except DependencyUnavailable:
                log.warning("broker unavailable; parent job %s stays queued for the sweeper", job_id)
        publish_job_event(broker_url, job_id, "running" if status is JobStatus.QUEUED else status.value)


class JobHandedBack(Exception):
    """Raised at a step boundary when the worker is shutting down and its grace period would end before the job:
    the run releases its jobs (queued again, sent at once) for another worker."""


class _ClaimLost(Exception):
    """Another attempt owns the job now: this attempt's write and side effects are undone."""


def input_error(exc: ValueError) -> dict[str, str]:
    """A predictor's ValueError as a job error; "[code] message" names a specific code."""
    message = str(exc)
    if message.startswith("[") and "] " in message:
        code, _, rest = message[1:].partition("] ")
        return {"code": code, "message": rest}
    return {"code": "invalid_input", "message": message}


def search_text_of(kind: str, output: dict[str, Any] | None) -> str | None:
    """What `GET /v1/jobs?q=` matches, as the job kind's declared `search_text` picks it from the output."""
    pick = search_text_function(kind)
    return pick(output) if pick is not None and output else None
