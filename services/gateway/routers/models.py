"""The model registry as clients see it."""

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from percept.db import registry
from percept.db.models import Model
from percept.db.session import session_scope
from percept.errors import NotFound
from services.gateway import ensembles
from services.gateway.deps import InfraDep, TenantDep
from services.gateway.schemas import EnsembleIn, ErrorOut, ModelOut, ModelVersionOut

router = APIRouter(prefix="/v1/models", tags=["models"])


def _group(rows: list[Model]) -> list[ModelOut]:
    by_name: dict[str, list[Model]] = {}
    for row in rows:
        by_name.setdefault(row.name, []).append(row)
    return [ModelOut(name=name, kind=versions[-1].kind, builtin=versions[-1].tenant_id is None,
                     latest=versions[-1].version,
                     versions=[ModelVersionOut(version=m.version, status=m.status, weights_sha256=m.weights_sha256,
                                               metrics=m.metrics, card=m.card, created_at=m.created_at)
                               for m in versions])
            for name, versions in by_name.items()]


@router.get("", response_model=list[ModelOut], responses={401: {"model": ErrorOut}})
async def list_models(infra: InfraDep, tenant_id: TenantDep) -> list[ModelOut]:
    """Built-in models and the tenant's own, with their versions."""
    def load() -> list[ModelOut]:
        with session_scope(infra.database_url) as session:
            return _group(registry.list_models(session, tenant_id))
    return await run_in_threadpool(load)


@router.post("/ensembles", status_code=201, response_model=ModelOut,
             responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 409: {"model": ErrorOut},
                        422: {"model": ErrorOut}})
async def create_ensemble(body: EnsembleIn, infra: InfraDep, tenant_id: TenantDep) -> ModelOut:
    """Register an ensemble of trained classifiers (votes weighted per class by validation F1); serve it
    with `/v1/classify` like any model."""
    model = await run_in_threadpool(ensembles.create_ensemble, infra, tenant_id, body.name, body.members)
    return await get_model(model.name, infra, tenant_id)


@router.get("/{name}", response_model=ModelOut, responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}})
async def get_model(name: str, infra: InfraDep, tenant_id: TenantDep) -> ModelOut:
    """One model: kind, versions, weights sha256, metrics and model card."""
    def load() -> list[ModelOut]:
        with session_scope(infra.database_url) as session:
            return _group(registry.model_versions(session, tenant_id, name))
    found = await run_in_threadpool(load)
    if not found:
        raise NotFound(f"No model named {name!r}; GET /v1/models lists them.", code="model_not_found")
    return found[0]
