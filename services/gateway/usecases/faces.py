"""Face collections and subjects (synchronous), and the parameters of the face jobs that name them."""

import secrets
from typing import Any

from sqlalchemy.orm import Session

from percept.db import faces as face_repo
from percept.db.ids import new_id
from percept.db.models import Collection, Subject
from percept.errors import Conflict, NotFound


def find_collection(session: Session, tenant_id: str, name_or_id: str) -> Collection:
    collection = face_repo.get_collection(session, tenant_id, name_or_id)
    if collection is None:
        raise NotFound(f"No collection {name_or_id!r}; create it with POST /v1/collections.",
                       code="collection_not_found")
    return collection


def find_subject(session: Session, collection: Collection, name_or_id: str) -> Subject:
    subject = face_repo.get_subject(session, collection.id, name_or_id)
    if subject is None:
        raise NotFound(f"No subject {name_or_id!r} in collection {collection.name!r}.", code="subject_not_found")
    return subject


def create_collection(session: Session, tenant_id: str, name: str, threshold: float) -> Collection:
    """A new collection; 409 when the tenant has one of that name (two requests at once included)."""
    created = face_repo.add_collection(session, Collection(id=new_id("col"), tenant_id=tenant_id, name=name,
                                                           threshold=threshold))
    if created is None:
        raise Conflict(f"You already have a collection named {name!r}.", code="collection_exists")
    return created


def list_collections(session: Session, tenant_id: str) -> list[Collection]:
    return face_repo.list_collections(session, tenant_id)


def delete_collection(session: Session, tenant_id: str, name_or_id: str) -> tuple[str, int]:
    """Delete it with its subjects and their embeddings: (its name, embeddings deleted)."""
    collection = find_collection(session, tenant_id, name_or_id)
    return collection.name, face_repo.delete_collection(session, collection)


def create_subject(session: Session, tenant_id: str, collection_ref: str, name: str) -> tuple[Subject, Collection]:
    """A new subject in the collection; 409 when it has one of that name (two requests at once included)."""
    collection = find_collection(session, tenant_id, collection_ref)
    created = face_repo.add_subject(session, Subject(id=new_id("sub"), collection_id=collection.id, name=name))
    if created is None:
        raise Conflict(f"{collection.name!r} already has a subject named {name!r}.", code="subject_exists")
    return created, collection


def list_subjects(session: Session, tenant_id: str,
                  collection_ref: str) -> tuple[Collection, list[tuple[Subject, int]]]:
    """The collection and its subjects, each with how many faces it has enrolled."""
    collection = find_collection(session, tenant_id, collection_ref)
    return collection, face_repo.list_subjects(session, collection.id)


def delete_subject(session: Session, tenant_id: str, collection_ref: str, subject_ref: str) -> tuple[str, int]:
    """Remove the subject and its embeddings: (its name, embeddings deleted)."""
    subject = find_subject(session, find_collection(session, tenant_id, collection_ref), subject_ref)
    return subject.name, face_repo.delete_subject(session, subject)


# --- the parameters of face jobs, resolved in the request's transaction ---------------------------------

def identify_params(session: Session, tenant_id: str, params: dict[str, Any]) -> dict[str, Any]:
    """The collection named by id and name; the collection's threshold unless one is given."""
    collection = find_collection(session, tenant_id, params["collection"])
    return params | {"collection": collection.name, "collection_id": collection.id,
                     "threshold": params["threshold"] or collection.threshold}


def enroll_params(session: Session, tenant_id: str, collection_ref: str, subject_ref: str,
                  params: dict[str, Any]) -> dict[str, Any]:
    """The subject and its collection named by id and name, with the collection's threshold."""
    collection = find_collection(session, tenant_id, collection_ref)
    subject = find_subject(session, collection, subject_ref)
    return params | {"collection": collection.name, "collection_id": collection.id, "subject": subject.name,
                     "subject_id": subject.id, "threshold": collection.threshold}


def meme_params(params: dict[str, Any]) -> dict[str, Any]:
    """A seed picks the caption: random when absent, and recorded, so the meme can be made again."""
    return params | {"seed": params["seed"] if params["seed"] is not None else secrets.randbelow(2**31)}
