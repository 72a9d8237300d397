"""LSTM captioner figures on synthetic captioned scenes (tests/scenes.py), the trainer and predictor called
directly (not through the gateway: the platform path is classification's bench; this one measures the model).

Run: .venv/bin/python bench/captioner.py [--device auto|cpu|cuda|cuda:N] [--images 600] [--epochs 10]

Prints: the training job's feature pass (the frozen encoder) and decoder epochs, per epoch and per 1,000
images; the BLEU table; the feature-cache hit rate and time of a retrain on the same photos; captions per
second, greedy and beam-3, at batch 1 and batch 16.
"""

import argparse
import sys
import time
from pathlib import Path

from harness import add_device_argument, apply_device

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class DictCache:
    """The FeatureCache contract in memory (the worker's is object storage)."""

    def __init__(self) -> None:
        self.items: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.items.get(key)

    def put(self, key: str, data: bytes) -> None:
        self.items[key] = data


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_argument(parser)
    parser.add_argument("--images", type=int, default=600, help="scenes in the zip (75%% train, 12.5%% dev, test)")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    apply_device(parser, args.device)

    from percept.datasets import DatasetLimits
    from percept.imaging import decode_rgb
    from percept.predictor import TrainingData
    from services.captioner.predictor import LSTMCaptioner
    from services.captioner.training import CaptionerTrainer
    from tests.scenes import make_scenes, scenes_zip

    params = {"name": "bench", "epochs": args.epochs, "min_word_count": 1, "seed": 0}
    zip_bytes = scenes_zip(args.images, seed=0)
    cache = DictCache()
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
    print("captions per second (direct predictor, encoder included):")
    for batch_size in (1, 16):
        greedy = captions_per_second(predictor, images, batch_size, beam_width=1)
        beam = captions_per_second(predictor, images, batch_size, beam_width=3)
        print(f"  batch {batch_size:>2}: greedy {greedy:6.1f}/s, beam-3 {beam:6.1f}/s")


if __name__ == "__main__":
    main()
