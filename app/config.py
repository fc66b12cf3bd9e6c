"""Settings: the one source of truth for every knob (env prefix SYNTHDERM_).

The embedded default (SQLite, a local-directory object store, a SQLite broker) and the
deployed stack (PostgreSQL, Redis, S3) are two sets of values for the same fields; the code
path is the same. No torch imports here: the API image is slim.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.schemas.jobs import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS


class Settings(BaseSettings):
    """Every setting of the service, worker and CLI; each has a default and an env var."""

    model_config = SettingsConfigDict(env_prefix="SYNTHDERM_", env_file=".env", extra="ignore")

    # Where the embedded default keeps its files (database, broker, objects, models).
    data_dir: Path = Field(Path("var"), description="Root folder of the embedded default.")
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty means SQLite at {data_dir}/synthderm.sqlite."
    )
    broker_url: str = Field(
        "",
        description="Celery broker URL; empty means the embedded SQLite broker "
        "at {data_dir}/broker.sqlite (no server needed).",
    )
    broker_polling_interval_s: float = Field(
        0.1, description="Polling interval of the embedded broker, in seconds."
    )

    storage_backend: Literal["local", "s3"] = Field("local", description="Object store kind.")
    storage_dir: Path | None = Field(
        None, description="Local object store folder; empty means {data_dir}/objects."
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO...).")
    s3_public_endpoint_url: str | None = Field(
        None, description="Endpoint used in presigned URLs given to clients (default: endpoint)."
    )
    s3_bucket: str = Field("synthderm", description="Bucket holding every object.")
    s3_region: str = Field("us-east-1", description="S3 region.")
    s3_access_key_id: str | None = Field(None, description="S3 access key id.")
    s3_secret_access_key: str | None = Field(None, description="S3 secret access key.")
    url_expiry_s: int = Field(3600, description="Lifetime of download URLs in manifests.")

    public_base_url: str = Field(
        "http://127.0.0.1:8000", description="Base URL clients use to reach the API."
    )
    signing_secret: str = Field(
        "", description="HMAC secret signing local-store URLs; empty: kept in {data_dir}."
    )
    auth_cache_ttl_s: float = Field(
        5.0,
        ge=0,
        description="How long an API process trusts a key it has checked before reading it "
        "again: a key revoked by another process (`synthderm keys revoke`) is refused by every "
        "API process at most this many seconds later. 0: read the key on every request.",
    )
    gc_freeze_after_requests: int = Field(
        1000,
        ge=0,
        description="After this many requests an API process is warm: it collects garbage once "
        "and freezes what is left (gc.freeze), so later full collections skip its long-lived "
        "objects instead of pausing every request in flight for 20-260 ms. 0: never.",
    )
    metrics_token: str = Field(
        "",
        description="Bearer token /metrics requires (an operator's, not an API key); empty: "
        "/metrics answers only clients on this host's loopback, not through a proxy.",
    )

    models_dir: Path | None = Field(
        None, description="Folder of generator model directories; empty: {data_dir}/models."
    )
    default_model: str = Field(
        "synthderm-fitz64",
        description="Generator of text-to-image and image-to-image jobs naming none (the "
        "project's own, models/synthderm-fitz64; tiny-random is the fastest).",
    )
    default_inpaint_model: str = Field(
        "synthderm-fitz64-inpaint", description="Generator of inpaint jobs naming none."
    )
    device: str = Field("auto", description="Torch device of the worker: auto, cpu, cuda, cuda:1.")

    generation_batch_size: int = Field(4, ge=1, le=256, description="Images per UNet call.")
    pipeline_cache_size: int = Field(2, ge=1, description="Pipelines a worker keeps loaded.")
    prompt_template: str = Field(
        "An image of {condition}, a skin disease",
        description="Prompt of text-to-image jobs ({condition} is the label with spaces).",
    )
    skin_tone_prompt_suffix: str = Field(
        ", Fitzpatrick skin type {skin_tone}",
        description="Appended to the prompt when a job sets skin_tone (PAPER.md section 1).",
    )
    default_guidance_scale: float = Field(
        DEFAULT_GUIDANCE_SCALE, description="Guidance scale (PAPER.md 2)."
    )
    default_num_inference_steps: int = Field(
        DEFAULT_NUM_INFERENCE_STEPS, description="Sampling steps (PAPER.md 2)."
    )
    step_update_interval_s: float = Field(
        0.5, ge=0, description="Least time between two per-step writes (step, cancel check)."
    )
    pipeline_memory_budget_gb: float = Field(
        0.0, ge=0, description="Weights a worker keeps loaded, in GiB (0: only the count limit)."
    )
    torch_compile: bool = Field(False, description="torch.compile the UNet on CUDA.")
    fault_oom_above_batch: int = Field(
        0, ge=0, description="Testing: fail batches larger than this as CUDA out-of-memory."
    )
    chunk_size: int = Field(64, ge=1, le=10_000, description="Images per Celery task.")
    task_max_retries: int = Field(5, ge=0, description="Retries of a failing chunk.")
    heartbeat_interval_s: float = Field(5.0, gt=0, description="Chunk heartbeat period.")
    stale_after_s: float = Field(
        60.0, gt=0, description="A running chunk whose heartbeat is older is re-dispatched."
    )
    redispatch_after_s: float = Field(
        30.0,
        gt=0,
        description="A dispatched chunk not started this long after its dispatch, while the "
        "queue is empty, is taken as lost and sent again.",
    )
    recovery_interval_s: float = Field(10.0, gt=0, description="Period of the recovery step.")
    dispatch_window: int = Field(
        2,
        ge=1,
        le=10_000,
        description="Chunks of one job kind waiting in the broker at most; the database holds "
        "the rest, and each claim sends the next, the key with the fewest chunks in flight "
        "first, so a small job behind a huge one starts within a chunk or two. Workers refill "
        "it as they claim and finish chunks; raise it if a queue's many workers find it empty.",
    )
    progress_update_interval_s: float = Field(
        1.0, ge=0, description="Least time between two progress writes of one chunk."
    )

    webhook_allow_private: bool = Field(
        False,
        description="Deliver webhooks to private, link-local, reserved and loopback addresses.",
    )
    webhook_allow_loopback: bool | None = Field(
        None,
        description="Deliver webhooks to loopback addresses (127.0.0.0/8, ::1); unset: only on "
        "the embedded default (a SQLite database).",
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, description="Time a webhook receiver has to answer one attempt."
    )
    webhook_max_attempts: int = Field(
        8, ge=1, description="Attempts of a webhook delivery before it is marked failed."
    )
    webhook_backoff_s: float = Field(
        5.0, gt=0, description="Wait before a delivery's first retry; doubles per retry."
    )
    webhook_max_backoff_s: float = Field(
        3600.0, gt=0, description="Longest wait between two attempts of a delivery."
    )
    webhook_progress_interval_s: float = Field(
        10.0, ge=0, description="Least time between two progress events of one job's webhook."
    )
    webhook_redeliver_after_s: float = Field(
        60.0,
        gt=0,
        description="A pending delivery this long overdue, while the webhooks queue is empty, "
        "is taken as lost and sent again.",
    )

    upload_max_bytes: int = Field(8 * 2**30, description="Largest dataset archive accepted.")
    archive_max_members: int = Field(1_000_000, description="Most files in an archive.")
    archive_max_uncompressed_bytes: int = Field(
        64 * 2**30, description="Most bytes an archive may expand to (archive bombs)."
    )
    archive_max_member_bytes: int = Field(100 * 2**20, description="Largest file in an archive.")
    archive_max_ratio: float = Field(
        200.0, description="Highest compression ratio of a zip member over 1 MiB (bombs)."
    )
    image_max_pixels: int = Field(100_000_000, description="Largest image accepted, in pixels.")
    image_min_side: int = Field(8, description="Smallest image side accepted, in pixels.")
    api_host: str = Field("127.0.0.1", description="Host `synthderm serve` binds.")
    api_port: int = Field(8000, description="Port `synthderm serve` binds.")
    shutdown_grace_s: float = Field(
        30.0, description="Grace period for running tasks when `synthderm run` stops."
    )
    manifest_batch_rows: int = Field(2000, ge=1, description="Rows fetched per manifest query.")
    classifier_backbone: str = Field(
        "efficientnet-lite0", description="Frozen ImageNet backbone of classifier runs."
    )
    classifier_augmented_views: int = Field(
        4,
        ge=1,
        le=64,
        description="Cached augmented copies per training image (epoch e sees copy e mod N).",
    )
    classifier_feature_memory_mb: int | None = Field(
        None,
        ge=0,
        description="Cached features a train worker keeps in memory for its next runs (MB); "
        "unset: a quarter of the machine's memory (or its container's limit, if lower); 0: none "
        "(every run reads the database).",
    )
    classifier_feature_batch: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Images per backbone forward pass; unset: 8 on the CPU (larger batches "
        "spill the CPU's caches and run slower), 64 on a GPU.",
    )

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        data_dir = self.data_dir
        if not self.database_url:
            self.database_url = f"sqlite:///{(data_dir / 'synthderm.sqlite').as_posix()}"
        if not self.broker_url:
            self.broker_url = f"sqlitewal+sqlite:///{(data_dir / 'broker.sqlite').as_posix()}"
        if self.storage_dir is None:
            self.storage_dir = data_dir / "objects"
        if self.models_dir is None:
            self.models_dir = data_dir / "models"
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def webhooks_reach_loopback(self) -> bool:
        """Whether webhooks may go to loopback addresses (the embedded default allows it)."""
        if self.webhook_allow_private:
            return True
        if self.webhook_allow_loopback is None:
            return self.is_sqlite
        return self.webhook_allow_loopback

    @property
    def broker_is_embedded(self) -> bool:
        return self.broker_url.startswith("sqlitewal+")

    @property
    def resolved_models_dir(self) -> Path:
        assert self.models_dir is not None
        return self.models_dir

    @property
    def resolved_storage_dir(self) -> Path:
        assert self.storage_dir is not None
        return self.storage_dir

    def resolved_signing_secret(self) -> str:
        """The HMAC secret; the embedded default keeps a random one beside its data."""
        if self.signing_secret:
            return self.signing_secret
        path = self.data_dir / "signing_secret"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip()


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
