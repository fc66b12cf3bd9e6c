"""/datasets: list, inspect, and stream manifests with a download URL per image.

A manifest streams a range of image ids at a time (JSON lines, CSV or Parquet) and is never
whole in memory: the database writes the rows' text (app/datasets.py), a few connections read
the next ranges while this one gets its URLs (signed in bulk, see url_signer) and is sent.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import itertools
import queue
import re
import time
from binascii import b2a_base64
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from app.api.deps import CallerDep, SessionDep, SettingsDep, StoreDep
from app.config import Settings
from app.datasets import repository as service
from app.db.session import session_factory
from app.fitzpatrick import UNKNOWN_GROUP
from app.schemas import (
    MANIFEST_COLUMNS,
    CountRow,
    DatasetList,
    DatasetOut,
    SplitCountRow,
    Strategy,
)
from app.storage import LocalStore, ObjectStore, S3Store

router = APIRouter(prefix="/datasets", tags=["datasets"])


class ManifestFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"


class Source(StrEnum):
    REAL = "real"
    SYNTHETIC = "synthetic"


class SkinToneGroup(StrEnum):
    I_II = "I-II"
    III_IV = "III-IV"
    V_VI = "V-VI"
    UNKNOWN = UNKNOWN_GROUP


class Split(StrEnum):
    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"


@router.get("", response_model=DatasetList)
def list_datasets(
    session: SessionDep, caller: CallerDep, kind: Source | None = None
) -> DatasetList:
    """The caller's datasets with their image counts."""
    rows = service.list_datasets(session=session, owner=caller, kind=kind.value if kind else None)
    return DatasetList(
        items=[
            DatasetOut(
                id=d.id,
                name=d.name,
                kind=d.kind,
                description=d.description,
                created_at=d.created_at,
                image_count=n,
            )
            for d, n in rows
        ]
    )


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, session: SessionDep, caller: CallerDep) -> DatasetOut:
    """One dataset with its counts by condition x skin tone x strategy."""
    dataset = service.get_dataset(session=session, dataset_id=dataset_id, owner=caller)
    counts = [
        CountRow(**row) for row in service.dataset_counts(session=session, dataset_id=dataset.id)
    ]
    return DatasetOut(
        id=dataset.id,
        name=dataset.name,
        kind=dataset.kind,
        description=dataset.description,
        created_at=dataset.created_at,
        image_count=sum(c.count for c in counts),
        counts=counts,
        splits=[
            SplitCountRow(**row)
            for row in service.split_counts(session=session, dataset_id=dataset.id)
        ],
    )


# --- download URLs in bulk ----------------------------------------------------------------
#
# ObjectStore.url signs one key per call; a manifest needs a million. These make the same URLs
# for a batch of keys at a time, each checked once against store.url when made (and not used if
# they differ): see url_signer. (They would sit well in app/storage.py, as ObjectStore.urls.)

UrlSigner = Callable[[Sequence[str]], list[str]]
_URL_SAFE_KEYS = re.compile(r"[A-Za-z0-9_.~/-]*")  # what quote(key, safe="/~") leaves alone
_B64_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _quoted(keys: Sequence[str]) -> Sequence[str]:
    if _URL_SAFE_KEYS.fullmatch("".join(keys)):
        return keys  # the usual case, checked for the whole batch at once
    return [quote(key, safe="/~") for key in keys]


class _Hmac:
    """HMAC-SHA256 with one key (RFC 2104), its padded-key hashes made once: ~1 us a message
    where hmac.new takes ~2."""

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class LocalUrls:
    """LocalStore.url for many keys: one expiry per batch, the same HMAC signature."""

    def __init__(self, *, base_url: str, secret: bytes, expiry_s: int) -> None:
        self.prefix = base_url.rstrip("/") + "/files/"
        self.expiry_s = expiry_s
        self._mac = _Hmac(secret)

    def signature(self, key: str, expires: int) -> str:
        mac = self._mac.digest(f"{key}\n{expires}".encode())
        return b2a_base64(mac, newline=False)[:43].translate(_B64_URLSAFE).decode()

    def __call__(self, keys: Sequence[str], *, now: float | None = None) -> list[str]:
        expires = int(now if now is not None else time.time()) + self.expiry_s
        tail = f"\n{expires}".encode()
        query = f"?expires={expires}&signature="
        digest = self._mac.digest
        urls = []
        for key, quoted in zip(keys, _quoted(keys), strict=True):
            mac = b2a_base64(digest(key.encode() + tail), newline=False)
            urls.append(self.prefix + quoted + query + mac[:43].translate(_B64_URLSAFE).decode())
        return urls


class S3Urls:
    """S3Store.url for many keys: presigned GETs (SigV4 query authentication, unsigned
    payload, host the only signed header), one timestamp per batch, the signing key derived
    once a day. botocore's generate_presigned_url takes ~130 us a URL; this ~2."""

    def __init__(
        self, *, origin: str, bucket_path: str, access_key: str, secret_key: str, region: str,
        expiry_s: int,
    ) -> None:  # fmt: skip
        self.origin = origin  # scheme://host[:port]
        self.host = urlsplit(origin).netloc
        self.bucket_path = bucket_path  # [/endpoint path]/bucket/
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.expiry_s = expiry_s
        self._day: tuple[str, _Hmac] | None = None

    def _signing_key(self, day: str) -> _Hmac:
        if self._day is None or self._day[0] != day:

            def step(key: bytes, text: str) -> bytes:
                return hmac.digest(key, text.encode(), "sha256")

            key = step(f"AWS4{self.secret_key}".encode(), day)
            for part in (self.region, "s3", "aws4_request"):
                key = step(key, part)
            self._day = (day, _Hmac(key))
        return self._day[1]

    def __call__(self, keys: Sequence[str], *, now: datetime | None = None) -> list[str]:
        now = now or datetime.now(UTC)
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        scope = f"{day}/{self.region}/s3/aws4_request"
        credential = quote(f"{self.access_key}/{scope}", safe="-_.~")
        query = (
            f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={credential}"
            f"&X-Amz-Date={stamp}&X-Amz-Expires={self.expiry_s}&X-Amz-SignedHeaders=host"
        )
        request_tail = f"\n{query}\nhost:{self.host}\n\nhost\nUNSIGNED-PAYLOAD".encode()
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n"
        mac = self._signing_key(day).digest
        sha256 = hashlib.sha256
        prefix = f"{self.origin}{self.bucket_path}"
        urls = []
        for quoted in _quoted(keys):
            path = self.bucket_path + quoted
            request_hash = sha256(b"GET\n" + path.encode() + request_tail).hexdigest()
            signature = mac((to_sign + request_hash).encode()).hex()
            urls.append(f"{prefix}{quoted}?{query}&X-Amz-Signature={signature}")
        return urls


_PROBE_KEY = "datasets/probe/url-check.png"


def _local_urls(store: LocalStore, settings: Settings) -> LocalUrls | None:
    urls = LocalUrls(
        base_url=store.base_url,
        secret=settings.resolved_signing_secret().encode(),
        expiry_s=store.expiry_s,
    )
    expires = int(time.time())
    same = urls.signature(_PROBE_KEY, expires) == store.signature(_PROBE_KEY, expires)
    return urls if same else None


def _s3_urls(store: S3Store, settings: Settings) -> S3Urls | None:
    if not settings.s3_secret_access_key:
        return None  # credentials from boto3's own chain (roles, tokens): botocore signs
    probe = urlsplit(store.url(_PROBE_KEY))
    params = {k: v[0] for k, v in parse_qs(probe.query).items()}
    if set(params) != {
        "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
        "X-Amz-SignedHeaders", "X-Amz-Signature",
    } or not probe.path.endswith("/" + _PROBE_KEY):  # fmt: skip
        return None
    access_key, _day, region, _service, _end = params["X-Amz-Credential"].rsplit("/", 4)
    urls = S3Urls(
        origin=f"{probe.scheme}://{probe.netloc}",
        bucket_path=probe.path[: -len(_PROBE_KEY)],
        access_key=access_key,
        secret_key=settings.s3_secret_access_key,
        region=region,
        expiry_s=int(params["X-Amz-Expires"]),
    )
    at = datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    same = urls([_PROBE_KEY], now=at)[0] == probe.geturl()
    return urls if same else None


def url_signer(store: ObjectStore, settings: Settings) -> UrlSigner:
    """URLs for a batch of keys, as store.url makes them one by one (a bulk signer where one
    is known to agree with the store, else store.url itself)."""
    fast: UrlSigner | None = None
    if isinstance(store, LocalStore):
        fast = _local_urls(store, settings)
    elif isinstance(store, S3Store):
        fast = _s3_urls(store, settings)
    if fast is not None:
        return fast
    return lambda keys: [store.url(key) for key in keys]


# --- streaming ----------------------------------------------------------------------------

# Connections that read one manifest at once (PostgreSQL; SQLite reads with one). Measured on
# two cores, a million rows of JSON lines: 1 connection 13-16 s, 3 about 8 s.
FETCH_CONNECTIONS = 3


def _fetched(
    *,
    settings: Settings,
    reader: service.ManifestReader,
    start_at: str | None,
    limit: int | None,
) -> Iterator[service.Columns]:
    """The manifest's rows, column by column, one range of ids at a time in id order, at most
    `limit` in all. Ranges are read over several connections at once: while one is formatted
    and sent, the next are being read. Closing this iterator cancels what is left."""
    make_session = session_factory(settings.database_url)
    workers = 1 if settings.is_sqlite else FETCH_CONNECTIONS
    range_rows = settings.manifest_batch_rows
    if limit is not None:
        range_rows = min(range_rows, limit)
    most = limit if limit is not None else range_rows
    sessions = [make_session() for _ in range(workers + 1)]
    idle: queue.SimpleQueue[Session] = queue.SimpleQueue()
    for session in sessions[1:]:
        idle.put(session)

    def read(id_range: service.IdRange) -> service.Columns:
        session = idle.get()  # a session is used by one thread at a time
        try:
            return reader.read(session=session, id_range=id_range, limit=most)
        finally:
            idle.put(session)

    pool = ThreadPoolExecutor(workers, thread_name_prefix="manifest")
    pending: deque[Future[service.Columns]] = deque()
    try:
        ranges = reader.ranges(session=sessions[0], start_at=start_at, rows=range_rows)
        for id_range in itertools.islice(ranges, workers):
            pending.append(pool.submit(read, id_range))
        remaining = limit
        while pending:
            columns = pending.popleft().result()
            for id_range in itertools.islice(ranges, 1):
                pending.append(pool.submit(read, id_range))
            count = len(columns[0])
            if remaining is not None and count >= remaining:
                yield [column[:remaining] for column in columns]
                return
            if remaining is not None:
                remaining -= count
            if count:
                yield columns
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)
        for session in sessions:
            session.close()


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
    batches: Iterator[service.Columns], sign: UrlSigner, fmt: ManifestFormat
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
                nullable=name not in service.MANIFEST_REQUIRED,
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


def _parquet_chunks(batches: Iterator[service.Columns], sign: UrlSigner) -> Iterator[bytes]:
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
    filters: service.ManifestFilter,
    cursor: str | None,
    limit: int | None,
    fmt: ManifestFormat,
) -> Iterator[bytes]:
    """A manifest's bytes, chunk by chunk (a batch of rows, or a Parquet row group each)."""
    reader = service.ManifestReader(
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


_MEDIA_TYPES = {
    ManifestFormat.JSONL: "application/x-ndjson",
    ManifestFormat.CSV: "text/csv; charset=utf-8",
    ManifestFormat.PARQUET: "application/vnd.apache.parquet",
}


@router.get("/{dataset_id}/manifest")
def get_manifest(
    dataset_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    caller: CallerDep,
    format: ManifestFormat = ManifestFormat.JSONL,
    condition: str | None = None,
    skin_tone: int | None = Query(None, ge=1, le=6, description="Fitzpatrick type 1..6."),
    skin_tone_group: SkinToneGroup | None = Query(
        None,
        description="Fitzpatrick group, from skin_tone or else the group the source gave; "
        "unknown: neither.",
    ),
    strategy: Strategy | None = None,
    source: Source | None = None,
    parent_image_id: str | None = Query(None, description="Children of this image."),
    job_id: str | None = None,
    split: Split | None = None,
    cursor: str | None = Query(None, description="Page start: X-Next-Cursor of the last page."),
    limit: int | None = Query(None, ge=1, le=1_000_000, description="Rows per page; all if unset."),
) -> StreamingResponse:
    """Every image of the dataset that the filters select, one row each, in image-id order,
    streamed as JSON lines, CSV or Parquet."""
    dataset = service.get_dataset(session=session, dataset_id=dataset_id, owner=caller)
    filters = service.ManifestFilter(
        condition=condition,
        skin_tone=skin_tone,
        strategy=strategy.value if strategy else None,
        source=source.value if source else None,
        job_id=job_id,
        skin_tone_group=skin_tone_group.value if skin_tone_group else None,
        parent_image_id=parent_image_id,
        split=split.value if split else None,
    )
    headers: dict[str, str] = {}
    if limit is not None:
        next_start = service.next_page_start(
            session=session, dataset_id=dataset.id, filters=filters, start_at=cursor, limit=limit
        )
        if next_start is not None:
            params = {k: v for k, v in request.query_params.items() if k != "cursor"}
            params["cursor"] = next_start
            headers["X-Next-Cursor"] = next_start
            headers["Link"] = f'<{request.url.path}?{urlencode(params)}>; rel="next"'
    headers["Content-Disposition"] = f'attachment; filename="{dataset.id}.{format.value}"'
    return StreamingResponse(
        stream_manifest(
            settings=settings,
            store=store,
            dataset_id=dataset.id,
            filters=filters,
            cursor=cursor,
            limit=limit,
            fmt=format,
        ),
        media_type=_MEDIA_TYPES[format],
        headers=headers,
    )
