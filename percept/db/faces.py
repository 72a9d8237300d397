"""Face collections, subjects and embeddings; 1:N search with pgvector's HNSW index where the server
has the extension, and exact search over plain arrays where it does not."""

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import cast

from sqlalchemy import CursorResult, Engine, delete, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from percept.db.models import Collection, Subject

# How many candidate faces HNSW visits per query: higher is slower and closer to exact. On 1M random
# 128-d vectors (bench/faces.py) 100 gives recall@1 0.88-0.92 and 400 gives 1.000 at p99 32 ms.
HNSW_EF_SEARCH = 400
# Several faces of one subject may come back first; fetch this many per wanted subject.
FACES_PER_SUBJECT = 5


@dataclass(frozen=True)
class FaceMatch:
    subject_id: str
    subject: str
    distance: float


@lru_cache(maxsize=8)
def _uses_pgvector(engine: Engine) -> bool:
    with engine.connect() as connection:
        kind = connection.execute(text(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'face_embeddings'::regclass AND attname = 'embedding'")).scalar()
    return bool(kind and kind.startswith("vector"))


def uses_pgvector(session: Session) -> bool:
    return _uses_pgvector(session.get_bind())


def _vector_literal(embedding: list[float]) -> str:
    return "[" + ",".join(f"{float(v):.8g}" for v in embedding) + "]"


def get_collection(session: Session, tenant_id: str, name_or_id: str) -> Collection | None:
    return session.scalar(select(Collection).where(
        Collection.tenant_id == tenant_id, (Collection.id == name_or_id) | (Collection.name == name_or_id)))


def add_collection(session: Session, collection: Collection) -> Collection | None:
    """Insert; None when the tenant already has a collection of that name (a concurrent request's too:
    the insert waits for it to commit, then finds the name taken)."""
    inserted = session.scalar(insert(Collection).values(
        id=collection.id, tenant_id=collection.tenant_id, name=collection.name, threshold=collection.threshold)
        .on_conflict_do_nothing(index_elements=[Collection.tenant_id, Collection.name]).returning(Collection.id))
    return session.get(Collection, inserted) if inserted else None


def delete_collection(session: Session, collection: Collection) -> int:
    """Delete the collection with its subjects; returns how many embeddings went with them."""
    removed = cast(CursorResult, session.execute(text("DELETE FROM face_embeddings WHERE collection_id = :c"),
                                                 {"c": collection.id})).rowcount
    session.execute(delete(Collection).where(Collection.id == collection.id))  # subjects cascade
    return removed


def list_collections(session: Session, tenant_id: str) -> list[Collection]:
    return list(session.scalars(select(Collection).where(Collection.tenant_id == tenant_id).order_by(Collection.id)))


def get_subject(session: Session, collection_id: str, name_or_id: str) -> Subject | None:
    return session.scalar(select(Subject).where(
        Subject.collection_id == collection_id, (Subject.id == name_or_id) | (Subject.name == name_or_id)))


def add_subject(session: Session, subject: Subject) -> Subject | None:
    """Insert; None when the collection already has a subject of that name (see add_collection)."""
    inserted = session.scalar(insert(Subject).values(
        id=subject.id, collection_id=subject.collection_id, name=subject.name)
        .on_conflict_do_nothing(index_elements=[Subject.collection_id, Subject.name]).returning(Subject.id))
    return session.get(Subject, inserted) if inserted else None


def list_subjects(session: Session, collection_id: str) -> list[tuple[Subject, int]]:
    """Subjects with how many faces each has enrolled."""
    counts: dict[str, int] = dict(session.execute(text(
        "SELECT subject_id, count(*) FROM face_embeddings WHERE collection_id = :c GROUP BY subject_id"),
        {"c": collection_id}).all())
    subjects = session.scalars(select(Subject).where(Subject.collection_id == collection_id).order_by(Subject.id))
    return [(subject, counts.get(subject.id, 0)) for subject in subjects]


def count_faces(session: Session, subject_id: str) -> int:
    return session.execute(text("SELECT count(*) FROM face_embeddings WHERE subject_id = :s"),
                           {"s": subject_id}).scalar() or 0


def delete_subject(session: Session, subject: Subject) -> int:
    """Delete the subject and its embeddings; returns how many embeddings went with it."""
    removed = cast(CursorResult, session.execute(text("DELETE FROM face_embeddings WHERE subject_id = :s"),
                                                 {"s": subject.id})).rowcount
    session.execute(delete(Subject).where(Subject.id == subject.id))
    return removed


def add_embedding(session: Session, collection_id: str, subject_id: str, embedding: list[float],
                  box: list[int], image_id: str | None, job_id: str | None) -> int:
    value = _vector_literal(embedding) if uses_pgvector(session) else [float(v) for v in embedding]
    cast = "CAST(:e AS vector)" if uses_pgvector(session) else ":e"
    return session.execute(text(
        f"INSERT INTO face_embeddings (collection_id, subject_id, image_id, job_id, box, embedding) "
        f"VALUES (:c, :s, :i, :j, CAST(:b AS jsonb), {cast}) RETURNING id"),
        {"c": collection_id, "s": subject_id, "i": image_id, "j": job_id, "b": json.dumps(box), "e": value}
    ).scalar_one()


def nearest_subjects(session: Session, collection_id: str, embedding: list[float], top_k: int,
                     max_distance: float | None = None, exact: bool = False) -> list[FaceMatch]:
    """The top_k closest subjects (each by its closest face), nearest first, none beyond max_distance.

    HNSW (approximate) where pgvector is installed, unless `exact`; a full scan otherwise.
    """
    limit = top_k * FACES_PER_SUBJECT
    if uses_pgvector(session):
        if exact:
            # No index scan: the true nearest neighbours (the benchmark's ground truth).
            session.execute(text("SET LOCAL enable_indexscan = off"))
        else:
            session.execute(text(f"SET LOCAL hnsw.ef_search = {max(HNSW_EF_SEARCH, limit)}"))
        rows = session.execute(text(
            "SELECT e.subject_id, s.name, e.embedding <-> CAST(:q AS vector) AS distance "
            "FROM face_embeddings e JOIN subjects s ON s.id = e.subject_id "
            "WHERE e.collection_id = :c ORDER BY e.embedding <-> CAST(:q AS vector) LIMIT :k"),
            {"q": _vector_literal(embedding), "c": collection_id, "k": limit}).all()
    else:
        rows = session.execute(text(
            "SELECT e.subject_id, s.name, "
            "       sqrt((SELECT sum((a - b) ^ 2) FROM unnest(e.embedding, CAST(:q AS double precision[])) AS t(a, b)))"
            "       AS distance "
            "FROM face_embeddings e JOIN subjects s ON s.id = e.subject_id "
            "WHERE e.collection_id = :c ORDER BY distance LIMIT :k"),
            {"q": [float(v) for v in embedding], "c": collection_id, "k": limit}).all()
    best: dict[str, FaceMatch] = {}
    for subject_id, name, distance in rows:
        if max_distance is not None and distance > max_distance:
            continue
        if subject_id not in best or distance < best[subject_id].distance:
            best[subject_id] = FaceMatch(subject_id, name, float(distance))
    return sorted(best.values(), key=lambda m: m.distance)[:top_k]

