"""The tiny pipeline (tests/diffusion_pipelines.py), built and zipped once per session, and a predictor serving
it: the real loading and rendering code runs on the CPU in a fraction of a second per image, offline."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers is imported: nothing is ever downloaded

from percept.predictor import PredictRequest  # noqa: E402
from tests.diffusion_pipelines import build_tiny_pipeline, tiny_pipeline_zip  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]  # the repository
# Fast settings for the tiny model: its own 64x64, few steps.
FAST = {"prompt": "a red cat on the grass", "seed": 7, "steps": 2, "guidance_scale": 6.0}


def request(**params) -> PredictRequest:
    return PredictRequest(images=[], params={**FAST, **params})


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """One CPU thread for these tests: the tiny model gains nothing from two, and on a busy machine two threads'
    spin-waits make a 50 ms render take seconds. (Images are reproducible for a given thread count: the record
    says which.)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pipeline_zip() -> bytes:
    return tiny_pipeline_zip()


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    """The tiny pipeline's directory (for tests that damage a copy of it)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("diffusion") / "tiny-pipeline")


@pytest.fixture(scope="session")
def predictor(pipeline_zip):
    from services.diffusion.predictor import TextToImagePredictor

    served = TextToImagePredictor(artifact=pipeline_zip, name="tiny", version="1")
    served.setup()
    return served
