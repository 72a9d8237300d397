"""Datasets: a zip of labelled images, checked for hostile archives, analysed, stored by content."""

import hashlib

from percept.datasets import DatasetLimits, analyse_dataset
from percept.db import datasets as dataset_repo
from percept.db.ids import new_id
from percept.db.models import Dataset
from percept.db.session import session_scope
from percept.errors import NotFound
from percept.infra import Infra
from percept.storage import object_key_for


def dataset_limits(infra: Infra) -> DatasetLimits:
    settings = infra.settings
    return DatasetLimits(max_zip_bytes=settings.max_dataset_bytes, max_files=settings.max_dataset_files,
                         max_uncompressed_bytes=settings.max_dataset_uncompressed_bytes,
                         max_image_pixels=settings.max_image_pixels)


def store_dataset(infra: Infra, tenant_id: str, name: str, data: bytes) -> Dataset:
    """Refuse a hostile or unusable zip (4xx), report what is in it, store it (same bytes -> same id)."""
    summary = analyse_dataset(data, dataset_limits(infra))
    sha256 = hashlib.sha256(data).hexdigest()
    key = object_key_for(sha256, prefix="datasets")
    if not infra.store.exists(key):
        infra.store.put(key, data, content_type="application/zip")
    with session_scope(infra.database_url) as session:
        dataset = dataset_repo.add_dataset(session, Dataset(
            id=new_id("ds"), tenant_id=tenant_id, name=name, sha256=sha256, object_key=key, bytes=len(data),
            summary=summary))
        session.commit()
    return dataset


def find_dataset(infra: Infra, tenant_id: str, dataset_id: str) -> Dataset:
    with session_scope(infra.database_url) as session:
        dataset = dataset_repo.get_dataset(session, tenant_id, dataset_id)
    if dataset is None:
        raise NotFound(f"No dataset {dataset_id!r}: upload it with POST /v1/datasets first.",
                       code="dataset_not_found")
    return dataset
