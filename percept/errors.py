"""One error base class: an HTTP status, a stable code and a sentence that says what to fix."""

from typing import Any


class PerceptError(Exception):
    status: int = 400
    code: str = "bad_request"
    # Seconds a client should wait before retrying (sent as Retry-After), where it applies.
    retry_after: int | None = None

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class InvalidInput(PerceptError):
    status, code = 422, "invalid_input"


class InvalidImage(PerceptError):
    status, code = 415, "unsupported_image"


class ImageTooLarge(PerceptError):
    status, code = 413, "image_too_large"


class NotFound(PerceptError):
    status, code = 404, "not_found"


class Conflict(PerceptError):
    status, code = 409, "conflict"


class Unauthorized(PerceptError):
    status, code = 401, "unauthorized"


class QuotaExceeded(PerceptError):
    status, code, retry_after = 429, "quota_exceeded", 5


class DependencyUnavailable(PerceptError):
    """Database, broker or object storage is unreachable: the client should retry shortly."""

    status, code, retry_after = 503, "dependency_unavailable", 5


# Worker-side failures. A retryable one is tried again with backoff; a fatal one fails the job.
class JobError(PerceptError):
    retryable = False


class RetryableJobError(JobError):
    retryable = True
    code = "temporarily_unavailable"
