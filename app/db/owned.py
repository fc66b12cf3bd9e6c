"""The caller's row or NotFound: one lookup for every owned table (jobs, datasets, runs).

Another key's row is reported exactly like a missing one, so ids do not leak across keys.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy.orm import Session

from app.errors import NotFound
from app.schemas.text import has_control

Row = TypeVar("Row")


def get_owned(
    *, session: Session, table: type[Row], row_id: str, owner_id: str, what: str, **where: Any
) -> Row:
    """The row `row_id` of `table` owned by `owner_id` (and matching `where`, e.g. a kind);
    NotFound("no {what} {row_id!r}") otherwise. An id with a control character cannot exist
    (ids are refused with one): NotFound before the database sees it (PostgreSQL refuses NUL)."""
    if has_control(row_id):
        raise NotFound(f"no {what} {row_id!r}")
    row = session.get(table, row_id)
    if (
        row is None
        or getattr(row, "owner_id", None) != owner_id
        or any(getattr(row, name) != value for name, value in where.items())
    ):
        raise NotFound(f"no {what} {row_id!r}")
    return row
