"""Peer: BentoML with adaptive batching (at most 16 per batch), one worker, the same predictor.

Run (bench/peers/run.py does): PYTHONPATH=<work tree> <env>/bin/bentoml serve bench.peers.bentoml_service:Classifier
    --host 127.0.0.1 --port P
"""

from pathlib import Path

import bentoml

from bench.peers.model import classify, load_predictor

MAX_BATCH_SIZE = 16
# BentoML's ceiling on a request's wait for a batch; its adaptive dispatcher picks the actual window.
MAX_LATENCY_MS = 10_000


@bentoml.service(workers=1, traffic={"timeout": 60})
class Classifier:
    def __init__(self) -> None:
        self.predictor = load_predictor()

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def classify(self, image: list[Path]) -> list[dict]:
        return classify(self.predictor, [path.read_bytes() for path in image])
