"""A service for the worker endpoint's tests (PERCEPT_EXTRA_SERVICES): one model served by a prefork pool and
by a batching solo pool, and a pool with no model to warm; its predictor logs a line per call, as a real one
may, so a test can see which job that line belongs to."""

import logging
from typing import Any

from percept.predictor import BasePredictor, ModelInfo, PredictRequest, StepCallback
from percept.services import BuiltinModel, JobKind, Service, WorkerPool

log = logging.getLogger(__name__)


class Announcer(BasePredictor):
    def load(self) -> ModelInfo:
        return ModelInfo("tiny-announcer", "1", None)

    def predict(self, requests: list[PredictRequest], on_step: StepCallback | None = None) -> list[dict[str, Any]]:
        log.info("announcing %d requests", len(requests))
        return [{"announced": True} for _ in requests]


SERVICE = Service(
    name="observed",
    job_kinds=(JobKind("announce", queue="observed", task="tests.announce", default_model="tiny-announcer"),
               JobKind("announce_batched", queue="observed-solo", task="tests.announce_batched",
                       default_model="tiny-announcer", model_kind="announce", batched=True)),
    models=(BuiltinModel("tiny-announcer", kind="announce", predictor="tests.workers.observed_service:Announcer"),),
    workers=(WorkerPool("observed", queues=("observed",)),
             WorkerPool("observed-solo", queues=("observed-solo",), pool="solo"),
             WorkerPool("observed-idle", queues=("observed-idle",))),
)
