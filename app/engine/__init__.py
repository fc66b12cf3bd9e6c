"""The job engine: the life of every job kind (generate, ingest, export, experiment).

A job is inserted with its chunks (`insert_job`), committed by its caller, then dispatched
(`enqueue_after_commit`) through a bounded window per kind, fair across keys (`refill`);
workers claim chunks, beat, report progress and finish them here, and the recovery step
finds chunks whose messages were lost. The database is the source of truth; the broker only
delivers ids. The engine imports no domain (datasets, generation, experiments): they import it.

Commit rule: functions a worker calls (claims, progress, finish, recovery) commit, and say so;
functions a service calls inside its own unit of work (insert, cancel, lookups) never do, and
the API request that called the service commits once.

Webhooks (app.engine.webhooks, app.engine.deliveries) come with every kind: a job inserted with
`**engine.subscription(...)` gets its started, progress and completed events from the claims
and finishes here, delivered by the `webhooks` queue's worker.
"""

from app.engine.claims import (
    ChunkClaim,
    claim_chunk,
    finish_chunk,
    job_status,
    record_heartbeat,
    record_progress,
    record_step,
    release_for_retry,
)
from app.engine.deliveries import deliver, resend_lost_deliveries, sign
from app.engine.dispatch import (
    dispatch_after_commit,
    enqueue_after_commit,
    fill_window,
    next_chunk,
    refill,
    waiting_count,
)
from app.engine.jobs import (
    ACTIVE_STATUS_VALUES,
    ChunkStatus,
    KeyRace,
    cancel_job,
    chunk_count,
    count_job_images,
    detach_dataset,
    get_job,
    insert_job,
    job_for_request,
    job_timings,
    jobs_with_running_chunks,
    list_jobs,
    request_hash,
    running_chunks,
    set_job_count,
    set_job_result,
)
from app.engine.recovery import (
    LostChunk,
    close_abandoned_chunks,
    find_lost_chunks,
    has_active_chunks,
    requeue_chunk,
)
from app.engine.webhooks import emit_job_events, list_deliveries, subscription, url_refusal

__all__ = [
    "ACTIVE_STATUS_VALUES",
    "ChunkClaim",
    "ChunkStatus",
    "KeyRace",
    "LostChunk",
    "cancel_job",
    "chunk_count",
    "claim_chunk",
    "close_abandoned_chunks",
    "count_job_images",
    "deliver",
    "detach_dataset",
    "dispatch_after_commit",
    "emit_job_events",
    "enqueue_after_commit",
    "fill_window",
    "find_lost_chunks",
    "finish_chunk",
    "get_job",
    "has_active_chunks",
    "insert_job",
    "job_for_request",
    "job_status",
    "job_timings",
    "jobs_with_running_chunks",
    "list_deliveries",
    "list_jobs",
    "next_chunk",
    "record_heartbeat",
    "record_progress",
    "record_step",
    "refill",
    "release_for_retry",
    "request_hash",
    "requeue_chunk",
    "resend_lost_deliveries",
    "running_chunks",
    "set_job_count",
    "set_job_result",
    "sign",
    "subscription",
    "url_refusal",
    "waiting_count",
]
