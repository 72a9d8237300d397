"""Celery bootstrap for worker processes: one app, the tasks of the queues this worker serves.

Built by a factory (never at import time) and started by `percept worker SERVICE`.
"""

import logging
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.signals import worker_process_init
from celery_batches import Batches

from percept.config import Settings
from percept.infra import Infra
from percept.queue import CLASSIFY, FACE_KINDS, TRAIN_CLASSIFIER, make_celery
from workers.runtime import JobRuntime

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class WorkerSpec:
    """How one service's worker runs: the queues it consumes and its Celery pool."""

    queues: list[str]
    # Batching services run the solo pool: with a process pool, celery-batches' timer hands the busy
    # child one-message batches and batches never form; with solo, messages gather in the buffer while
    # a batch runs. Celery's time limits need prefork, so they do not apply to these workers.
    pool: str = "prefork"
    batched: bool = False


SERVICES: dict[str, WorkerSpec] = {
    "classifier": WorkerSpec([CLASSIFY.queue], pool="solo", batched=True),
    # Training: one long job at a time in a process pool, so the time limits can stop a runaway one.
    "classifier-train": WorkerSpec([TRAIN_CLASSIFIER.queue]),
    "facerec": WorkerSpec(sorted({kind.queue for kind in FACE_KINDS})),
}


def create_worker_app(infra: Infra, spec: WorkerSpec) -> Celery:
    settings: Settings = infra.settings
    app = make_celery(infra.broker_url, name="percept-worker")
    app.conf.update(
        task_soft_time_limit=settings.task_soft_time_limit.total_seconds(),
        task_time_limit=settings.task_hard_time_limit.total_seconds(),
        # A batching worker must hold a full batch of unacknowledged messages (celery-batches needs
        # prefetch >= flush_every); every other worker takes one long job at a time.
        worker_prefetch_multiplier=settings.classify_batch_size if spec.batched else 1,
    )
    runtime_holder: dict[str, JobRuntime] = {}

    def runtime() -> JobRuntime:
        # One runtime (and model cache) per pool process, made after the fork.
        if "runtime" not in runtime_holder:
            runtime_holder["runtime"] = JobRuntime(infra)
        return runtime_holder["runtime"]

    @worker_process_init.connect(weak=False)
    def _reset_after_fork(**_: Any) -> None:
        # Connections and engines made in the parent must not be shared with the child.
        from percept.db.session import _session_factory, get_engine

        get_engine.cache_clear()
        _session_factory.cache_clear()
        runtime_holder.clear()

    @app.task(name=CLASSIFY.task, base=Batches, flush_every=settings.classify_batch_size,
              flush_interval=settings.classify_batch_wait.total_seconds(), acks_late=True)
    def classify(requests: list[Any]) -> None:
        """Micro-batch: every queued classify job in this flush goes through one forward pass."""
        runtime().run([request.args[0] for request in requests])

    @app.task(name=TRAIN_CLASSIFIER.task, acks_late=True)
    def train_classifier(job_id: str) -> None:
        """Train a classifier on a dataset and register it as the next version of its name."""
        runtime().run([job_id])

    def run_one(job_id: str) -> None:
        runtime().run([job_id])

    for kind in FACE_KINDS:  # one task per face job kind, each one job at a time
        app.task(name=kind.task, acks_late=True)(run_one)

    return app
