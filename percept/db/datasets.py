"""Dataset records. The zip itself lives in object storage under its content address."""

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from percept.db.models import Dataset, Job


def add_dataset(session: Session, dataset: Dataset) -> Dataset:
    """Insert unless the tenant already uploaded these bytes; either way return the stored row."""
    # Unset columns are left out, so a dataset not analysed yet has a SQL NULL summary (not JSON null).
    values = {c.name: getattr(dataset, c.name) for c in Dataset.__table__.columns
              if c.name != "created_at" and getattr(dataset, c.name) is not None}
    session.execute(insert(Dataset).values(**values).on_conflict_do_nothing(
        index_elements=[Dataset.tenant_id, Dataset.sha256]))
    return session.scalars(select(Dataset).where(Dataset.tenant_id == dataset.tenant_id,
                                                 Dataset.sha256 == dataset.sha256)).one()


def get_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset | None:
    return session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id))


def get_dataset_by_id(session: Session, dataset_id: str) -> Dataset | None:
    return session.get(Dataset, dataset_id)


def list_datasets(session: Session, tenant_id: str) -> list[Dataset]:
    return list(session.scalars(select(Dataset).where(Dataset.tenant_id == tenant_id).order_by(Dataset.id.desc())))


def get_with_analysis(session: Session, tenant_id: str, dataset_id: str) -> tuple[Dataset, Job | None] | None:
    """The tenant's dataset and its analysis job (None for a dataset analysed at upload)."""
    row = session.execute(select(Dataset, Job).outerjoin(Job, Job.id == Dataset.analysis_job_id)
                          .where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id)).first()
    return (row[0], row[1]) if row is not None else None


def list_with_analysis(session: Session, tenant_id: str) -> list[tuple[Dataset, Job | None]]:
    """The tenant's datasets with their analysis jobs, newest first."""
    rows = session.execute(select(Dataset, Job).outerjoin(Job, Job.id == Dataset.analysis_job_id)
                           .where(Dataset.tenant_id == tenant_id).order_by(Dataset.id.desc()))
    return [(dataset, job) for dataset, job in rows]


def analysis_of(session: Session, dataset: Dataset) -> Job | None:
    return session.get(Job, dataset.analysis_job_id) if dataset.analysis_job_id else None


def set_analysis_job(session: Session, dataset: Dataset, job_id: str) -> None:
    dataset.analysis_job_id = job_id
    session.flush()
