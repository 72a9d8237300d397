"""The blocking service's predictor: one call for the whole batch that blocks for the longest
`block_seconds` asked, reporting no step meanwhile (like a forward pass stuck in C code)."""

import time
from typing import Any

from percept.predictor import BasePredictor, ModelInfo, PredictRequest, StepCallback


class Blocker(BasePredictor):
    def load(self) -> ModelInfo:
        return ModelInfo("tiny-blocker", "1", None)

    def predict(self, requests: list[PredictRequest], on_step: StepCallback | None = None) -> list[dict[str, Any]]:
        seconds = max(float(request.params.get("block_seconds", 0)) for request in requests)
        time.sleep(seconds)
        return [{"blocked_seconds": seconds} for _ in requests]
