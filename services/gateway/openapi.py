"""The OpenAPI schema as the gateway really answers: besides what each route lists, the answers its shared
machinery gives on any route (the API key check and rate limits, body parsing and the body size cap,
parameter validation, a dependency down), all in the error format of API.md (`ErrorOut`).

tests/gateway/test_fuzz.py holds the gateway to this schema: every answer's status, content type, headers and
body must be declared here.
"""

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorOut"}
VALIDATION_ERROR = {"$ref": "#/components/schemas/HTTPValidationError"}  # FastAPI's, replaced
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "required": True,
                               "schema": {"type": "integer", "minimum": 1}}}

# Status -> (description, headers), by what makes an operation liable to it.
SECURED = {
    "401": ("No API key, or not a valid one (`missing_api_key`, `invalid_api_key`)", None),
    "429": ("Over the tenant's rate or queue quota, or too many wrong keys from this address", RETRY_AFTER),
    "503": ("The database, broker or object storage is unreachable (`dependency_unavailable`)", RETRY_AFTER),
}
WITH_INPUT = {"422": ("Invalid parameters (`invalid_parameters`, with `details.errors`)", None)}
WITH_BODY = {
    "400": ("The body cannot be read: not valid JSON, or a malformed form", None),
    "413": ("The body is over the size limit (`request_too_large`)", None),
}
METHODS = ("get", "put", "post", "delete", "patch")


def _error_response(description: str, headers: dict[str, Any] | None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    if headers:
        response["headers"] = headers
    return response


def without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`X | None` without the None: what a header, a query or path parameter or a form field can carry (an
    optional one is left out, never sent as null)."""
    alternatives = [alt for alt in schema.get("anyOf", ()) if alt != {"type": "null"}]
    if "anyOf" not in schema or len(alternatives) == len(schema["anyOf"]):
        return schema
    rest = {key: value for key, value in schema.items() if key not in ("anyOf", "default")}
    return {**alternatives[0], **rest} if len(alternatives) == 1 else {**rest, "anyOf": alternatives}


def complete_operation(operation: dict[str, Any]) -> None:
    """Add the shared error answers to one operation; route-specific ones keep their description, and every
    4xx/5xx answer is declared as `ErrorOut` (FastAPI's own 422 model is not what the gateway sends)."""
    liable: dict[str, tuple[str, dict[str, Any] | None]] = {}
    if operation.get("security"):
        liable |= SECURED
    if operation.get("parameters") or operation.get("requestBody"):
        liable |= WITH_INPUT
    if operation.get("requestBody"):
        liable |= WITH_BODY
    for parameter in operation.get("parameters", ()):
        parameter["schema"] = without_null(parameter.get("schema", {}))
    responses = operation.setdefault("responses", {})
    for status, (description, headers) in liable.items():
        responses.setdefault(status, _error_response(description, headers))
    for status, response in responses.items():
        content = response.get("content", {}).get("application/json", {})
        if status.startswith(("4", "5")) and content.get("schema", ERROR_SCHEMA) in (ERROR_SCHEMA, VALIDATION_ERROR):
            response["content"] = {"application/json": {"schema": ERROR_SCHEMA}}
            if status in ("429", "503"):
                response["headers"] = {**response.get("headers", {}), **RETRY_AFTER}


def install_openapi(app: FastAPI) -> None:
    """Serve the completed schema at /openapi.json (built once, on the first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for path in schema.get("paths", {}).values():
                for method in METHODS:
                    if method in path:
                        complete_operation(path[method])
            schemas = schema.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
