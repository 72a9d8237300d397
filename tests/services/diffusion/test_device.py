"""The diffusion service's device: PERCEPT_DEVICE through the settings, and the worker's start-up check (a fake
view of the GPUs stands in for torch.cuda)."""

import pytest

from percept.config import get_settings
from percept.devices import Device
from services.diffusion import device as diffusion_device
from tests.services.test_devices import FakeCuda


@pytest.fixture
def fresh_device(monkeypatch):
    def set_device(value: str) -> None:
        monkeypatch.setenv("PERCEPT_DEVICE", value)
        get_settings.cache_clear()
        diffusion_device.torch_device.cache_clear()

    yield set_device
    monkeypatch.delenv("PERCEPT_DEVICE", raising=False)
    get_settings.cache_clear()
    diffusion_device.torch_device.cache_clear()


def test_the_setting_chooses_the_device_once_per_process(fresh_device, monkeypatch):
    monkeypatch.setattr(diffusion_device.torch, "cuda", FakeCuda("Fake GPU 0", "Fake GPU 1"))
    fresh_device("cuda:1")

    assert diffusion_device.torch_device() == Device("cuda:1", "cuda:1 (Fake GPU 1)")
    assert diffusion_device.torch_device() is diffusion_device.torch_device()


def test_the_cpu_setting_stays_on_the_cpu(fresh_device, monkeypatch):
    monkeypatch.setattr(diffusion_device.torch, "cuda", FakeCuda("Fake GPU 0"))
    fresh_device("cpu")

    assert diffusion_device.torch_device() == Device("cpu", "cpu")


def test_the_start_up_check_describes_the_device_or_refuses_a_missing_gpu(monkeypatch):
    monkeypatch.setattr(diffusion_device.torch, "cuda", FakeCuda("Fake GPU 0"))
    assert diffusion_device.serving_device("auto") == "cuda:0 (Fake GPU 0)"

    monkeypatch.setattr(diffusion_device.torch, "cuda", FakeCuda())
    assert diffusion_device.serving_device("auto") == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        diffusion_device.serving_device("cuda")
