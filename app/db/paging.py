"""Keyset paging, newest first, shared by the listings of owned rows (jobs, runs, datasets)."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

from app.errors import InvalidField

Row = TypeVar("Row")


def newest_first(
    *,
    session: Session,
    query: Select[Row],
    table: Any,
    owner_id: str,
    limit: int,
    cursor: str | None,
) -> tuple[list[Row], str | None]:
    """One page of `query` ordered by (created_at, id) descending, from the row `cursor`
    (an id the caller owns) on; returns the rows and the next page's cursor."""
    if cursor:
        anchor = session.get(table, cursor)
        if anchor is None or anchor.owner_id != owner_id:
            raise InvalidField("cursor: unknown cursor", field="cursor")
        query = query.where(
            (table.created_at < anchor.created_at)
            | ((table.created_at == anchor.created_at) & (table.id <= anchor.id))
        )
    ordered = query.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)
    rows = list(session.scalars(ordered))
    next_cursor = rows[limit].id if len(rows) > limit else None  # type: ignore[attr-defined]
    return rows[:limit], next_cursor
