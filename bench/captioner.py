"""LSTM captioner figures on synthetic captioned scenes (tests/scenes.py): the trainer and predictor called
directly, then the same through the API of a `percept run` platform.

Run: .venv/bin/python bench/captioner.py [--device auto|cpu|cuda|cuda:N] [--images 600] [--epochs 10]
     [--api-seconds 15]

Prints: the training job's feature pass (the frozen encoder) and decoder epochs, per epoch and per 1,000
images; the BLEU table; the feature-cache hit rate and time of a retrain on the same photos; captions per
second, greedy and beam-3, at batch 1 and batch 16 (direct), and at 1 and 16 concurrent API clients.
"""

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from harness import add_device_argument, apply_device, running_platform

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def captions_per_second(predictor, images, batch_size: int, beam_width: int, seconds: float = 4.0) -> float:
    from percept.predictor import PredictRequest

    requests = [PredictRequest(images=[images[i % len(images)]], params={"beam_width": beam_width})
                for i in range(batch_size)]
    predictor.predict(requests)  # warm-up
    done = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        predictor.predict(requests)
        done += batch_size
    return done / elapsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    parser.add_argument("--images", type=int, default=600, help="scenes in the zip (75%% train, 12.5%% dev, test)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--api-seconds", type=float, default=15.0,
                        help="seconds per API measurement (0: skip the API part)")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    apply_device(parser, args.device)
    measure(args)


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Prints the figures as it goes; returns them: training s per 1,000 images (`decoder_epoch_per_1000_s`,
    `feature_pass_per_1000_s`), `direct_{greedy,beam}_{1,16}` and `api_{greedy,beam}_{1,16}` captions/s."""

    from percept.datasets import DatasetLimits
    from percept.imaging import decode_rgb
    from percept.predictor import TrainingData
    from services.captioner.predictor import LSTMCaptioner
    from services.captioner.training import CaptionerTrainer
    from tests.scenes import make_scenes, scenes_zip

    params = {"name": "bench", "epochs": args.epochs, "min_word_count": 1, "seed": 0}
    zip_bytes = scenes_zip(args.images, seed=0)
    # The worker's cache: object storage (here a local directory), as the platform runs it.
    from percept.storage import StoredCache, object_store_from_url

    cache_dir = Path(tempfile.mkdtemp(prefix="percept-bench-captioner-"))
    cache = StoredCache(object_store_from_url(cache_dir.as_uri()), "cache")
    trainer = CaptionerTrainer()
    print(f"device: {trainer.device.description}; {args.images} scenes at 96 px, {args.epochs} epochs")

    # 1. Training from nothing: the encoder runs on every photo
    started = time.perf_counter()
    first = trainer.train(TrainingData(archive=zip_bytes, limits=DatasetLimits(), cache=cache), params,
                          lambda *_: None)
    total = time.perf_counter() - started
    history = first.metrics["history"]
    epoch_seconds = sum(e["seconds"] for e in history) / len(history)
    train_images = first.output["dataset"]["train_images"]
    print(f"training: {total:.1f} s in all, {len(history)} epochs")
    print(f"  decoder epoch: {epoch_seconds:.2f} s ({epoch_seconds / train_images * 1000:.2f} s per 1,000 "
          f"training images, {train_images * 5} captions)")

    # 2. Retraining on the same photos: every feature from the cache
    started = time.perf_counter()
    again = trainer.train(TrainingData(archive=zip_bytes, limits=DatasetLimits(), cache=cache), params,
                          lambda *_: None)
    retrain = time.perf_counter() - started
    hits = again.output["dataset"]["feature_cache"]
    rate = hits["hits"] / max(1, hits["hits"] + hits["misses"])
    encoder_pass = total - retrain
    print(f"  feature pass (encoder, cache empty): ~{encoder_pass:.1f} s "
          f"({encoder_pass / args.images * 1000:.1f} s per 1,000 images)")
    print(f"retrain on the same zip: {retrain:.1f} s, feature-cache hit rate {rate:.0%} "
          f"({hits['hits']} hits, {hits['misses']} misses)")
    bleu = first.metrics["bleu"]
    print(f"BLEU-1..4 on the test split: greedy {bleu['greedy']}, beam-{bleu['beam_width']} {bleu['beam']}")

    # 3. Serving: the predictor called directly
    predictor = LSTMCaptioner(artifact=first.artifact, name="bench", version="1")
    predictor.setup()
    images = [decode_rgb(scene.image, 10**7, at_least=LSTMCaptioner.input_size)
              for scene in make_scenes(32, seed=1)]
    figures = {"decoder_epoch_per_1000_s": epoch_seconds / train_images * 1000,
               "feature_pass_per_1000_s": encoder_pass / args.images * 1000}
    print("captions per second (direct predictor, encoder included):")
    for batch_size in (1, 16):
        greedy = figures[f"direct_greedy_{batch_size}"] = captions_per_second(predictor, images, batch_size, 1)
        beam = figures[f"direct_beam_{batch_size}"] = captions_per_second(predictor, images, batch_size, 3)
        print(f"  batch {batch_size:>2}: greedy {greedy:6.1f}/s, beam-3 {beam:6.1f}/s")

    # 4. Through the API: `percept run`, a captioner trained there on the same scenes, then POST /v1/caption
    shutil.rmtree(cache_dir, ignore_errors=True)  # the training's feature cache: done with it
    if args.api_seconds > 0:
        figures.update(api_figures(zip_bytes, [scene.image for scene in make_scenes(32, seed=1)], args.epochs,
                                   args.api_seconds))
    return figures


def api_figures(zip_bytes: bytes, photos: list[bytes], epochs: int, seconds: float) -> dict[str, float]:
    with running_platform() as (url, key, _):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
            dataset = client.post("/v1/datasets", files={"file": ("scenes.zip", zip_bytes)}).json()
            while dataset["status"] == "analyzing":
                client.get(f"/v1/jobs/{dataset['job_id']}", headers={"Prefer": "wait=10"})
                dataset = client.get(f"/v1/datasets/{dataset['id']}").json()
            job = client.post("/v1/train/captioner", json={"dataset": dataset["id"], "name": "bench", "epochs": epochs,
                                                           "min_word_count": 1}).json()
            while job["status"] in ("queued", "running"):
                job = client.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=30"}).json()
            if job["status"] != "succeeded":
                raise RuntimeError(f"training through the API did not succeed: {job['error']}")
            ids = [client.post("/v1/images", files={"file": ("s.jpg", photo)}).json()["id"] for photo in photos]
        print("captions per second through the API (percept run; the captioner trained there on the same scenes):")
        figures = {}
        for beam_width in (1, 3):
            for clients in (1, 16):
                rate, device = api_rate(url, key, ids, beam_width, clients, seconds)
                figures[f"api_{'greedy' if beam_width == 1 else 'beam'}_{clients}"] = rate
                print(f"  {'greedy' if beam_width == 1 else 'beam-3'}, {clients:>2} concurrent clients: "
                      f"{rate:6.1f}/s (worker device {device})")
    return figures


def api_rate(url: str, key: str, image_ids: list[str], beam_width: int, clients: int, seconds: float
             ) -> tuple[float, str]:
    stop_at = time.perf_counter() + seconds
    devices: set[str] = set()

    def hammer(offset: int) -> int:
        count = 0
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            while time.perf_counter() < stop_at:
                body = {"image": image_ids[(offset + count) % len(image_ids)], "beam_width": beam_width}
                job = client.post("/v1/caption", json=body, headers={"Prefer": "wait=30"}).json()
                if job.get("status") != "succeeded":
                    raise RuntimeError(f"caption job did not succeed: {job}")
                devices.add(job["provenance"]["worker"]["device"])
                count += 1
        return count

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = sum(pool.map(hammer, range(clients)))
    return done / (time.perf_counter() - started), ", ".join(sorted(devices))


if __name__ == "__main__":
    main()
