"""The one list of services, and the shape of the declaration each service makes of itself.

Each service folder has a `service.py` that imports no ML framework and declares a `SERVICE`: its job
kinds (queue, task, trainer, finalizer, fan-out), its built-in models (seeded into the registry at
migration time), its worker pools and its dependency files. The core, the gateway and the worker runtime
read these declarations and name no service's code: adding a service is a new folder plus one line in
`SERVICE_MODULES` (or, for a deployment's own services, `PERCEPT_EXTRA_SERVICES`).
"""

import importlib
from dataclasses import dataclass, field
from functools import cache, cached_property, lru_cache
from typing import Any

# Where the platform's own services declare themselves. Loaded by name, never imported, so the core
# depends on no service (import-linter checks it).
SERVICE_MODULES: tuple[str, ...] = (
    "services.classifier.service",
    "services.facerec.service",
    "services.captioner.service",
    "services.diffusion.service",
)

# Dataset analysis (POST /v1/datasets) is the platform's own job, run by any worker pool that lists
# this queue (the training pools do: they read datasets anyway).
DATASETS_QUEUE = "datasets"


@dataclass(frozen=True)
class JobKind:
    """A kind of job: the queue that carries it, the task that runs it, and what runs inside the task.

    A kind with a `trainer` is a training job (dataset and params in, a registered model out, see
    `percept.predictor.Trainer`); any other kind is served by the predictor of the model it names (the
    registry row says which class), `default_model` when the caller names none.
    """

    name: str
    queue: str
    task: str
    default_model: str | None = None
    trainer: str | None = None  # "module:Class", a Trainer
    # "module:function" (infra, session, tenant_id, job_id, params, inputs, output) -> the output to
    # write, run in the transaction that writes a succeeded job's result (side effects such as stored
    # embeddings land exactly when the result does).
    finalizer: str | None = None
    # "module:function" output -> the text `GET /v1/jobs?q=` searches (labels, captions, prompts).
    search_text: str | None = None
    # "module:Class", a `percept.predictor.FanOut`: the kind fans out into child jobs (a grid's cells), and
    # runs again once they have all ended, to gather their results (a grid's contact sheets).
    fan_out: str | None = None
    # The registry kind of the models that serve it (what `model` may name); default: the job kind's name.
    model_kind: str | None = None
    # Many jobs of this kind share one predict() call (micro-batching).
    batched: bool = False
    # Equal inputs, parameters, model version and seed give an equal result: a repeated request is answered
    # from the tenant's earlier succeeded job (result reuse). A job whose seed the platform chose is never equal.
    deterministic: bool = False

    @property
    def has_children(self) -> bool:
        return self.fan_out is not None

    @property
    def serves(self) -> str:
        """The registry kind of the models that serve this kind."""
        return self.model_kind or self.name


@dataclass(frozen=True)
class BuiltinModel:
    """A model every tenant can use, registered (or updated) when the database is migrated."""

    name: str
    kind: str  # the job kind it answers
    predictor: str  # "module:Class"
    version: str = "1"
    metrics: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerPool:
    """One deployable worker: the queues it consumes and how its Celery pool runs."""

    name: str  # `percept worker NAME`, the k8s Deployment and the compose service
    queues: tuple[str, ...]
    # Batching pools run the solo pool: with a process pool, celery-batches' timer hands the busy child
    # one-message batches and batches never form. Celery's time limits need prefork, so they do not
    # apply to solo pools: PERCEPT_INFERENCE_DEADLINE bounds a predict() call there instead.
    pool: str = "prefork"
    uses_gpu: bool = False  # k8s requests `nvidia.com/gpu` for it and it runs on the GPU node pool


@dataclass(frozen=True)
class Service:
    name: str
    job_kinds: tuple[JobKind, ...]
    workers: tuple[WorkerPool, ...]
    models: tuple[BuiltinModel, ...] = ()
    # Requirements files, relative to the service folder; its image installs only these.
    requirements: tuple[str, ...] = ()
    # "module:function" (requested device, e.g. "auto" or "cuda:1") -> the device it will use, described
    # ("cuda:0 (NVIDIA H100 80GB HBM3)" or "cpu"); raises ValueError when it cannot be had. Called when
    # a worker starts, so a wrong PERCEPT_DEVICE stops it there rather than at its first job.
    device: str | None = None


def import_by_name(path: str) -> Any:
    """`module:attribute` -> the attribute; how the core and the workers reach a service's code."""
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


@lru_cache
def load_services(extra: tuple[str, ...] = ()) -> tuple[Service, ...]:
    """The declared services: the platform's own and `extra` (PERCEPT_EXTRA_SERVICES) modules."""
    found = []
    for module in dict.fromkeys((*SERVICE_MODULES, *extra)):
        declared = getattr(importlib.import_module(module), "SERVICE", None)
        if not isinstance(declared, Service):
            raise RuntimeError(f"{module} must declare SERVICE = percept.services.Service(...)")
        found.append(declared)
    names = [kind.name for service in found for kind in service.job_kinds]
    if len(names) != len(set(names)):
        raise RuntimeError(f"two services declare the same job kind: {sorted(names)}")
    return tuple(found)


@dataclass(frozen=True)
class Catalog:
    """Every declaration, indexed: what the gateway, the queue and the workers look things up in."""

    services: tuple[Service, ...]

    @cached_property
    def job_kinds(self) -> dict[str, JobKind]:
        return {kind.name: kind for service in self.services for kind in service.job_kinds}

    @cached_property
    def queues(self) -> tuple[str, ...]:
        return tuple(sorted({kind.queue for kind in self.job_kinds.values()}
                            | {q for s in self.services for pool in s.workers for q in pool.queues}))

    @cached_property
    def worker_pools(self) -> dict[str, tuple[Service, WorkerPool]]:
        return {pool.name: (service, pool) for service in self.services for pool in service.workers}

    @cached_property
    def models(self) -> tuple[BuiltinModel, ...]:
        return tuple(model for service in self.services for model in service.models)

    def kind(self, name: str) -> JobKind:
        try:
            return self.job_kinds[name]
        except KeyError:
            raise KeyError(f"no service declares the job kind {name!r}") from None


@cache
def catalog() -> Catalog:
    """The services of this deployment (the settings name any extra declaration modules)."""
    from percept.config import get_settings
    from percept.datasets import ANALYZE_DATASET

    services = load_services(tuple(get_settings().extra_services))
    platform = Service("platform", job_kinds=(ANALYZE_DATASET,), workers=())
    return Catalog((platform, *services))
