"""FastAPI dependencies as Annotated aliases: the infrastructure handles, the request's database session
and the caller's tenant."""

import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from percept.db.session import session_scope
from percept.db.tenants import hash_key, tenant_id_for_key
from percept.errors import Unauthorized
from percept.infra import Infra
from services.gateway.events import JobEvents
from services.gateway.ratelimit import WrongKeyLimit
from services.gateway.transaction import commit, has_work

# A key lookup is cached this long: a revoked key stops working within this time.
KEY_CACHE_SECONDS = 30.0


# Async, as every dependency here: FastAPI runs a plain `def` dependency on a worker thread, a trip (and a
# thread wake-up) per request for what is one attribute read.
async def get_infra(request: Request) -> Infra:
    return request.app.state.infra


async def get_events(request: Request) -> JobEvents:
    return request.app.state.events


InfraDep = Annotated[Infra, Depends(get_infra)]
EventsDep = Annotated[JobEvents, Depends(get_events)]


async def get_session(infra: InfraDep) -> AsyncIterator[Session]:
    """The request's one session, committed here once the route has returned (then its buffered sends
    run, see services.gateway.transaction); rolled back when the route raised.

    `scope="function"` below: FastAPI runs this exit before the response is sent (the default, "request",
    runs it after), so the client is answered only once its work is committed, and a failed commit or
    send becomes the error response instead of a 2xx for work that was lost.

    Async, so a worker thread is used only for what does I/O: making the session opens no connection, and a
    route that committed its work already (a job POST that waits for its job) leaves nothing to do at the end.
    """
    scope = session_scope(infra.database_url)
    session = scope.__enter__()
    try:
        yield session
        if has_work(session):
            await run_in_threadpool(commit, session)
    except Exception as exc:  # rolled back, and a database error turned into the API's (session_scope)
        if session.in_transaction():
            await run_in_threadpool(scope.__exit__, type(exc), exc, exc.__traceback__)
        else:
            scope.__exit__(type(exc), exc, exc.__traceback__)
        raise
    except BaseException as exc:  # the request was canceled: no worker thread to wait for
        scope.__exit__(type(exc), exc, exc.__traceback__)
        raise
    scope.__exit__(None, None, None)


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


# The two ways to present a key, declared as the OpenAPI schema's security schemes; neither refuses by itself
# (auto_error=False), so a request without a key is answered by get_tenant_id in the API's error format.
BearerKey = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(
    auto_error=False, scheme_name="bearer", description="`Authorization: Bearer <api key>`"))]
HeaderKey = Annotated[str | None, Depends(APIKeyHeader(
    name="X-API-Key", auto_error=False, scheme_name="apiKey", description="`X-API-Key: <api key>`"))]


async def get_tenant_id(request: Request, infra: InfraDep, bearer: BearerKey, header_key: HeaderKey) -> str:
    key = (bearer.credentials if bearer else None) or header_key or None
    if not key:
        raise Unauthorized("Send your API key as `Authorization: Bearer <key>` or `X-API-Key: <key>`.",
                           code="missing_api_key")
    # The connection's address, or the client a trusted proxy names (PERCEPT_TRUSTED_PROXIES, given to uvicorn).
    client = request.client.host if request.client else None
    wrong_keys: WrongKeyLimit = request.app.state.wrong_keys
    wrong_keys.check(client)
    cache: dict[str, tuple[str, float]] = request.app.state.key_cache
    hashed = hash_key(key)
    cached = cache.get(hashed)
    if cached and cached[1] > time.monotonic():
        tenant_id = cached[0]
    else:
        found = await run_in_threadpool(_tenant_of_key, infra, key)
        if found is None:
            await wrong_keys.wrong_key(client)  # 429 instead of 401 once this address has guessed too often
            raise Unauthorized("The API key is not valid; create one with `percept keys create NAME`.",
                               code="invalid_api_key")
        tenant_id = found
        cache[hashed] = (tenant_id, time.monotonic() + KEY_CACHE_SECONDS)
    await request.app.state.rate_limit.hit(tenant_id)
    return tenant_id


def _tenant_of_key(infra: Infra, key: str) -> str | None:
    # A short session of its own, not the request's: the request's transaction starts with its work, so
    # no connection is held while a large upload streams in after authentication.
    with session_scope(infra.database_url) as session:
        return tenant_id_for_key(session, key)


TenantDep = Annotated[str, Depends(get_tenant_id)]
