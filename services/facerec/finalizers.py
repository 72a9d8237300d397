"""What the face job kinds do with a prediction before it is written (their declared `finalizer`): store
an enrollment's embedding, search a collection, store a meme. The worker runtime runs them in the
transaction that writes the job's result, so the side effects land exactly when the result does; each in a
savepoint of its own, so one that raises (a JobError names the job's error code) fails its job alone.

The one module of the service that touches the database: predictors stay free of it (import-linter)."""

from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from percept.db import faces as face_repo
from percept.db import images as image_repo
from percept.errors import JobError
from percept.infra import Infra

# An embedding whose subject (or its collection, which takes its subjects with it) is gone violates one of these.
SUBJECT_FOREIGN_KEYS = {"fk_face_embeddings_subject_id_subjects", "fk_face_embeddings_collection_id_collections"}


def enroll_face(infra: Infra, session: Session, tenant_id: str, job_id: str, params: dict[str, Any],
                inputs: list[dict[str, Any]], output: dict[str, Any]) -> dict[str, Any]:
    """Store the one accepted face of an enrollment; warn when it already belongs to another subject."""
    face = output["face"]
    collection_id, subject_id = params["collection_id"], params["subject_id"]
    threshold = params["threshold"]
    warnings = []
    for match in face_repo.nearest_subjects(session, collection_id, face["embedding"], top_k=3, max_distance=threshold):
        if match.subject_id != subject_id:
            warnings.append({"code": "already_enrolled", "subject": match.subject, "distance": round(match.distance, 4),
                             "message": f"This face is within {threshold} of subject {match.subject!r} already."})
    try:
        face_repo.add_embedding(session, collection_id, subject_id, face["embedding"], face["box"],
                                inputs[0]["image_id"], job_id)
    except IntegrityError as exc:
        # Deleted while the job waited or ran (a delete still uncommitted is waited for by the insert).
        if getattr(getattr(exc.orig, "diag", None), "constraint_name", None) not in SUBJECT_FOREIGN_KEYS:
            raise
        raise JobError(f"Subject {params['subject']!r} of collection {params['collection']!r} was deleted "
                       "while this face was being enrolled; nothing was stored. Create the subject again to "
                       "enroll faces into it.", code="subject_deleted") from None
    return {"collection": params["collection"], "subject": params["subject"],
            "face": {key: face[key] for key in ("box", "score", "sharpness") if key in face},
            "faces_enrolled": face_repo.count_faces(session, subject_id), "warnings": warnings}


def identify_faces(infra: Infra, session: Session, tenant_id: str, job_id: str, params: dict[str, Any],
                   inputs: list[dict[str, Any]], output: dict[str, Any]) -> dict[str, Any]:
    """Each face in the image -> the collection's closest subjects, none beyond the threshold."""
    faces = []
    for face in output["faces"]:
        matches = face_repo.nearest_subjects(session, params["collection_id"], face["embedding"],
                                             top_k=params["top_k"], max_distance=params["threshold"])
        faces.append({"box": face["box"], "score": face.get("score"),
                      "matches": [{"subject": m.subject, "distance": round(m.distance, 4)} for m in matches]})
    return {"faces": faces, "collection": params["collection"], "threshold": params["threshold"],
            "search": "hnsw" if face_repo.uses_pgvector(session) else "exact"}


def store_meme(infra: Infra, session: Session, tenant_id: str, job_id: str, params: dict[str, Any],
               inputs: list[dict[str, Any]], output: dict[str, Any]) -> dict[str, Any]:
    """The rendered meme becomes an image of the tenant's, linked to the job that made it."""
    image = image_repo.add_job_image(session, infra.store, infra.settings.max_image_pixels, tenant_id, job_id,
                                     output.pop("image_png"))
    return {"image_id": image.id, **output, "source_image_id": inputs[0]["image_id"]}
