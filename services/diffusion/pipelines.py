"""Diffusers text-to-image pipelines: loading a checkpoint directory safely, and the schedulers a user can pick.

Supported pipelines (`model_index.json` `_class_name`): `StableDiffusionPipeline` (SD 1.x, 2.x) and
`StableDiffusionXLPipeline` (SDXL, SDXL Turbo). Both are UNet latent-diffusion pipelines whose schedulers swap
freely, called the same way (prompt, negative prompt, steps, guidance, size, generator, step callback).

Nothing is ever downloaded (`local_files_only=True`) and no code from the checkpoint runs: `model_index.json` is
checked before diffusers reads it (a supported `_class_name`, every component of `diffusers` or `transformers`
and a class those libraries have), and `trust_remote_code` stays off. A safety checker, its feature extractor and
an IP-adapter image encoder are never loaded (the platform does its own moderation, if any); the card records
whether the checkpoint shipped one.

Weights load in float16 on CUDA (with PyTorch's scaled-dot-product attention) and float32 on the CPU.
"""

import importlib.util
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from percept.checkpoints import invalid_checkpoint, unpack_checkpoint
from percept.devices import Device

PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
# What the components' entries in model_index.json may name: the libraries diffusers loads components from.
COMPONENT_LIBRARIES = ("diffusers", "transformers")
# Components never loaded: the safety checker (and its feature extractor), and the IP-adapter image encoder.
SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
PIPELINE_CONTENTS = "model_index.json and one folder per component: unet, vae, text_encoder, tokenizer, scheduler"

# Neutral sigma schedules: a scheduler swapped in from a config that used Karras sigmas must not inherit them.
_PLAIN_SIGMAS: dict[str, Any] = {"use_karras_sigmas": False, "use_exponential_sigmas": False,
                                 "use_beta_sigmas": False}
_KARRAS_SIGMAS: dict[str, Any] = {**_PLAIN_SIGMAS, "use_karras_sigmas": True}

# The scheduler names a request may use (AUTOMATIC1111's sampler names; the gateway's `SchedulerName` lists the
# same) -> the diffusers class and the `from_config` overrides that make it that sampler. Each is built from the
# pipeline's own scheduler config, so the model's noise schedule and prediction type (epsilon, v) carry over.
# Left out: "DPM++ SDE" (DPMSolverSDEScheduler needs torchsde). "DPM++ 2M SDE" (DPMSolverMultistepScheduler with
# algorithm_type "sde-dpmsolver++") would need nothing more: it draws its noise from the request's generator.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIM": ("DDIMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", _PLAIN_SIGMAS),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", _PLAIN_SIGMAS),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                 **_PLAIN_SIGMAS}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        **_KARRAS_SIGMAS}),
    "DPM2": ("KDPM2DiscreteScheduler", _PLAIN_SIGMAS),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", _PLAIN_SIGMAS),
    "UniPC": ("UniPCMultistepScheduler", _PLAIN_SIGMAS),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),  # PLMS, as SD 1.x ships it
    "LMS": ("LMSDiscreteScheduler", _PLAIN_SIGMAS),
    "LMS Karras": ("LMSDiscreteScheduler", _KARRAS_SIGMAS),
    "DEIS": ("DEISMultistepScheduler", {"algorithm_type": "deis", **_PLAIN_SIGMAS}),
}
# Python packages a scheduler needs beyond diffusers (LMS integrates its coefficients with scipy).
SCHEDULER_PACKAGES = {"LMS": "scipy", "LMS Karras": "scipy"}

# A pipeline's images are sized in multiples of this (the pipelines' own check) and of the VAE's scale factor.
PIPELINE_SIZE_MULTIPLE = 8


def scheduler_name(scheduler: Any) -> str:
    """Our name for a scheduler instance (the first of SCHEDULERS its class and config match), else its class."""
    class_name = type(scheduler).__name__
    config = getattr(scheduler, "config", {})
    for name, (scheduler_class, overrides) in SCHEDULERS.items():
        if class_name == scheduler_class and all(config.get(key) == value for key, value in overrides.items()):
            return name
    return class_name


def missing_scheduler_package(name: str) -> str | None:
    """The package the named scheduler needs that this environment lacks, if any."""
    package = SCHEDULER_PACKAGES.get(name)
    return package if package and importlib.util.find_spec(package) is None else None


@dataclass
class LoadedPipeline:
    """A pipeline in memory on its device, ready to render, with what its card and provenance record."""

    pipe: Any  # a diffusers DiffusionPipeline
    pipeline_class: str
    dtype: str  # "float16" | "float32"
    default_scheduler: str  # scheduler_name() of the checkpoint's own scheduler
    default_size: tuple[int, int]  # (width, height)
    attention: str  # "sdpa" (PyTorch scaled-dot-product attention) or the processors' class names
    parameters: int
    memory_bytes: int
    vae_scale_factor: int
    components: dict[str, str]  # component name -> class name, as model_index.json declares them
    safety_checker: str  # "removed" (the checkpoint had one; not loaded) | "none"
    files: list[str] = field(default_factory=list)
    # The scheduler instances by name, built once each: swapping is then an attribute assignment.
    schedulers: dict[str, Any] = field(default_factory=dict)

    @property
    def size_multiple(self) -> int:
        """Widths and heights must be multiples of this."""
        return math.lcm(PIPELINE_SIZE_MULTIPLE, self.vae_scale_factor)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def _read_model_index(directory: Path) -> dict[str, Any]:
    try:
        index = json.loads((directory / "model_index.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid_checkpoint(f"model_index.json is not valid JSON ({exc}).") from None
    if not isinstance(index, dict):
        raise invalid_checkpoint("model_index.json is not a JSON object.")
    return index


def _pipeline_class(index: dict[str, Any]) -> Any:
    """The supported diffusers class model_index.json names, or ValueError saying what to import instead."""
    import diffusers

    name = index.get("_class_name")
    supported = " or ".join(PIPELINE_CLASSES)
    if not isinstance(name, str):
        raise invalid_checkpoint(f"model_index.json's _class_name is {name!r}: Percept imports diffusers "
                                 f"text-to-image pipelines ({supported}), never a custom pipeline's code.")
    if name not in PIPELINE_CLASSES:
        if any(word in name for word in ("Img2Img", "Inpaint", "InstructPix2Pix", "Upscale", "Depth2Img",
                                         "ImageVariation", "ControlNet")):
            kind = "a pipeline that needs an input image"
        else:
            kind = "not a pipeline Percept serves"
        raise invalid_checkpoint(f"{name} is {kind}: import a text-to-image pipeline ({supported}), e.g. the "
                                 "directory `StableDiffusionPipeline.save_pretrained` wrote.")
    return getattr(diffusers, name)


def _components(index: dict[str, Any], pipeline_class: Any, directory: Path) -> dict[str, str]:
    """Each component model_index.json declares (name -> class), checked: a known library and class, its folder
    present; every component the pipeline needs declared."""
    import diffusers
    import transformers

    libraries = {"diffusers": diffusers, "transformers": transformers}
    expected, _ = pipeline_class._get_signature_keys(pipeline_class)
    optional = set(pipeline_class._optional_components)
    components: dict[str, str] = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue  # _class_name, _diffusers_version, requires_safety_checker, force_zeros_for_empty_prompt...
        if len(entry) != 2 or entry[0] is None or entry[1] is None:
            continue  # [null, null]: the component was saved as absent
        if name in SKIPPED_COMPONENTS:
            components[name] = str(entry[1])
            continue
        library, class_name = entry
        if library not in libraries or not isinstance(class_name, str) \
                or getattr(libraries[library], class_name, None) is None:
            raise invalid_checkpoint(f"model_index.json declares the {name} component as {entry}: Percept loads "
                                     f"components of {' and '.join(COMPONENT_LIBRARIES)} only (and no code from "
                                     "the checkpoint); save the pipeline with diffusers' save_pretrained.")
        folder = directory / name
        if not folder.is_dir() or not any(folder.iterdir()):
            raise invalid_checkpoint(f"model_index.json names a {name} component but the zip has no {name}/ folder "
                                     "(or it is empty): zip the whole directory `save_pretrained` wrote.")
        components[name] = class_name
    needed = [name for name in expected if name not in optional and name not in SKIPPED_COMPONENTS]
    absent = [name for name in needed if name not in components]
    if absent:
        raise invalid_checkpoint(f"The {pipeline_class.__name__} has no {', '.join(absent)} in model_index.json: "
                                 f"a text-to-image pipeline needs {', '.join(needed)}.")
    if not any(name.startswith("text_encoder") and name in components for name in expected):
        raise invalid_checkpoint("The pipeline has no text encoder (text_encoder or text_encoder_2): a "
                                 "text-to-image pipeline needs one to read the prompt.")
    return components


def _attention(pipe: Any, device: Device) -> str:
    """PyTorch's fused scaled-dot-product attention on CUDA (it is also diffusers' default where available)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if device.is_cuda:
        for component in (pipe.unet, pipe.vae):
            component.set_attn_processor(AttnProcessor2_0())
    kinds = sorted({type(processor).__name__ for processor in pipe.unet.attn_processors.values()})
    return "sdpa" if kinds == ["AttnProcessor2_0"] else ", ".join(kinds)


def _modules(pipe: Any) -> list[torch.nn.Module]:
    return [module for module in pipe.components.values() if isinstance(module, torch.nn.Module)]


def load_pipeline(directory: Path, device: Device) -> LoadedPipeline:
    """Check and load the pipeline directory onto `device`; ValueError("[invalid_checkpoint] ...") if it is not a
    supported, loadable text-to-image pipeline."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    # 1. What model_index.json declares, checked before diffusers reads it
    index = _read_model_index(directory)
    pipeline_class = _pipeline_class(index)
    components = _components(index, pipeline_class, directory)
    expected, _ = pipeline_class._get_signature_keys(pipeline_class)
    skipped = {name: None for name in SKIPPED_COMPONENTS if name in expected}
    options: dict[str, Any] = {"requires_safety_checker": False} if "safety_checker" in expected else {}

    # 2. Load from this directory only, half precision on a GPU (twice the throughput, half the memory)
    dtype = torch.float16 if device.is_cuda else torch.float32
    try:
        pipe = pipeline_class.from_pretrained(directory, dtype=dtype, local_files_only=True, trust_remote_code=False,
                                              **skipped, **options)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the checkpoint's
        raise invalid_checkpoint(f"The {pipeline_class.__name__} does not load ({_first_line(exc)}): check that "
                                 "every component folder holds its config and weights as save_pretrained wrote "
                                 "them.") from None
    pipe = pipe.to(device.name)
    pipe.set_progress_bar_config(disable=True)

    # 3. What the card and provenance record
    attention = _attention(pipe, device)
    vae_scale_factor = int(pipe.vae_scale_factor)
    sample_size = pipe.unet.config.sample_size
    if isinstance(sample_size, list | tuple):
        height, width = (int(side) * vae_scale_factor for side in sample_size)
    else:
        height = width = int(sample_size) * vae_scale_factor
    modules = _modules(pipe)
    tensors = [t for module in modules for t in (*module.parameters(), *module.buffers())]
    loaded = LoadedPipeline(
        pipe=pipe, pipeline_class=pipeline_class.__name__, dtype=str(dtype).removeprefix("torch."),
        default_scheduler=scheduler_name(pipe.scheduler), default_size=(width, height), attention=attention,
        parameters=sum(p.numel() for module in modules for p in module.parameters()),
        memory_bytes=sum(t.numel() * t.element_size() for t in tensors), vae_scale_factor=vae_scale_factor,
        components=dict(sorted(components.items())),
        safety_checker="removed" if "safety_checker" in components else "none")
    loaded.schedulers[loaded.default_scheduler] = pipe.scheduler
    return loaded


def load_pipeline_zip(archive: bytes, device: Device) -> LoadedPipeline:
    """Unpack a pipeline zip into a temporary directory, load it, and remove the directory (the weights are in
    memory then); `files` lists what the zip held."""
    with tempfile.TemporaryDirectory(prefix="percept-pipeline-") as unpacked:
        directory = Path(unpacked)
        files = unpack_checkpoint(archive, directory, marker="model_index.json", contents=PIPELINE_CONTENTS)
        loaded = load_pipeline(directory, device)
    loaded.files = files
    return loaded


def check_scheduler(loaded: LoadedPipeline, name: str | None) -> str:
    """The scheduler name a request may use with this pipeline (None: the checkpoint's own), or
    ValueError("[invalid_parameters] ...")."""
    name = name or loaded.default_scheduler
    if name in loaded.schedulers:
        return name
    if name not in SCHEDULERS:
        raise ValueError(f"[invalid_parameters] Unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)} "
                         f"(or omit it for the model's own, {loaded.default_scheduler}).")
    if package := missing_scheduler_package(name):
        raise ValueError(f"[invalid_parameters] The {name} scheduler needs {package}, which this worker lacks: "
                         "choose another scheduler.")
    return name


def set_scheduler(loaded: LoadedPipeline, name: str | None) -> str:
    """Put the named scheduler (None: the checkpoint's own) on the pipeline and return the name in use. Each is
    built once from the checkpoint's scheduler config, so the noise schedule and prediction type carry over."""
    import diffusers

    name = check_scheduler(loaded, name)
    if name not in loaded.schedulers:
        class_name, overrides = SCHEDULERS[name]
        default = loaded.schedulers[loaded.default_scheduler]
        loaded.schedulers[name] = getattr(diffusers, class_name).from_config(default.config, **overrides)
    loaded.pipe.scheduler = loaded.schedulers[name]
    return name
