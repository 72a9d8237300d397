"""The model registry: what models exist, their versions, weights sha256 and metrics."""

from collections.abc import Iterable

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from percept.db.models import Model
from percept.services import BuiltinModel


def visible(tenant_id: str):
    """Built-in models (no tenant) and the tenant's own."""
    return or_(Model.tenant_id.is_(None), Model.tenant_id == tenant_id)


def list_models(session: Session, tenant_id: str) -> list[Model]:
    return list(session.scalars(select(Model).where(visible(tenant_id)).order_by(Model.name, Model.id)))


def model_versions(session: Session, tenant_id: str, name: str) -> list[Model]:
    return list(session.scalars(
        select(Model).where(visible(tenant_id), Model.name == name).order_by(Model.id)))


def get_model(session: Session, tenant_id: str, model_id: int) -> Model | None:
    """A model the tenant may use, by registry id."""
    return session.scalar(select(Model).where(visible(tenant_id), Model.id == model_id))


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
    return bool(session.scalar(select(func.count()).select_from(Model)
                               .where(Model.tenant_id.is_(None), Model.name == name)))


def seed_builtin(session: Session, models: Iterable[BuiltinModel]) -> None:
    """Insert or update the declared built-in models (name + version), keeping what workers recorded."""
    for declared in models:
        values = {"kind": declared.kind, "predictor": declared.predictor, "metrics": declared.metrics,
                  "card": declared.card, "status": "ready"}
        statement = insert(Model).values(tenant_id=None, name=declared.name, version=declared.version, **values)
        session.execute(statement.on_conflict_do_update(
            index_elements=[Model.tenant_id, Model.name, Model.version], set_=values))


def record_loaded(session: Session, model_id: int, device: str, sha256: str | None = None) -> None:
    """What a worker found when it loaded a model: the device it runs on and, for a built-in model,
    the weights hash (a trained model's hash is its artifact's, known at registration)."""
    values: dict[str, object] = {"device": device}
    if sha256 is not None:
        values["weights_sha256"] = sha256
    session.execute(update(Model).where(Model.id == model_id).values(**values))


def newest_of_kind(session: Session, tenant_id: str, kind: str) -> Model | None:
    """The tenant's own model version of `kind` created last (any name)."""
    return session.scalar(select(Model).where(Model.tenant_id == tenant_id, Model.kind == kind)
                          .order_by(Model.created_at.desc(), Model.id.desc()).limit(1))


def kinds_named(session: Session, tenant_id: str, name: str) -> set[str]:
    """The kinds of the tenant's own model versions called `name`."""
    return set(session.scalars(select(Model.kind).where(Model.tenant_id == tenant_id, Model.name == name)))
