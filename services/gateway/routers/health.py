"""Liveness, readiness and metrics."""

import hmac

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from percept.db.session import session_scope
from percept.errors import Unauthorized
from percept.queue import redis_client
from percept.schemas import ErrorOut
from services.gateway.deps import InfraDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """Liveness: the process answers."""
    return {"status": "ok"}


READINESS = {"type": "object", "required": ["status", "checks"], "properties": {
    "status": {"enum": ["ready", "unavailable"]},
    "checks": {"type": "object", "additionalProperties": {"type": "string"}}}}


@router.get("/readyz", responses={
    200: {"description": "All dependencies answer", "content": {"application/json": {"schema": READINESS}}},
    503: {"description": "A dependency does not answer (see `checks`)",
          "content": {"application/json": {"schema": READINESS}},
          "headers": {"Retry-After": {"required": True, "schema": {"type": "integer"}}}}})
def readyz(infra: InfraDep) -> JSONResponse:
    """Readiness: the database, the broker and object storage all answer."""
    checks = {}
    for name, probe in (("database", lambda: _ping_database(infra.database_url)),
                        ("broker", lambda: redis_client(infra.broker_url).ping()),
                        ("storage", infra.store.ping)):
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable: {exc.__class__.__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "unavailable", "checks": checks},
                        status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"})


def _ping_database(url: str) -> None:
    with session_scope(url) as session:
        session.execute(text("SELECT 1"))


@router.get("/metrics", include_in_schema=True, response_class=Response, responses={
    200: {"description": "Prometheus text exposition", "content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}},
    401: {"model": ErrorOut}})
async def metrics(request: Request, infra: InfraDep) -> Response:
    """Prometheus metrics; with PERCEPT_METRICS_TOKEN set, only for `Authorization: Bearer <that token>`."""
    token = infra.settings.metrics_token
    if token:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
            raise Unauthorized("GET /metrics wants `Authorization: Bearer <token>` with the platform's metrics "
                               "token (PERCEPT_METRICS_TOKEN).", code="metrics_token_required")
    data = await run_in_threadpool(generate_latest, request.app.state.metrics_registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
