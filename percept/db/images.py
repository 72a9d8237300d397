"""Image records. The bytes live in object storage under their content address."""

from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from percept.db import driver
from percept.db.ids import new_id
from percept.db.models import Image
from percept.imaging import inspect_image
from percept.storage import ObjectStore, object_key_for


def get_image(session: Session, tenant_id: str, image_id: str) -> Image | None:
    return session.scalar(select(Image).where(Image.id == image_id, Image.tenant_id == tenant_id))


def get_images(session: Session, image_ids: list[str]) -> dict[str, Image]:
    return {img.id: img for img in session.scalars(select(Image).where(Image.id.in_(image_ids)))}


# One statement (driver SQL: percept.db.driver): insert unless the tenant has these bytes, then the row inserted, else
# the one there.
_IMAGES: Any = Image.__table__
_WRITTEN = tuple(column.key for column in _IMAGES.columns if column.key != "created_at")
_COLUMNS = ", ".join(column.key for column in _IMAGES.columns)
_ADD_IMAGE = (f"WITH inserted AS (INSERT INTO images ({', '.join(_WRITTEN)}) VALUES "
              f"({driver.placeholders(_IMAGES, _WRITTEN)}) ON CONFLICT (tenant_id, sha256) DO NOTHING "
              f"RETURNING {_COLUMNS}) SELECT {_COLUMNS} FROM inserted UNION ALL SELECT {_COLUMNS} FROM images "
              "WHERE tenant_id = %(tenant_id)s AND sha256 = %(sha256)s LIMIT 1")
_SAME = (_IMAGES.c.tenant_id == bindparam("tenant_id"), _IMAGES.c.sha256 == bindparam("sha256"))
_FIND_IMAGE = select(*_IMAGES.columns).where(*_SAME)


def add_image(session: Session, image: Image) -> Image:
    """Insert unless the tenant already has these bytes; either way return the stored row (as a plain object, not
    one the session tracks). One statement; a second look only when another request inserted the row meanwhile,
    which the statement's snapshot cannot see."""
    values = {key: getattr(image, key) for key in _WRITTEN}
    row = driver.execute(session, _ADD_IMAGE, values).first() or session.execute(_FIND_IMAGE, values).one()
    return Image(**row._mapping)


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
