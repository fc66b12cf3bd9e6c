"""The webhook delivery task, on the `webhooks` queue: one attempt per message (app.engine.
deliveries signs, posts and records it, and sends the retry). No torch, no models here: a
worker that only delivers webhooks stays small."""

from __future__ import annotations

from app import engine
from app.broker import WEBHOOK_TASK
from app.config import get_settings
from workers.celery_app import app


@app.task(name=WEBHOOK_TASK, acks_late=True, ignore_result=True)
def deliver_webhook(delivery_id: str) -> None:
    """Make the delivery's next attempt (a duplicate or early message does nothing)."""
    engine.deliver(get_settings(), delivery_id)
