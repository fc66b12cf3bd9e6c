"""The backbone feature cache: every query on `feature_cache`.

A frozen backbone maps an image (by its bytes' sha256) under a transform to the same vector
every time, so it is computed once and shared by every run and every worker. No torch here:
vectors travel as bytes, stored as little-endian float16 (half the bytes of float32 in the
database, in a run's memory and on its device; pooled features lose ~3 decimal digits, which
a linear head on them cannot use). Rows stored as float32 by earlier versions are read and
rounded the same way, so a vector's value does not depend on when it was stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.db.tables import FeatureCache, utcnow

# sha256 values per IN list.
LOOKUP_BATCH = 500
STORED_DTYPE = np.dtype("<f2")
_EARLIER_DTYPE = np.dtype("<f4")  # rows stored when RESULTS_VERSION < 4


def encode_vector(vector: np.ndarray) -> bytes:
    """A (dim,) vector -> the bytes stored: float16, little-endian."""
    return np.asarray(vector).astype(STORED_DTYPE).tobytes()


def decode_vector(data: bytes, *, dim: int) -> np.ndarray:
    """Stored bytes -> (dim,) float16 (read-only when it is a view of `data`); float32 rows of
    earlier versions are rounded to float16, as encode_vector would have stored them."""
    if len(data) == dim * STORED_DTYPE.itemsize:
        return np.frombuffer(data, dtype=STORED_DTYPE)
    if len(data) == dim * _EARLIER_DTYPE.itemsize:
        return np.frombuffer(data, dtype=_EARLIER_DTYPE).astype(STORED_DTYPE)
    raise ValueError(f"a stored feature vector of {len(data)} bytes is not {dim} values")


def iter_cached_features(
    *, session: Session, backbone: str, transform: str, sha256s: Iterable[str]
) -> Iterator[tuple[str, bytes]]:
    """The stored vectors of those images under (backbone, transform), as (sha256, bytes for
    decode_vector), a batch of rows at a time: a caller can put each where it belongs without
    holding all of them as bytes too (a paper-size run reads gigabytes). On PostgreSQL the rows
    come in binary (bytea as text would be hex, twice the bytes to send and decode) with one
    array parameter per batch."""
    unique = sorted(set(sha256s))
    if session.get_bind().dialect.name == "postgresql":
        raw: Any = session.connection().connection.dbapi_connection  # a psycopg Connection
        cursor = raw.cursor(binary=True)
        try:
            for start in range(0, len(unique), LOOKUP_BATCH):
                cursor.execute(
                    "SELECT sha256, vector FROM feature_cache "
                    "WHERE backbone = %s AND transform = %s AND sha256 = ANY(%s)",
                    (backbone, transform, unique[start : start + LOOKUP_BATCH]),
                )
                yield from cursor
        finally:
            cursor.close()
        return
    for start in range(0, len(unique), LOOKUP_BATCH):
        rows = session.execute(
            select(FeatureCache.sha256, FeatureCache.vector).where(
                FeatureCache.backbone == backbone,
                FeatureCache.transform == transform,
                FeatureCache.sha256.in_(unique[start : start + LOOKUP_BATCH]),
            )
        )
        yield from rows.tuples()


def store_features(
    *,
    session: Session,
    backbone: str,
    transform: str,
    dim: int,
    vectors: Iterable[tuple[str, bytes]],
) -> None:
    """Insert vectors; one another worker stored meanwhile wins (the values are equal).
    Commits."""
    now = utcnow()
    rows = [
        {"sha256": sha, "backbone": backbone, "transform": transform, "dim": dim,
         "vector": vector, "created_at": now}
        for sha, vector in vectors
    ]  # fmt: skip
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    for start in range(0, len(rows), LOOKUP_BATCH):
        statement = insert_fn(FeatureCache).values(rows[start : start + LOOKUP_BATCH])
        session.execute(statement.on_conflict_do_nothing())
    session.commit()
