"""The model registry as clients see it, and ensembles of the tenant's trained classifiers."""

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from services.gateway.deps import EventsDep, InfraDep, SessionDep, TenantDep
from services.gateway.routers.jobs import JOB_RESPONSES, IdempotencyHeader, PreferHeader, accepted
from services.gateway.schemas import EnsembleIn, ErrorOut, JobOut, ModelOut
from services.gateway.usecases import models

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=list[ModelOut], responses={401: {"model": ErrorOut}})
def list_models(session: SessionDep, tenant_id: TenantDep) -> list[ModelOut]:
    """Built-in models and the tenant's own, with their versions."""
    return models.list_models(session, tenant_id)


@router.post("/ensembles", status_code=202, response_model=JobOut, responses=JOB_RESPONSES)
async def create_ensemble(body: EnsembleIn, response: Response, session: SessionDep, infra: InfraDep,
                          events: EventsDep, tenant_id: TenantDep, idempotency_key: IdempotencyHeader = None,
                          prefer: PreferHeader = None) -> JobOut:
    """A job that registers an ensemble of your trained classifiers as `name` (votes weighted per class by
    each member's validation F1); its output names the model. Serve it with `/v1/classify` like any model."""
    submitted = await run_in_threadpool(models.create_ensemble, session, infra, tenant_id, body.name, body.members,
                                        idempotency_key)
    return await accepted(response, session, infra, events, tenant_id, submitted, prefer)


@router.get("/{name}", response_model=ModelOut, responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}})
def get_model(name: str, session: SessionDep, tenant_id: TenantDep) -> ModelOut:
    """One model: kind, versions, weights sha256, metrics and model card."""
    return models.find_model(session, tenant_id, name)
