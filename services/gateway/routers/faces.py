"""Faces: detect, verify, collections and subjects, enrollment, identify, memes."""

import secrets
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from starlette.concurrency import run_in_threadpool

from percept.db import faces as face_repo
from percept.db.ids import new_id
from percept.db.models import Collection, Subject
from percept.db.session import session_scope
from percept.errors import Conflict, NotFound
from services.gateway.deps import EventsDep, InfraDep, TenantDep
from services.gateway.intake import read_job_request
from services.gateway.routers.jobs import ERRORS, JOB_ERRORS, PreferHeader, accepted
from services.gateway.schemas import (
    CollectionIn,
    CollectionOut,
    EnrollParams,
    FaceDetectParams,
    FaceIdentifyParams,
    FaceVerifyParams,
    JobOut,
    MemeParams,
    SubjectIn,
    SubjectOut,
)
from services.gateway.usecases import JobRequest, submit_job

router = APIRouter(prefix="/v1", tags=["faces"])
IdempotencyHeader = Annotated[str | None, Header(max_length=200)]


def _image_form(*fields: str, params: type) -> dict:
    """The OpenAPI request body of a job POST with image fields (files or image ids)."""
    properties = {name: {"type": "string", "format": "binary", "description": "file, or an image id"}
                  for name in fields}
    schema = {"type": "object", "required": list(fields),
              "properties": {**properties, **params.model_json_schema()["properties"]}}
    return {"requestBody": {"content": {"multipart/form-data": {"schema": schema}}}}


async def _submit(request: Request, response: Response, infra, events, tenant_id: str, kind: str, model: str,
                  params_model: type, image_fields: tuple[str, ...], idempotency_key: str | None,
                  prefer: str | None, resolve=None) -> JobOut:
    params, images = await read_job_request(request, infra, tenant_id, params_model, image_fields)
    values = params.model_dump()
    if resolve is not None:
        values = await run_in_threadpool(resolve, values)
    job, created = await run_in_threadpool(submit_job, infra, tenant_id, JobRequest(
        kind=kind, params=values, images=[images[name] for name in image_fields], model=model,
        idempotency_key=idempotency_key))
    return await accepted(response, infra, events, tenant_id, job, created, prefer)


@router.post("/faces/detect", status_code=202, response_model=JobOut, responses=JOB_ERRORS,
             openapi_extra=_image_form("image", params=FaceDetectParams))
async def detect_faces(request: Request, response: Response, infra: InfraDep, events: EventsDep,
                       tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                       prefer: PreferHeader = None) -> JobOut:
    """Faces in an image: boxes, scores, landmarks and (with `expressions`) the expression of each."""
    return await _submit(request, response, infra, events, tenant_id, "faces_detect", "dlib-face-detector",
                         FaceDetectParams, ("image",), idempotency_key, prefer)


@router.post("/faces/verify", status_code=202, response_model=JobOut, responses=JOB_ERRORS,
             openapi_extra=_image_form("image_a", "image_b", params=FaceVerifyParams))
async def verify_faces(request: Request, response: Response, infra: InfraDep, events: EventsDep,
                       tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                       prefer: PreferHeader = None) -> JobOut:
    """1:1: are the main faces of two images the same person? (distance, threshold, same_person)"""
    return await _submit(request, response, infra, events, tenant_id, "faces_verify", "dlib-face-verifier",
                         FaceVerifyParams, ("image_a", "image_b"), idempotency_key, prefer)


def _collection(session, tenant_id: str, name_or_id: str) -> Collection:
    collection = face_repo.get_collection(session, tenant_id, name_or_id)
    if collection is None:
        raise NotFound(f"No collection {name_or_id!r}; create it with POST /v1/collections.",
                       code="collection_not_found")
    return collection


def _subject(session, collection: Collection, name_or_id: str) -> Subject:
    subject = face_repo.get_subject(session, collection.id, name_or_id)
    if subject is None:
        raise NotFound(f"No subject {name_or_id!r} in collection {collection.name!r}.", code="subject_not_found")
    return subject


@router.post("/faces/identify", status_code=202, response_model=JobOut, responses=JOB_ERRORS,
             openapi_extra=_image_form("image", params=FaceIdentifyParams))
async def identify_faces(request: Request, response: Response, infra: InfraDep, events: EventsDep,
                         tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                         prefer: PreferHeader = None) -> JobOut:
    """1:N: for each face, the collection's closest subjects (top_k), none beyond the threshold."""
    def resolve(values: dict) -> dict:
        with session_scope(infra.database_url) as session:
            collection = _collection(session, tenant_id, values["collection"])
        return values | {"collection": collection.name, "collection_id": collection.id,
                         "threshold": values["threshold"] or collection.threshold}

    return await _submit(request, response, infra, events, tenant_id, "faces_identify", "dlib-face-identifier",
                         FaceIdentifyParams, ("image",), idempotency_key, prefer, resolve)


@router.post("/memes", status_code=202, response_model=JobOut, responses=JOB_ERRORS,
             openapi_extra=_image_form("image", params=MemeParams))
async def make_meme(request: Request, response: Response, infra: InfraDep, events: EventsDep,
                    tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                    prefer: PreferHeader = None) -> JobOut:
    """A meme of the photo: the main face's expression picks a caption (`top_text`/`bottom_text` override)."""
    def resolve(values: dict) -> dict:
        return values | {"seed": values["seed"] if values["seed"] is not None else secrets.randbelow(2**31)}

    return await _submit(request, response, infra, events, tenant_id, "memes", "fer-meme-maker", MemeParams,
                         ("image",), idempotency_key, prefer, resolve)


# --- collections and subjects (synchronous) -------------------------------------------------------------

def _collection_out(collection: Collection) -> CollectionOut:
    return CollectionOut(id=collection.id, name=collection.name, threshold=collection.threshold,
                         created_at=collection.created_at)


@router.post("/collections", status_code=201, response_model=CollectionOut, responses={**ERRORS, 409: {}})
async def create_collection(body: CollectionIn, infra: InfraDep, tenant_id: TenantDep) -> CollectionOut:
    """A collection of people to enroll faces into and identify against."""
    def create() -> CollectionOut:
        with session_scope(infra.database_url) as session:
            if face_repo.get_collection(session, tenant_id, body.name) is not None:
                raise Conflict(f"You already have a collection named {body.name!r}.", code="collection_exists")
            collection = Collection(id=new_id("col"), tenant_id=tenant_id, name=body.name, threshold=body.threshold)
            session.add(collection)
            session.commit()
            return _collection_out(collection)
    return await run_in_threadpool(create)


@router.get("/collections", response_model=list[CollectionOut], responses=ERRORS)
async def list_collections(infra: InfraDep, tenant_id: TenantDep) -> list[CollectionOut]:
    """Your collections."""
    def load() -> list[CollectionOut]:
        with session_scope(infra.database_url) as session:
            return [_collection_out(c) for c in face_repo.list_collections(session, tenant_id)]
    return await run_in_threadpool(load)


@router.delete("/collections/{collection}", responses=ERRORS)
async def delete_collection(collection: str, infra: InfraDep, tenant_id: TenantDep) -> dict:
    """Delete a collection with its subjects and their face embeddings."""
    def remove() -> dict:
        with session_scope(infra.database_url) as session:
            found = _collection(session, tenant_id, collection)
            embeddings = sum(face_repo.delete_subject(session, subject)
                             for subject, _ in face_repo.list_subjects(session, found.id))
            session.delete(found)
            session.commit()
            return {"deleted": found.name, "embeddings_deleted": embeddings}
    return await run_in_threadpool(remove)


@router.post("/collections/{collection}/subjects", status_code=201, response_model=SubjectOut,
             responses={**ERRORS, 409: {}})
async def create_subject(collection: str, body: SubjectIn, infra: InfraDep, tenant_id: TenantDep) -> SubjectOut:
    """A person in the collection; enroll their faces next."""
    def create() -> SubjectOut:
        with session_scope(infra.database_url) as session:
            found = _collection(session, tenant_id, collection)
            if face_repo.get_subject(session, found.id, body.name) is not None:
                raise Conflict(f"{found.name!r} already has a subject named {body.name!r}.", code="subject_exists")
            subject = Subject(id=new_id("sub"), collection_id=found.id, name=body.name)
            session.add(subject)
            session.commit()
            return SubjectOut(id=subject.id, name=subject.name, collection=found.name, created_at=subject.created_at)
    return await run_in_threadpool(create)


@router.get("/collections/{collection}/subjects", response_model=list[SubjectOut], responses=ERRORS)
async def list_subjects(collection: str, infra: InfraDep, tenant_id: TenantDep) -> list[SubjectOut]:
    """The collection's subjects with how many faces each has enrolled."""
    def load() -> list[SubjectOut]:
        with session_scope(infra.database_url) as session:
            found = _collection(session, tenant_id, collection)
            return [SubjectOut(id=s.id, name=s.name, collection=found.name, faces=n, created_at=s.created_at)
                    for s, n in face_repo.list_subjects(session, found.id)]
    return await run_in_threadpool(load)


@router.delete("/collections/{collection}/subjects/{subject}", responses=ERRORS)
async def delete_subject(collection: str, subject: str, infra: InfraDep, tenant_id: TenantDep) -> dict:
    """Remove the subject and its face embeddings (the answer says how many)."""
    def remove() -> dict:
        with session_scope(infra.database_url) as session:
            found = _subject(session, _collection(session, tenant_id, collection), subject)
            embeddings = face_repo.delete_subject(session, found)
            session.commit()
            return {"deleted": found.name, "embeddings_deleted": embeddings}
    return await run_in_threadpool(remove)


@router.post("/collections/{collection}/subjects/{subject}/faces", status_code=202, response_model=JobOut,
             responses=JOB_ERRORS, openapi_extra=_image_form("image", params=EnrollParams))
async def enroll_face(collection: str, subject: str, request: Request, response: Response, infra: InfraDep,
                      events: EventsDep, tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                      prefer: PreferHeader = None) -> JobOut:
    """Enroll a face (a job): exactly one face, large and sharp enough, else the job fails with a clear code."""
    def resolve(values: dict) -> dict:
        with session_scope(infra.database_url) as session:
            found_collection = _collection(session, tenant_id, collection)
            found = _subject(session, found_collection, subject)
        return values | {"collection": found_collection.name, "collection_id": found_collection.id,
                         "subject": found.name, "subject_id": found.id, "threshold": found_collection.threshold}

    return await _submit(request, response, infra, events, tenant_id, "faces_enroll", "dlib-face-enroller",
                         EnrollParams, ("image",), idempotency_key, prefer, resolve)
