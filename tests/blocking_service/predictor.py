"""The blocking service's predictor: one call for the whole batch that blocks for the longest
`block_seconds` asked, reporting no step meanwhile (like a forward pass stuck in C code)."""

import time
from typing import Any

from percept.predictor import BasePredictor, ModelInfo, PredictRequest, StepCallback, report_step

TICK_SECONDS = 0.1


class Blocker(BasePredictor):
    def load(self) -> ModelInfo:
        return ModelInfo("tiny-blocker", "1", None)

    def predict(self, requests: list[PredictRequest], on_step: StepCallback | None = None) -> list[dict[str, Any]]:
        seconds = max(float(request.params.get("block_seconds", 0)) for request in requests)
        time.sleep(seconds)
        return [{"blocked_seconds": seconds} for _ in requests]


class Ticker(BasePredictor):
    """Sleeps `seconds` in steps of 0.1 s, reporting each step (a cancel or a hand-back stops it at one)."""

    def load(self) -> ModelInfo:
        return ModelInfo("tiny-ticker", "1", None)

    def predict(self, requests: list[PredictRequest], on_step: StepCallback | None = None) -> list[dict[str, Any]]:
        steps = max(round(float(request.params.get("seconds", 0)) / TICK_SECONDS) for request in requests)
        for step in range(steps):
            time.sleep(TICK_SECONDS)
            report_step(on_step, step + 1, steps)
        return [{"ticks": steps} for _ in requests]
