"""The schema: SQLAlchemy 2.0 typed tables. Alembic (migrations/) is the only way it changes.

One row per image with its full provenance; jobs and their chunks hold all job state (the
broker only delivers). Types are portable between PostgreSQL and SQLite.
"""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_webhook_secret() -> str:
    """A Standard Webhooks signing secret: "whsec_" and the base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # Standard Webhooks signing secret ("whsec_" + base64): kept as is, the HMAC needs it
    webhook_secret: Mapped[str] = mapped_column(String(100), default=new_webhook_secret)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Condition(Base):
    """The condition vocabulary: data, not code (seeded with the paper's ten labels)."""

    __tablename__ = "conditions"

    slug: Mapped[str] = mapped_column(String(120), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ConditionOwner(Base):
    """Whose a condition is (issue 21): a seeded condition has no row and is everyone's; a
    label a key uploads is that key's, named in its own words (two keys may own one slug)."""

    __tablename__ = "condition_owners"

    slug: Mapped[str] = mapped_column(
        ForeignKey("conditions.slug", ondelete="CASCADE"), primary_key=True
    )
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True, index=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class GeneratorModel(Base):
    """A generator a worker can load: a diffusers pipeline directory."""

    __tablename__ = "generator_models"

    id: Mapped[str] = mapped_column(String(120), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    pipeline_class: Mapped[str] = mapped_column(String(120))
    # the sampler knobs a job on this model takes when it leaves them unset (synthderm.json)
    sampling_defaults: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    weights_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    weights_signature: Mapped[str | None] = mapped_column(String(64), nullable=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # A fine-tuned model (issue 22) belongs to the key that trained it (a base model, NULL, is
    # everyone's); its weights live in the object store under `weights_key`, and it came from
    # member `finetune_index` of the fine-tune job `finetune_id`. A per-condition fine-tune's
    # members share a `family_id`, which POST /jobs may name: the job's condition picks one.
    owner_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    finetune_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    finetune_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    family_id: Mapped[str | None] = mapped_column(String(120), nullable=True, index=True)
    base_model_id: Mapped[str | None] = mapped_column(String(120), nullable=True)
    # the condition of a per-condition member; NULL for a joint model and for base models
    condition: Mapped[str | None] = mapped_column(String(120), nullable=True)
    weights_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    # method, variant, conditions, hyperparameters, training images, steps, final loss, files
    training: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Dataset(Base):
    __tablename__ = "datasets"
    # GET /datasets pages a key's datasets newest first
    __table_args__ = (Index("ix_datasets_owner_created", "owner_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))  # real | synthetic
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # GET /jobs pages a key's jobs newest first
        Index("ix_jobs_owner_created", "owner_id", "created_at", "id"),
        # an idempotency key is scoped to (owner, kind): /jobs and /experiments keys are apart
        UniqueConstraint(
            "owner_id", "kind", "idempotency_key", name="uq_jobs_owner_kind_idempotency"
        ),
        Index("ix_jobs_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    # NULL once a failed ingest has removed the dataset it was filling.
    dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id"), index=True, nullable=True
    )
    kind: Mapped[str] = mapped_column(String(32), default="generate")  # generate|ingest|export
    status: Mapped[str] = mapped_column(String(16))
    condition: Mapped[str | None] = mapped_column(ForeignKey("conditions.slug"), nullable=True)
    skin_tone: Mapped[int | None] = mapped_column(Integer, nullable=True)
    strategy: Mapped[str | None] = mapped_column(String(32), nullable=True)
    model_id: Mapped[str | None] = mapped_column(ForeignKey("generator_models.id"), nullable=True)
    count: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    chunk_size: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    done: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # What a finished ingest or export made (report of bad rows, shard URLs...).
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # sha256 of the request the key was first used with (engine.request_hash): the same key
    # with another request is refused
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # where the job's events are delivered (app.engine.webhooks), and which of them
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    canceled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


UNDISPATCHED_SQL = "status = 'pending' AND dispatched_at IS NULL"
IN_FLIGHT_SQL = "status = 'running' OR (status = 'pending' AND dispatched_at IS NOT NULL)"


class JobChunk(Base):
    """One Celery task's share of a job: images [start, stop)."""

    __tablename__ = "job_chunks"
    __table_args__ = (
        Index("ix_job_chunks_status", "status"),
        # the dispatch window's lookups (app/engine/dispatch.py): a job's next chunk to send,
        # and the chunks in flight, without reading a million-image job's finished chunks
        Index(
            "ix_job_chunks_undispatched",
            "job_id",
            "index",
            postgresql_where=text(UNDISPATCHED_SQL),
            sqlite_where=text(UNDISPATCHED_SQL),
        ),
        Index(
            "ix_job_chunks_in_flight",
            "job_id",
            postgresql_where=text(IN_FLIGHT_SQL),
            sqlite_where=text(IN_FLIGHT_SQL),
        ),
    )

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    start: Mapped[int] = mapped_column(Integer)
    stop: Mapped[int] = mapped_column(Integer)
    # pending -> running -> succeeded | failed | canceled
    status: Mapped[str] = mapped_column(String(16), default="pending")
    done: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    dispatches: Mapped[int] = mapped_column(Integer, default=0)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(nullable=True)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class WebhookDelivery(Base):
    """One event of a job sent to its webhook: the exact body signed, and every attempt's
    outcome (the delivery log)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_job_id_created_at", "job_id", "created_at"),
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # the webhook-id header
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    event: Mapped[str] = mapped_column(String(32))  # job.started | job.progress | job.completed
    # what makes an event once only: "started:<started_at>", "progress:<done>", ...
    event_key: Mapped[str] = mapped_column(String(120))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)  # the JSON body, byte for byte on every attempt
    # pending -> delivered | failed
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    response_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobParent(Base):
    """The real parent images of an editing job, in the order its images use them: image
    `index` derives from the parent at position `index // synthetic_per_real`."""

    __tablename__ = "job_parents"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[str] = mapped_column(ForeignKey("images.id"))


class Image(Base):
    """One image (real or synthetic) with its full provenance."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("job_id", "index", name="uq_images_job_index"),
        Index("ix_images_dataset_id_id", "dataset_id", "id"),
        Index("ix_images_dataset_id_sha256", "dataset_id", "sha256"),
        Index("ix_images_parent_image_id", "parent_image_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    source: Mapped[str] = mapped_column(String(16))  # real | synthetic
    condition: Mapped[str] = mapped_column(String(120))
    skin_tone: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # A Fitzpatrick group when only that is known (DDI gives "12", "34", "56"): I-II, III-IV, V-VI.
    skin_tone_group: Mapped[str | None] = mapped_column(String(8), nullable=True)
    split: Mapped[str | None] = mapped_column(String(16), nullable=True)
    labels: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    original_name: Mapped[str | None] = mapped_column(Text, nullable=True)
    strategy: Mapped[str | None] = mapped_column(String(32), nullable=True)
    model_id: Mapped[str | None] = mapped_column(String(120), nullable=True)
    prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    negative_prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    seed: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    guidance_scale: Mapped[float | None] = mapped_column(nullable=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(Text)
    parent_image_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Run(Base):
    """One classifier training and evaluation: a point of an experiment's grid (an experiment
    is a job of kind `experiment`; run `index` is its chunk `index`)."""

    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("job_id", "index", name="uq_runs_job_index"),
        Index("ix_runs_owner_config_key", "owner_id", "config_key"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    # queued -> running -> succeeded | failed | canceled
    status: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    # sha256 of the config and the data it reads: a run with the same key is not redone
    config_key: Mapped[str] = mapped_column(String(64))
    split: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    history: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    best_epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    predictions_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    reused_from: Mapped[str | None] = mapped_column(String(36), nullable=True)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class FeatureCache(Base):
    """A frozen backbone's pooled features of one image under one transform, computed once:
    a grid of runs then trains only heads (issue 6)."""

    __tablename__ = "feature_cache"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Backbone.cache_key: name, first 16 hex digits of the weights' sha256, +revision if any
    backbone: Mapped[str] = mapped_column(String(160), primary_key=True)
    transform: Mapped[str] = mapped_column(String(64), primary_key=True)
    dim: Mapped[int] = mapped_column(Integer)
    # float16, little-endian (float32 in rows of earlier versions): app.features.decode_vector
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class FinetuneMember(Base):
    """One model a fine-tune job trains: chunk `index` of the job (a per-condition fine-tune
    has one per condition, a joint one a single member), its live state and checkpoints."""

    __tablename__ = "finetune_members"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[str] = mapped_column(String(120))  # the id it is registered under
    conditions: Mapped[list[str]] = mapped_column(JSON)
    train_images: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(nullable=True)  # the last step's
    images_per_s: Mapped[float | None] = mapped_column(nullable=True)
    # the latest complete checkpoint (object key) and its step: a restarted task resumes there
    checkpoint_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    checkpoint_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # validation images: [{step, prompt, seed, key}]
    samples: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    final_loss: Mapped[float | None] = mapped_column(nullable=True)
    weights_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)


class FinetuneImage(Base):
    """Lineage: the exact real images a fine-tune member trains on, chosen and recorded when
    the fine-tune is submitted. Kept by sha256 as well, so a copy of a photo uploaded again
    under another id is still recognised (the experiments' leakage check)."""

    __tablename__ = "finetune_images"
    __table_args__ = (Index("ix_finetune_images_sha256", "sha256"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    # where the worker reads it and what it is captioned with
    storage_key: Mapped[str] = mapped_column(Text)
    condition: Mapped[str] = mapped_column(String(120))
    skin_tone: Mapped[int | None] = mapped_column(Integer, nullable=True)


class FinetuneLoss(Base):
    """A member's training loss per step (the loss plot). A resumed task first deletes the
    steps after its checkpoint, which it trains again."""

    __tablename__ = "finetune_losses"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    loss: Mapped[float] = mapped_column()


class EvaluationPair(Base):
    """An evaluation's memorisation audit (issue 23): each synthetic image, its nearest real
    training image (feature cosine, SSIM at 64 px) and, for a child, its own parent; flagged
    rows are what `exclude_copies` leaves out."""

    __tablename__ = "evaluation_pairs"
    __table_args__ = (Index("ix_evaluation_pairs_dataset_flagged", "dataset_id", "flagged"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(String(36))
    condition: Mapped[str] = mapped_column(String(120))
    skin_tone: Mapped[int | None] = mapped_column(Integer, nullable=True)
    strategy: Mapped[str | None] = mapped_column(String(32), nullable=True)
    nearest_image_id: Mapped[str] = mapped_column(String(36))
    cosine: Mapped[float] = mapped_column()
    ssim: Mapped[float | None] = mapped_column(nullable=True)
    parent_image_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    parent_cosine: Mapped[float | None] = mapped_column(nullable=True)
    parent_ssim: Mapped[float | None] = mapped_column(nullable=True)
    flagged: Mapped[bool] = mapped_column(default=False)
