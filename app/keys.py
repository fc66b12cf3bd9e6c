"""API keys: created once by the CLI, stored only as a SHA-256 hash, checked per request.

An API process remembers a key it has checked for `auth_cache_ttl_s` (a few seconds), so a
busy client's requests do not each read it: a key revoked by another process is refused at
most that long after. `revoke_key` forgets the key in its own process at once.
"""

from __future__ import annotations

import hashlib
import secrets
import time
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


# sha256 of a raw key -> (when it was read, time.monotonic(); the live key, detached from
# every session: requests of many threads share it and read only its columns)
_checked: dict[str, tuple[float, ApiKey]] = {}
CACHE_MAX_KEYS = 10_000


def cached_key(raw_key: str, *, max_age_s: float) -> ApiKey | None:
    """The live key matching `raw_key` if this process checked it less than `max_age_s` ago;
    None otherwise (then `authenticate` reads it). No database access."""
    if max_age_s <= 0:
        return None
    hit = _checked.get(hash_key(raw_key))
    if hit is None or time.monotonic() - hit[0] >= max_age_s:
        return None
    return hit[1]


def authenticate(*, session: Session, raw_key: str, remember: bool = False) -> ApiKey | None:
    """The live key matching `raw_key`, or None. The row is detached from `session` (its
    columns stay readable); with `remember`, `cached_key` answers for it for a while."""
    digest = hash_key(raw_key)
    read_at = time.monotonic()
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    if row is None:
        return None
    session.expunge(row)
    if row.revoked_at is not None:
        _checked.pop(digest, None)
        return None
    if remember:
        if len(_checked) >= CACHE_MAX_KEYS:
            _checked.clear()
        _checked[digest] = (read_at, row)
    return row


def forget_keys() -> None:
    """Forget every key this process has checked (the next request reads its key again)."""
    _checked.clear()


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
    _checked.pop(row.key_hash, None)  # this process refuses it at once; others within the TTL
    return True
