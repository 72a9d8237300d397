"""PERCEPT_DEVICE: the choice itself (a fake view of the GPUs stands in for torch.cuda), and the setting
flowing through the settings into what the classifier and face predictors load on and record."""

import pytest
import torch

from percept.config import get_settings
from percept.devices import Device, choose_device
from services.classifier.device import torch_device
from services.classifier.predictor import ImageNetClassifier
from services.facerec.device import facerec_device
from services.facerec.predictors import FaceEmbedPredictor


class FakeCuda:
    """What `choose_device` asks of torch.cuda, for a machine with these GPUs."""

    def __init__(self, *names: str):
        self.names = names

    def is_available(self) -> bool:
        return bool(self.names)

    def device_count(self) -> int:
        return len(self.names)

    def get_device_name(self, device: int) -> str:
        return self.names[device]


TWO_GPUS = FakeCuda("Fake GPU 0", "Fake GPU 1")


@pytest.fixture
def device_setting(monkeypatch):
    """Set PERCEPT_DEVICE for one test: the settings and the per-process device are read afresh."""

    def set_device(value: str) -> None:
        monkeypatch.setenv("PERCEPT_DEVICE", value)
        get_settings.cache_clear()
        torch_device.cache_clear()

    yield set_device
    monkeypatch.delenv("PERCEPT_DEVICE", raising=False)
    get_settings.cache_clear()
    torch_device.cache_clear()


# -- the choice ---------------------------------------------------------------------------------------------


def test_a_named_gpu_is_described_with_its_name():
    device = choose_device("cuda:1", TWO_GPUS)

    assert device == Device("cuda:1", "cuda:1 (Fake GPU 1)")
    assert device.is_cuda


def test_auto_and_cuda_take_the_first_gpu_and_cpu_stays_on_the_cpu():
    assert choose_device("auto", TWO_GPUS) == Device("cuda:0", "cuda:0 (Fake GPU 0)")
    assert choose_device(" CUDA ", TWO_GPUS) == Device("cuda:0", "cuda:0 (Fake GPU 0)")
    assert choose_device("cpu", TWO_GPUS) == Device("cpu", "cpu")
    assert not Device("cpu", "cpu").is_cuda


def test_a_gpu_that_is_not_there_is_an_error_not_a_fallback():
    with pytest.raises(ValueError, match=r"only 2 CUDA device\(s\) are visible \(cuda:0 to cuda:1\)"):
        choose_device("cuda:3", TWO_GPUS)
    for no_gpus in (FakeCuda(), None):  # none visible, or a framework without CUDA
        assert choose_device("auto", no_gpus) == Device("cpu", "cpu")
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            choose_device("cuda", no_gpus)


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:-1", "tpu", ""])
def test_a_malformed_setting_is_refused(value):
    with pytest.raises(ValueError, match="PERCEPT_DEVICE must be auto, cpu, cuda or cuda:N"):
        choose_device(value, TWO_GPUS)


def test_the_face_service_refuses_a_gpu_and_says_why():
    assert facerec_device("auto") == facerec_device("cpu") == Device("cpu", "cpu")
    for value in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="runs on the CPU only: dlib-bin and tensorflow-cpu"):
            facerec_device(value)


# -- the setting, through the settings ----------------------------------------------------------------------


def test_the_classifier_device_follows_the_setting(device_setting, monkeypatch):
    for name, value in (("is_available", lambda: True), ("device_count", lambda: 2),
                        ("get_device_name", lambda index: f"Fake GPU {index}")):
        monkeypatch.setattr(torch.cuda, name, value)

    device_setting("cuda:1")
    assert torch_device() == Device("cuda:1", "cuda:1 (Fake GPU 1)")
    device_setting("cpu")
    assert torch_device() == Device("cpu", "cpu")


def test_with_percept_device_cpu_the_classifier_loads_on_and_records_the_cpu(device_setting):
    device_setting("cpu")
    predictor = ImageNetClassifier()
    info = predictor.setup()

    assert predictor.device == Device("cpu", "cpu")
    assert info.device == "cpu"
    assert next(predictor._model.parameters()).device == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_gpu_this_machine_lacks_stops_the_classifier(device_setting):
    device_setting("cuda")
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        ImageNetClassifier().setup()


def test_the_face_predictors_record_the_cpu_and_refuse_a_gpu_setting(device_setting):
    device_setting("cpu")
    assert FaceEmbedPredictor().setup().device == "cpu"

    device_setting("cuda")
    with pytest.raises(ValueError, match="runs on the CPU only"):
        FaceEmbedPredictor().setup()
