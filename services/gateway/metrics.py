"""Prometheus metrics: request latency here; jobs, the backlog per queue (what the workers scale on), queue
wait, inference and total time per job kind and model, broker queue depth and webhook deliveries read at
scrape time from Postgres (the job record) and the broker, so every gateway replica reports the same truth
(aggregate replicas with `max`, never `sum`).

Jobs and deliveries are counted over all time without reading their tables at every scrape: see
RunningTotals. The bench `bench/metrics_scrape.py` measures a scrape with a million jobs.
"""

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.metrics_core import CounterMetricFamily
from sqlalchemy.orm import Session

from percept.db import jobs as job_repo
from percept.db import webhooks as webhook_repo
from percept.db.session import session_scope
from percept.infra import Infra
from percept.queue import queue_depths
from percept.services import catalog
from percept.supervisor import restart_counts
from services.gateway.usecases.jobs import REUSED

log = logging.getLogger(__name__)
# A row is folded into the running totals once it is this old. A job or delivery commits within its
# request or worker transaction, seconds after its id is drawn (ids grow with creation time); one that
# committed later than this below the fold would go uncounted by the replicas that folded past it.
SETTLE = timedelta(seconds=60)

# Histograms per job kind and model, from each ended job's provenance timings: (metric name, help).
HISTOGRAMS = {"queued": ("queue_wait", "Time from submission until a worker started the job"),
              "inference": ("inference", "Model time of the job (its batch's predict() call, or training)"),
              "total": ("duration", "Time from submission until the job ended")}

Labels = tuple[Any, ...]
Values = tuple[float, ...]
Totals = dict[Labels, list[float]]


@dataclass(frozen=True)
class TallySource:
    """How RunningTotals reads one table whose rows end in a state that never changes again, by ranges of
    its primary key (see percept/db/jobs.py and percept/db/webhooks.py)."""

    newest_created_before: Callable[[Session, timedelta], Any]
    totals: Callable[..., Sequence[tuple[Labels, Values]]]  # (session, *, after, upto=None, ended_only=False)
    pending_ids: Callable[..., Sequence[Any]]  # (session, *, after, upto)
    totals_by_id: Callable[[Session, list[Any]], Sequence[tuple[Any, bool, Labels, Values]]]


JOBS = TallySource(job_repo.newest_job_created_before, job_repo.job_totals, job_repo.pending_job_ids,
                   job_repo.job_totals_by_id)
DELIVERIES = TallySource(webhook_repo.newest_delivery_created_before, webhook_repo.delivery_totals,
                         webhook_repo.pending_delivery_ids, webhook_repo.delivery_totals_by_id)


def _add(totals: Totals, rows: Sequence[tuple[Labels, Values]]) -> None:
    for labels, values in rows:
        current = totals.setdefault(labels, [0.0] * len(values))
        for i, value in enumerate(values):
            current[i] += value


class RunningTotals:
    """All-time totals of a table's rows by labels, without reading the whole table at every scrape.

    A row that has ended (ended rows never change) and is older than SETTLE is folded into totals kept in
    memory; the fold's boundary is the newest such id. A refresh then reads by primary key only: the rows
    above the boundary (created within about SETTLE and since the last refresh), and the rows below it
    that were still pending when they were folded. A replica's first refresh reads the table once.
    Rows deleted after they were folded (a tenant removed) stay counted until the replica restarts.
    """

    def __init__(self, source: TallySource) -> None:
        self.source = source
        self.boundary: Any = None
        self.folded: Totals = {}
        self.pending: set[Any] = set()  # ids at or below the boundary not ended when folded
        self._lock = threading.Lock()  # scrapes run in threads; one refresh at a time

    def refresh(self, session: Session) -> Totals:
        with self._lock:
            source, boundary = self.source, self.boundary
            folded = {labels: list(values) for labels, values in self.folded.items()}
            pending = set(self.pending)
            # 1. Fold the rows that have settled since the last refresh
            newest = source.newest_created_before(session, SETTLE)
            if newest is not None and (boundary is None or newest > boundary):
                _add(folded, source.totals(session, after=boundary, upto=newest, ended_only=True))
                pending.update(source.pending_ids(session, after=boundary, upto=newest))
                boundary = newest
            # 2. The folded rows that were pending: fold those that have ended since
            live: Totals = {}
            still_pending = set()
            for row_id, ended, labels, values in source.totals_by_id(session, list(pending)):
                _add(folded if ended else live, [(labels, values)])
                if not ended:
                    still_pending.add(row_id)
            # 3. The rows above the boundary, as they stand
            _add(live, source.totals(session, after=boundary))
            # Kept only once every read has answered: a failed refresh leaves the totals as they were.
            self.boundary, self.folded, self.pending = boundary, folded, still_pending
        _add(live, [(labels, tuple(values)) for labels, values in folded.items()])
        return live


class PlatformCollector:
    def __init__(self, infra: Infra) -> None:
        self.infra = infra
        self.jobs = RunningTotals(JOBS)
        self.deliveries = RunningTotals(DELIVERIES)

    def totals(self) -> tuple[Totals, Totals, list[tuple[str, str, int, float]]]:
        """(jobs by (kind, status, model), deliveries by (status,), the backlog per queue), read now."""
        with session_scope(self.infra.database_url) as session:
            # One snapshot for every read: a job that ends between two of them is counted exactly once.
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            return self.jobs.refresh(session), self.deliveries.refresh(session), job_repo.backlog(session)

    def warm_up(self) -> None:
        """The replica's one pass over the history, at start-up rather than in the first scrape."""
        try:
            self.totals()
        except Exception as exc:  # the first scrape will try again
            log.warning("metrics: history not read at start-up (%s)", exc.__class__.__name__)

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("percept_jobs", "Jobs by kind and status", labels=["kind", "status"])
        inference = SummaryMetricFamily("percept_inference_seconds",
                                        "Model inference time of finished jobs", labels=["model"])
        histograms = {name: HistogramMetricFamily(f"percept_job_{metric}_seconds", text, labels=["kind", "model"])
                      for name, (metric, text) in HISTOGRAMS.items()}
        waiting = GaugeMetricFamily("percept_queue_jobs", "Jobs per queue from the job records: `queued` (waiting "
                                    "for a worker) and `running` (held by one); what the workers scale on",
                                    labels=["queue", "state"])
        oldest = GaugeMetricFamily("percept_queue_oldest_queued_seconds",
                                   "Seconds since the oldest queued job of the queue was submitted (0: none queued)",
                                   labels=["queue"])
        depth = GaugeMetricFamily("percept_queue_depth", "Messages waiting per queue in the broker",
                                  labels=["queue"])
        deliveries = GaugeMetricFamily("percept_webhook_deliveries", "Webhook deliveries by status",
                                       labels=["status"])
        try:
            job_totals, delivery_totals, backlog = self.totals()
            by_job: Totals = {}
            by_model: Totals = {}
            by_kind_model: Totals = {}
            for (kind, status, model), values in job_totals.items():
                _add(by_job, [((kind, status), (values[0],))])
                if values[1]:
                    _add(by_model, [((model or "unknown",), (values[1], values[2]))])
                _add(by_kind_model, [((kind, model or "unknown"), tuple(values[3:]))])
            for (kind, status), (count,) in by_job.items():
                jobs.add_metric([kind, status], count)
            for (model,), (count, seconds) in by_model.items():
                inference.add_metric([model], int(count), seconds)
            per_timing = 2 + len(job_repo.HISTOGRAM_BUCKETS)
            for (kind, model), values in by_kind_model.items():
                for i, name in enumerate(job_repo.TIMED):
                    count, seconds, *cumulative = values[i * per_timing:(i + 1) * per_timing]
                    if count:
                        buckets = [(repr(le), n) for le, n in zip(job_repo.HISTOGRAM_BUCKETS, cumulative, strict=True)]
                        histograms[name].add_metric([kind, model], buckets + [("+Inf", count)], seconds)
            queues = {queue: {"queued": (0, 0.0), "running": (0, 0.0)} for queue in catalog().queues}
            for queue, state, count, age in backlog:
                queues.setdefault(queue, {"queued": (0, 0.0), "running": (0, 0.0)})[state] = (count, age)
            for queue, states in queues.items():
                for state, (count, _) in states.items():
                    waiting.add_metric([queue, state], count)
                oldest.add_metric([queue], states["queued"][1])
            for (status,), (count,) in delivery_totals.items():
                deliveries.add_metric([status], count)
        except Exception as exc:  # a scrape must answer even when the database is down
            log.warning("metrics: database unavailable (%s)", exc.__class__.__name__)
        try:
            for queue, count in queue_depths(self.infra.broker_url).items():
                depth.add_metric([queue], count)
        except Exception as exc:
            log.warning("metrics: broker unavailable (%s)", exc.__class__.__name__)
        # Written by `percept run`'s supervisor, a process of its own, each time it restarts one (absent otherwise)
        restarts = CounterMetricFamily("percept_process_restarts", "Times `percept run` started a process again "
                                       "after it exited (a worker, the gateway, embedded Redis or Postgres)",
                                       labels=["process"])
        for process, count in sorted(restart_counts(self.infra.settings.data_dir).items()):
            restarts.add_metric([process], count)
        yield from (jobs, inference, *histograms.values(), waiting, oldest, depth, deliveries, restarts)


def make_registry(infra: Infra) -> tuple[CollectorRegistry, Histogram, PlatformCollector]:
    registry = CollectorRegistry()
    latency = Histogram("percept_http_request_seconds", "HTTP request latency",
                        ["method", "route", "status"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
    collector = PlatformCollector(infra)
    registry.register(collector)
    registry.register(REUSED)
    return registry, latency, collector
