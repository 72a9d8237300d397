"""Captioning: caption an image with a tenant's captioner, and train one on a caption dataset."""


from sqlalchemy.orm import Session

from percept.db import registry
from percept.db.models import Job
from percept.errors import Conflict, InvalidInput, NotFound
from percept.infra import Infra
from percept.schemas import CaptionParams, DatasetOut, TrainCaptionerParams
from services.gateway.usecases.datasets import ready_dataset
from services.gateway.usecases.images import as_inputs, job_images
from services.gateway.usecases.jobs import JobRequest, submit_job

# The job kinds behind POST /v1/caption and POST /v1/train/captioner; services/captioner declares them.
CAPTION = "caption"
TRAIN_CAPTIONER = "train_captioner"

# A dataset's analysis report says what it holds; a report from before caption datasets has no `kind`
# and is of class folders.
CLASS_DATASET, CAPTION_DATASET = "classes", "captions"
_DATASET_KINDS = {
    CLASS_DATASET: ("a class-folder dataset (one folder per class)",
                    "train a classifier on it with POST /v1/train/classifier", "not_a_class_dataset"),
    CAPTION_DATASET: ("a caption dataset (images with captions)",
                      "train a captioner on it with POST /v1/train/captioner", "not_a_caption_dataset"),
}


def dataset_kind(dataset: DatasetOut) -> str:
    return str((dataset.report or {}).get("kind", CLASS_DATASET))


def ready_dataset_of_kind(session: Session, tenant_id: str, dataset_id: str, kind: str) -> DatasetOut:
    """The dataset, if it is ready (see ready_dataset) and holds `kind` ("classes" or "captions"): else a 422
    that says what it holds and what it can train."""
    dataset = ready_dataset(session, tenant_id, dataset_id)
    found = dataset_kind(dataset)
    if found != kind:
        what, use, _ = _DATASET_KINDS.get(found, (f"a {found!r} dataset", "", ""))
        wanted = _DATASET_KINDS[kind][0]
        raise InvalidInput(f"Dataset {dataset_id!r} is {what}, not {wanted}" + (f"; {use}." if use else "."),
                           code=_DATASET_KINDS[kind][2], details={"dataset_id": dataset_id, "kind": found})
    return dataset


def _newest_captioner(session: Session, tenant_id: str) -> str:
    """`name:version` of the tenant's captioner created last; 404 with how to get one when there is none."""
    newest = registry.newest_of_kind(session, tenant_id, CAPTION)
    if newest is None:
        raise NotFound("You have no captioner yet: train one on a caption dataset with POST /v1/train/captioner, "
                       "or import a Hugging Face image-to-text checkpoint with POST /v1/models/import.",
                       code="no_captioner")
    return f"{newest.name}:{newest.version}"


def check_caption_params(params: CaptionParams) -> None:
    """What one field's bounds cannot say: the limits between fields."""
    if params.num_captions > params.beam_width:
        raise InvalidInput(f"`num_captions` ({params.num_captions}) cannot exceed `beam_width` "
                           f"({params.beam_width}): each caption is a finished beam. Raise `beam_width` or ask "
                           "for fewer captions.", code="num_captions_over_beam_width",
                           details={"num_captions": params.num_captions, "beam_width": params.beam_width})
    if params.min_length is not None and params.max_length is not None and params.min_length > params.max_length:
        raise InvalidInput(f"`min_length` ({params.min_length}) cannot exceed `max_length` ({params.max_length}).",
                           code="min_length_over_max_length",
                           details={"min_length": params.min_length, "max_length": params.max_length})


def caption(session: Session, infra: Infra, tenant_id: str, params: CaptionParams, images: list[bytes | str],
            idempotency_key: str | None) -> tuple[Job, bool]:
    """A caption job with the model asked for, or the tenant's newest captioner (the kind has no built-in)."""
    check_caption_params(params)
    found = job_images(session, infra, tenant_id, images)  # a bad image is the first thing to say
    # The params stay as sent (`model` null when left out) so a replay matches after a newer captioner;
    # the job records the model it resolved to.
    model = params.model or _newest_captioner(session, tenant_id)
    return submit_job(session, infra, tenant_id, JobRequest(
        kind=CAPTION, params=params.model_dump(), inputs=as_inputs(found), model=model,
        idempotency_key=idempotency_key, image_keys=[image.object_key for image in found]))


def _check_name(session: Session, tenant_id: str, name: str) -> None:
    if registry.is_builtin_name(session, name):
        raise Conflict(f"{name!r} is a built-in model; choose another name.", code="model_name_reserved")
    # A name's versions are one model: a captioner cannot become version N+1 of a classifier.
    other = registry.kinds_named(session, tenant_id, name) - {CAPTION}
    if other:
        raise Conflict(f"{name!r} is already your {sorted(other)[0]} model; choose another name for a captioner.",
                       code="model_name_in_use", details={"name": name, "kind": sorted(other)[0]})


def train_captioner(session: Session, infra: Infra, tenant_id: str, params: TrainCaptionerParams,
                    idempotency_key: str | None) -> tuple[Job, bool]:
    """A training job on an analysed caption dataset; it registers `name` version N+1 when it succeeds."""
    _check_name(session, tenant_id, params.name)
    dataset = ready_dataset_of_kind(session, tenant_id, params.dataset, CAPTION_DATASET)
    return submit_job(session, infra, tenant_id, JobRequest(
        kind=TRAIN_CAPTIONER, params=params.model_dump(),
        inputs=[{"dataset_id": dataset.id, "sha256": dataset.sha256}], idempotency_key=idempotency_key))
