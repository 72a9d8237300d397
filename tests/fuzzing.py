"""API fuzzing with schemathesis against a running gateway's own OpenAPI schema (GET /openapi.json).

Every operation is called with generated requests, valid (`positive`) and invalid (`negative`) bodies, query
strings, headers and path ids; each answer is checked: never a 5xx, every 4xx in the error format of API.md
(`{"error": {"code", "message", "details"}}`, `Retry-After` on 429 and 503), its status code, content type,
headers and body as the schema declares them. Generated values are mixed with real ones (the tenant's image,
job, collection, subject, dataset and webhook ids, a real JPEG in place of a generated file, a wrong or missing
key, `Prefer` / `Idempotency-Key` / `Cancel-After` values near their edges) so the calls get past the first 404
or 415 and reach the code behind it.

Generation is derandomized (Hypothesis's `derandomize`, no example database): the same schema gives the same
requests, run after run. Shared by tests/gateway/test_fuzz.py (a few hundred cases in `make test`) and
bench/fuzz.py (the full run).
"""

import io
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.own_platform import OwnPlatform, own_platform

# The platform the fuzz runs on: its own, so its jobs never queue ahead of other tests' jobs. Waits are held
# short (`Prefer: wait=N` is capped at PERCEPT_MAX_WAIT), and the limits a fuzzer trips at once are raised so
# the cases behind them are reached: wrong keys from one address, requests per tenant, pending jobs.
FUZZ_ENV = {
    "PERCEPT_MAX_WAIT": "1",
    "PERCEPT_AUTH_FAILURE_LIMIT": "1000000/minute",
    "PERCEPT_RATE_LIMIT": "1000000/minute",
    "PERCEPT_MAX_PENDING_JOBS_PER_TENANT": "100000",
}
# Every request is answered within this (the longest hold is a 1 s wait; a hung stream is a failure).
REQUEST_TIMEOUT = 20.0


@dataclass
class Resources:
    """Real ids of the fuzzing tenant's objects, mixed into generated requests."""

    key: str
    image_id: str
    job_id: str
    collection: str
    subject: str
    dataset_id: str
    webhook_id: str
    jpeg: bytes
    png: bytes
    model: str = "imagenet-efficientnet-lite0"


@dataclass
class OperationSummary:
    label: str
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    # One line per distinct failure (check and status), with how to reproduce it.
    failures: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # generation that could not run, timeouts

    @property
    def failed(self) -> int:
        return len(self.failures) + len(self.errors)


def _picture(fmt: str, size: tuple[int, int] = (96, 64)) -> bytes:
    image = Image.new("RGB", size)
    for x in range(size[0]):
        for y in range(size[1]):
            image.putpixel((x, y), (x * 2 % 256, y * 3 % 256, (x + y) % 256))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _class_zip(jpeg: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for label in ("cat", "dog"):
            for i in range(3):
                archive.writestr(f"{label}/{i}.jpg", jpeg[:-2] + bytes([i, 0xD9]) if i else jpeg)
    return buffer.getvalue()


def seed_resources(url: str, key: str) -> Resources:
    """One of each object the API's paths name, for the tenant of `key`."""
    jpeg = _picture("JPEG")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        image = client.post("/v1/images", files={"file": ("fuzz.jpg", jpeg, "image/jpeg")}).raise_for_status().json()
        job = client.post("/v1/classify", json={"image": image["id"]},
                          headers={"Prefer": "wait=1"}).raise_for_status().json()
        deadline = time.monotonic() + 60
        while job["status"] not in ("succeeded", "failed", "canceled") and time.monotonic() < deadline:
            job = client.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=1"}).raise_for_status().json()
        collection = client.post("/v1/collections", json={"name": "fuzz-people"}).raise_for_status().json()
        subject = client.post(f"/v1/collections/{collection['name']}/subjects",
                              json={"name": "fuzz-subject"}).raise_for_status().json()
        dataset = client.post("/v1/datasets", files={"file": ("pets.zip", _class_zip(jpeg), "application/zip")})
        webhook = client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/fuzz"}).raise_for_status().json()
    return Resources(key=key, image_id=image["id"], job_id=job["id"], collection=collection["name"],
                     subject=subject["name"], dataset_id=dataset.raise_for_status().json()["id"],
                     webhook_id=webhook["id"], jpeg=jpeg, png=_picture("PNG"))


# --- the checks --------------------------------------------------------------------------------------------

def error_format(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx and 5xx is `{"error": {"code", "message", "details"}}` (API.md), with `Retry-After` on 429/503."""
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"{response.status_code} with a body that is not JSON: {response.text[:200]!r}") from None
    error = body.get("error") if isinstance(body, dict) else None
    ok = (isinstance(error, dict) and set(body) == {"error"} and set(error) == {"code", "message", "details"}
          and isinstance(error["code"], str) and error["code"] and isinstance(error["message"], str)
          and error["message"] and isinstance(error["details"], dict))
    if not ok:
        raise AssertionError(f"{response.status_code} not in the API's error format: {response.text[:300]}")
    if response.status_code in (429, 503) and not str(response.headers.get("retry-after", [""])[0]).isdigit():
        raise AssertionError(f"{response.status_code} without a Retry-After of whole seconds")
    return True


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, error_format]


# --- mixing real values into generated cases ----------------------------------------------------------------

# Edge values of the job headers, each list mostly None (the generated value stays) so that a case is not
# nearly always refused for one of its three headers before its body is read. (Values a client library refuses
# to send, such as leading spaces, are left to the generator.)
PREFER = [None] * 8 + ["wait=1", "wait=0", "wait=0.5", "no-reuse", "no-reuse, wait=1", "wait=1e9", "respond-async",
                       "wait=-1", "wait=abc", "wait=", "wait=nan"]
CANCEL_AFTER = [None] * 10 + ["0.5", "30", "604800", "0", "-1", "abc", "nan", "inf", "1e309", "604801", "1_0"]
IDEMPOTENCY = [None] * 6 + ["fuzz-key-1", "fuzz-key-2", "", "k" * 200, "k" * 201]


def _auth(resources: Resources) -> list[dict[str, str]]:
    return [{"Authorization": f"Bearer {resources.key}"}] * 16 + [{"X-API-Key": resources.key}] + [
        {}, {"Authorization": "Bearer pk_wrong"}, {"Authorization": "Basic abc"},
        {"Authorization": "Bearer "}, {"X-API-Key": ""}]


def _real_path_values(resources: Resources) -> dict[str, str]:
    return {"image_id": resources.image_id, "job_id": resources.job_id, "collection": resources.collection,
            "subject": resources.subject, "dataset_id": resources.dataset_id, "webhook_id": resources.webhook_id,
            "name": resources.model}


IMAGE_FIELDS = ("image", "image_a", "image_b")
# Text no generator writes by default: a lone surrogate (valid JSON as an escape, not valid Unicode), NUL, bidi
# overrides, long astral text. Put in one string field of a JSON body, or in a path id (NUL only: a URL carries
# UTF-8, which has no surrogates).
HOSTILE_TEXT = [None] * 4 + ["\ud800", "x\udfffy", "\x00", "a\x00b", "\u202e\u2066", "\U0001d54f" * 300]


def _tweaks(resources: Resources) -> st.SearchStrategy[Callable[[Any], None]]:
    """A change to a generated case: real auth (mostly), real path ids, a real image, edge headers."""
    paths = _real_path_values(resources)
    truncated = resources.jpeg[: len(resources.jpeg) // 2]
    truncated_png = resources.png[: len(resources.png) // 2]
    zipped = _class_zip(resources.jpeg)

    def tweak(auth: dict[str, str], real_paths: bool, image: str, prefer: str | None, cancel_after: str | None,
              idempotency: str | None, hostile: str | None, which: int) -> Callable[[Any], None]:
        def apply(case: Any) -> None:
            headers = dict(case.headers or {})
            for name in list(headers):
                if name.lower() in ("authorization", "x-api-key"):
                    del headers[name]
            headers.update(auth)
            declared = {p.name.lower() for p in case.operation.headers}
            for header, value in (("prefer", prefer), ("cancel-after", cancel_after),
                                  ("idempotency-key", idempotency)):
                if value is not None and header in declared:
                    for name in [n for n in headers if n.lower() == header]:
                        del headers[name]
                    headers[header] = value
            case.headers = headers
            if real_paths and case.path_parameters:
                case.path_parameters = {k: paths.get(k, v) for k, v in case.path_parameters.items()}
            if isinstance(case.body, dict):
                multipart = case.media_type == "multipart/form-data"
                real = {"jpeg": resources.jpeg if multipart else resources.image_id, "id": resources.image_id,
                        "truncated": truncated if multipart else "img_x",
                        "truncated png": truncated_png if multipart else resources.image_id.lower()}
                for name in IMAGE_FIELDS:
                    if name in case.body and image in real:
                        case.body[name] = real[image]
                if "file" in case.body and multipart:
                    case.body["file"] = {"zip": zipped, "jpeg": resources.jpeg, "truncated": truncated,
                                         "truncated png": truncated_png}.get(image, case.body["file"])
                texts = sorted(name for name, value in case.body.items() if isinstance(value, str))
                if hostile is not None and texts and case.media_type == "application/json":
                    case.body[texts[which % len(texts)]] = hostile
            if hostile is not None and "\x00" in hostile and case.path_parameters:
                names = sorted(case.path_parameters)
                case.path_parameters = {**case.path_parameters, names[which % len(names)]: hostile}
        return apply

    images = ["generated", "jpeg", "id", "truncated", "truncated png", "zip"]
    return st.builds(tweak, st.sampled_from(_auth(resources)), st.booleans(), st.sampled_from(images),
                     st.sampled_from(PREFER), st.sampled_from(CANCEL_AFTER), st.sampled_from(IDEMPOTENCY),
                     st.sampled_from(HOSTILE_TEXT), st.integers(0, 7))


# --- the run -----------------------------------------------------------------------------------------------

def load_schema(url: str) -> Any:
    return schemathesis.openapi.from_url(f"{url}/openapi.json")


def fuzz_operation(operation: Any, url: str, resources: Resources, max_examples: int,
                   modes: tuple[GenerationMode, ...] = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
                   ) -> OperationSummary:
    """Up to `max_examples` cases per generation mode (fewer when the operation has fewer distinct ones)."""
    summary = OperationSummary(operation.label)
    with requests.Session() as session:
        for mode in modes:
            _fuzz_mode(summary, operation, mode, url, session, resources, max_examples)
    return summary


def _fuzz_mode(summary: OperationSummary, operation: Any, mode: GenerationMode, url: str, session: requests.Session,
               resources: Resources, max_examples: int) -> None:
    try:
        cases = operation.as_strategy(generation_mode=mode)
    except Exception as exc:  # nothing to generate in this mode (no parameters to make invalid)
        summary.errors.append(f"{mode}: {exc.__class__.__name__}: {str(exc)[:300]}")
        return

    # No shrinking: a failing case is recorded (with its curl) and the run goes on to the next one.
    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.tuples(cases, _tweaks(resources)))
    def run(drawn: tuple[Any, Callable[[Any], None]]) -> None:
        case, tweak = drawn
        tweak(case)
        _call_and_check(summary, case, mode, url, session)

    try:
        run()
    except Exception as exc:
        if mode == GenerationMode.POSITIVE or summary.cases == 0:
            summary.errors.append(f"{mode}: {exc.__class__.__name__}: {str(exc)[:300]}")


def _call_and_check(summary: OperationSummary, case: Any, mode: GenerationMode, url: str,
                    session: requests.Session) -> None:
    summary.cases += 1
    try:
        response = case.call(base_url=url, session=session, timeout=REQUEST_TIMEOUT)
    except requests.RequestException as exc:
        summary.errors.append(f"{mode}: {exc.__class__.__name__}: {str(exc)[:200]} — {case.as_curl_command()}")
        return
    summary.statuses[response.status_code] += 1
    try:
        case.validate_response(response, checks=CHECKS)
    except FailureGroup as group:
        for failure in group.exceptions:
            _record(summary, failure, response, case)
    except AssertionError as exc:
        summary.failures.setdefault(f"{response.status_code} {exc}"[:200],
                                    case.as_curl_command(headers=dict(case.headers or {})))


def _record(summary: OperationSummary, failure: Failure, response: Any, case: Any) -> None:
    key = f"{response.status_code} {failure.title}: {failure.message.splitlines()[0] if failure.message else ''}"
    summary.failures.setdefault(key[:200], f"{case.as_curl_command(headers=dict(case.headers or {}))}\n"
                                           f"    -> {response.text[:300]}")


def fuzz(url: str, resources: Resources, max_examples: int, only: Callable[[str], bool] | None = None,
         ) -> Iterator[OperationSummary]:
    """Fuzz every operation of the gateway's schema, `max_examples` per operation and generation mode."""
    operations = [result.ok() for result in load_schema(url).get_all_operations()]
    # Deletions last, so the other operations still find the real objects they are given.
    for operation in sorted(operations, key=lambda operation: operation.method.upper() == "DELETE"):
        if only is None or only(operation.label):
            yield fuzz_operation(operation, url, resources, max_examples)


@contextmanager
def fuzz_platform(data_dir: Path) -> Iterator[tuple[OwnPlatform, Resources]]:
    """A platform of its own with the classifier and face workers, and a tenant with one of each object."""
    with own_platform(data_dir, **FUZZ_ENV) as plat:
        plat.start_worker()
        plat.start_worker("face-worker", "facerec")
        key = plat.new_key("fuzz")
        yield plat, seed_resources(plat.url, key)


def report(summaries: list[OperationSummary]) -> str:
    """A table: operation, cases, statuses seen, failures; then each failure with how to reproduce it."""
    lines = [f"{'operation':<58} {'cases':>5}  {'failures':>8}  statuses"]
    for s in summaries:
        statuses = " ".join(f"{code}x{n}" for code, n in sorted(s.statuses.items()))
        lines.append(f"{s.label:<58} {s.cases:>5}  {s.failed:>8}  {statuses}")
    total_cases = sum(s.cases for s in summaries)
    total_failures = sum(s.failed for s in summaries)
    lines.append(f"{'total: ' + str(len(summaries)) + ' operations':<58} {total_cases:>5}  {total_failures:>8}")
    for s in summaries:
        for what, curl in s.failures.items():
            lines.append(f"\nFAIL {s.label}: {what}\n    {curl}")
        for error in s.errors:
            lines.append(f"\nERROR {s.label}: {error}")
    return "\n".join(lines)
