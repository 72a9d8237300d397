"""The model registry: what models exist, their versions, weights sha256 and metrics."""

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from percept.db.models import Model


def visible(tenant_id: str):
    """Built-in models (no tenant) and the tenant's own."""
    return or_(Model.tenant_id.is_(None), Model.tenant_id == tenant_id)


def list_models(session: Session, tenant_id: str) -> list[Model]:
    return list(session.scalars(select(Model).where(visible(tenant_id)).order_by(Model.name, Model.id)))


def model_versions(session: Session, tenant_id: str, name: str) -> list[Model]:
    return list(session.scalars(
        select(Model).where(visible(tenant_id), Model.name == name).order_by(Model.id)))


def record_weights(session: Session, model_id: int, sha256: str | None) -> None:
    """Workers fill in the weights hash of a built-in model the first time they load it."""
    session.execute(update(Model).where(Model.id == model_id, Model.weights_sha256.is_distinct_from(sha256))
                    .values(weights_sha256=sha256))


def find_version(session: Session, tenant_id: str, name: str, version: str) -> Model | None:
    return session.scalar(select(Model).where(visible(tenant_id), Model.name == name, Model.version == version))


def register_version(session: Session, tenant_id: str, model: Model) -> Model:
    """Add `model` as the next version of the tenant's model of that name (1, 2, ...)."""
    # Two trainings of one name finishing together must not both take version N+1.
    session.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"{tenant_id}/{model.name}"))))
    versions = session.scalars(select(Model.version).where(Model.tenant_id == tenant_id, Model.name == model.name))
    model.tenant_id = tenant_id
    model.version = str(max((int(v) for v in versions if v.isdigit()), default=0) + 1)
    session.add(model)
    session.flush()
    return model


def is_builtin_name(session: Session, name: str) -> bool:
    return session.scalar(select(func.count()).select_from(Model)
                          .where(Model.tenant_id.is_(None), Model.name == name)) > 0
