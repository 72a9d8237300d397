"""Dataset records. The zip itself lives in object storage under its content address."""

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from percept.db.models import Dataset


def add_dataset(session: Session, dataset: Dataset) -> Dataset:
    """Insert unless the tenant already uploaded these bytes; either way return the stored row."""
    values = {c.name: getattr(dataset, c.name) for c in Dataset.__table__.columns if c.name != "created_at"}
    session.execute(insert(Dataset).values(**values).on_conflict_do_nothing(
        index_elements=[Dataset.tenant_id, Dataset.sha256]))
    return session.scalar(select(Dataset).where(Dataset.tenant_id == dataset.tenant_id,
                                                Dataset.sha256 == dataset.sha256))


def get_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset | None:
    return session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id))


def get_dataset_by_id(session: Session, dataset_id: str) -> Dataset | None:
    return session.get(Dataset, dataset_id)


def list_datasets(session: Session, tenant_id: str) -> list[Dataset]:
    return list(session.scalars(select(Dataset).where(Dataset.tenant_id == tenant_id).order_by(Dataset.id.desc())))
