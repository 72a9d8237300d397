"""The FastAPI gateway: validates requests, stores images, records jobs and sends them to workers.

It imports no ML framework (import-linter checks it), so it starts fast and stays small.
"""

import asyncio
import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from percept.config import Settings, get_settings
from percept.errors import ImageTooLarge, PerceptError
from percept.infra import Infra, resolve_infra
from percept.sweeper import sweep_once
from services.gateway.events import JobEvents
from services.gateway.intake import validation_message
from services.gateway.metrics import make_registry
from services.gateway.openapi import install_openapi
from services.gateway.ratelimit import TenantRateLimit, WrongKeyLimit, limits_storage
from services.gateway.routers import (
    caption,
    classify,
    faces,
    generate,
    health,
    images,
    jobs,
    models,
    training,
    webhooks,
)
from services.gateway.webhooks import WebhookSender

log = logging.getLogger("percept.gateway")

# The web console: static pages that call the public API with the user's key (no build step).
CONSOLE_DIR = Path(__file__).resolve().parent / "console"

# Multipart framing and form fields on top of the image itself.
BODY_OVERHEAD_BYTES = 1024 * 1024


def error_response(exc: PerceptError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.status, headers=headers)


class BodySizeLimit:
    """Refuses a request body over the cap while it streams in, before it reaches disk or memory.

    `max_bytes` applies everywhere but under the path prefixes of `per_path` (dataset and checkpoint zips are larger).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, per_path: dict[str, int] | None = None) -> None:
        self.app, self.max_bytes, self.per_path = app, max_bytes, per_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cap = next((cap for prefix, cap in self.per_path.items() if scope["path"].startswith(prefix)),
                   self.max_bytes)
        too_large = ImageTooLarge(
            f"The request body is larger than {cap // (1024 * 1024)} MB; send a smaller file.",
            code="request_too_large", details={"max_bytes": cap})
        declared = dict(scope["headers"]).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            return await error_response(too_large)(scope, receive, send)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise too_large
            return message

        await self.app(scope, counting_receive, send)


class RequestLatency:
    """Observes every request's latency by method, route template and status (pure ASGI: cheap)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            scope["app"].state.request_latency.labels(scope["method"], route, str(status)).observe(
                time.perf_counter() - started)


async def _sweep_forever(infra: Infra) -> None:
    interval = infra.settings.sweep_interval.total_seconds()
    while True:
        await asyncio.sleep(interval)
        try:
            await anyio.to_thread.run_sync(sweep_once, infra.settings, infra.database_url, infra.broker_url)
        except Exception as exc:
            log.warning("sweep failed: %s", exc)


def create_app(settings: Settings | None = None, infra: Infra | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = infra is None
        app.state.infra = resolved = infra or resolve_infra(settings)
        # Long-polls hold a worker thread each while they read the database; allow many at once.
        anyio.to_thread.current_default_thread_limiter().total_tokens = 200
        app.state.events = JobEvents(resolved.broker_url)
        app.state.webhook_sender = webhook_sender = WebhookSender(resolved)
        app.state.events.on_ended = webhook_sender.wake
        app.state.events.start()
        webhook_sender.start()
        app.state.key_cache = {}
        limits = limits_storage(resolved.broker_url)
        app.state.rate_limit = TenantRateLimit(resolved.settings.rate_limit, limits)
        app.state.wrong_keys = WrongKeyLimit(resolved.settings.auth_failure_limit, limits)
        app.state.metrics_registry, app.state.request_latency, collector = make_registry(resolved)
        # The replica's one pass over the job history, now rather than in the first scrape; a daemon thread,
        # so a long read holds up neither the start nor the shutdown.
        threading.Thread(target=collector.warm_up, name="metrics-warm-up", daemon=True).start()
        sweeper = asyncio.create_task(_sweep_forever(resolved))
        yield
        sweeper.cancel()
        await webhook_sender.stop()
        await app.state.events.stop()
        if owned:
            resolved.close()

    app = FastAPI(title="Percept", version="1", lifespan=lifespan,
                  description="Image-AI jobs: classification, captioning, faces and diffusion behind one API.")
    for router in (health.router, images.router, jobs.router, classify.router, caption.router, models.router,
                   training.router, faces.router, generate.router, webhooks.router):
        app.include_router(router)

    @app.get("/console", include_in_schema=False)
    async def console_root() -> RedirectResponse:
        return RedirectResponse("/console/", status_code=308)

    app.mount("/console", StaticFiles(directory=CONSOLE_DIR, html=True), name="console")

    @app.exception_handler(PerceptError)
    async def percept_error(_: Request, exc: PerceptError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, details = validation_message(list(exc.errors()))
        return error_response(PerceptError(message, code="invalid_parameters", status=422,
                                           details={"errors": details}))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        return error_response(PerceptError(str(exc.detail), status=exc.status_code,
                                           code=codes.get(exc.status_code, "http_error")))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(PerceptError("Something went wrong on our side; it has been logged.",
                                           code="internal_error", status=500))

    install_openapi(app)
    app.add_middleware(RequestLatency)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_image_bytes + BODY_OVERHEAD_BYTES,
                       per_path={"/v1/datasets": settings.max_dataset_bytes + BODY_OVERHEAD_BYTES,
                                 # The larger of the kinds' caps; the import's own kind is checked against its cap
                                 "/v1/models/import": max(settings.max_import_bytes, settings.max_pipeline_import_bytes)
                                 + BODY_OVERHEAD_BYTES})
    return app
