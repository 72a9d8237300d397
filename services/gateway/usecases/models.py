"""The model registry as clients see it, and the jobs that add to it: training, ensembles and imports."""

import zipfile
from typing import Any, BinaryIO

from sqlalchemy.orm import Session

from percept.datasets import NotAZip
from percept.db import registry
from percept.db.models import Job, Model
from percept.errors import Conflict, ImageTooLarge, InvalidInput, NotFound
from percept.infra import Infra
from percept.predictor import parse_model_ref
from percept.schemas import ModelImportParams, ModelOut, ModelVersionOut, TrainClassifierParams
from percept.services import catalog
from percept.storage import import_key_for, store_content_addressed
from services.gateway.usecases.datasets import ready_dataset
from services.gateway.usecases.jobs import JobRequest, submit_job

# The job kinds behind POST /v1/train/classifier and POST /v1/models/ensembles; the services declare them.
TRAIN_CLASSIFIER = "train_classifier"
BUILD_ENSEMBLE = "build_ensemble"
# Ensembles combine models that answer this kind.
CLASSIFY = "classify"
# POST /v1/models/import: the registry kind an import's `kind` names, and the job kind (declared by the service
# that serves such models) that validates the checkpoint by loading it in one of that service's workers.
IMPORT_KINDS = {"caption": "caption", "image-to-text": "caption", "text-to-image": "text-to-image"}
IMPORT_JOBS = {"caption": "import_captioner", "text-to-image": "import_pipeline"}
# What the zip holds, for the sentence that refuses one that is not a zip.
IMPORT_CONTENTS = {"caption": "config.json, weights, tokenizer and preprocessor files",
                   "text-to-image": "model_index.json and the unet, vae, text_encoder, tokenizer and scheduler "
                                    "folders"}


def import_cap(settings: Any, model_kind: str) -> int:
    """The largest checkpoint zip of this kind an import takes: diffusers pipelines have their own, larger cap."""
    return int(settings.max_pipeline_import_bytes if model_kind == "text-to-image" else settings.max_import_bytes)


def _grouped(rows: list[Model]) -> list[ModelOut]:
    by_name: dict[str, list[Model]] = {}
    for row in rows:
        by_name.setdefault(row.name, []).append(row)
    return [ModelOut(name=name, kind=versions[-1].kind, builtin=versions[-1].tenant_id is None,
                     latest=versions[-1].version,
                     versions=[ModelVersionOut(version=m.version, status=m.status, weights_sha256=m.weights_sha256,
                                               device=m.device, metrics=m.metrics, card=m.card,
                                               created_at=m.created_at)
                               for m in versions])
            for name, versions in by_name.items()]


def list_models(session: Session, tenant_id: str) -> list[ModelOut]:
    """Built-in models and the tenant's own, with their versions."""
    return _grouped(registry.list_models(session, tenant_id))


def find_model(session: Session, tenant_id: str, name: str) -> ModelOut:
    found = _grouped(registry.model_versions(session, tenant_id, name))
    if not found:
        raise NotFound(f"No model named {name!r}; GET /v1/models lists them.", code="model_not_found")
    return found[0]


def _check_name_free(session: Session, name: str) -> None:
    if registry.is_builtin_name(session, name):
        raise Conflict(f"{name!r} is a built-in model; choose another name.", code="model_name_reserved")


def train_classifier(session: Session, infra: Infra, tenant_id: str, params: TrainClassifierParams,
                     idempotency_key: str | None) -> tuple[Job, bool]:
    """A training job on an analysed dataset; it registers `name` version N+1 when it succeeds."""
    _check_name_free(session, params.name)
    dataset = ready_dataset(session, tenant_id, params.dataset)
    return submit_job(session, infra, tenant_id, JobRequest(
        kind=TRAIN_CLASSIFIER, params=params.model_dump(),
        inputs=[{"dataset_id": dataset.id, "sha256": dataset.sha256}], idempotency_key=idempotency_key))


def _is_ensemble(model: Model) -> bool:
    return model.card.get("type") == "ensemble"


def _member(session: Session, tenant_id: str, ref: str) -> Model:
    """The tenant's trained classifier `name` (latest) or `name:version` that can join an ensemble."""
    name, version = parse_model_ref(ref)
    versions = [m for m in registry.model_versions(session, tenant_id, name) if m.tenant_id is not None]
    chosen = versions[-1] if versions and not version else next((m for m in versions if m.version == version), None)
    if chosen is None:
        raise NotFound(f"No trained model {ref!r} of yours; train one with POST /v1/train/classifier.",
                       code="model_not_found", details={"member": ref})
    if chosen.kind != CLASSIFY or not chosen.artifact_key or _is_ensemble(chosen):
        raise InvalidInput(f"{ref!r} is not a trained classifier; ensembles combine trained classifiers.",
                           code="invalid_ensemble_member", details={"member": ref})
    return chosen


def create_ensemble(session: Session, infra: Infra, tenant_id: str, name: str, member_refs: list[str],
                    idempotency_key: str | None) -> tuple[Job, bool]:
    """A job that builds an ensemble of trained classifiers (a worker reads their artifacts) and registers
    it as `name` version N+1; each member's vote for a class is weighted by its validation F1."""
    _check_name_free(session, name)
    members = [_member(session, tenant_id, ref) for ref in member_refs]
    refs = [f"{m.name}:{m.version}" for m in members]
    if len(set(refs)) < len(refs):
        raise InvalidInput("An ensemble's members must be different models.", code="invalid_ensemble_member",
                           details={"members": refs})
    inputs = [{"model_id": m.id, "ref": ref, "sha256": m.weights_sha256} for m, ref in zip(members, refs, strict=True)]
    return submit_job(session, infra, tenant_id, JobRequest(
        kind=BUILD_ENSEMBLE, params={"name": name, "members": refs}, inputs=inputs, idempotency_key=idempotency_key))


def import_model(session: Session, infra: Infra, tenant_id: str, params: ModelImportParams, upload: BinaryIO,
                 size: int, idempotency_key: str | None) -> tuple[Job, bool]:
    """Store an uploaded checkpoint zip (read in chunks from the spooled upload, never whole) and submit the job
    that loads it in the serving service's worker and registers `name` version N+1."""
    # 1. What the request asks for, checked before anything is stored
    model_kind = IMPORT_KINDS[params.kind]
    job_kind = IMPORT_JOBS[model_kind]
    if job_kind not in catalog().job_kinds:
        raise InvalidInput(f"This deployment runs no service that serves {model_kind!r} models, so none can be "
                           "imported.", code="kind_not_available_yet", details={"kind": params.kind})
    _check_name_free(session, params.name)
    other_kinds = {m.kind for m in registry.model_versions(session, tenant_id, params.name)} - {model_kind}
    if other_kinds:
        raise Conflict(f"Your model {params.name!r} is a {sorted(other_kinds)[0]} model; import the checkpoint "
                       "under another name.", code="model_kind_mismatch",
                       details={"name": params.name, "kind": sorted(other_kinds)[0]})

    # 2. What can be checked without unpacking: the size, and that it is a zip at all
    cap = import_cap(infra.settings, model_kind)
    if size > cap:
        raise ImageTooLarge(f"The checkpoint zip is larger than {cap // 2**20} MB; import a smaller checkpoint.",
                            code="import_too_large", details={"max_bytes": cap})
    if not zipfile.is_zipfile(upload):  # finds the central directory's end record, reading only the tail
        raise NotAZip("The upload is not a readable zip archive: zip the checkpoint directory that "
                      f"`save_pretrained` wrote ({IMPORT_CONTENTS[model_kind]}).")

    # 3. Store it under its content address; the job reads it from there
    sha256, key = store_content_addressed(infra.store, upload, size, import_key_for, content_type="application/zip")
    return submit_job(session, infra, tenant_id, JobRequest(
        kind=job_kind, params={"name": params.name, "kind": model_kind},
        inputs=[{"object_key": key, "sha256": sha256}], idempotency_key=idempotency_key))
