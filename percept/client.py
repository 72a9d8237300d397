"""The Python client of the Percept API (API.md): `Percept` (sync) and `AsyncPercept` (async), on httpx.

What each method sends and how its answer is parsed is written once, in `_Operations`: every operation is a
generator that yields the steps it needs (an HTTP call, a pause before a retry, blocking local work such as
zipping a directory) and is sent back their outcomes. The two client classes only perform those steps, each its
own way, so retries, Idempotency-Keys, long-polls and parsing cannot differ between them. Answers are parsed into
the gateway's own schemas (percept.schemas), so the client and the API cannot drift apart.
"""

import asyncio
import io
import itertools
import math
import os
import random
import tempfile
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from functools import lru_cache, partial
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar
from urllib.parse import quote

import httpx
from PIL import Image
from pydantic import TypeAdapter, ValidationError

from percept.config import get_settings
from percept.schemas import (
    CollectionOut,
    DatasetOut,
    ErrorOut,
    ImageOut,
    ImagePage,
    JobOut,
    JobPage,
    ModelOut,
    SubjectOut,
)

T = TypeVar("T")

# A job's image: an existing file's path (streamed from disk), encoded bytes, a PIL image (sent as PNG), or the id
# of an uploaded image ("img_...").
ImageInput = str | os.PathLike[str] | bytes | Image.Image
# A zip (path or bytes), or a directory that is zipped to a temporary file first.
Archive = str | os.PathLike[str] | bytes
# False: answer at once; True: until the job has ended, each request held up to MAX_WAIT; a number: the same,
# each request held up to that many seconds (e.g. under a proxy's idle timeout).
Wait = bool | float

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
MAX_WAIT = 60.0  # API.md: Prefer: wait=N, N <= 60
RETRIED_STATUSES = frozenset({429, 503})
# Backoff before retry n (from 0) when the answer names no Retry-After: BACKOFF * 2^n, +-25 % jitter.
BACKOFF = 0.5
# A Retry-After (or a backoff) longer than this is cut to it: a client waiting minutes looks hung.
MAX_RETRY_SLEEP = 30.0
# The gateway's 409 for a retry that arrives while the first request with its key is still being recorded.
KEY_IN_USE = "idempotency_key_in_use"
USER_AGENT = "percept-python-client/1"


# --- errors -------------------------------------------------------------------------------------------------

class PerceptError(Exception):
    """An error answer of the API (4xx/5xx): its HTTP status, stable `code`, sentence, details and Retry-After."""

    def __init__(self, message: str, *, status: int, code: str, details: dict[str, Any] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.retry_after = retry_after


class NotFound(PerceptError):
    """404: no such thing for this tenant (another tenant's things are 404 too)."""


class InvalidRequest(PerceptError):
    """A 4xx other than 404, 409 and 429: the request itself has to change."""


class Unauthorized(InvalidRequest):
    """401: no API key, or not a valid one."""


class Conflict(PerceptError):
    """409: e.g. an Idempotency-Key reused with a different body, a name already taken."""


class RateLimited(PerceptError):
    """429 after the retries: over the tenant's request rate or pending-jobs quota."""


class Unavailable(PerceptError):
    """503 after the retries (a dependency of the API is down), or no answer at all (`status` 0)."""


class ServerError(PerceptError):
    """Another 5xx: a fault on the API's side."""


class JobFailed(PerceptError):
    """Waiting for a job that ended failed or canceled: `code`, `message` and `details` are the job's error."""

    def __init__(self, job: JobOut, status: int = 200) -> None:
        error = job.error or {}
        super().__init__(error.get("message") or f"Job {job.id} ended {job.status}.", status=status,
                         code=error.get("code") or job.status, details=error.get("details"))
        self.job = job


_ERRORS: dict[int, type[PerceptError]] = {401: Unauthorized, 404: NotFound, 409: Conflict, 429: RateLimited,
                                          503: Unavailable}


def error_for(response: httpx.Response) -> PerceptError:
    """The typed error of a 4xx/5xx answer; one not in the API's error format keeps its status and text."""
    try:
        body = ErrorOut.model_validate_json(response.content).error
        code, message, details = body.code, body.message, body.details
    except ValidationError:
        code, message, details = f"http_{response.status_code}", response.text[:500] or response.reason_phrase, {}
    status = response.status_code
    kind = _ERRORS.get(status) or (ServerError if status >= 500 else InvalidRequest)
    return kind(message, status=status, code=code, details=details, retry_after=retry_after_of(response))


def retry_after_of(response: httpx.Response) -> float | None:
    """Retry-After in seconds (a number, or an HTTP date); None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp() - time.time()
    return None if math.isnan(seconds) else max(0.0, seconds)


# --- what a request sends -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Upload:
    """A file part: bytes in memory, or a file on disk opened again for each attempt and streamed from it."""

    filename: str
    content: bytes | None = None
    path: Path | None = None

    def part(self, files: ExitStack) -> tuple[str, bytes | IO[bytes]]:
        if self.content is not None:
            return self.filename, self.content
        assert self.path is not None
        return self.filename, files.enter_context(self.path.open("rb"))


# Modes PNG stores as they are; others (CMYK, YCbCr, LAB, HSV, F) are converted to RGB(A) first.
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


def _image_input(image: ImageInput) -> _Upload | str:
    """A job's image as sent: an image id as it is (a form field), else a file part."""
    if isinstance(image, Image.Image):
        if image.mode not in _PNG_MODES:
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return _Upload("image.png", content=buffer.getvalue())
    if isinstance(image, bytes | bytearray | memoryview):
        return _Upload("image", content=bytes(image))
    path = Path(image)
    if path.is_file():
        return _Upload(path.name, path=path)
    if isinstance(image, str) and image.startswith("img_"):
        return image
    raise FileNotFoundError(f"{os.fspath(image)!r} is neither an existing file nor an image id (img_...)")


def _archive_input(archive: Archive) -> _Upload | Path:
    """A zip as sent: its bytes or its file; a directory (returned as is) must be zipped first."""
    if isinstance(archive, bytes | bytearray | memoryview):
        return _Upload("archive.zip", content=bytes(archive))
    path = Path(archive)
    if path.is_dir():
        return path
    if path.is_file():
        return _Upload(path.name, path=path)
    raise FileNotFoundError(f"{os.fspath(archive)!r} is neither a zip file nor a directory")


def _zip_directory(directory: Path, target: Path) -> _Upload:
    """The directory's files zipped into `target` (one file at a time, never whole in memory)."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(directory).as_posix())
    return _Upload(f"{directory.name or 'archive'}.zip", path=target)


def _form(params: dict[str, Any]) -> dict[str, str]:
    """Form fields: booleans as the API reads them, absent (None) parameters left out."""
    return {name: ("true" if value else "false") if isinstance(value, bool) else str(value)
            for name, value in params.items() if value is not None}


def _present(params: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in params.items() if value is not None}


def _segment(value: str) -> str:
    return quote(str(value), safe="")


def _wait_seconds(wait: Wait) -> float:
    if wait is True:
        return MAX_WAIT
    return min(max(float(wait), 0.0), MAX_WAIT)


@dataclass
class _Call:
    """One HTTP request of the API, built anew (its files opened again) for each attempt."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    data: dict[str, str] | None = None
    files: dict[str, _Upload] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    wait: float = 0.0  # seconds the API may hold the answer (Prefer: wait=N): added to the read timeout
    stream: bool = False  # the body is read as it arrives (server-sent events)
    idempotent: bool = False  # sending it twice does nothing twice (content-addressed uploads, cancel)

    @property
    def replayable(self) -> bool:
        """Safe to send again after a break that may have come after the API received it."""
        return self.idempotent or self.method == "GET" or "Idempotency-Key" in self.headers

    def request(self, http: httpx.Client | httpx.AsyncClient, files: ExitStack, timeout: float) -> httpx.Request:
        parts = {name: upload.part(files) for name, upload in self.files.items()}
        return http.build_request(self.method, self.path, params=self.params, json=self.json, data=self.data,
                                  files=parts or None, headers=self.headers,
                                  timeout=httpx.Timeout(timeout, read=timeout + self.wait))


@dataclass(frozen=True)
class _Pause:
    seconds: float


@dataclass(frozen=True)
class _Offload:
    """Blocking local work (zipping a directory): the async client runs it in a thread."""

    work: Callable[[], Any]


@dataclass(frozen=True)
class _Done:
    value: Any


_Step = _Call | _Pause | _Offload
# Yields steps; is sent each step's outcome: an httpx.Response or httpx.TransportError for a call, the work's
# result for an offload, None for a pause.
_Operation = Generator[_Step, Any, T]


def _advance(operation: _Operation[Any], outcome: Any) -> _Step | _Done:
    try:
        return operation.send(outcome)
    except StopIteration as finished:
        return _Done(finished.value)


# One validator per answer schema (building one is not free).
_adapter: Callable[[Any], TypeAdapter[Any]] = lru_cache(TypeAdapter)


class _JobEvents:
    """Reads the server-sent events of GET /v1/jobs/{id}/events into jobs, each state once, until the job has
    ended. A stream that breaks off early is opened again (each starts with the job as it stands), at most
    `reconnects` times in a row without news."""

    def __init__(self, job_id: str, reconnects: int) -> None:
        self.job_id = job_id
        self.reconnects = reconnects
        self.last: JobOut | None = None
        self._data: list[str] = []
        self._opened = 0

    @property
    def ended(self) -> bool:
        return self.last is not None and self.last.status in TERMINAL

    def connection(self) -> _Call | None:
        """The stream to open next; None once the job has ended."""
        if self.ended:
            return None
        if self._opened > self.reconnects:
            raise Unavailable(f"The event stream of job {self.job_id} kept breaking off.", status=0,
                              code="stream_interrupted")
        self._opened += 1
        self._data = []
        return _Call("GET", f"/v1/jobs/{_segment(self.job_id)}/events", headers={"Accept": "text/event-stream"},
                     stream=True)

    def feed(self, line: str) -> list[JobOut]:
        """The job an event completed by this line (a blank line ends an event), if it is news."""
        if line:
            name, _, value = line.partition(":")
            if name == "data":
                self._data.append(value.removeprefix(" "))
            return []
        if not self._data:
            return []
        job = JobOut.model_validate_json("\n".join(self._data))
        self._data = []
        if self.last is not None and (job.status, job.progress) == (self.last.status, self.last.progress):
            return []  # the first event of a reopened stream repeats what was seen
        self.last, self._opened = job, 0
        return [job]

    def jobs(self, lines: Iterable[str]) -> Iterator[JobOut]:
        try:
            for line in lines:
                yield from self.feed(line)
                if self.ended:
                    return
        except httpx.TransportError:
            return  # broke off: connection() decides whether to open it again


# --- the shared layer -------------------------------------------------------------------------------------------

class _Operations:
    """What each method of the API sends and how its answer is parsed, for both clients."""

    def __init__(self, api_key: str | None, base_url: str | None, timeout: float, max_retries: int) -> None:
        if api_key is None or base_url is None:
            settings = get_settings()
            base_url = base_url or settings.api_url
            key_file = settings.data_dir / "dev-api-key"
            api_key = api_key or settings.api_key or (key_file.read_text().strip() if key_file.exists() else None)
        if not api_key:
            raise ValueError("No API key: pass api_key, set PERCEPT_API_KEY, or run `percept run` once "
                             "(it writes <data_dir>/dev-api-key).")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.headers = {"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT,
                        "Accept": "application/json"}

    def client_options(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "headers": self.headers, "timeout": self.timeout}

    # 1. Sending, retrying, parsing

    def send(self, call: _Call) -> _Operation[httpx.Response]:
        """The call's answer. 429, 503 and lost connections are sent again (the same call: the same
        Idempotency-Key) up to max_retries times, after the Retry-After or a backoff; any other 4xx/5xx is a
        typed error."""
        for attempt in itertools.count():
            outcome = yield call
            delay = self._retry_delay(call, outcome, attempt)
            if delay is None:
                break
            yield _Pause(delay)
        if isinstance(outcome, httpx.TransportError):
            code = "timeout" if isinstance(outcome, httpx.TimeoutException) else "connection_error"
            raise Unavailable(f"No answer from {self.base_url} to {call.method} {call.path}: "
                              f"{type(outcome).__name__} {outcome}".rstrip(), status=0, code=code) from outcome
        if outcome.is_error:
            raise error_for(outcome)
        return outcome

    def _retry_delay(self, call: _Call, outcome: httpx.Response | httpx.TransportError, attempt: int) -> float | None:
        """Seconds to wait before sending the call again; None when its outcome is final."""
        if attempt >= self.max_retries:
            return None
        if isinstance(outcome, httpx.TransportError):
            # A connection never made sent nothing; any other break may have come after the API acted on it.
            if not (isinstance(outcome, httpx.ConnectError | httpx.ConnectTimeout) or call.replayable):
                return None
            retry_after = None
        elif outcome.status_code in RETRIED_STATUSES or (
                outcome.status_code == 409 and error_for(outcome).code == KEY_IN_USE):
            retry_after = retry_after_of(outcome)
        else:
            return None
        if retry_after is None:
            retry_after = BACKOFF * 2**attempt * random.uniform(0.75, 1.25)
        return min(retry_after, MAX_RETRY_SLEEP)

    def _parsed(self, call: _Call, schema: type[T]) -> _Operation[T]:
        response = yield from self.send(call)
        return _adapter(schema).validate_json(response.content)

    # 2. Jobs

    def _submit(self, call: _Call, wait: Wait, idempotency_key: str | None) -> _Operation[JobOut]:
        """A job-creating POST, with an Idempotency-Key (the caller's, or a new one) that every retry repeats;
        with `wait`, the job once it has ended (JobFailed if it failed or was canceled)."""
        call.headers["Idempotency-Key"] = idempotency_key or str(uuid.uuid4())
        seconds = _wait_seconds(wait)
        if seconds:
            call.headers["Prefer"], call.wait = f"wait={seconds:g}", seconds
        job = yield from self._parsed(call, JobOut)
        if not seconds:
            return job
        return _succeeded((yield from self._until_ended(job, seconds)))

    def _until_ended(self, job: JobOut, poll: float, deadline: float | None = None) -> _Operation[JobOut]:
        """Long-poll the job, each request held up to `poll` s, until it has ended; TimeoutError past `deadline`
        (time.monotonic)."""
        while job.status not in TERMINAL:
            wait = poll if deadline is None else min(poll, deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError(f"Job {job.id} is still {job.status}.")
            job = yield from self.get_job(job.id, wait=wait)
        return job

    def get_job(self, job_id: str, *, wait: float = 0) -> _Operation[JobOut]:
        seconds = _wait_seconds(wait)
        headers = {"Prefer": f"wait={seconds:g}"} if seconds else {}
        return self._parsed(_Call("GET", f"/v1/jobs/{_segment(job_id)}", headers=headers, wait=seconds), JobOut)

    def wait_for_job(self, job_id: str, *, timeout: float | None = None) -> _Operation[JobOut]:
        deadline = None if timeout is None else time.monotonic() + timeout
        job = yield from self.get_job(job_id, wait=MAX_WAIT if timeout is None else min(timeout, MAX_WAIT))
        return _succeeded((yield from self._until_ended(job, MAX_WAIT, deadline)))

    def list_jobs(self, *, kind: str | None = None, status: str | None = None, model: str | None = None,
                  q: str | None = None, limit: int = 50, cursor: str | None = None) -> _Operation[JobPage]:
        params = _present({"kind": kind, "status": status, "model": model, "q": q, "limit": limit, "cursor": cursor})
        return self._parsed(_Call("GET", "/v1/jobs", params=params), JobPage)

    def cancel_job(self, job_id: str) -> _Operation[JobOut]:
        return self._parsed(_Call("POST", f"/v1/jobs/{_segment(job_id)}/cancel", idempotent=True), JobOut)

    def _image_job(self, path: str, images: dict[str, ImageInput], params: dict[str, Any], wait: Wait,
                   idempotency_key: str | None) -> _Operation[JobOut]:
        """A job POST with image fields: ids as form fields, everything else as file parts."""
        data, files = _form(params), dict[str, _Upload]()
        for name, image in images.items():
            sent = _image_input(image)
            if isinstance(sent, str):
                data[name] = sent
            else:
                files[name] = sent
        return self._submit(_Call("POST", path, data=data, files=files), wait, idempotency_key)

    def classify(self, image: ImageInput, *, wait: Wait = False, idempotency_key: str | None = None,
                 **params: Any) -> _Operation[JobOut]:
        return self._image_job("/v1/classify", {"image": image}, params, wait, idempotency_key)

    def caption(self, image: ImageInput, *, wait: Wait = False, idempotency_key: str | None = None,
                **params: Any) -> _Operation[JobOut]:
        return self._image_job("/v1/caption", {"image": image}, params, wait, idempotency_key)

    def detect_faces(self, image: ImageInput, *, wait: Wait = False, idempotency_key: str | None = None,
                     **params: Any) -> _Operation[JobOut]:
        return self._image_job("/v1/faces/detect", {"image": image}, params, wait, idempotency_key)

    def verify_faces(self, image_a: ImageInput, image_b: ImageInput, *, wait: Wait = False,
                     idempotency_key: str | None = None, **params: Any) -> _Operation[JobOut]:
        return self._image_job("/v1/faces/verify", {"image_a": image_a, "image_b": image_b}, params, wait,
                               idempotency_key)

    def identify_faces(self, image: ImageInput, collection: str, *, wait: Wait = False,
                       idempotency_key: str | None = None, **params: Any) -> _Operation[JobOut]:
        return self._image_job("/v1/faces/identify", {"image": image}, {"collection": collection, **params}, wait,
                               idempotency_key)

    def make_meme(self, image: ImageInput, *, wait: Wait = False, idempotency_key: str | None = None,
                  **params: Any) -> _Operation[JobOut]:
        return self._image_job("/v1/memes", {"image": image}, params, wait, idempotency_key)

    def enroll_face(self, collection: str, subject: str, image: ImageInput, *, wait: Wait = False,
                    idempotency_key: str | None = None) -> _Operation[JobOut]:
        path = f"/v1/collections/{_segment(collection)}/subjects/{_segment(subject)}/faces"
        return self._image_job(path, {"image": image}, {}, wait, idempotency_key)

    def generate(self, prompt: str, *, wait: Wait = False, idempotency_key: str | None = None,
                 **params: Any) -> _Operation[JobOut]:
        body = _present({"prompt": prompt, **params})
        return self._submit(_Call("POST", "/v1/generate", json=body), wait, idempotency_key)

    def generate_grid(self, subjects: list[str], styles: list[str], *, wait: Wait = False,
                      idempotency_key: str | None = None, **params: Any) -> _Operation[JobOut]:
        body = _present({"subjects": subjects, "styles": styles, **params})
        return self._submit(_Call("POST", "/v1/generate/grid", json=body), wait, idempotency_key)

    def reproduce(self, image_id: str, *, wait: Wait = False,
                  idempotency_key: str | None = None) -> _Operation[JobOut]:
        call = _Call("POST", f"/v1/images/{_segment(image_id)}/reproduce")
        return self._submit(call, wait, idempotency_key)

    def events(self, job_id: str) -> _JobEvents:
        return _JobEvents(job_id, self.max_retries)

    # 3. Images, collections, datasets, models

    def upload_image(self, image: ImageInput) -> _Operation[ImageOut]:
        sent = _image_input(image)
        if isinstance(sent, str):  # uploaded already
            return self.get_image(sent)
        return self._parsed(_Call("POST", "/v1/images", files={"file": sent}, idempotent=True), ImageOut)

    def get_image(self, image_id: str) -> _Operation[ImageOut]:
        return self._parsed(_Call("GET", f"/v1/images/{_segment(image_id)}"), ImageOut)

    def download_image(self, image_id: str, path: str | os.PathLike[str] | None = None) -> _Operation[bytes]:
        response = yield from self.send(_Call("GET", f"/v1/images/{_segment(image_id)}/content",
                                              headers={"Accept": "*/*"}))
        if path is not None:
            Path(path).write_bytes(response.content)
        return response.content

    def list_images(self, *, q: str | None = None, subject: str | None = None, style: str | None = None,
                    model: str | None = None, job: str | None = None, grid: str | None = None,
                    kind: str | None = None, limit: int = 50, cursor: str | None = None) -> _Operation[ImagePage]:
        params = _present({"q": q, "subject": subject, "style": style, "model": model, "job": job, "grid": grid,
                           "kind": kind, "limit": limit, "cursor": cursor})
        return self._parsed(_Call("GET", "/v1/images", params=params), ImagePage)

    def create_collection(self, name: str, *, threshold: float | None = None) -> _Operation[CollectionOut]:
        body = _present({"name": name, "threshold": threshold})
        return self._parsed(_Call("POST", "/v1/collections", json=body), CollectionOut)

    def create_subject(self, collection: str, name: str) -> _Operation[SubjectOut]:
        call = _Call("POST", f"/v1/collections/{_segment(collection)}/subjects", json={"name": name})
        return self._parsed(call, SubjectOut)

    def _archive_part(self, archive: Archive, scratch: ExitStack) -> _Operation[_Upload]:
        """The zip's file part; a directory is zipped into a temporary directory `scratch` removes."""
        sent = _archive_input(archive)
        if isinstance(sent, _Upload):
            return sent
        target = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="percept-"))) / "archive.zip"
        return (yield _Offload(partial(_zip_directory, sent, target)))

    def upload_dataset(self, archive: Archive, *, wait: Wait = False) -> _Operation[DatasetOut]:
        with ExitStack() as scratch:
            upload = yield from self._archive_part(archive, scratch)
            # Content-addressed: the same zip is the same dataset, so sending it again is safe.
            dataset = yield from self._parsed(_Call("POST", "/v1/datasets", files={"file": upload},
                                                    idempotent=True), DatasetOut)
        seconds = _wait_seconds(wait)
        if seconds and dataset.status == "analyzing" and dataset.job_id:
            analysis = yield from self.get_job(dataset.job_id, wait=seconds)
            yield from self._until_ended(analysis, seconds)
            dataset = yield from self.get_dataset(dataset.id)
        return dataset

    def get_dataset(self, dataset_id: str) -> _Operation[DatasetOut]:
        return self._parsed(_Call("GET", f"/v1/datasets/{_segment(dataset_id)}"), DatasetOut)

    def train_classifier(self, dataset: str, name: str, *, wait: Wait = False, idempotency_key: str | None = None,
                         **params: Any) -> _Operation[JobOut]:
        body = _present({"dataset": dataset, "name": name, **params})
        return self._submit(_Call("POST", "/v1/train/classifier", json=body), wait, idempotency_key)

    def train_captioner(self, dataset: str, name: str, *, wait: Wait = False, idempotency_key: str | None = None,
                        **params: Any) -> _Operation[JobOut]:
        body = _present({"dataset": dataset, "name": name, **params})
        return self._submit(_Call("POST", "/v1/train/captioner", json=body), wait, idempotency_key)

    def list_models(self) -> _Operation[list[ModelOut]]:
        return self._parsed(_Call("GET", "/v1/models"), list[ModelOut])

    def get_model(self, name: str) -> _Operation[ModelOut]:
        return self._parsed(_Call("GET", f"/v1/models/{_segment(name)}"), ModelOut)

    def import_model(self, checkpoint: Archive, name: str, *, kind: str = "caption", wait: Wait = False,
                     idempotency_key: str | None = None) -> _Operation[JobOut]:
        with ExitStack() as scratch:
            upload = yield from self._archive_part(checkpoint, scratch)
            call = _Call("POST", "/v1/models/import", data=_form({"name": name, "kind": kind}), files={"file": upload})
            return (yield from self._submit(call, wait, idempotency_key))


def _succeeded(job: JobOut) -> JobOut:
    if job.status != "succeeded":
        raise JobFailed(job)
    return job


# --- the clients ---------------------------------------------------------------------------------------------

class Percept:
    """The Percept API, synchronously. Every job-creating method sends an Idempotency-Key (yours, or a new one)
    that its retries repeat, so a retried submit never makes two jobs; with `wait` it returns the ended job (and
    raises JobFailed for a failed or canceled one). Errors are PerceptError subclasses carrying the API's code.

    Defaults: the key and URL of percept.config's settings (PERCEPT_API_KEY, PERCEPT_API_URL), else embedded
    mode's dev key (<data_dir>/dev-api-key).
    """

    def __init__(self, api_key: str | None = None, base_url: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 3, transport: httpx.BaseTransport | None = None) -> None:
        self._ops = _Operations(api_key, base_url, timeout, max_retries)
        self._http = httpx.Client(transport=transport, **self._ops.client_options())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def _run(self, operation: _Operation[T]) -> T:
        outcome: Any = None
        with closing(operation):
            while not isinstance(step := _advance(operation, outcome), _Done):
                outcome = self._perform(step)
        return step.value

    def _perform(self, step: _Step) -> Any:
        if isinstance(step, _Pause):
            return self._pause(step.seconds)
        if isinstance(step, _Offload):
            return step.work()
        with ExitStack() as files:
            try:
                response = self._http.send(step.request(self._http, files, self._ops.timeout), stream=step.stream)
            except httpx.TransportError as exc:
                return exc
        if step.stream and response.is_error:
            response.read()  # the error's body, for error_for
        return response

    def _pause(self, seconds: float) -> None:
        time.sleep(seconds)

    # Images
    def upload_image(self, image: ImageInput) -> ImageOut:
        """Upload an image (a path is streamed from disk); the same bytes give the same id."""
        return self._run(self._ops.upload_image(image))

    def get_image(self, image_id: str) -> ImageOut:
        return self._run(self._ops.get_image(image_id))

    def download_image(self, image_id: str, path: str | os.PathLike[str] | None = None) -> bytes:
        """The image's bytes; also written to `path` when given."""
        return self._run(self._ops.download_image(image_id, path))

    def list_images(self, *, q: str | None = None, subject: str | None = None, style: str | None = None,
                    model: str | None = None, job: str | None = None, grid: str | None = None,
                    kind: str | None = None, limit: int = 50, cursor: str | None = None) -> ImagePage:
        """Your images, newest first; `cursor` is the previous page's next_cursor."""
        return self._run(self._ops.list_images(q=q, subject=subject, style=style, model=model, job=job, grid=grid,
                                               kind=kind, limit=limit, cursor=cursor))

    # Jobs
    def get_job(self, job_id: str, *, wait: float = 0) -> JobOut:
        """The job; with `wait`, held up to that many seconds (at most 60) for it to end."""
        return self._run(self._ops.get_job(job_id, wait=wait))

    def wait_for_job(self, job_id: str, *, timeout: float | None = None) -> JobOut:
        """The job once it has ended (long-polling): JobFailed if it failed or was canceled, TimeoutError when
        `timeout` seconds pass first."""
        return self._run(self._ops.wait_for_job(job_id, timeout=timeout))

    def list_jobs(self, *, kind: str | None = None, status: str | None = None, model: str | None = None,
                  q: str | None = None, limit: int = 50, cursor: str | None = None) -> JobPage:
        """Your jobs, newest first; `q` searches labels, captions and prompts."""
        return self._run(self._ops.list_jobs(kind=kind, status=status, model=model, q=q, limit=limit,
                                             cursor=cursor))

    def cancel_job(self, job_id: str) -> JobOut:
        return self._run(self._ops.cancel_job(job_id))

    def events(self, job_id: str) -> Iterator[JobOut]:
        """The job at each status or progress change (server-sent events), until it has ended."""
        stream = self._ops.events(job_id)
        while (call := stream.connection()) is not None:
            with closing(self._run(self._ops.send(call))) as response:
                yield from stream.jobs(response.iter_lines())

    def classify(self, image: ImageInput, *, wait: Wait = False, idempotency_key: str | None = None,
                 **params: Any) -> JobOut:
        """Classify an image; params: model, top_k, expected_label, unknown_threshold."""
        return self._run(self._ops.classify(image, wait=wait, idempotency_key=idempotency_key, **params))

    def caption(self, image: ImageInput, *, wait: Wait = False, idempotency_key: str | None = None,
                **params: Any) -> JobOut:
        """Caption an image; params: model, beam_width, num_captions, max_length, min_length, ..."""
        return self._run(self._ops.caption(image, wait=wait, idempotency_key=idempotency_key, **params))

    def detect_faces(self, image: ImageInput, *, wait: Wait = False, idempotency_key: str | None = None,
                     **params: Any) -> JobOut:
        """Faces in an image; params: detector, expressions, landmarks."""
        return self._run(self._ops.detect_faces(image, wait=wait, idempotency_key=idempotency_key, **params))

    def verify_faces(self, image_a: ImageInput, image_b: ImageInput, *, wait: Wait = False,
                     idempotency_key: str | None = None, **params: Any) -> JobOut:
        """Are the main faces of two images one person? params: detector, threshold."""
        return self._run(self._ops.verify_faces(image_a, image_b, wait=wait, idempotency_key=idempotency_key,
                                                **params))

    def identify_faces(self, image: ImageInput, collection: str, *, wait: Wait = False,
                       idempotency_key: str | None = None, **params: Any) -> JobOut:
        """The collection's closest subjects for each face; params: detector, top_k, threshold."""
        return self._run(self._ops.identify_faces(image, collection, wait=wait, idempotency_key=idempotency_key,
                                                  **params))

    def make_meme(self, image: ImageInput, *, wait: Wait = False, idempotency_key: str | None = None,
                  **params: Any) -> JobOut:
        """A meme of the photo; params: top_text, bottom_text, seed, detector."""
        return self._run(self._ops.make_meme(image, wait=wait, idempotency_key=idempotency_key, **params))

    def create_collection(self, name: str, *, threshold: float | None = None) -> CollectionOut:
        return self._run(self._ops.create_collection(name, threshold=threshold))

    def create_subject(self, collection: str, name: str) -> SubjectOut:
        return self._run(self._ops.create_subject(collection, name))

    def enroll_face(self, collection: str, subject: str, image: ImageInput, *, wait: Wait = False,
                    idempotency_key: str | None = None) -> JobOut:
        """Enroll the image's one face for the subject (a job)."""
        return self._run(self._ops.enroll_face(collection, subject, image, wait=wait,
                                               idempotency_key=idempotency_key))

    # Text-to-image
    def generate(self, prompt: str, *, wait: Wait = False, idempotency_key: str | None = None,
                 **params: Any) -> JobOut:
        """Render images of a prompt; params: negative_prompt, model, seed, steps, guidance_scale, width, ..."""
        return self._run(self._ops.generate(prompt, wait=wait, idempotency_key=idempotency_key, **params))

    def generate_grid(self, subjects: list[str], styles: list[str], *, wait: Wait = False,
                      idempotency_key: str | None = None, **params: Any) -> JobOut:
        """A subject x style grid (a parent job with a child per cell); params: images_per_prompt, seed, ..."""
        return self._run(self._ops.generate_grid(subjects, styles, wait=wait, idempotency_key=idempotency_key,
                                                 **params))

    def reproduce(self, image_id: str, *, wait: Wait = False, idempotency_key: str | None = None) -> JobOut:
        """Render a generated image again from its provenance."""
        return self._run(self._ops.reproduce(image_id, wait=wait, idempotency_key=idempotency_key))

    # Datasets and models
    def upload_dataset(self, archive: Archive, *, wait: Wait = False) -> DatasetOut:
        """Upload a dataset zip (streamed from its file; a directory is zipped first); with `wait`, the dataset
        once analysed (`ready` or `failed`)."""
        return self._run(self._ops.upload_dataset(archive, wait=wait))

    def get_dataset(self, dataset_id: str) -> DatasetOut:
        return self._run(self._ops.get_dataset(dataset_id))

    def train_classifier(self, dataset: str, name: str, *, wait: Wait = False, idempotency_key: str | None = None,
                         **params: Any) -> JobOut:
        """Train a classifier on a ready dataset; params: balance, augment, epochs, val_fraction, ..."""
        return self._run(self._ops.train_classifier(dataset, name, wait=wait, idempotency_key=idempotency_key,
                                                    **params))

    def train_captioner(self, dataset: str, name: str, *, wait: Wait = False, idempotency_key: str | None = None,
                        **params: Any) -> JobOut:
        """Train a captioner on a ready caption dataset; params: architecture, epochs, beam_width, seed, ..."""
        return self._run(self._ops.train_captioner(dataset, name, wait=wait, idempotency_key=idempotency_key,
                                                   **params))

    def list_models(self) -> list[ModelOut]:
        return self._run(self._ops.list_models())

    def get_model(self, name: str) -> ModelOut:
        return self._run(self._ops.get_model(name))

    def import_model(self, checkpoint: Archive, name: str, *, kind: str = "caption", wait: Wait = False,
                     idempotency_key: str | None = None) -> JobOut:
        """Import a checkpoint (a zip, or a directory zipped to a temporary file first) as `name`'s next
        version; kind: caption (image-to-text) or text-to-image."""
        return self._run(self._ops.import_model(checkpoint, name, kind=kind, wait=wait,
                                                idempotency_key=idempotency_key))


class AsyncPercept:
    """Percept's methods as coroutines (`events` is an async iterator), on httpx.AsyncClient; `aclose()` or
    `async with`."""

    def __init__(self, api_key: str | None = None, base_url: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 3, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._ops = _Operations(api_key, base_url, timeout, max_retries)
        self._http = httpx.AsyncClient(transport=transport, **self._ops.client_options())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.aclose()

    async def _run(self, operation: _Operation[T]) -> T:
        outcome: Any = None
        with closing(operation):
            while not isinstance(step := _advance(operation, outcome), _Done):
                outcome = await self._perform(step)
        return step.value

    async def _perform(self, step: _Step) -> Any:
        if isinstance(step, _Pause):
            return await self._pause(step.seconds)
        if isinstance(step, _Offload):
            return await asyncio.to_thread(step.work)
        with ExitStack() as files:
            try:
                response = await self._http.send(step.request(self._http, files, self._ops.timeout),
                                                 stream=step.stream)
            except httpx.TransportError as exc:
                return exc
        if step.stream and response.is_error:
            await response.aread()
        return response

    async def _pause(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def upload_image(self, image: ImageInput) -> ImageOut:
        return await self._run(self._ops.upload_image(image))

    async def get_image(self, image_id: str) -> ImageOut:
        return await self._run(self._ops.get_image(image_id))

    async def download_image(self, image_id: str, path: str | os.PathLike[str] | None = None) -> bytes:
        return await self._run(self._ops.download_image(image_id, path))

    async def list_images(self, *, q: str | None = None, subject: str | None = None, style: str | None = None,
                          model: str | None = None, job: str | None = None, grid: str | None = None,
                          kind: str | None = None, limit: int = 50, cursor: str | None = None) -> ImagePage:
        return await self._run(self._ops.list_images(q=q, subject=subject, style=style, model=model, job=job,
                                                     grid=grid, kind=kind, limit=limit, cursor=cursor))

    async def get_job(self, job_id: str, *, wait: float = 0) -> JobOut:
        return await self._run(self._ops.get_job(job_id, wait=wait))

    async def wait_for_job(self, job_id: str, *, timeout: float | None = None) -> JobOut:
        return await self._run(self._ops.wait_for_job(job_id, timeout=timeout))

    async def list_jobs(self, *, kind: str | None = None, status: str | None = None, model: str | None = None,
                        q: str | None = None, limit: int = 50, cursor: str | None = None) -> JobPage:
        return await self._run(self._ops.list_jobs(kind=kind, status=status, model=model, q=q, limit=limit,
                                                   cursor=cursor))

    async def cancel_job(self, job_id: str) -> JobOut:
        return await self._run(self._ops.cancel_job(job_id))

    async def events(self, job_id: str) -> AsyncIterator[JobOut]:
        stream = self._ops.events(job_id)
        while (call := stream.connection()) is not None:
            response = await self._run(self._ops.send(call))
            try:
                async for line in response.aiter_lines():
                    for job in stream.feed(line):
                        yield job
                    if stream.ended:
                        return
            except httpx.TransportError:
                pass  # broke off: connection() decides whether to open it again
            finally:
                await response.aclose()

    async def classify(self, image: ImageInput, *, wait: Wait = False, idempotency_key: str | None = None,
                       **params: Any) -> JobOut:
        return await self._run(self._ops.classify(image, wait=wait, idempotency_key=idempotency_key, **params))

    async def caption(self, image: ImageInput, *, wait: Wait = False, idempotency_key: str | None = None,
                      **params: Any) -> JobOut:
        return await self._run(self._ops.caption(image, wait=wait, idempotency_key=idempotency_key, **params))

    async def detect_faces(self, image: ImageInput, *, wait: Wait = False, idempotency_key: str | None = None,
                           **params: Any) -> JobOut:
        return await self._run(self._ops.detect_faces(image, wait=wait, idempotency_key=idempotency_key, **params))

    async def verify_faces(self, image_a: ImageInput, image_b: ImageInput, *, wait: Wait = False,
                           idempotency_key: str | None = None, **params: Any) -> JobOut:
        return await self._run(self._ops.verify_faces(image_a, image_b, wait=wait, idempotency_key=idempotency_key,
                                                      **params))

    async def identify_faces(self, image: ImageInput, collection: str, *, wait: Wait = False,
                             idempotency_key: str | None = None, **params: Any) -> JobOut:
        return await self._run(self._ops.identify_faces(image, collection, wait=wait,
                                                        idempotency_key=idempotency_key, **params))

    async def make_meme(self, image: ImageInput, *, wait: Wait = False, idempotency_key: str | None = None,
                        **params: Any) -> JobOut:
        return await self._run(self._ops.make_meme(image, wait=wait, idempotency_key=idempotency_key, **params))

    async def create_collection(self, name: str, *, threshold: float | None = None) -> CollectionOut:
        return await self._run(self._ops.create_collection(name, threshold=threshold))

    async def create_subject(self, collection: str, name: str) -> SubjectOut:
        return await self._run(self._ops.create_subject(collection, name))

    async def enroll_face(self, collection: str, subject: str, image: ImageInput, *, wait: Wait = False,
                          idempotency_key: str | None = None) -> JobOut:
        return await self._run(self._ops.enroll_face(collection, subject, image, wait=wait,
                                                     idempotency_key=idempotency_key))

    async def generate(self, prompt: str, *, wait: Wait = False, idempotency_key: str | None = None,
                       **params: Any) -> JobOut:
        return await self._run(self._ops.generate(prompt, wait=wait, idempotency_key=idempotency_key, **params))

    async def generate_grid(self, subjects: list[str], styles: list[str], *, wait: Wait = False,
                            idempotency_key: str | None = None, **params: Any) -> JobOut:
        return await self._run(self._ops.generate_grid(subjects, styles, wait=wait, idempotency_key=idempotency_key,
                                                       **params))

    async def reproduce(self, image_id: str, *, wait: Wait = False, idempotency_key: str | None = None) -> JobOut:
        return await self._run(self._ops.reproduce(image_id, wait=wait, idempotency_key=idempotency_key))

    async def upload_dataset(self, archive: Archive, *, wait: Wait = False) -> DatasetOut:
        return await self._run(self._ops.upload_dataset(archive, wait=wait))

    async def get_dataset(self, dataset_id: str) -> DatasetOut:
        return await self._run(self._ops.get_dataset(dataset_id))

    async def train_classifier(self, dataset: str, name: str, *, wait: Wait = False,
                               idempotency_key: str | None = None, **params: Any) -> JobOut:
        return await self._run(self._ops.train_classifier(dataset, name, wait=wait, idempotency_key=idempotency_key,
                                                          **params))

    async def train_captioner(self, dataset: str, name: str, *, wait: Wait = False,
                              idempotency_key: str | None = None, **params: Any) -> JobOut:
        return await self._run(self._ops.train_captioner(dataset, name, wait=wait, idempotency_key=idempotency_key,
                                                         **params))

    async def list_models(self) -> list[ModelOut]:
        return await self._run(self._ops.list_models())

    async def get_model(self, name: str) -> ModelOut:
        return await self._run(self._ops.get_model(name))

    async def import_model(self, checkpoint: Archive, name: str, *, kind: str = "caption", wait: Wait = False,
                           idempotency_key: str | None = None) -> JobOut:
        return await self._run(self._ops.import_model(checkpoint, name, kind=kind, wait=wait,
                                                      idempotency_key=idempotency_key))
