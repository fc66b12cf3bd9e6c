"""Webhook subscriptions and events of every job kind (issue 21, Standard Webhooks).

A job made with `webhook` gets one delivery row per event (`job.started`, `job.progress`,
`job.completed`), written by `emit_job_events` in the same transaction as the state change
that calls for it; the delivery task is sent once that transaction commits, and a worker on
the `webhooks` queue makes the HTTP attempts (app.engine.deliveries). Nothing here makes an
HTTP request, and nothing here commits.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from app.broker import send_delivery
from app.config import Settings, get_settings
from app.db.paging import newest_first
from app.db.tables import Job, WebhookDelivery, utcnow
from app.errors import InvalidField
from app.ids import new_id
from app.schemas import ACTIVE_JOB_STATUSES, JobStatus, WebhookSubscription

log = logging.getLogger(__name__)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
TERMINAL = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELED.value)
# A job's result in its last event is kept when its JSON is at most this long (an ingest's
# report of bad rows may be megabytes: GET /jobs/{id} has it whole).
RESULT_MAX_CHARS = 8192
_SEND = "synthderm_webhook_deliveries"


# --- where a webhook may point ------------------------------------------------------------


def url_refusal(url: str, settings: Settings) -> str | None:
    """Why `url` may not receive webhooks (None when it may): its host must resolve, and to no
    loopback, private, link-local, reserved, multicast or unspecified address unless a
    setting allows it. Checked when a job is made and again before every attempt (DNS
    answers change)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http or https URL with a host"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        return f"its host {parts.hostname!r} does not resolve ({error})"
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_loopback:
            if not settings.webhooks_reach_loopback:
                return (
                    f"{parts.hostname} is a loopback address ({address}); allowed only with "
                    "SYNTHDERM_WEBHOOK_ALLOW_LOOPBACK or SYNTHDERM_WEBHOOK_ALLOW_PRIVATE"
                )
            continue
        if (
            address.is_private
            or address.is_link_local
            or address.is_reserved
            or address.is_multicast
            or address.is_unspecified
        ) and not settings.webhook_allow_private:
            return (
                f"{parts.hostname} is a private or reserved address ({address}); allowed only "
                "with SYNTHDERM_WEBHOOK_ALLOW_PRIVATE"
            )
    return None


def subscription(*, settings: Settings, params: WebhookSubscription) -> dict[str, Any]:
    """What `insert_job` stores of a request's webhook fields (`webhook`, `webhook_events`),
    once the URL is checked: InvalidField (422 naming `webhook`) for one it may not call."""
    if params.webhook is None:
        if params.webhook_events is not None:
            raise InvalidField("webhook_events: needs a webhook URL", field="webhook_events")
        return {}
    reason = url_refusal(params.webhook, settings)
    if reason is not None:
        raise InvalidField(f"webhook: {reason}", field="webhook")
    return {"webhook": params.webhook, "webhook_events": params.subscribed_events()}


# --- events -------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def job_data(job: Job) -> dict[str, Any]:
    """The `data` of a job's event: its state now (and at the end, its error and result)."""
    data: dict[str, Any] = {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "done": job.done,
        "count": job.count,
        "dataset_id": job.dataset_id,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
    }
    if job.status in TERMINAL:
        data["error"] = job.error
        result = json.dumps(job.result) if job.result is not None else None
        if result is not None and len(result) > RESULT_MAX_CHARS:
            data["result"] = {"truncated": True, "keys": sorted(job.result or {})}
        else:
            data["result"] = job.result
    return data


def _exists(session: Session, job_id: str, event_key: str) -> bool:
    found = session.scalar(
        select(WebhookDelivery.id).where(
            WebhookDelivery.job_id == job_id, WebhookDelivery.event_key == event_key
        )
    )
    return found is not None


def _progress_throttled(session: Session, job_id: str, interval_s: float) -> bool:
    """Whether the job's last progress event is younger than `interval_s`."""
    last = session.scalar(
        select(WebhookDelivery.created_at)
        .where(WebhookDelivery.job_id == job_id, WebhookDelivery.event == "job.progress")
        .order_by(WebhookDelivery.created_at.desc())
        .limit(1)
    )
    return last is not None and utcnow() - last < timedelta(seconds=interval_s)


def _due_events(session: Session, job: Job, settings: Settings) -> list[tuple[str, str]]:
    """(event, event_key) of the events the job's state calls for that were not made yet."""
    wanted = set(job.webhook_events or ())
    due: list[tuple[str, str]] = []
    if "started" in wanted and job.status == JobStatus.RUNNING and job.started_at is not None:
        key = f"started:{job.started_at.isoformat()}"
        if not _exists(session, job.id, key):
            due.append(("started", key))
    active = [s.value for s in ACTIVE_JOB_STATUSES]
    if "progress" in wanted and job.status in active and job.done > 0:
        key = f"progress:{job.done}"
        if not _exists(session, job.id, key) and not _progress_throttled(
            session, job.id, settings.webhook_progress_interval_s
        ):
            due.append(("progress", key))
    if "completed" in wanted and job.status in TERMINAL:  # always sent, never throttled
        key = f"completed:{job.status}:{_iso(job.started_at)}"  # once per run of it
        if not _exists(session, job.id, key):
            due.append(("completed", key))
    return due


def emit_job_events(*, session: Session, job_id: str, settings: Settings | None = None) -> int:
    """Write the delivery rows the job's state now calls for, each event once: `started` when
    it runs, `progress` when its count moved (at most one per webhook_progress_interval_s),
    `completed` when it ended (always). The delivery tasks are sent after the session's
    commit. Call it in the transaction that changed the job, before its commit; returns how
    many rows it wrote. Not committed."""
    job = session.execute(
        select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if job is None or not job.webhook_url:
        return 0
    settings = settings or get_settings()
    now = utcnow()
    due = _due_events(session, job, settings)
    for name, key in due:
        body = {"type": f"job.{name}", "timestamp": now.isoformat(), "data": job_data(job)}
        row = WebhookDelivery(
            id=new_id(),
            job_id=job.id,
            owner_id=job.owner_id,
            event=f"job.{name}",
            event_key=key,
            url=job.webhook_url,
            payload=json.dumps(body, separators=(",", ":")),
            status=PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        session.add(row)
        _send_after_commit(session, settings, row.id)
    if due:
        session.flush()
    return len(due)


def _send_after_commit(session: Session, settings: Settings, delivery_id: str) -> None:
    """Send the delivery's task once the session commits (forgotten on a rollback: the rows
    are gone too)."""
    waiting = session.info.get(_SEND)
    if waiting is None:
        waiting = session.info[_SEND] = []
        if not event.contains(session, "after_commit", _send_waiting):
            event.listen(session, "after_commit", _send_waiting)
            event.listen(session, "after_rollback", _forget_waiting)
    waiting.append((settings, delivery_id))


def _send_waiting(session: Session) -> None:
    for settings, delivery_id in session.info.pop(_SEND, []):
        try:
            send_delivery(settings, delivery_id=delivery_id)
        except Exception:  # the recovery step sends it once it is overdue
            log.exception("could not send webhook delivery %s; recovery will", delivery_id)


def _forget_waiting(session: Session) -> None:
    session.info.pop(_SEND, None)


# --- the delivery log ---------------------------------------------------------------------


def list_deliveries(
    *, session: Session, job: Job, limit: int, cursor: str | None
) -> tuple[list[WebhookDelivery], str | None]:
    """A job's deliveries (the caller owns the job), newest first, keyset-paged."""
    query = select(WebhookDelivery).where(WebhookDelivery.job_id == job.id)
    return newest_first(session=session, query=query, table=WebhookDelivery,
                        owner_id=job.owner_id, limit=limit, cursor=cursor)  # fmt: skip
