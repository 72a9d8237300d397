"""ORM classes: the schema as the code sees it. Alembic revisions are the only way it changes."""

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONB, list[Any]: JSONB, datetime: DateTime(timezone=True)}


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class Priority(enum.StrEnum):
    """A tenant's share of the queues: a worker takes every waiting `high` job before any `normal` one, and
    every `normal` one before any `low` one (see percept.queue)."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class Tenant(Base):
    __tablename__ = "tenants"
    __mapper_args__ = {"eager_defaults": True}  # server defaults come back on INSERT
    __table_args__ = (CheckConstraint("priority IN ('high', 'normal', 'low')", name="priority"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    priority: Mapped[str] = mapped_column(String(10), server_default=Priority.NORMAL.value)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class ApiKey(Base):
    __tablename__ = "api_keys"
    __mapper_args__ = {"eager_defaults": True}  # server defaults come back on INSERT

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # sha256 of the key: a leaked table does not leak keys, and lookup stays one indexed query.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    revoked_at: Mapped[datetime | None]


class Image(Base):
    __tablename__ = "images"
    __mapper_args__ = {"eager_defaults": True}  # server defaults come back on INSERT
    __table_args__ = (UniqueConstraint("tenant_id", "sha256"), Index("ix_images_tenant_id_id", "tenant_id", "id"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    sha256: Mapped[str] = mapped_column(String(64))
    object_key: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))
    content_type: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    # The job that produced this image, for generated images (memes, diffusion); null for uploads.
    source_job_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Generation(Base):
    """The provenance of a generated image (role `image`) or a grid's contact sheet (role `card`): what made
    it, searchable. The image's PNG carries the same record in its text chunks, less the job and grid ids."""

    __tablename__ = "generations"
    __mapper_args__ = {"eager_defaults": True}
    __table_args__ = (Index("ix_generations_tenant_id_image_id", "tenant_id", "image_id"),)

    image_id: Mapped[str] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    grid_id: Mapped[str | None] = mapped_column(String(40), index=True)  # the grid's (parent) job id
    role: Mapped[str] = mapped_column(String(10))  # image | card
    prompt: Mapped[str | None] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(Text)
    style: Mapped[str | None] = mapped_column(Text)
    model_name: Mapped[str | None] = mapped_column(String(200))
    model_version: Mapped[str | None] = mapped_column(String(40))
    seed: Mapped[int | None] = mapped_column(BigInteger)
    record: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Job(Base):
    __tablename__ = "jobs"
    __mapper_args__ = {"eager_defaults": True}  # server defaults come back on INSERT
    __table_args__ = (
        Index("ix_jobs_tenant_id_id", "tenant_id", "id"),
        Index("ix_jobs_status_queued_at", "status", "queued_at"),
        Index("uq_jobs_tenant_id_idempotency_key", "tenant_id", "idempotency_key", unique=True,
              postgresql_where="idempotency_key IS NOT NULL"),
        Index("ix_jobs_deadline_at", "deadline_at",
              postgresql_where="deadline_at IS NOT NULL AND status IN ('queued', 'running')"),
        Index("ix_jobs_queue_pending", "queue", "status", "queued_at",
              postgresql_where="status IN ('queued', 'running')"),
        Index("ix_jobs_reuse", "tenant_id", "reuse_key",
              postgresql_where="reuse_key IS NOT NULL AND status = 'succeeded'"),
    )

    # ULID-based: lexical order is creation order, which cursor pagination relies on.
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(40))
    queue: Mapped[str] = mapped_column(String(40))
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, name="job_status", values_callable=lambda e: [m.value for m in e]))
    model_name: Mapped[str | None] = mapped_column(String(200))
    params: Mapped[dict[str, Any]]
    inputs: Mapped[list[Any]]
    output: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]
    provenance: Mapped[dict[str, Any] | None]
    progress: Mapped[dict[str, Any]]
    # Text `q` searches: labels, captions, prompts.
    search_text: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    worker: Mapped[str | None] = mapped_column(String(200))
    # The tenant's priority when the job was submitted: the broker queues it at that priority.
    priority: Mapped[str] = mapped_column(String(10), server_default=Priority.NORMAL.value)
    # `Cancel-After`: a job still queued or running at this time is canceled (`deadline_exceeded`).
    deadline_at: Mapped[datetime | None]
    # A deterministic job's kind, resolved parameters (model version, seed) and input sha256s, digested: a later
    # equal request of the tenant is answered from this job once it succeeded (provenance.reused_from).
    reuse_key: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    # Last time the job was (re)sent to the queue; the sweeper re-sends stale queued jobs.
    queued_at: Mapped[datetime] = mapped_column(server_default=func.now())
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]


class Dataset(Base):
    """A tenant's labelled image set (a zip, one folder per class) and what its analysis found."""

    __tablename__ = "datasets"
    __mapper_args__ = {"eager_defaults": True}  # server defaults come back on INSERT
    __table_args__ = (UniqueConstraint("tenant_id", "sha256"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64))
    object_key: Mapped[str] = mapped_column(String(200))
    bytes: Mapped[int] = mapped_column(BigInteger)
    # The `analyze_dataset` job: its status is the dataset's (queued/running: analyzing, succeeded:
    # ready with the job's report, failed: the job's error). Null on datasets analysed at upload.
    analysis_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    summary: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Model(Base):
    """The model registry: built-in models (tenant_id null) and, later, tenants' trained models."""

    __tablename__ = "models"
    __mapper_args__ = {"eager_defaults": True}  # server defaults come back on INSERT
    __table_args__ = (UniqueConstraint("tenant_id", "name", "version", postgresql_nulls_not_distinct=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20), default="ready")
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    # The predictor class that serves it ("module:Class", loaded by the worker by name) and, for
    # trained models, the object key of its artifact (weights, labels, threshold).
    predictor: Mapped[str] = mapped_column(String(200))
    artifact_key: Mapped[str | None] = mapped_column(String(200))
    # Where a worker last loaded it: "cpu" or "cuda:0 (NVIDIA H100 80GB HBM3)".
    device: Mapped[str | None] = mapped_column(String(120))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    card: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Collection(Base):
    """A tenant's set of enrolled people (subjects), searched by face."""

    __tablename__ = "collections"
    __mapper_args__ = {"eager_defaults": True}  # server defaults come back on INSERT
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    # Face distance under which two faces are the same person (dlib's recommended 0.6).
    threshold: Mapped[float] = mapped_column(default=0.6)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Subject(Base):
    __tablename__ = "subjects"
    __mapper_args__ = {"eager_defaults": True}
    __table_args__ = (UniqueConstraint("collection_id", "name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    collection_id: Mapped[str] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Webhook(Base):
    """A tenant's subscription: job events POSTed to a URL, signed with the webhook's secret."""

    __tablename__ = "webhooks"
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(ARRAY(String(40)))
    # Kept in clear: it signs every delivery (HMAC-SHA256), as the receiver's copy checks it.
    secret: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class WebhookDelivery(Base):
    """The outbox: one row per (webhook, job event), written by a trigger in the transaction that ends
    the job, so an event is never lost between the job's commit and its delivery."""

    __tablename__ = "webhook_deliveries"
    __mapper_args__ = {"eager_defaults": True}
    __table_args__ = (Index("ix_webhook_deliveries_due", "next_attempt_at", postgresql_where="status = 'pending'"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    delivered_at: Mapped[datetime | None]
