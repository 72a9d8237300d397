"""Prometheus metrics: request latency here; jobs, queue depth and inference time read at scrape time
from Postgres (the job record) and the broker, so every gateway replica reports the same truth."""

import logging

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily

from percept.db import jobs as job_repo
from percept.db import webhooks as webhook_repo
from percept.db.session import session_scope
from percept.infra import Infra
from percept.queue import queue_depths

log = logging.getLogger(__name__)


class PlatformCollector:
    def __init__(self, infra: Infra) -> None:
        self.infra = infra

    def collect(self):
        jobs = GaugeMetricFamily("percept_jobs", "Jobs by kind and status", labels=["kind", "status"])
        inference = SummaryMetricFamily("percept_inference_seconds",
                                        "Model inference time of finished jobs", labels=["model"])
        depth = GaugeMetricFamily("percept_queue_depth", "Messages waiting per queue", labels=["queue"])
        deliveries = GaugeMetricFamily("percept_webhook_deliveries", "Webhook deliveries by status",
                                       labels=["status"])
        try:
            with session_scope(self.infra.database_url) as session:
                for kind, status, count in job_repo.count_by_kind_and_status(session):
                    jobs.add_metric([kind, status], count)
                for name, count, seconds in job_repo.inference_time_by_model(session):
                    inference.add_metric([name or "unknown"], count, seconds)
                for status, count in webhook_repo.count_deliveries_by_status(session):
                    deliveries.add_metric([status], count)
        except Exception as exc:  # a scrape must answer even when the database is down
            log.warning("metrics: database unavailable (%s)", exc.__class__.__name__)
        try:
            for queue, count in queue_depths(self.infra.broker_url).items():
                depth.add_metric([queue], count)
        except Exception as exc:
            log.warning("metrics: broker unavailable (%s)", exc.__class__.__name__)
        yield from (jobs, inference, depth, deliveries)


def make_registry(infra: Infra) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    latency = Histogram("percept_http_request_seconds", "HTTP request latency",
                        ["method", "route", "status"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
    registry.register(PlatformCollector(infra))
    return registry, latency
