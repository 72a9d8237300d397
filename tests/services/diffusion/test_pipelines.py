"""Loading pipeline directories (services/diffusion/pipelines.py): what is accepted, what is refused before any
of it is read by diffusers, and the scheduler names."""

import inspect
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import diffusers
import pytest

from percept.devices import Device
from services.diffusion.pipelines import (
    SCHEDULERS,
    LoadedPipeline,
    load_pipeline,
    load_pipeline_zip,
    scheduler_name,
    set_scheduler,
)
from tests.diffusion_pipelines import zip_directory

CPU = Device("cpu", "cpu")
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "prediction_type": "v_prediction"}


@pytest.fixture
def copy_of(pipeline_dir, tmp_path):
    """A copy of the tiny pipeline's directory to damage."""
    target = tmp_path / "pipeline"
    shutil.copytree(pipeline_dir, target)
    return target


def edit_index(directory: Path, **changes) -> None:
    index = json.loads((directory / "model_index.json").read_text())
    index.update(changes)
    (directory / "model_index.json").write_text(json.dumps(index))


def loaded_with(scheduler) -> LoadedPipeline:
    """A LoadedPipeline around a stand-in pipeline holding only a scheduler (set_scheduler touches nothing else)."""
    name = scheduler_name(scheduler)
    return LoadedPipeline(pipe=SimpleNamespace(scheduler=scheduler), pipeline_class="StableDiffusionPipeline",
                          dtype="float32", default_scheduler=name, default_size=(512, 512), attention="sdpa",
                          parameters=0, memory_bytes=0, vae_scale_factor=8, components={}, safety_checker="none",
                          schedulers={name: scheduler})


# -- loading ------------------------------------------------------------------------------------------------


def test_the_tiny_pipeline_loads_with_what_its_card_records(pipeline_dir):
    loaded = load_pipeline(pipeline_dir, CPU)

    assert (loaded.pipeline_class, loaded.dtype, loaded.default_scheduler, loaded.default_size) == \
        ("StableDiffusionPipeline", "float32", "PNDM", (64, 64))
    assert loaded.attention == "sdpa"
    assert loaded.components == {"scheduler": "PNDMScheduler", "text_encoder": "CLIPTextModel",
                                 "tokenizer": "CLIPTokenizer", "unet": "UNet2DConditionModel",
                                 "vae": "AutoencoderKL"}
    modules = (loaded.pipe.unet, loaded.pipe.vae, loaded.pipe.text_encoder)
    assert loaded.parameters == sum(p.numel() for module in modules for p in module.parameters())
    assert loaded.memory_bytes >= 4 * loaded.parameters
    assert (loaded.vae_scale_factor, loaded.size_multiple) == (2, 8)
    assert loaded.safety_checker == "none"
    assert loaded.pipe._progress_bar_config == {"disable": True}
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in loaded.pipe.unet.parameters())


def test_a_zip_loads_from_its_top_or_its_one_folder_and_lists_its_files(pipeline_dir):
    at_top = load_pipeline_zip(zip_directory(pipeline_dir), CPU)
    in_folder = load_pipeline_zip(zip_directory(pipeline_dir, prefix="my-pipeline/"), CPU)

    assert at_top.files == in_folder.files
    assert "model_index.json" in at_top.files and "unet/diffusion_pytorch_model.safetensors" in at_top.files


def test_a_safety_checker_is_never_loaded_and_recorded_as_removed(copy_of):
    # SD 1.x ships one; this directory has no folder for it, so loading it would fail
    edit_index(copy_of, safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
               feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)

    loaded = load_pipeline(copy_of, CPU)

    assert loaded.safety_checker == "removed"
    assert loaded.pipe.safety_checker is None and loaded.pipe.feature_extractor is None
    assert loaded.components["safety_checker"] == "StableDiffusionSafetyChecker"


def _no_model_index(directory: Path) -> None:
    (directory / "model_index.json").unlink()


def _image_to_image(directory: Path) -> None:
    edit_index(directory, _class_name="StableDiffusionImg2ImgPipeline")


def _other_text_to_image(directory: Path) -> None:
    edit_index(directory, _class_name="FluxPipeline")


def _custom_pipeline(directory: Path) -> None:
    edit_index(directory, _class_name=["pipeline", "MyPipeline"])


def _unknown_library(directory: Path) -> None:
    edit_index(directory, unet=["my_library", "UNet2DConditionModel"])


def _unknown_class(directory: Path) -> None:
    edit_index(directory, vae=["diffusers", "NoSuchAutoencoder"])


def _missing_folder(directory: Path) -> None:
    shutil.rmtree(directory / "vae")


def _component_not_declared(directory: Path) -> None:
    index = json.loads((directory / "model_index.json").read_text())
    del index["unet"]
    (directory / "model_index.json").write_text(json.dumps(index))


def _broken_weights(directory: Path) -> None:
    weights = directory / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _not_json(directory: Path) -> None:
    (directory / "model_index.json").write_text("{not json")


@pytest.mark.parametrize(("damage", "says"), [
    (_no_model_index, "no model_index.json"),
    (_image_to_image, "needs an input image"),
    (_other_text_to_image, "not a pipeline Percept serves"),
    (_custom_pipeline, "never a custom pipeline"),
    (_unknown_library, "components of diffusers and transformers only"),
    (_unknown_class, "NoSuchAutoencoder"),
    (_missing_folder, "no vae/ folder"),
    (_component_not_declared, "has no unet in model_index.json"),
    (_broken_weights, "does not load"),
    (_not_json, "not valid JSON"),
])
def test_what_is_not_a_loadable_text_to_image_pipeline_is_refused_with_a_sentence(copy_of, damage, says):
    damage(copy_of)

    with pytest.raises(ValueError) as refused:
        load_pipeline_zip(zip_directory(copy_of), CPU)

    assert str(refused.value).startswith("[invalid_checkpoint] ")
    assert says in str(refused.value)


def test_code_in_the_checkpoint_never_runs(copy_of, tmp_path):
    marker = tmp_path / "ran"
    (copy_of / "unet" / "my_unet.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                                 "from diffusers import UNet2DConditionModel as MyUNet\n")
    (copy_of / "pipeline.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    edit_index(copy_of, unet=["my_unet", "MyUNet"])

    with pytest.raises(ValueError, match=r"^\[invalid_checkpoint\] .*diffusers and transformers only"):
        load_pipeline(copy_of, CPU)
    edit_index(copy_of, _class_name=["pipeline", "MyPipeline"], unet=["diffusers", "UNet2DConditionModel"])
    with pytest.raises(ValueError, match=r"^\[invalid_checkpoint\]"):
        load_pipeline(copy_of, CPU)

    assert not marker.exists()


# -- schedulers ---------------------------------------------------------------------------------------------


def test_the_gateway_offers_exactly_these_scheduler_names():
    from typing import get_args

    from percept.schemas import SchedulerName

    assert list(get_args(SchedulerName)) == list(SCHEDULERS)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_each_schedulers_overrides_are_its_classs_own_settings(name):
    class_name, overrides = SCHEDULERS[name]
    accepted = inspect.signature(getattr(diffusers, class_name).__init__).parameters

    # an override the class does not take would be dropped silently, and the name would mean another sampler
    assert set(overrides) <= set(accepted)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_a_scheduler_swapped_in_carries_the_models_schedule_and_is_named_back(name):
    default = diffusers.EulerDiscreteScheduler(**SD_SCHEDULER, use_karras_sigmas=True)
    loaded = loaded_with(default)

    assert set_scheduler(loaded, name) == name

    swapped = loaded.pipe.scheduler
    assert type(swapped).__name__ == SCHEDULERS[name][0]
    assert scheduler_name(swapped) == name
    assert swapped.config.prediction_type == "v_prediction"  # the model's, not the class default
    assert swapped.config.beta_schedule == "scaled_linear"
    if "use_karras_sigmas" in inspect.signature(type(swapped).__init__).parameters:
        # Karras sigmas only where the name says so, though the model's own scheduler used them
        assert swapped.config.use_karras_sigmas == name.endswith("Karras")


def test_swapping_is_cached_and_none_restores_the_models_own():
    default = diffusers.PNDMScheduler(**SD_SCHEDULER, skip_prk_steps=True)
    loaded = loaded_with(default)

    set_scheduler(loaded, "DDIM")
    ddim = loaded.pipe.scheduler
    set_scheduler(loaded, "Euler")
    set_scheduler(loaded, "DDIM")

    assert loaded.pipe.scheduler is ddim
    assert set_scheduler(loaded, None) == "PNDM"
    assert loaded.pipe.scheduler is default


def test_a_scheduler_of_no_known_name_is_named_by_its_class_and_can_still_be_asked_for():
    default = diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULER, solver_order=3)
    loaded = loaded_with(default)

    assert scheduler_name(default) == "DPMSolverMultistepScheduler"
    assert scheduler_name(diffusers.PNDMScheduler()) == "PNDMScheduler"  # with its PRK warm-up steps
    assert set_scheduler(loaded, "DPMSolverMultistepScheduler") == "DPMSolverMultistepScheduler"
    assert loaded.pipe.scheduler is default


def test_an_unknown_scheduler_is_refused_with_the_names_to_use():
    loaded = loaded_with(diffusers.DDIMScheduler(**SD_SCHEDULER))

    with pytest.raises(ValueError, match=r"^\[invalid_parameters\] Unknown scheduler 'Euler b': use one of DDIM"):
        set_scheduler(loaded, "Euler b")


def test_a_scheduler_whose_package_is_missing_is_refused_before_rendering(monkeypatch):
    from services.diffusion import pipelines

    loaded = loaded_with(diffusers.DDIMScheduler(**SD_SCHEDULER))
    real_find_spec = pipelines.importlib.util.find_spec
    monkeypatch.setattr(pipelines.importlib.util, "find_spec",
                        lambda name, *args: None if name == "scipy" else real_find_spec(name, *args))

    with pytest.raises(ValueError, match=r"^\[invalid_parameters\] The LMS Karras scheduler needs scipy"):
        set_scheduler(loaded, "LMS Karras")
    assert type(loaded.pipe.scheduler).__name__ == "DDIMScheduler"
