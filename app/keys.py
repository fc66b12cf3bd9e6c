"""API keys: created once by the CLI, stored only as a SHA-256 hash, checked per request."""

from __future__ import annotations

import hashlib
import secrets
import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.tables import ApiKey, new_webhook_secret, utcnow

KEY_PREFIX = "sdk_"


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def create_key(*, session: Session, name: str) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the raw key, which is shown once and never stored.
    The row's `webhook_secret` signs its webhooks (shown once by the CLI too)."""
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=str(uuid.uuid4()),
        name=name,
        prefix=raw[:10],
        key_hash=hash_key(raw),
        webhook_secret=new_webhook_secret(),
    )
    session.add(row)
    session.flush()
    return row, raw


def authenticate(*, session: Session, raw_key: str) -> ApiKey | None:
    """The live key matching `raw_key`, or None."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(raw_key)))
    if row is None or row.revoked_at is not None:
        return None
    return row


def list_keys(*, session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def rotate_webhook_secret(*, session: Session, key_id: str) -> str | None:
    """Give a key (by id or prefix) a new webhook signing secret and return it; None when no
    key matches. Deliveries attempted from now on are signed with the new one."""
    row = session.scalar(select(ApiKey).where((ApiKey.id == key_id) | (ApiKey.prefix == key_id)))
    if row is None:
        return None
    row.webhook_secret = new_webhook_secret()
    return row.webhook_secret


def revoke_key(*, session: Session, key_id: str) -> bool:
    """Revoke by id or prefix; False when no key matches."""
    row = session.scalar(select(ApiKey).where((ApiKey.id == key_id) | (ApiKey.prefix == key_id)))
    if row is None:
        return False
    row.revoked_at = utcnow()
    return True
