"""The captioner service declares itself (read by the core, the gateway and the workers; no ML import)."""

from typing import Any

from percept.services import DATASETS_QUEUE, JobKind, Service, WorkerPool


def caption_text(output: dict[str, Any]) -> str | None:
    """A caption job is found by its captions' words."""
    return " ".join(caption["text"] for caption in output.get("captions", [])) or None


SERVICE = Service(
    name="captioner",
    job_kinds=(
        # Micro-batched like classification: the encoder runs once per batch, and every beam of every image
        # in it advances in one decoder call. No built-in model: the default is the tenant's newest captioner.
        JobKind("caption", queue="captioner", task="percept.caption", batched=True, deterministic=True,
                search_text="services.captioner.service:caption_text"),
        # Its own queue: an hour of training must not hold up captioning.
        JobKind("train_captioner", queue="captioner-train", task="percept.train_captioner",
                trainer="services.captioner.training:CaptionerTrainer"),
        # A Hugging Face image-to-text checkpoint directory (a zip), validated by loading it here.
        JobKind("import_captioner", queue="captioner-train", task="percept.import_captioner",
                trainer="services.captioner.hf:CheckpointImporter"),
    ),
    workers=(
        WorkerPool("captioner", queues=("captioner",), pool="solo", uses_gpu=True),
        WorkerPool("captioner-train", queues=("captioner-train", DATASETS_QUEUE), uses_gpu=True),
    ),
    requirements=("requirements.txt",),
    device="services.captioner.device:serving_device",
)
