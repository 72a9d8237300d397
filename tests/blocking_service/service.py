"""The blocking service's declaration: a batched job kind on a solo pool, like classification, where
Celery's time limits do not reach; and a job kind that ticks through steps on a prefork pool, like a generation
(shutdown drains, deadlines and priorities are tested on it)."""

from percept.services import BuiltinModel, JobKind, Service, WorkerPool

SERVICE = Service(
    name="blocking",
    job_kinds=(JobKind("block", queue="blocking", task="tests.block", default_model="tiny-blocker", batched=True),
               JobKind("tick", queue="ticking", task="tests.tick", default_model="tiny-ticker")),
    models=(BuiltinModel("tiny-blocker", kind="block", predictor="tests.blocking_service.predictor:Blocker",
                         card={"description": "blocks for params.block_seconds"}),
            BuiltinModel("tiny-ticker", kind="tick", predictor="tests.blocking_service.predictor:Ticker",
                         card={"description": "ticks for params.seconds, a step every 0.1 s"})),
    workers=(WorkerPool("blocking", queues=("blocking",), pool="solo"),
             WorkerPool("ticking", queues=("ticking",), pool="prefork")),
)
