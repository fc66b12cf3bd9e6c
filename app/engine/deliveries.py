"""Webhook attempts, on the `webhooks` queue's worker, never in a request: sign (Standard
Webhooks), POST, record the outcome, and retry with exponential backoff on 5xx, 429, timeouts
and connection errors; any other answer ends the delivery. The recovery step re-sends the
deliveries whose message was lost.

Every function here that writes commits (a worker calls them).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from datetime import timedelta

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.broker import WEBHOOK_QUEUE, queue_depth, send_delivery
from app.config import Settings
from app.db.session import session_factory
from app.db.tables import ApiKey, WebhookDelivery, utcnow
from app.engine.webhooks import DELIVERED, FAILED, PENDING, url_refusal

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
# A message may arrive a little before the time its delivery is due (clocks, rounding).
EARLY_SLACK_S = 1.0


def sign(secret: str, *, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: "v1," + base64(HMAC-SHA256(key, id.timestamp.body)),
    the key being the base64-decoded part of the "whsec_" secret."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


@dataclass(frozen=True)
class Attempt:
    """One claimed attempt of a delivery: what to send and how to sign it."""

    delivery_id: str
    url: str
    payload: str
    secret: str
    number: int


@dataclass(frozen=True)
class Outcome:
    """What an attempt got: delivered, or why not, and whether to try again."""

    delivered: bool
    retry: bool
    response_code: int | None = None
    error: str | None = None


def claim_attempt(*, session: Session, settings: Settings, delivery_id: str) -> Attempt | None:
    """Take the delivery's next attempt; None when there is none to make now (delivered,
    failed, not due yet, or claimed by a duplicate message). While it runs, its next attempt
    time is pushed past the timeout so that the recovery step leaves it alone. Commits."""
    row = session.get(WebhookDelivery, delivery_id)
    now = utcnow()
    if row is None or row.status != PENDING:
        return None
    if row.next_attempt_at > now + timedelta(seconds=EARLY_SLACK_S):
        return None  # an early duplicate: the message for the due time comes later
    lease = now + timedelta(seconds=settings.webhook_timeout_s + 5)
    claimed = session.execute(
        update(WebhookDelivery)
        .execution_options(synchronize_session=False)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == PENDING,
            WebhookDelivery.attempts == row.attempts,
        )
        .values(attempts=row.attempts + 1, last_attempt_at=now, next_attempt_at=lease)
    )
    if not claimed.rowcount:  # type: ignore[attr-defined]
        session.rollback()
        return None
    secret = session.scalar(select(ApiKey.webhook_secret).where(ApiKey.id == row.owner_id))
    attempt = Attempt(delivery_id, row.url, row.payload, secret or "", row.attempts + 1)
    session.commit()
    return attempt


def post(attempt: Attempt, settings: Settings) -> Outcome:
    """Make the attempt: the URL checked again, the body signed with the key's secret."""
    refused = url_refusal(attempt.url, settings)
    if refused is not None:
        return Outcome(delivered=False, retry=False, error=f"refused: {refused}")
    body = attempt.payload.encode()
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "synthderm-webhooks",
        "webhook-id": attempt.delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(
            attempt.secret, msg_id=attempt.delivery_id, timestamp=timestamp, body=body
        ),
    }
    try:
        # redirects are not followed: a redirect could lead to an address the check refuses
        response = httpx.post(
            attempt.url, content=body, headers=headers, timeout=settings.webhook_timeout_s
        )
    except httpx.TimeoutException:
        return Outcome(False, True, error=f"no answer within {settings.webhook_timeout_s:g}s")
    except httpx.HTTPError as error:
        return Outcome(False, True, error=f"{type(error).__name__}: {error}")
    code = response.status_code
    if 200 <= code < 300:
        return Outcome(True, False, response_code=code)
    retry = code == 429 or code >= 500
    return Outcome(False, retry, response_code=code, error=f"answered {code}")


def backoff_s(settings: Settings, attempts: int) -> float:
    """Wait after the `attempts`-th failed attempt: webhook_backoff_s doubled each time."""
    wait = settings.webhook_backoff_s * 2 ** (attempts - 1)
    return float(min(settings.webhook_max_backoff_s, wait))


def record_outcome(
    *, session: Session, settings: Settings, attempt: Attempt, outcome: Outcome
) -> float | None:
    """Write the attempt's outcome; returns the wait before the next attempt, or None when the
    delivery is over (delivered, refused, or out of attempts). Commits."""
    now = utcnow()
    values: dict[str, object] = {"response_code": outcome.response_code, "error": outcome.error}
    wait: float | None = None
    if outcome.delivered:
        values |= {"status": DELIVERED, "delivered_at": now, "next_attempt_at": now}
    elif outcome.retry and attempt.number < settings.webhook_max_attempts:
        wait = backoff_s(settings, attempt.number)
        values["next_attempt_at"] = now + timedelta(seconds=wait)
    else:
        values |= {"status": FAILED, "next_attempt_at": now}
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == attempt.delivery_id, WebhookDelivery.status == PENDING)
        .values(**values)
    )
    session.commit()
    return wait


def deliver(settings: Settings, delivery_id: str) -> None:
    """The task's body: one attempt of a delivery, and the next one sent when it must retry."""
    make_session = session_factory(settings.database_url)
    with make_session() as session:
        attempt = claim_attempt(session=session, settings=settings, delivery_id=delivery_id)
    if attempt is None:
        return
    outcome = post(attempt, settings)
    with make_session() as session:
        wait = record_outcome(session=session, settings=settings, attempt=attempt, outcome=outcome)
    log.info("webhook %s attempt %d: %s", delivery_id, attempt.number,
             "delivered" if outcome.delivered else outcome.error)  # fmt: skip
    if wait is not None:
        send_delivery(settings, delivery_id=delivery_id, countdown=wait)


def resend_lost_deliveries(settings: Settings, limit: int = 500) -> int:
    """The recovery step's share: pending deliveries overdue by webhook_redeliver_after_s
    while the webhooks queue is empty lost their message (a worker killed, a broker emptied,
    a send that failed after a commit); each is sent again. Returns how many. Commits."""
    make_session = session_factory(settings.database_url)
    cutoff = utcnow() - timedelta(seconds=settings.webhook_redeliver_after_s)
    with make_session() as session:
        lost = session.execute(
            select(WebhookDelivery.id, WebhookDelivery.next_attempt_at)
            .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at < cutoff)
            .limit(limit)
        ).all()
    if not lost or queue_depth(settings, WEBHOOK_QUEUE) > 0:
        return 0
    sent = 0
    for delivery_id, due in lost:
        with make_session() as session, session.begin():
            won = session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookDelivery.next_attempt_at == due)
                .values(next_attempt_at=utcnow())
            ).rowcount  # type: ignore[attr-defined]
        if won:
            send_delivery(settings, delivery_id=delivery_id)
            log.warning("re-sent webhook delivery %s (its message was lost)", delivery_id)
            sent += 1
    return sent
