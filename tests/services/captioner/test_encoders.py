"""A user-supplied TorchScript encoder (the `encoder` training param): a tiny CNN built here (a strided
convolution and a global average pool, F = 16) is `torch.jit.save`d into the dataset zip, trained on end to
end, carried inside the artifact and served by `LSTMCaptioner`. A small dataset: the tiny CNN is fast, but
the default encoder's run (for the cache keys) costs ~20 ms an image.
"""

import hashlib
import io

import pytest
import torch
from torch import nn

from percept.datasets import DatasetLimits
from percept.imaging import decode_rgb
from percept.predictor import PredictRequest, TrainingData, TrainingResult
from services.captioner.model import load_caption_model
from services.captioner.predictor import LSTMCaptioner
from services.captioner.training import CaptionerTrainer
from tests.scenes import add_files, make_scenes, scenes_zip
from tests.services.captioner.test_lstm_captioner import DictCache

ENCODER_PATH = "encoders/tiny-cnn.pt"
FEATURES = 16
PARAMS = {"name": "tiny", "epochs": 2, "min_word_count": 1, "embedding_dim": 16, "hidden_size": 32, "seed": 0}


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, FEATURES, kernel_size=5, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


class FeatureMap(nn.Module):
    """Forgets to pool: (N, C, H, W) out, not (N, F)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2]


def torchscript(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module.eval()), buffer)
    return buffer.getvalue()


def train(zip_bytes: bytes, cache: DictCache, **params) -> TrainingResult:
    data = TrainingData(archive=zip_bytes, limits=DatasetLimits(), cache=cache, dataset={"sha256": "e" * 64})
    return CaptionerTrainer(device="cpu").train(data, {**PARAMS, **params}, lambda *args: None)


@pytest.fixture(scope="module")
def encoder_file() -> bytes:
    torch.manual_seed(0)
    return torchscript(TinyCNN())


@pytest.fixture(scope="module")
def dataset(encoder_file: bytes) -> bytes:
    return add_files(scenes_zip(60, seed=2, split=(40, 10, 10)),
                     {ENCODER_PATH: encoder_file, "notes/readme.txt": b"not a model"})


@pytest.fixture(scope="module")
def cache() -> DictCache:
    return DictCache()


@pytest.fixture(scope="module")
def trained(dataset: bytes, cache: DictCache) -> TrainingResult:
    return train(dataset, cache, encoder=ENCODER_PATH)


def test_training_with_a_torchscript_encoder_uses_its_features(trained, encoder_file, cache):
    sha256 = hashlib.sha256(encoder_file).hexdigest()
    card = trained.card
    assert (card["encoder"], card["encoder_kind"], card["feature_dim"]) == (ENCODER_PATH, "torchscript", FEATURES)
    assert card["encoder_weights_sha256"] == sha256 and card["encoder_weights"] == "user-supplied TorchScript"
    assert card["config"]["encoder"] == ENCODER_PATH
    assert trained.output["dataset"]["feature_cache"] == {"hits": 0, "misses": 60}
    assert trained.metrics["history"][-1]["loss"] < trained.metrics["history"][0]["loss"]
    # Its cache keys carry the file's sha256; every vector has its F values
    assert cache.items and all(key.startswith(f"torchscript-v1-{sha256}/") for key in cache.items)
    assert all(len(data) == 128 + 4 * FEATURES for data in cache.items.values())  # an .npy of 16 float32


def test_the_default_encoder_never_shares_cached_features_with_it(trained, dataset, cache, encoder_file):
    scripted_keys = set(cache.items)
    again = train(dataset, cache, encoder=ENCODER_PATH)
    assert again.output["dataset"]["feature_cache"] == {"hits": 60, "misses": 0}
    assert again.artifact == trained.artifact  # deterministic, from the cached features too
    default = train(dataset, cache, epochs=1)
    assert default.output["dataset"]["feature_cache"] == {"hits": 0, "misses": 60}
    assert default.card["encoder"] == "efficientnet-lite0" and default.card["feature_dim"] == 1280
    default_keys = set(cache.items) - scripted_keys
    assert len(default_keys) == 60 and all(key.startswith("efficientnet-lite0-v1-") for key in default_keys)
    # Another TorchScript file (other weights) gets keys of its own
    torch.manual_seed(1)
    other = torchscript(TinyCNN())
    other_dataset = add_files(dataset, {"encoders/other.pt": other})
    result = train(other_dataset, cache, encoder="encoders/other.pt", epochs=1)
    assert result.output["dataset"]["feature_cache"] == {"hits": 0, "misses": 60}
    assert hashlib.sha256(other).hexdigest() != hashlib.sha256(encoder_file).hexdigest()


def test_the_predictor_serves_with_the_encoder_in_the_artifact(trained, encoder_file, dataset):
    payload = torch.load(io.BytesIO(trained.artifact), weights_only=True)
    assert payload["format_version"] == 2
    stored = payload["encoder"]
    assert (stored["kind"], stored["name"], stored["feature_dim"]) == ("torchscript", ENCODER_PATH, FEATURES)
    assert stored["torchscript"].numpy().tobytes() == encoder_file
    model = load_caption_model(trained.artifact, "cpu", "not-the-packaged-weights")  # not needed for this one
    assert model.encoder.torchscript == encoder_file and model.config.feature_dim == FEATURES

    captioner = LSTMCaptioner(artifact=trained.artifact, name="tiny", version="1", device="cpu")
    info = captioner.setup()
    assert info.sha256 == hashlib.sha256(trained.artifact).hexdigest()
    assert captioner._encoder is not None and captioner._encoder.feature_dim == FEATURES
    scenes = make_scenes(4, seed=5)
    images = [decode_rgb(scene.image, 10**7, at_least=LSTMCaptioner.input_size) for scene in scenes]
    outputs = captioner.predict([PredictRequest(images=[image], params={"beam_width": 2}) for image in images])
    assert all(out["captions"][0]["text"] and out["captions"][0]["log_prob"] < 0 for out in outputs)
    # Served as trained: the trainer's greedy captions of its test images come back
    import zipfile

    archive = zipfile.ZipFile(io.BytesIO(dataset))
    for example in trained.output["examples"]:
        image = decode_rgb(archive.read(example["image"]), 10**7, at_least=LSTMCaptioner.input_size)
        served = captioner.predict([PredictRequest(images=[image], params={"beam_width": 1})])
        assert served[0]["captions"][0]["text"] == example["greedy"]


@pytest.mark.parametrize(("encoder", "code", "message"), [
    ("notes/readme.txt", "invalid_encoder", "is not a TorchScript file"),
    ("encoders/feature-map.pt", "invalid_encoder", "must map a (N, 3, 224, 224) batch to (N, F)"),
    ("encoders/inception-v3.pt", "encoder_not_found", "the zip holds no 'encoders/inception-v3.pt'"),
    ("", "invalid_encoder", "encoder must be 'efficientnet-lite0' or the path"),
])
def test_an_encoder_that_is_not_usable_fails_with_its_code(dataset, encoder, code, message):
    zip_bytes = add_files(dataset, {"encoders/feature-map.pt": torchscript(FeatureMap())})
    with pytest.raises(ValueError, match=rf"^\[{code}\] ") as error:
        train(zip_bytes, DictCache(), encoder=encoder)
    assert message in str(error.value)
