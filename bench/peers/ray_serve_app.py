"""Peer: Ray Serve, one replica, `@serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)`, the same
predictor, behind Serve's FastAPI ingress (multipart `image`).

Run (bench/peers/run.py does): PYTHONPATH=<work tree> <env python> bench/peers/ray_serve_app.py --port P
It stays in the foreground until SIGTERM / SIGINT, then shuts Serve and its local Ray down.
"""

import argparse
import os
import signal
import threading
from typing import Annotated

import ray
from fastapi import FastAPI, File
from ray import serve

from bench.peers.model import classify, load_predictor

app = FastAPI()


@serve.deployment(num_replicas=1, max_ongoing_requests=64)
@serve.ingress(app)
class Classifier:
    def __init__(self) -> None:
        self.predictor = load_predictor()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def classify_batch(self, uploads: list[bytes]) -> list[dict]:
        return classify(self.predictor, uploads)

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"ok": True}

    @app.post("/classify")
    async def classify_upload(self, image: Annotated[bytes, File()]) -> dict:
        return await self.classify_batch(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # A local Ray of this machine's cores, no dashboard; the replica gets no CPU reservation, so the
    # controller and proxy actors never keep it from starting on 2 cores.
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(Classifier.options(ray_actor_options={"num_cpus": 0}).bind(), route_prefix="/", blocking=False)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
