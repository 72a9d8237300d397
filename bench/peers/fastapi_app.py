"""Peer: a plain FastAPI endpoint calling the model, no batching (one predict() per request).

A sync `def` route, as most such services are written: Starlette runs it in its thread pool.
Run (bench/peers/run.py does): PYTHONPATH=<work tree> <env python> -m uvicorn bench.peers.fastapi_app:app --port P
"""

from typing import Annotated

from fastapi import FastAPI, File

from bench.peers.model import classify, load_predictor

app = FastAPI()
predictor = load_predictor()


@app.get("/healthz")
def healthz() -> dict:
    return {"ok": True}


@app.post("/classify")
def classify_upload(image: Annotated[bytes, File()]) -> dict:
    return classify(predictor, [image])[0]
