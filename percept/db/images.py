"""Image records. The bytes live in object storage under their content address."""

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from percept.db.ids import new_id
from percept.db.models import Image
from percept.imaging import inspect_image
from percept.storage import ObjectStore, object_key_for


def get_image(session: Session, tenant_id: str, image_id: str) -> Image | None:
    return session.scalar(select(Image).where(Image.id == image_id, Image.tenant_id == tenant_id))


def get_images(session: Session, image_ids: list[str]) -> dict[str, Image]:
    return {img.id: img for img in session.scalars(select(Image).where(Image.id.in_(image_ids)))}


def add_image(session: Session, image: Image) -> Image:
    """Insert unless the tenant already has these bytes; either way return the stored row. One statement: the
    row inserted, else the one there (a second look only when another request inserted it meanwhile, which the
    statement's snapshot cannot see)."""
    values = {c.name: getattr(image, c.name) for c in Image.__table__.columns if c.name != "created_at"}
    same = (Image.tenant_id == image.tenant_id, Image.sha256 == image.sha256)
    inserted = (insert(Image).values(**values).on_conflict_do_nothing(index_elements=[Image.tenant_id, Image.sha256])
                .returning(*Image.__table__.columns).cte("inserted"))
    either = select(inserted).union_all(select(*Image.__table__.columns).where(*same)).limit(1)
    found = session.scalars(select(Image).from_statement(either)).first()
    return found if found is not None else session.scalars(select(Image).where(*same)).one()


def add_job_image(session: Session, store: ObjectStore, max_pixels: int, tenant_id: str, job_id: str,
                  data: bytes) -> Image:
    """An image a job made (a meme, a generated picture, a contact sheet): its bytes stored under their content
    address and recorded as the tenant's, linked to the job (the same bytes made again keep their first row)."""
    facts = inspect_image(data, max_pixels)
    key = object_key_for(facts.sha256)
    if not store.exists(key):
        store.put(key, data, content_type=facts.content_type)
    return add_image(session, Image(
        id=new_id("img"), tenant_id=tenant_id, sha256=facts.sha256, object_key=key, format=facts.format,
        content_type=facts.content_type, width=facts.width, height=facts.height, bytes=facts.bytes,
        source_job_id=job_id))
