"""The blocking service's declaration: a batched job kind on a solo pool, like classification, where
Celery's time limits do not reach."""

from percept.services import BuiltinModel, JobKind, Service, WorkerPool

SERVICE = Service(
    name="blocking",
    job_kinds=(JobKind("block", queue="blocking", task="tests.block", default_model="tiny-blocker", batched=True),),
    models=(BuiltinModel("tiny-blocker", kind="block", predictor="tests.blocking_service.predictor:Blocker",
                         card={"description": "blocks for params.block_seconds"}),),
    workers=(WorkerPool("blocking", queues=("blocking",), pool="solo"),),
)
