"""The manifest in SQL: its filters, and its rows read a range of image ids at a time.

Manifests are read in id order, a range at a time, so that a million rows never sit in memory
at once; the database writes their JSON lines and CSV text itself (see below). The streaming
side (connections, URLs, Parquet) is app/datasets/manifest_stream.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    String,
    Text,
    and_,
    bindparam,
    case,
    cast,
    func,
    literal_column,
    or_,
    select,
    type_coerce,
)
from sqlalchemy.orm import Session

from app.datasets.copies import flagged_query
from app.db.tables import Image
from app.fitzpatrick import GROUP_OF_TONE, SKIN_TONE_GROUPS, UNKNOWN_GROUP
from app.schemas import MANIFEST_COLUMNS


def skin_tone_group_of() -> ColumnElement[Any]:
    """An image's Fitzpatrick group in SQL, the rule of app.fitzpatrick.fitzpatrick_group: from
    skin_tone when it is 1..6, else the group the source gave, else NULL (unknown)."""
    tones = {
        group: [t for t, g in GROUP_OF_TONE.items() if g == group] for group in SKIN_TONE_GROUPS
    }
    return case(
        *[(Image.skin_tone.in_(tones[g]), literal_column(f"'{g}'")) for g in SKIN_TONE_GROUPS],
        (Image.skin_tone_group.in_(SKIN_TONE_GROUPS), Image.skin_tone_group),
        else_=None,
    )


@dataclass(frozen=True)
class ManifestFilter:
    """Which of a dataset's images a manifest (or an export) holds; None selects any."""

    condition: str | None = None
    skin_tone: int | None = None
    strategy: str | None = None
    source: str | None = None
    job_id: str | None = None
    skin_tone_group: str | None = None  # one of FITZPATRICK_GROUPS
    parent_image_id: str | None = None
    split: str | None = None
    # an evaluation whose flagged copies are left out (exclude_copies, issue 23)
    exclude_copies_of: str | None = None


# A select of any columns (a manifest query, an export's, a count).
AnySelect = Select[*tuple[Any, ...]]


def filtered_images(query: AnySelect, dataset_id: str, filters: ManifestFilter) -> AnySelect:
    """`query` narrowed to the dataset's images that the filters select."""
    query = query.where(Image.dataset_id == dataset_id)
    for column, value in (
        (Image.condition, filters.condition),
        (Image.skin_tone, filters.skin_tone),
        (Image.strategy, filters.strategy),
        (Image.source, filters.source),
        (Image.job_id, filters.job_id),
        (Image.parent_image_id, filters.parent_image_id),
        (Image.split, filters.split),
    ):
        if value is not None:
            query = query.where(column == value)
    if filters.skin_tone_group is not None:
        group = skin_tone_group_of()
        if filters.skin_tone_group == UNKNOWN_GROUP:
            query = query.where(group.is_(None))
        else:
            query = query.where(group == filters.skin_tone_group)
    if filters.exclude_copies_of is not None:
        query = query.where(Image.id.not_in(flagged_query(filters.exclude_copies_of)))
    return query


# --- manifest rows ----------------------------------------------------------------------------
#
# A million rows must stream in seconds. Most of a row's time in PostgreSQL is the read of its
# heap page (rows sit in insertion order, the manifest goes in id order), so the API reads
# consecutive ranges of ids over a few connections at once (ManifestReader.ranges plans them
# from the index alone). The database does the per-row work it does fastest: for JSON lines and CSV
# it writes each row's text, as two pieces around the download URL (signed by the API: the
# store's secret never reaches SQL), and PostgreSQL hands a whole range over as one value per
# column (Parquet is made from the CSV text, see manifest_stream.py). The JSON texts are what
# Python's json module writes (ensure_ascii=False), the CSV texts what its csv module writes
# but for two things: an empty string is "" (an empty field is null) and a carriage return is
# quoted too. Alike on PostgreSQL and SQLite.

# How each manifest column is written: text, int, float, time (ISO 8601 UTC), json (a JSON
# document's text); url is made outside SQL from storage_key.
_KINDS: dict[str, str] = {
    "size_bytes": "int", "skin_tone": "int", "seed": "int", "steps": "int", "width": "int",
    "height": "int", "guidance_scale": "float", "created_at": "time", "labels": "json",
}  # fmt: skip
# Manifest columns that are never null (no SQL coalesce needed).
MANIFEST_REQUIRED = frozenset(
    {"image_id", "dataset_id", "url", "sha256", "size_bytes", "condition", "source", "width",
     "height", "storage_key", "created_at"}
)  # fmt: skip
# Joins a range's texts into one value (PostgreSQL); JSON text never holds a raw control
# character, and a CSV text that does is caught by the count check in ManifestReader.read.
_SEPARATOR = "\x1e"

Columns = list[Sequence[Any]]  # a batch of rows, column by column
RANGES_PER_QUERY = 16


def _manifest_expressions(dialect: str) -> dict[str, Any]:
    """The SQL expression of every manifest column but `url`."""
    return {
        "image_id": Image.id,
        "dataset_id": Image.dataset_id,
        "sha256": Image.sha256,
        "size_bytes": Image.size_bytes,
        "condition": Image.condition,
        "skin_tone": Image.skin_tone,
        "source": Image.source,
        "strategy": Image.strategy,
        "model": Image.model_id,
        "seed": Image.seed,
        "steps": Image.steps,
        "guidance_scale": Image.guidance_scale,
        "prompt": Image.prompt,
        "negative_prompt": Image.negative_prompt,
        "parent_image_id": Image.parent_image_id,
        "width": Image.width,
        "height": Image.height,
        "job_id": Image.job_id,
        "storage_key": Image.storage_key,
        "created_at": _time_text(Image.created_at, dialect),
        "split": Image.split,
        "skin_tone_group": skin_tone_group_of(),
        # the stored JSON text, as is; a JSON null is no labels
        "labels": func.nullif(cast(Image.labels, Text), _sql_text("null")),
        "original_name": Image.original_name,
    }


def _sql_text(value: str) -> ColumnElement[str]:
    return literal_column("'" + value.replace("'", "''") + "'", Text)


def _concat(parts: list[Any]) -> ColumnElement[str]:
    """parts (SQL expressions and strings) joined with ||; adjacent strings become one."""
    merged: list[Any] = []
    for part in parts:
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
        else:
            merged.append(part)
    exprs = [_sql_text(p) if isinstance(p, str) else type_coerce(p, Text) for p in merged]
    result = exprs[0]
    for expr in exprs[1:]:
        result = result.concat(expr)
    return result


def _float_text(expr: Any, dialect: str) -> ColumnElement[str]:
    """A float as Python's repr writes it (3.0, 7.5): PostgreSQL writes an integral one bare."""
    written = cast(expr, Text)
    if dialect != "postgresql":
        return written  # SQLite writes 3.0
    integral = and_(expr == func.trunc(expr), func.abs(expr) < literal_column("1e15"))
    return case((integral, written.concat(_sql_text(".0"))), else_=written)


def _time_text(expr: Any, dialect: str) -> ColumnElement[str]:
    """ISO 8601 in UTC with microseconds: 2026-11-25T12:00:00.000000+00:00."""
    if dialect == "postgresql":
        pattern = _sql_text('YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')
        return func.to_char(func.timezone(_sql_text("UTC"), expr), pattern, type_=Text)
    # SQLite holds UTC as text: 2026-11-25 12:00:00.000000
    raw = type_coerce(expr, Text)
    return func.replace(raw, _sql_text(" "), _sql_text("T"), type_=Text).concat(_sql_text("+00:00"))


def _json_value(name: str, expr: Any, dialect: str) -> ColumnElement[str]:
    kind = _KINDS.get(name, "text")
    value: Any
    if kind == "text":
        if dialect == "postgresql":
            value = cast(func.to_json(expr), Text)
        else:
            value = func.json_quote(expr, type_=Text)
    elif kind == "int":
        value = cast(expr, Text)
    elif kind == "float":
        value = _float_text(expr, dialect)
    elif kind == "time":
        value = _concat(['"', expr, '"'])
    else:  # json: the document itself
        value = expr
    if name in MANIFEST_REQUIRED:
        return type_coerce(value, Text)
    return func.coalesce(value, _sql_text("null"), type_=Text)


def _csv_value(name: str, expr: Any, dialect: str) -> ColumnElement[str]:
    kind = _KINDS.get(name, "text")
    required = name in MANIFEST_REQUIRED
    if kind == "time":
        return type_coerce(expr, Text)
    if kind in ("int", "float"):
        number = cast(expr, Text) if kind == "int" else _float_text(expr, dialect)
        return number if required else func.coalesce(number, _sql_text(""), type_=Text)
    value = type_coerce(expr, Text)
    # quoted when it holds a delimiter, a quote or a line break, or is empty (so that an empty
    # field is null); quotes doubled (RFC 4180)
    special = or_(
        value == _sql_text(""), *(value.like(_sql_text(f"%{c}%")) for c in (",", '"', "\n", "\r"))
    )
    quoted = _concat(['"', func.replace(value, _sql_text('"'), _sql_text('""')), '"'])
    plain = value if required else func.coalesce(value, _sql_text(""), type_=Text)
    return case((special, quoted), else_=plain)


def manifest_text_query(*, fmt: str, dialect: str, dataset_id: str) -> AnySelect:
    """Rows of (image id, storage key, head, tail) of a dataset's images, where a manifest row
    is head + URL + tail (tail ends the line), in `fmt` ("jsonl" or "csv") for a database of
    `dialect`."""
    expressions = _manifest_expressions(dialect)
    # the same in every row: written once here, not by the database a million times
    constant = {
        "jsonl": json.dumps(dataset_id, ensure_ascii=False),
        "csv": _csv_field(dataset_id),
    }[fmt]

    def json_value(name: str) -> Any:
        return constant if name == "dataset_id" else _json_value(name, expressions[name], dialect)

    def csv_value(name: str) -> Any:
        return constant if name == "dataset_id" else _csv_value(name, expressions[name], dialect)

    at = MANIFEST_COLUMNS.index("url")
    before, after = MANIFEST_COLUMNS[:at], MANIFEST_COLUMNS[at + 1 :]
    head: list[Any] = []
    tail: list[Any] = []
    if fmt == "jsonl":
        for i, name in enumerate(before):
            head += ["{" if i == 0 else ",", f'"{name}":', json_value(name)]
        head.append(',"url":"')
        tail.append('"')
        for name in after:
            tail += [f',"{name}":', json_value(name)]
        tail.append("}")
    else:
        for name in before:
            head += [csv_value(name), ","]
        for name in after:
            tail += [",", csv_value(name)]
    tail.append("\n")
    return select(Image.id, Image.storage_key, _concat(head), _concat(tail))


def _csv_field(value: str) -> str:
    """A CSV field as the SQL of _csv_value writes it."""
    if value == "" or any(c in value for c in ',"\n\r'):
        return '"' + value.replace('"', '""') + '"'
    return value


@dataclass(frozen=True)
class IdRange:
    """A dataset's image ids after `after` (from it, when inclusive) up to `last` (None: to
    the end), in id order."""

    after: str | None
    inclusive: bool
    last: str | None


@dataclass(frozen=True)
class _Compiled:
    """A statement compiled once, run with new parameter values on the driver's own cursor:
    plain tuples back, without SQLAlchemy's row objects and result types (microseconds a row,
    on a million rows). Its parameters skip SQLAlchemy's bind types: strings and numbers."""

    sql: str
    params: dict[str, Any]
    positions: list[str] | None  # SQLite's "?" placeholders, in order

    @classmethod
    def of(cls, statement: AnySelect, session: Session) -> _Compiled:
        compiled = statement.compile(
            dialect=session.get_bind().dialect, compile_kwargs={"render_postcompile": True}
        )
        positions = list(compiled.positiontup) if compiled.positiontup is not None else None
        return cls(compiled.string, dict(compiled.params), positions)

    def rows(self, session: Session, **values: Any) -> list[tuple[Any, ...]]:
        params = {**self.params, **values}
        args: Any = params if self.positions is None else [params[n] for n in self.positions]
        cursor = session.connection().connection.cursor()
        try:
            cursor.execute(self.sql, args)
            return list(cursor.fetchall())
        finally:
            cursor.close()


class ManifestReader:
    """Reads one manifest (a dataset, its filters, a format) a range of ids at a time, from
    any number of sessions; each statement is compiled once, not once per range.

    A range is [storage keys, heads, tails]: a row of `fmt` ("jsonl" or "csv") is head + its
    URL + tail."""

    def __init__(self, *, fmt: str, dialect: str, dataset_id: str, filters: ManifestFilter):
        self.fmt = fmt
        self.dialect = dialect
        self.dataset_id = dataset_id
        self.filters = filters
        self._select = manifest_text_query(fmt=fmt, dialect=dialect, dataset_id=dataset_id)
        self._compiled: dict[tuple[Any, ...], _Compiled] = {}

    def _statement(
        self, key: tuple[Any, ...], session: Session, build: Callable[[], AnySelect]
    ) -> _Compiled:
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = _Compiled.of(build(), session)
        return compiled

    @staticmethod
    def _after(query: AnySelect, after: str | None, inclusive: bool) -> AnySelect:
        if after is None:
            return query
        bound = bindparam("after", None, type_=String)
        return query.where(Image.id >= bound if inclusive else Image.id > bound)

    def ranges(self, *, session: Session, start_at: str | None, rows: int) -> Iterator[IdRange]:
        """Consecutive ranges of `rows` image ids each (filters aside), from `start_at`
        (inclusive) to the end, the last open-ended: planned from the (dataset_id, id) index
        alone, RANGES_PER_QUERY at a time, so they cost little."""
        after, inclusive = start_at, True
        while True:

            def build(after: str | None = after, inclusive: bool = inclusive) -> AnySelect:
                # every rows-th id of the next rows * RANGES_PER_QUERY
                numbered = select(Image.id, func.row_number().over(order_by=Image.id).label("n"))
                numbered = self._after(
                    numbered.where(Image.dataset_id == self.dataset_id), after, inclusive
                )
                span = bindparam("span", None, type_=Integer)
                every = numbered.order_by(Image.id).limit(span).subquery()
                step = bindparam("rows", None, type_=Integer)
                return select(every.c.id).where(every.c.n % step == 0).order_by(every.c.id)

            key = ("ranges", after is None, inclusive)
            statement = self._statement(key, session, build)
            span = rows * RANGES_PER_QUERY
            lasts = [row[0] for row in statement.rows(session, after=after, span=span, rows=rows)]
            for last in lasts:
                yield IdRange(after, inclusive, last)
                after, inclusive = last, False
            if len(lasts) < RANGES_PER_QUERY:
                yield IdRange(after, inclusive, None)
                return

    def _range_query(self, id_range: IdRange, *, joined: bool) -> AnySelect:
        query = filtered_images(self._select, self.dataset_id, self.filters)
        query = self._after(query, id_range.after, id_range.inclusive)
        if id_range.last is not None:
            query = query.where(Image.id <= bindparam("last", None, type_=String))
        query = query.order_by(Image.id).limit(bindparam("most", None, type_=Integer))
        if not joined:
            return query
        # One row for the whole range: a million rows cross the wire as a few hundred values.
        # string_agg takes its rows in the order the subquery gives them (ORDER BY inside it
        # would sort each range once more, ~10% of the time); read() checks the ids' order.
        ranged = query.subquery()
        separator = func.chr(ord(_SEPARATOR))
        return select(func.count(), *(func.string_agg(c, separator) for c in ranged.c))

    def _range_rows(
        self, session: Session, id_range: IdRange, limit: int, *, joined: bool
    ) -> list[tuple[Any, ...]]:
        shape = (joined, id_range.after is None, id_range.inclusive, id_range.last is None)
        statement = self._statement(
            shape, session, lambda: self._range_query(id_range, joined=joined)
        )
        return statement.rows(session, after=id_range.after, last=id_range.last, most=limit)

    def read(self, *, session: Session, id_range: IdRange, limit: int) -> Columns:
        """The range's rows that the filters select, at most `limit`, in id order."""
        if self.dialect == "postgresql":
            ((count, *texts),) = self._range_rows(session, id_range, limit, joined=True)
            if count == 0:
                return [[], [], []]
            ids, *columns = [joined.split(_SEPARATOR) for joined in texts]
            # Python orders ids as the database does under a C collation, and UUIDs under any
            if all(len(column) == count for column in (ids, *columns)) and ids == sorted(ids):
                return columns
            # else a CSV text held the separator (or ids sort otherwise): row by row
        rows = self._range_rows(session, id_range, limit, joined=False)
        return _transposed(rows, 4)[1:]


def _transposed(rows: list[tuple[Any, ...]], width: int) -> Columns:
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


def next_page_start(
    *, session: Session, dataset_id: str, filters: ManifestFilter, start_at: str | None, limit: int
) -> str | None:
    """The id the page after [start_at, +limit) begins at, or None on the last page."""
    query = filtered_images(select(Image.id), dataset_id, filters)
    if start_at is not None:
        query = query.where(Image.id >= start_at)
    return session.scalar(query.order_by(Image.id).offset(limit).limit(1))
