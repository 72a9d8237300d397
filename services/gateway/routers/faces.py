"""Faces: detect, verify, collections and subjects, enrollment, identify, memes."""

from collections.abc import Callable
from functools import partial
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from percept.db.models import Collection
from percept.infra import Infra
from percept.schemas import (
    CollectionIn,
    CollectionOut,
    EnrollParams,
    ErrorOut,
    FaceDetectParams,
    FaceIdentifyParams,
    FaceVerifyParams,
    JobOut,
    MemeParams,
    Responses,
    SubjectIn,
    SubjectOut,
)
from services.gateway.deps import EventsDep, InfraDep, SessionDep, TenantDep
from services.gateway.events import JobEvents
from services.gateway.intake import read_job_request
from services.gateway.routers.jobs import (
    CANCEL_AFTER,
    ERRORS,
    JOB_RESPONSES,
    IdempotencyHeader,
    PreferHeader,
    accepted,
    image_job_body,
    submit,
)
from services.gateway.usecases import faces
from services.gateway.usecases.jobs import JobRequest

router = APIRouter(prefix="/v1", tags=["faces"])
CONFLICT: Responses = {409: {"model": ErrorOut}}


async def _submit(request: Request, response: Response, session: Session, infra: Infra, events: JobEvents,
                  tenant_id: str, kind: str, params_model: type[BaseModel], image_fields: tuple[str, ...],
                  idempotency_key: str | None, prefer: str | None,
                  resolve: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> JobOut:
    """A face job on the kind's default model: read the images and parameters, resolve what the parameters
    name (collections, subjects), submit."""
    params, images = await read_job_request(request, session, infra, tenant_id, params_model, image_fields)
    values = params.model_dump()
    if resolve is not None:
        values = await run_in_threadpool(resolve, values)
    submitted = await submit(session, infra, tenant_id, JobRequest(
        kind=kind, params=values, images=images, idempotency_key=idempotency_key), prefer)
    return await accepted(response, session, infra, events, tenant_id, submitted, prefer)


@router.post("/faces/detect", status_code=202, response_model=JobOut, responses=JOB_RESPONSES,
             dependencies=CANCEL_AFTER,
             openapi_extra=image_job_body("image", params=FaceDetectParams))
async def detect_faces(request: Request, response: Response, session: SessionDep, infra: InfraDep,
                       events: EventsDep, tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                       prefer: PreferHeader = None) -> JobOut:
    """Faces in an image: boxes, scores, landmarks and (with `expressions`) the expression of each."""
    return await _submit(request, response, session, infra, events, tenant_id, "faces_detect", FaceDetectParams,
                         ("image",), idempotency_key, prefer)


@router.post("/faces/verify", status_code=202, response_model=JobOut, responses=JOB_RESPONSES,
             dependencies=CANCEL_AFTER,
             openapi_extra=image_job_body("image_a", "image_b", params=FaceVerifyParams))
async def verify_faces(request: Request, response: Response, session: SessionDep, infra: InfraDep,
                       events: EventsDep, tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                       prefer: PreferHeader = None) -> JobOut:
    """1:1: are the main faces of two images the same person? (distance, threshold, same_person)"""
    return await _submit(request, response, session, infra, events, tenant_id, "faces_verify", FaceVerifyParams,
                         ("image_a", "image_b"), idempotency_key, prefer)


@router.post("/faces/identify", status_code=202, response_model=JobOut, responses=JOB_RESPONSES,
             dependencies=CANCEL_AFTER,
             openapi_extra=image_job_body("image", params=FaceIdentifyParams))
async def identify_faces(request: Request, response: Response, session: SessionDep, infra: InfraDep,
                         events: EventsDep, tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                         prefer: PreferHeader = None) -> JobOut:
    """1:N: for each face, the collection's closest subjects (top_k), none beyond the threshold."""
    return await _submit(request, response, session, infra, events, tenant_id, "faces_identify",
                         FaceIdentifyParams, ("image",), idempotency_key, prefer,
                         resolve=partial(faces.identify_params, session, tenant_id))


@router.post("/memes", status_code=202, response_model=JobOut, responses=JOB_RESPONSES, dependencies=CANCEL_AFTER,
             openapi_extra=image_job_body("image", params=MemeParams))
async def make_meme(request: Request, response: Response, session: SessionDep, infra: InfraDep, events: EventsDep,
                    tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                    prefer: PreferHeader = None) -> JobOut:
    """A meme of the photo: the main face's expression picks a caption (`top_text`/`bottom_text` override)."""
    return await _submit(request, response, session, infra, events, tenant_id, "memes", MemeParams, ("image",),
                         idempotency_key, prefer, resolve=faces.meme_params)


@router.post("/collections/{collection}/subjects/{subject}/faces", status_code=202, response_model=JobOut,
             responses=JOB_RESPONSES,
             dependencies=CANCEL_AFTER, openapi_extra=image_job_body("image", params=EnrollParams))
async def enroll_face(collection: str, subject: str, request: Request, response: Response, session: SessionDep,
                      infra: InfraDep, events: EventsDep, tenant_id: TenantDep,
                      idempotency_key: IdempotencyHeader = None, prefer: PreferHeader = None) -> JobOut:
    """Enroll a face (a job): exactly one face, large and sharp enough, else the job fails with a clear code."""
    return await _submit(request, response, session, infra, events, tenant_id, "faces_enroll", EnrollParams,
                         ("image",), idempotency_key, prefer,
                         resolve=partial(faces.enroll_params, session, tenant_id, collection, subject))


# --- collections and subjects (synchronous) -------------------------------------------------------------

def _collection_out(collection: Collection) -> CollectionOut:
    return CollectionOut(id=collection.id, name=collection.name, threshold=collection.threshold,
                         created_at=collection.created_at)


@router.post("/collections", status_code=201, response_model=CollectionOut, responses={**ERRORS, **CONFLICT})
def create_collection(body: CollectionIn, session: SessionDep, tenant_id: TenantDep) -> CollectionOut:
    """A collection of people to enroll faces into and identify against."""
    return _collection_out(faces.create_collection(session, tenant_id, body.name, body.threshold))


@router.get("/collections", response_model=list[CollectionOut], responses=ERRORS)
def list_collections(session: SessionDep, tenant_id: TenantDep) -> list[CollectionOut]:
    """Your collections."""
    return [_collection_out(c) for c in faces.list_collections(session, tenant_id)]


@router.delete("/collections/{collection}", responses=ERRORS)
def delete_collection(collection: str, session: SessionDep, tenant_id: TenantDep) -> dict:
    """Delete a collection with its subjects and their face embeddings."""
    name, embeddings = faces.delete_collection(session, tenant_id, collection)
    return {"deleted": name, "embeddings_deleted": embeddings}


@router.post("/collections/{collection}/subjects", status_code=201, response_model=SubjectOut,
             responses={**ERRORS, **CONFLICT})
def create_subject(collection: str, body: SubjectIn, session: SessionDep, tenant_id: TenantDep) -> SubjectOut:
    """A person in the collection; enroll their faces next."""
    subject, found = faces.create_subject(session, tenant_id, collection, body.name)
    return SubjectOut(id=subject.id, name=subject.name, collection=found.name, created_at=subject.created_at)


@router.get("/collections/{collection}/subjects", response_model=list[SubjectOut], responses=ERRORS)
def list_subjects(collection: str, session: SessionDep, tenant_id: TenantDep) -> list[SubjectOut]:
    """The collection's subjects with how many faces each has enrolled."""
    found, subjects = faces.list_subjects(session, tenant_id, collection)
    return [SubjectOut(id=s.id, name=s.name, collection=found.name, faces=n, created_at=s.created_at)
            for s, n in subjects]


@router.delete("/collections/{collection}/subjects/{subject}", responses=ERRORS)
def delete_subject(collection: str, subject: str, session: SessionDep, tenant_id: TenantDep) -> dict:
    """Remove the subject and its face embeddings (the answer says how many)."""
    name, embeddings = faces.delete_subject(session, tenant_id, collection, subject)
    return {"deleted": name, "embeddings_deleted": embeddings}
