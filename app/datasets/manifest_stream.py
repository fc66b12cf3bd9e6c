"""The manifest as bytes: its rows read over a few connections at once, their URLs signed in
bulk, written as JSON lines, CSV or Parquet, a batch of rows (or a row group) a chunk.

Never whole in memory: the database writes the rows' text (manifest.py), a few connections read
the next ranges while this one gets its URLs (app/storage_urls.py) and is sent. No HTTP here.
"""

from __future__ import annotations

import io
import itertools
import queue
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.datasets import copies
from app.datasets.manifest import (
    MANIFEST_REQUIRED,
    Columns,
    IdRange,
    ManifestFilter,
    ManifestReader,
    filtered_images,
)
from app.db.session import session_factory
from app.db.tables import Image
from app.schemas import MANIFEST_COLUMNS, ManifestFormat
from app.storage import ObjectStore
from app.storage_urls import UrlSigner, url_signer

# Connections that read one manifest at once (PostgreSQL; SQLite reads with one). Measured on
# two cores, a million rows of JSON lines: 1 connection 13-16 s, 3 about 8 s.
FETCH_CONNECTIONS = 3


class _RangeReads:
    """Ranges of one manifest read over several sessions at once, handed back in the order
    they were asked for: while one is formatted and sent, the next are being read."""

    def __init__(self, *, settings: Settings, reader: ManifestReader, most: int) -> None:
        make_session = session_factory(settings.database_url)
        self.ahead = 1 if settings.is_sqlite else FETCH_CONNECTIONS
        self.reader = reader
        self.most = most  # rows a range may give
        self._sessions = [make_session() for _ in range(self.ahead + 1)]
        self.planner = self._sessions[0]  # plans the ranges; the others read them
        self._idle: queue.SimpleQueue[Session] = queue.SimpleQueue()
        for session in self._sessions[1:]:
            self._idle.put(session)
        self._pool = ThreadPoolExecutor(self.ahead, thread_name_prefix="manifest")
        self._pending: deque[Future[Columns]] = deque()

    def _read(self, id_range: IdRange) -> Columns:
        session = self._idle.get()  # a session is used by one thread at a time
        try:
            return self.reader.read(session=session, id_range=id_range, limit=self.most)
        finally:
            self._idle.put(session)

    def columns(self, ranges: Iterator[IdRange]) -> Iterator[Columns]:
        """Each range's rows, column by column, in order; `ahead` ranges are read ahead."""
        for id_range in itertools.islice(ranges, self.ahead):
            self._pending.append(self._pool.submit(self._read, id_range))
        while self._pending:
            columns = self._pending.popleft().result()
            for id_range in itertools.islice(ranges, 1):
                self._pending.append(self._pool.submit(self._read, id_range))
            yield columns

    def close(self) -> None:
        """Cancel the reads not begun, wait for the others, close the sessions."""
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
        for session in self._sessions:
            session.close()


def _at_most(batches: Iterator[Columns], limit: int | None) -> Iterator[Columns]:
    """The non-empty batches, cut at `limit` rows in all (None: every row)."""
    remaining = limit
    for columns in batches:
        count = len(columns[0])
        if remaining is not None and count >= remaining:
            yield [column[:remaining] for column in columns]
            return
        if remaining is not None:
            remaining -= count
        if count:
            yield columns


def _fetched(
    *,
    settings: Settings,
    reader: ManifestReader,
    start_at: str | None,
    limit: int | None,
) -> Iterator[Columns]:
    """The manifest's rows, column by column, one range of ids at a time in id order, at most
    `limit` in all. Ranges are read over several connections at once: while one is formatted
    and sent, the next are being read. Closing this iterator cancels what is left."""
    # 1. ranges of at most `limit` rows each
    range_rows = settings.manifest_batch_rows
    if limit is not None:
        range_rows = min(range_rows, limit)
    most = limit if limit is not None else range_rows
    # 2. read ahead over a few connections, cut at `limit`
    reads = _RangeReads(settings=settings, reader=reader, most=most)
    try:
        ranges = reader.ranges(session=reads.planner, start_at=start_at, rows=range_rows)
        yield from _at_most(reads.columns(ranges), limit)
    finally:
        reads.close()


def _text_rows(
    keys: Sequence[str], heads: Sequence[str], tails: Sequence[str], sign: UrlSigner
) -> bytes:
    """A batch's rows: per row, the database's head + the URL + its tail (which ends the line),
    joined in one go (a string per row first would copy every row once more)."""
    pieces: list[str] = [""] * (3 * len(keys))
    pieces[0::3] = heads
    pieces[1::3] = sign(keys)
    pieces[2::3] = tails
    return "".join(pieces).encode()


def _text_chunks(
    batches: Iterator[Columns], sign: UrlSigner, fmt: ManifestFormat
) -> Iterator[bytes]:
    """JSON lines or CSV, a batch of rows a chunk."""
    if fmt is ManifestFormat.CSV:
        yield (",".join(MANIFEST_COLUMNS) + "\n").encode()
    for keys, heads, tails in batches:
        yield _text_rows(keys, heads, tails, sign)


# Parquet: a stable, explicit type for every column (labels is the JSON text).
PARQUET_TYPES = {
    "image_id": "string", "dataset_id": "string", "url": "string", "sha256": "string",
    "size_bytes": "int64", "condition": "string", "skin_tone": "int8", "source": "string",
    "strategy": "string", "model": "string", "seed": "int64", "steps": "int32",
    "guidance_scale": "float64", "prompt": "string", "negative_prompt": "string",
    "parent_image_id": "string", "width": "int32", "height": "int32", "job_id": "string",
    "storage_key": "string", "created_at": "timestamp[us, tz=UTC]", "split": "string",
    "skin_tone_group": "string", "labels": "string", "original_name": "string",
}  # fmt: skip
# Dictionary-encoded: the columns that repeat (one job, a few conditions and prompts...).
_PARQUET_DICTIONARY = [
    "dataset_id", "condition", "skin_tone", "source", "strategy", "model", "steps",
    "guidance_scale", "prompt", "negative_prompt", "width", "height", "job_id", "split",
    "skin_tone_group",
]  # fmt: skip
# Min/max statistics where a reader may filter on them (not long or random texts: URLs...).
_PARQUET_STATISTICS = [
    name for name in MANIFEST_COLUMNS
    if name not in {"url", "sha256", "storage_key", "prompt", "negative_prompt", "labels",
                    "original_name", "parent_image_id"}
]  # fmt: skip
PARQUET_ROW_GROUP_ROWS = 10_000


def parquet_schema() -> Any:
    """The manifest's Arrow schema (pyarrow is imported only when Parquet is asked for)."""
    import pyarrow as pa

    def arrow_type(name: str) -> Any:
        if name == "timestamp[us, tz=UTC]":
            return pa.timestamp("us", tz="UTC")
        return pa.type_for_alias(name)

    return pa.schema(
        [
            pa.field(
                name,
                arrow_type(PARQUET_TYPES[name]),
                nullable=name not in MANIFEST_REQUIRED,
            )
            for name in MANIFEST_COLUMNS
        ]
    )


class _Chunks:
    """A write-only file that hands back what was written since it was last asked."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._position = 0
        self.closed = False

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def _parquet_chunks(batches: Iterator[Columns], sign: UrlSigner) -> Iterator[bytes]:
    """Parquet, a row group per PARQUET_ROW_GROUP_ROWS rows or so, sent as each is written.
    Its rows are the CSV manifest's, parsed by Arrow into the explicit schema (in C++, a
    microsecond a row): the same values as CSV by construction."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    schema = parquet_schema()
    # one thread: Arrow's pool of them keeps ~50 MB more for little gain (the database is
    # the slower side)
    read_options = pa_csv.ReadOptions(column_names=MANIFEST_COLUMNS, use_threads=False)
    parse_options = pa_csv.ParseOptions(newlines_in_values=True)
    # an empty field is null, "" an empty string, and no other text ("NA", "null") is null
    convert_options = pa_csv.ConvertOptions(
        column_types=schema, null_values=[""], strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )  # fmt: skip
    sink = _Chunks()
    writer = pq.ParquetWriter(
        sink, schema, compression="snappy", use_dictionary=_PARQUET_DICTIONARY,
        write_statistics=_PARQUET_STATISTICS,
    )  # fmt: skip
    pending: list[Any] = []
    pending_rows = 0

    def write() -> bytes:
        nonlocal pending, pending_rows
        writer.write_table(pa.concat_tables(pending), row_group_size=pending_rows)
        pending, pending_rows = [], 0
        pa.default_memory_pool().release_unused()  # else its allocator keeps what it freed
        return sink.take()

    for keys, heads, tails in batches:
        rows = io.BytesIO(_text_rows(keys, heads, tails, sign))
        table = pa_csv.read_csv(rows, read_options, parse_options, convert_options)
        pending.append(pa.Table.from_arrays(table.columns, schema=schema))  # its nullability
        pending_rows += table.num_rows
        if pending_rows >= PARQUET_ROW_GROUP_ROWS:
            yield write()
    if pending:
        yield write()
    writer.close()
    yield sink.take()


def stream_manifest(
    *,
    settings: Settings,
    store: ObjectStore,
    dataset_id: str,
    filters: ManifestFilter,
    cursor: str | None,
    limit: int | None,
    fmt: ManifestFormat,
) -> Iterator[bytes]:
    """A manifest's bytes, chunk by chunk (a batch of rows, or a Parquet row group each)."""
    reader = ManifestReader(
        fmt="jsonl" if fmt is ManifestFormat.JSONL else "csv",  # Parquet is parsed from CSV
        dialect="sqlite" if settings.is_sqlite else "postgresql",
        dataset_id=dataset_id,
        filters=filters,
    )
    batches = _fetched(settings=settings, reader=reader, start_at=cursor, limit=limit)
    sign = url_signer(store, settings)
    if fmt is ManifestFormat.PARQUET:
        yield from _parquet_chunks(batches, sign)
    else:
        yield from _text_chunks(batches, sign, fmt)


def without_copies(
    *, session: Session, owner_id: str, dataset_id: str, filters: ManifestFilter
) -> tuple[ManifestFilter, int]:
    """`exclude_copies`: the filters that leave out what the dataset's latest evaluation
    flagged, and how many of the selected images that drops (a 422 without an evaluation)."""
    audit = copies.require_evaluation(session=session, owner_id=owner_id, dataset_id=dataset_id)
    selected = filtered_images(select(Image.id), dataset_id, filters).whereclause
    excluded = copies.count_flagged(
        session=session, evaluation_id=audit, dataset_id=dataset_id, where=selected
    )
    return replace(filters, exclude_copies_of=audit), excluded
