"""Celery bootstrap for worker processes: one app, the tasks of the queues this worker pool serves.

Built by a factory (never at import time) and started by `percept worker POOL`. Which tasks exist, on
which queues, batched or not, comes from the services' declarations (percept/services.py).
"""

import logging
import time
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_shutting_down
from celery_batches import Batches

from percept.config import Settings
from percept.infra import Infra
from percept.queue import make_celery, waiting_messages
from percept.services import JobKind, WorkerPool, catalog
from workers import drain, observe
from workers.runtime import JobRuntime, announcer, beaters, decoders

log = logging.getLogger(__name__)


class GatheringBatches(Batches):
    """celery-batches, but a batch does not run while messages for it still wait in the broker.

    The Redis transport hands the worker one message per poll, so a backlog trickles in and a
    fixed batch window cuts it into batches of one or two. Here a batch that is not full yet keeps
    taking in messages while the queue is not empty, for at most `gather_seconds`; with an empty
    queue (a lone request) it runs as it arrives, so a single request pays no extra wait.
    """

    abstract = True
    broker_url: str = ""
    queue_name: str = ""
    gather_seconds: float = 0.05
    _gathering_since: float | None = None

    def Strategy(self, task: Any, app: Celery, consumer: Any) -> Any:
        """celery-batches' message handler, then a look at once: a message that arrives with none waiting behind
        it (a lone request) runs now, not at the timer's next tick; one with more behind it waits for them."""
        handle = super().Strategy(task, app, consumer)

        def handle_and_look(*args: Any, **kwargs: Any) -> None:
            handle(*args, **kwargs)
            self._do_flush()
        return handle_and_look

    def _do_flush(self) -> None:
        buffered = self._buffer.qsize()
        if 0 < buffered < self.flush_every:
            now = time.monotonic()
            self._gathering_since = self._gathering_since or now
            if now - self._gathering_since < self.gather_seconds and waiting_messages(self.broker_url,
                                                                                        self.queue_name):
                return  # the timer calls again after flush_interval
        self._gathering_since = None
        super()._do_flush()


def served_kinds(pool: WorkerPool) -> list[JobKind]:
    return [kind for kind in catalog().job_kinds.values() if kind.queue in pool.queues]


def create_worker_app(infra: Infra, pool: WorkerPool) -> Celery:
    settings: Settings = infra.settings
    kinds = served_kinds(pool)
    batched = any(kind.batched for kind in kinds)
    app = make_celery(infra.broker_url, name="percept-worker")
    app.conf.update(
        task_soft_time_limit=settings.task_soft_time_limit.total_seconds(),
        task_time_limit=settings.task_hard_time_limit.total_seconds(),
        # A batching worker must hold a full batch of unacknowledged messages (celery-batches needs
        # prefetch >= flush_every); every other worker takes one long job at a time.
        worker_prefetch_multiplier=settings.classify_batch_size if batched else 1,
    )
    runtime_holder: dict[str, JobRuntime] = {}

    def runtime() -> JobRuntime:
        # One runtime (and model cache) per pool process, made after the fork.
        if "runtime" not in runtime_holder:
            runtime_holder["runtime"] = JobRuntime(infra, inference_deadline=pool.pool == "solo")
        return runtime_holder["runtime"]

    @worker_process_init.connect(weak=False)
    def _reset_after_fork(**_: Any) -> None:
        # Connections and engines made in the parent must not be shared with the child.
        from percept.db.session import _autocommit_factory, _session_factory, get_engine

        get_engine.cache_clear()
        _session_factory.cache_clear()
        _autocommit_factory.cache_clear()
        decoders.cache_clear()  # threads do not survive a fork
        announcer.cache_clear()
        beaters.cache_clear()
        runtime_holder.clear()

    drain.clear()  # this worker process's marker, left in a /tmp that outlived an earlier container

    @worker_shutting_down.connect(weak=False)
    def _draining(**_: Any) -> None:
        # SIGTERM (warm shutdown): Celery takes no new message and waits for the running task; the job's process
        # reads when this began and hands its job back if the grace period would end first (workers/drain.py).
        log.info("shutting down: finishing the jobs held (hand-back %g s from now if still running)",
                 (settings.shutdown_grace - settings.handback_margin).total_seconds())
        drain.begin()

    # Each job's images are read early, from the keys its message names, while the claim runs. (Read as each message
    # arrives instead, while a batch gathers, the decodes slowed the gathering: larger batches, fewer images/s.)
    def batch_runner(kind: str) -> Any:
        def run_batch(requests: list[Any]) -> None:
            """Micro-batch: every queued job of the kind in this flush goes through one predict() call."""
            for request in requests:
                runtime().read_early(kind, request.args[0], request.kwargs.get("image_keys") or [])
            runtime().run([request.args[0] for request in requests])
        return run_batch

    def runner(kind: str) -> Any:
        def run_one(job_id: str, image_keys: list[str] | None = None) -> None:
            runtime().read_early(kind, job_id, image_keys or [])
            runtime().run([job_id])
        return run_one

    for kind in kinds:
        if kind.batched:
            app.task(name=kind.task, base=GatheringBatches, flush_every=settings.classify_batch_size,
                     flush_interval=settings.classify_batch_wait.total_seconds(), acks_late=True,
                     broker_url=infra.broker_url, queue_name=kind.queue,
                     gather_seconds=settings.classify_batch_gather.total_seconds())(batch_runner(kind.name))
        else:
            app.task(name=kind.task, acks_late=True)(runner(kind.name))
    observe.install(app, kinds, runtime)
    return app
