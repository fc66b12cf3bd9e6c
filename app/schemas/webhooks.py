"""Webhook subscriptions and the delivery log: the public contract (Standard Webhooks).

Only the URL's shape is checked here; where it may point (no private or loopback address
unless a setting allows it) needs the settings and a DNS lookup: app.engine.webhooks.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, Field

from app.schemas.text import Name


class WebhookEvent(StrEnum):
    """What a subscription may ask for; `completed` is any end: succeeded, failed, canceled."""

    STARTED = "started"
    PROGRESS = "progress"
    COMPLETED = "completed"


def webhook_url_shape(value: str) -> str:
    """A validator: an http(s) URL with a host and no credentials in it."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http or https URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold credentials (user:password@); sign with the key's secret")
    try:
        parts.port  # noqa: B018 (a port out of range raises)
    except ValueError as error:
        raise ValueError(f"bad port: {error}") from None
    return value


WebhookUrl = Annotated[Name, AfterValidator(webhook_url_shape)]


class WebhookSubscription(BaseModel):
    """The fields a request that makes a job takes to have its events delivered."""

    webhook: WebhookUrl | None = Field(
        None,
        max_length=2000,
        description="URL that receives the job's events, signed as Standard Webhooks with the "
        "API key's signing secret.",
        examples=["https://example.org/synthderm-hook"],
    )
    webhook_events: list[WebhookEvent] | None = Field(
        None,
        min_length=1,
        description="Events to deliver (default: all three). completed is sent for any end.",
    )

    def subscribed_events(self) -> list[str] | None:
        """The events asked for, in a stable order (all three by default); None without a
        webhook."""
        if self.webhook is None:
            return None
        chosen = set(self.webhook_events or WebhookEvent)
        return [event.value for event in WebhookEvent if event in chosen]


class DeliveryOut(BaseModel):
    id: str = Field(description="The webhook-id header: the same on every retry.")
    job_id: str
    event: str = Field(description="job.started, job.progress or job.completed.")
    url: str
    status: str = Field(description="pending, delivered or failed.")
    attempts: int
    response_code: int | None = Field(description="The last attempt's HTTP status.")
    error: str | None = Field(description="Why the last attempt failed.")
    payload: dict[str, Any]
    created_at: datetime
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None = Field(description="When a pending one is tried again.")
    delivered_at: datetime | None


class DeliveryList(BaseModel):
    items: list[DeliveryOut]
    next_cursor: str | None
