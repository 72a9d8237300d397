"""TextToImagePredictor on the tiny pipeline: reproducible PNGs, seeds, schedulers, parameter checks, progress
and cancellation."""

import hashlib
import io
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

from percept.predictor import JobCanceled
from services.diffusion.pipelines import SCHEDULERS, scheduler_name
from services.diffusion.pngmeta import read_parameters, read_png_record
from services.diffusion.predictor import SEED_LIMIT, TextToImagePredictor
from tests.services.diffusion.conftest import request


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def only_image(predictor, **params) -> dict:
    [output] = predictor.predict([request(**params)])
    [image] = output["images"]
    return image


# -- reproducibility ----------------------------------------------------------------------------------------


def test_the_same_params_and_seed_give_the_same_png_bytes_from_two_separately_loaded_predictors(pipeline_zip,
                                                                                                predictor):
    again = TextToImagePredictor(artifact=pipeline_zip, name="tiny", version="1")

    first = only_image(predictor, seed=1234)
    second = only_image(again, seed=1234)

    assert first["png"] == second["png"]
    assert first["sha256"] == second["sha256"] == hashlib.sha256(first["png"]).hexdigest()
    assert first["generation"] == second["generation"]


def test_the_png_carries_its_record_and_a1111_parameters(predictor):
    image = only_image(predictor, seed=99, negative_prompt="blurry", subject="cat", style="oil")

    record = image["generation"]
    assert read_png_record(image["png"]) == record
    assert record == {
        "prompt": "a red cat on the grass", "negative_prompt": "blurry", "seed": 99, "steps": 2,
        "guidance_scale": 6.0, "width": 64, "height": 64, "scheduler": "PNDM",
        "model": {"name": "tiny", "version": "1", "sha256": predictor.setup().sha256},
        "pipeline": "StableDiffusionPipeline", "device": "cpu", "dtype": "float32",
        "libraries": record["libraries"], "noise": "cpu-generator", "cpu_threads": torch.get_num_threads(),
        "subject": "cat", "style": "oil"}
    assert set(record["libraries"]) == {"diffusers", "transformers", "torch", "safetensors"}
    assert read_parameters(image["png"]) == (
        "a red cat on the grass\nNegative prompt: blurry\nSteps: 2, Sampler: PNDM, CFG scale: 6, Seed: 99, "
        f"Size: 64x64, Model hash: {predictor.setup().sha256[:10]}, Model: tiny, Version: percept")


def test_different_seeds_give_different_images(predictor):
    one, other = only_image(predictor, seed=1), only_image(predictor, seed=2)

    assert np.abs(pixels(one["png"]) - pixels(other["png"])).mean() > 1.0


def test_num_images_renders_consecutive_seeds_and_each_image_reproduces_alone(predictor):
    [output] = predictor.predict([request(seed=500, num_images=2)])
    alone = only_image(predictor, seed=501)

    assert [image["seed"] for image in output["images"]] == [500, 501]
    assert output["images"][1]["png"] == alone["png"]
    assert output["images"][1]["generation"] == alone["generation"]
    assert output["images"][0]["png"] != output["images"][1]["png"]


def test_seeds_wrap_around_below_two_to_the_32(predictor):
    [output] = predictor.predict([request(seed=SEED_LIMIT - 1, num_images=2)])

    assert [image["seed"] for image in output["images"]] == [SEED_LIMIT - 1, 0]
    assert output["images"][1]["png"] == only_image(predictor, seed=0)["png"]


def test_keys_the_job_adds_change_nothing_of_the_image(predictor):
    plain = only_image(predictor, seed=3)
    with_extras = only_image(predictor, seed=3, model="tiny:1", cell=[0, 1], reproduce={"image_id": "x"})

    assert with_extras["png"] == plain["png"]


def test_the_negative_prompt_steers_the_image_and_an_empty_one_is_none(predictor):
    plain = only_image(predictor, seed=4)
    empty = only_image(predictor, seed=4, negative_prompt="  ")
    steered = only_image(predictor, seed=4, negative_prompt="green dog")

    assert empty["png"] == plain["png"]
    assert empty["generation"]["negative_prompt"] is None
    assert steered["png"] != plain["png"]


def test_the_output_describes_what_was_rendered_with_the_models_defaults(predictor):
    [output] = predictor.predict([request(seed=8, width=None, height=None, scheduler=None)])

    png = output.pop("images")[0]
    assert output == {"prompt": "a red cat on the grass", "negative_prompt": None, "seed": 8, "scheduler": "PNDM",
                      "width": 64, "height": 64, "steps": 2, "guidance_scale": 6.0, "device": "cpu",
                      "dtype": "float32"}
    assert (png["width"], png["height"]) == (64, 64)
    assert Image.open(io.BytesIO(png["png"])).size == (64, 64)


def test_a_requested_size_is_rendered(predictor):
    image = only_image(predictor, seed=9, width=96, height=64, steps=2)

    assert Image.open(io.BytesIO(image["png"])).size == (96, 64)
    assert (image["width"], image["height"]) == (96, 64)
    assert image["generation"]["width"] == 96


def test_requests_of_a_batch_get_one_output_each_in_order(predictor):
    outputs = predictor.predict([request(seed=10, steps=2), request(seed=11, steps=2, num_images=2)])

    assert [[image["seed"] for image in output["images"]] for output in outputs] == [[10], [11, 12]]


# -- schedulers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_each_scheduler_renders_and_is_recorded(predictor, name):
    image = only_image(predictor, seed=21, steps=2, scheduler=name)

    used = predictor.loaded.pipe.scheduler
    assert type(used).__name__ == SCHEDULERS[name][0]
    assert scheduler_name(used) == name
    assert image["generation"]["scheduler"] == name
    assert pixels(image["png"]).std() > 0  # an image, not a blank


def test_schedulers_differ_and_swapping_back_reproduces_the_default(predictor):
    default = only_image(predictor, seed=22, steps=3)
    euler = only_image(predictor, seed=22, steps=3, scheduler="Euler a")
    dpm = only_image(predictor, seed=22, steps=3, scheduler="DPM++ 2M Karras")
    default_again = only_image(predictor, seed=22, steps=3, scheduler=None)
    by_name = only_image(predictor, seed=22, steps=3, scheduler="PNDM")

    assert len({default["png"], euler["png"], dpm["png"]}) == 3
    assert default_again["png"] == default["png"] == by_name["png"]
    assert only_image(predictor, seed=22, steps=3, scheduler="Euler a")["png"] == euler["png"]


# -- checked parameters -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "named"), [
    ({"prompt": None}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"negative_prompt": ["no"]}, "negative_prompt"),
    ({"negative_prompt": "x" * 2001}, "negative_prompt"),
    ({"seed": None}, "seed"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),
    ({"seed": 1.0}, "seed"),
    ({"seed": True}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"steps": 0}, "steps"),
    ({"steps": 151}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"guidance_scale": -0.5}, "guidance_scale"),
    ({"guidance_scale": 30.5}, "guidance_scale"),
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"guidance_scale": "7"}, "guidance_scale"),
    ({"width": 56}, "width"),
    ({"width": 100}, "width"),
    ({"height": 2056}, "height"),
    ({"height": 64.0}, "height"),
    ({"num_images": 0}, "num_images"),
    ({"num_images": 9}, "num_images"),
    ({"scheduler": "Euler b"}, "scheduler"),
    ({"scheduler": 3}, "scheduler"),
    ({"subject": 5}, "subject"),
    ({"style": ["oil"]}, "style"),
])
def test_every_bad_parameter_is_refused_with_a_sentence(predictor, params, named):
    with pytest.raises(ValueError) as refused:
        predictor.predict([request(**params)])

    message = str(refused.value)
    assert message.startswith("[invalid_parameters] ")
    assert named in message
    assert message.rstrip().endswith((".", ")"))


def test_a_bad_request_in_a_batch_renders_nothing(predictor):
    steps = []

    with pytest.raises(ValueError, match=r"^\[invalid_parameters\] `steps`"):
        predictor.predict([request(seed=1), request(seed=2, steps=0)], lambda *args: steps.append(args))

    assert steps == []


# -- progress and cancellation ------------------------------------------------------------------------------


def test_progress_counts_the_jobs_steps_for_every_image(predictor):
    reports = []

    predictor.predict([request(seed=30, steps=4, num_images=2)], lambda done, total, info=None:
                      reports.append((done, total, info)))

    assert {total for _, total, _ in reports} == {8}
    dones = [done for done, _, _ in reports]
    assert dones == sorted(dones) and dones[-1] == 8
    assert set(range(1, 9)) <= set(dones)
    last = reports[-1][2]
    assert (last["image"], last["images"], last["step"], last["steps"]) == (2, 2, 4, 4)
    assert last["eta_seconds"] == 0 and last["steps_per_second"] > 0
    middle = next(info for done, _, info in reports if done == 4)
    assert middle["image"] == 1 and middle["eta_seconds"] > 0


def test_progress_counts_steps_not_timesteps_with_a_two_stage_scheduler(predictor):
    reports = []

    predictor.predict([request(seed=31, steps=3, scheduler="Heun")], lambda done, total, info=None:
                      reports.append((done, total, info["step"])))

    # Heun evaluates the model twice per step (5 timesteps for 3 steps): progress still ends at 3 of 3
    assert len(reports) == 5
    assert reports[-1] == (3, 3, 3)
    assert all(done <= total for done, total, _ in reports)


def test_a_canceled_job_stops_at_the_step_boundary(predictor):
    calls = []

    def cancel_at_the_second_step(done, total, info=None):
        calls.append(done)
        if len(calls) == 2:
            raise JobCanceled()

    before = only_image(predictor, seed=40, steps=4)
    with pytest.raises(JobCanceled):
        predictor.predict([request(seed=40, steps=4, num_images=3)], cancel_at_the_second_step)

    assert len(calls) == 2
    # and the predictor renders as before afterwards (the scheduler's state starts afresh)
    assert only_image(predictor, seed=40, steps=4)["png"] == before["png"]


# -- loading ------------------------------------------------------------------------------------------------


def test_setup_describes_the_model_and_leaves_no_unpacked_files(pipeline_zip, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    served = TextToImagePredictor(artifact=pipeline_zip, name="tiny", version="3")

    info = served.setup()

    assert (info.name, info.version, info.device) == ("tiny", "3", "cpu")
    assert info.sha256 == hashlib.sha256(pipeline_zip).hexdigest()
    assert set(info.libraries) == {"diffusers", "transformers", "torch", "safetensors"}
    assert info.memory_bytes >= 4 * served.loaded.parameters > 0
    assert info.device_memory_bytes == 0
    assert served.setup() is info
    assert list(tmp_path.iterdir()) == []


def test_a_closed_predictor_refuses_to_render(pipeline_zip):
    served = TextToImagePredictor(artifact=pipeline_zip, name="tiny", version="1")
    served.setup()

    served.close()

    with pytest.raises(RuntimeError, match="closed"):
        served.predict([request()])


def test_a_zip_that_is_not_a_pipeline_fails_setup():
    with pytest.raises(ValueError, match=r"^\[not_a_zip\]"):
        TextToImagePredictor(artifact=b"not a zip").setup()


@pytest.mark.gpu
def test_on_a_gpu_the_pipeline_runs_in_half_precision_with_sdpa(pipeline_zip):
    served = TextToImagePredictor(artifact=pipeline_zip, name="tiny", version="1")

    info = served.setup()
    image = only_image(served, seed=5)

    assert info.device.startswith("cuda:") and info.device_memory_bytes > 0
    assert (served.loaded.dtype, served.loaded.attention) == ("float16", "sdpa")
    assert image["generation"]["device"].startswith("cuda (") and image["generation"]["dtype"] == "float16"
    assert only_image(served, seed=5)["png"] == image["png"]
