"""The tiny service's predictor: an image's mean colour and its dominant channel (Pillow only)."""

from typing import Any

from PIL import ImageStat

from percept.config import get_settings
from percept.devices import cpu_only
from percept.predictor import BasePredictor, ModelInfo, PredictRequest, StepCallback, report_step


def serving_device(requested: str) -> str:
    return cpu_only(requested, "the tiny service computes with Pillow").description


class ColourStats(BasePredictor):
    input_size = 32  # a mean colour needs few pixels: large photos are decoded at a reduced scale

    def load(self) -> ModelInfo:
        return ModelInfo("tiny-colour-stats", "1", None, device=serving_device(get_settings().device))

    def predict(self, requests: list[PredictRequest], on_step: StepCallback | None = None) -> list[dict[str, Any]]:
        outputs = []
        for done, request in enumerate(requests, start=1):
            mean = [round(value, 1) for value in ImageStat.Stat(request.images[0].convert("RGB")).mean]
            outputs.append({"mean_rgb": mean, "dominant": ("red", "green", "blue")[mean.index(max(mean))]})
            report_step(on_step, done, len(requests))
        return outputs
