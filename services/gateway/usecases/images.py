"""Images: store an upload under its content address, find the tenant's images, name a job's image inputs."""

import os
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache

from sqlalchemy.orm import Session

from percept.db import images as image_repo
from percept.db.ids import new_id
from percept.db.models import Image
from percept.errors import NotFound, PerceptError
from percept.imaging import check_pixels, describe_image
from percept.infra import Infra
from percept.storage import object_key_for


@cache
def checkers() -> ThreadPoolExecutor:
    """The gateway's threads that decode an upload's pixels and store its bytes while the request writes its row."""
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="image-check")


def store_image(session: Session, infra: Infra, tenant_id: str, data: bytes) -> Image:
    """Validate, store the bytes under their sha256 and record the image (same bytes -> same id)."""
    return job_images(session, infra, tenant_id, [data])[0]


def _check_and_store(infra: Infra, key: str, data: bytes, content_type: str) -> None:
    check_pixels(data, infra.settings.max_image_pixels)
    if not infra.store.exists(key):
        infra.store.put(key, data, content_type=content_type)


def find_image(session: Session, tenant_id: str, image_id: str) -> Image:
    image = image_repo.get_image(session, tenant_id, image_id)
    if image is None:
        raise NotFound(f"No image {image_id!r}: upload it with POST /v1/images first.", code="image_not_found")
    return image


def image_content(session: Session, infra: Infra, tenant_id: str, image_id: str) -> tuple[Image, bytes]:
    image = find_image(session, tenant_id, image_id)
    return image, infra.store.get(image.object_key)


def job_images(session: Session, infra: Infra, tenant_id: str, images: list[bytes | str]) -> list[Image]:
    """A job's images, in order: uploaded bytes are validated, stored and recorded, image ids are checked as the
    tenant's. An upload's header is read here; its pixels are decoded (every byte checked, at the smallest scale) and
    its bytes stored on a checker thread while its row is written, and they are waited for before this returns: an
    image's error is still the first thing the request is told, and the row is rolled back with the request."""
    pending: list[Future[None]] = []
    found: list[Image] = []
    try:
        for image in images:
            if isinstance(image, str):
                found.append(find_image(session, tenant_id, image))
                continue
            facts = describe_image(image, infra.settings.max_image_pixels)
            key = object_key_for(facts.sha256)
            pending.append(checkers().submit(_check_and_store, infra, key, image, facts.content_type))
            found.append(image_repo.add_image(session, Image(
                id=new_id("img"), tenant_id=tenant_id, sha256=facts.sha256, object_key=key, format=facts.format,
                content_type=facts.content_type, width=facts.width, height=facts.height, bytes=facts.bytes)))
    except PerceptError:
        for check in pending:  # an earlier upload's error comes first, as it would have without the overlap
            check.result()
        raise
    for check in pending:
        check.result()
    return found


def as_inputs(images: list[Image]) -> list[dict[str, str]]:
    """Images as a job's inputs name them (what its row and provenance record)."""
    return [{"image_id": image.id, "sha256": image.sha256} for image in images]
