"""Images: store an upload under its content address, find the tenant's images, name a job's image inputs."""

from sqlalchemy.orm import Session

from percept.db import images as image_repo
from percept.db.ids import new_id
from percept.db.models import Image
from percept.errors import NotFound
from percept.imaging import inspect_image
from percept.infra import Infra
from percept.storage import object_key_for


def store_image(session: Session, infra: Infra, tenant_id: str, data: bytes) -> Image:
    """Validate, store the bytes under their sha256 and record the image (same bytes -> same id)."""
    facts = inspect_image(data, infra.settings.max_image_pixels)
    key = object_key_for(facts.sha256)
    if not infra.store.exists(key):
        infra.store.put(key, data, content_type=facts.content_type)
    return image_repo.add_image(session, Image(
        id=new_id("img"), tenant_id=tenant_id, sha256=facts.sha256, object_key=key, format=facts.format,
        content_type=facts.content_type, width=facts.width, height=facts.height, bytes=facts.bytes))


def find_image(session: Session, tenant_id: str, image_id: str) -> Image:
    image = image_repo.get_image(session, tenant_id, image_id)
    if image is None:
        raise NotFound(f"No image {image_id!r}: upload it with POST /v1/images first.", code="image_not_found")
    return image


def image_content(session: Session, infra: Infra, tenant_id: str, image_id: str) -> tuple[Image, bytes]:
    image = find_image(session, tenant_id, image_id)
    return image, infra.store.get(image.object_key)


def job_images(session: Session, infra: Infra, tenant_id: str, images: list[bytes | str]) -> list[Image]:
    """A job's images, in order: uploaded bytes are stored, image ids are checked as the tenant's."""
    return [store_image(session, infra, tenant_id, image) if isinstance(image, bytes)
            else find_image(session, tenant_id, image) for image in images]


def as_inputs(images: list[Image]) -> list[dict[str, str]]:
    """Images as a job's inputs name them (what its row and provenance record)."""
    return [{"image_id": image.id, "sha256": image.sha256} for image in images]
