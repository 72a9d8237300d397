"""Generated images' provenance rows, and the search of a tenant's images (GET /v1/images)."""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from percept.db.models import Generation, Image


def add_generation(session: Session, generation: Generation) -> Generation:
    """Record what made an image, unless it is recorded already (the same bytes made again, e.g. by a
    reproduction, keep their first record); either way return the stored row."""
    values = {c.name: getattr(generation, c.name) for c in Generation.__table__.columns if c.name != "created_at"}
    session.execute(insert(Generation).values(**values).on_conflict_do_nothing(index_elements=[Generation.image_id]))
    return session.scalars(select(Generation).where(Generation.image_id == generation.image_id)).one()


def get_generation(session: Session, tenant_id: str, image_id: str) -> Generation | None:
    return session.scalar(select(Generation).where(Generation.image_id == image_id,
                                                   Generation.tenant_id == tenant_id))


@dataclass(frozen=True)
class ImageFilter:
    q: str | None = None  # words of the prompt (or negative prompt)
    subject: str | None = None
    style: str | None = None
    model: str | None = None  # `name` or `name:version`
    job: str | None = None
    grid: str | None = None
    kind: str | None = None  # uploaded | generated | card
    created_after: datetime | None = None
    created_before: datetime | None = None


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def list_images(session: Session, tenant_id: str, where: ImageFilter, *, limit: int = 50,
                before_id: str | None = None) -> list[tuple[Image, Generation | None]]:
    """The tenant's images newest first, each with its generation record (None for uploads); `before_id` is
    the cursor (ids sort by creation time)."""
    query = (select(Image, Generation).outerjoin(Generation, Generation.image_id == Image.id)
             .where(Image.tenant_id == tenant_id))
    if where.kind == "uploaded":
        query = query.where(Image.source_job_id.is_(None))
    elif where.kind == "generated":
        query = query.where(Image.source_job_id.is_not(None), Generation.role.is_distinct_from("card"))
    elif where.kind == "card":
        query = query.where(Generation.role == "card")
    if where.q:
        query = query.where(Generation.prompt.ilike(_like(where.q)) | Generation.negative_prompt.ilike(_like(where.q)))
    if where.subject:
        query = query.where(Generation.subject == where.subject)
    if where.style:
        query = query.where(Generation.style == where.style)
    if where.model:
        name, _, version = where.model.partition(":")
        query = query.where(Generation.model_name == name)
        if version:
            query = query.where(Generation.model_version == version)
    if where.job:
        query = query.where((Generation.job_id == where.job) | (Image.source_job_id == where.job))
    if where.grid:
        query = query.where(Generation.grid_id == where.grid)
    if where.created_after:
        query = query.where(Image.created_at >= where.created_after)
    if where.created_before:
        query = query.where(Image.created_at < where.created_before)
    if before_id:
        query = query.where(Image.id < before_id)
    return [(image, generation) for image, generation in session.execute(query.order_by(Image.id.desc()).limit(limit))]
