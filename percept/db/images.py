"""Image records. The bytes live in object storage under their content address."""

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from percept.db.models import Image


def get_image(session: Session, tenant_id: str, image_id: str) -> Image | None:
    return session.scalar(select(Image).where(Image.id == image_id, Image.tenant_id == tenant_id))


def get_images(session: Session, image_ids: list[str]) -> dict[str, Image]:
    return {img.id: img for img in session.scalars(select(Image).where(Image.id.in_(image_ids)))}


def add_image(session: Session, image: Image) -> Image:
    """Insert unless the tenant already has these bytes; either way return the stored row."""
    values = {c.name: getattr(image, c.name) for c in Image.__table__.columns if c.name != "created_at"}
    session.execute(insert(Image).values(**values).on_conflict_do_nothing(
        index_elements=[Image.tenant_id, Image.sha256]))
    return session.scalars(select(Image).where(Image.tenant_id == image.tenant_id,
                                               Image.sha256 == image.sha256)).one()
