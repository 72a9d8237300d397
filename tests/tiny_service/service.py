"""The tiny service's declaration: one job kind on its own queue, one built-in model, one worker pool."""

from typing import Any

from percept.services import BuiltinModel, JobKind, Service, WorkerPool


def colour_name(output: dict[str, Any]) -> str | None:
    return output.get("dominant")


SERVICE = Service(
    name="tiny",
    job_kinds=(JobKind("colour_stats", queue="tiny", task="tests.colour_stats", default_model="tiny-colour-stats",
                       search_text="tests.tiny_service.service:colour_name"),),
    models=(BuiltinModel("tiny-colour-stats", kind="colour_stats",
                         predictor="tests.tiny_service.predictor:ColourStats", card={"description": "mean RGB"}),),
    workers=(WorkerPool("tiny", queues=("tiny",)),),
    device="tests.tiny_service.predictor:serving_device",
)
