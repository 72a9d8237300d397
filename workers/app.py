"""Celery bootstrap for worker processes: one app, the tasks of the queues this worker serves.

Built by a factory (never at import time) and started by `percept worker SERVICE`.
"""

import logging
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.signals import worker_process_init
from celery_batches import Batches

from percept.config import Settings
from percept.infra import Infra
from percept.queue import CLASSIFY, FACE_KINDS, TRAIN_CLASSIFIER, make_celery, waiting_messages
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


class GatheringBatches(Batches):
    """celery-batches, but a batch does not run while messages for it still wait in the broker.

    The Redis transport hands the worker one message per poll, so a backlog trickles in and a
    fixed batch window cuts it into batches of one or two. Here a batch that is not full yet keeps
    taking in messages while the queue is not empty, for at most `gather_seconds`; with an empty
    queue (a lone request) it runs at the next tick, so a single request pays no extra wait.
    """

    abstract = True
    broker_url: str = ""
    gather_seconds: float = 0.05
    _gathering_since: float | None = None

    def _do_flush(self) -> None:
        buffered = self._buffer.qsize()
        if 0 < buffered < self.flush_every:
            now = time.monotonic()
            self._gathering_since = self._gathering_since or now
            if now - self._gathering_since < self.gather_seconds and waiting_messages(self.broker_url,
                                                                                        CLASSIFY.queue):
                return  # the timer calls again after flush_interval
        self._gathering_since = None
        super()._do_flush()


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

    @app.task(name=CLASSIFY.task, base=GatheringBatches, flush_every=settings.classify_batch_size,
              flush_interval=settings.classify_batch_wait.total_seconds(), acks_late=True,
              broker_url=infra.broker_url, gather_seconds=settings.classify_batch_gather.total_seconds())
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
