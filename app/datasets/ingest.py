"""Reading a real labelled dataset from an uploaded archive: its members, its images, and the
rows of its metadata CSV (read by ingest_csv.py) matched to them.

Archives are read one member at a time with limits on size, count and compression ratio;
paths that escape, links and devices are refused. Byte-identical copies are sorted into
duplicates and conflicts. No torch here; images are decoded with Pillow.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO, Any

from PIL import Image, UnidentifiedImageError

SECOND_LABELS = ("malignant",)  # labels kept beside the condition (DDI's malignancy)
IMAGE_FORMATS = {"JPEG": ("jpg", "image/jpeg"), "PNG": ("png", "image/png"),
                 "WEBP": ("webp", "image/webp"), "BMP": ("bmp", "image/bmp"),
                 "TIFF": ("tif", "image/tiff")}  # fmt: skip


class IngestError(ValueError):
    """The upload is refused; `report` lists the bad rows when there are any."""

    def __init__(self, message: str, *, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = report or {"errors": [{"row": None, "file": None, "reason": message}]}


@dataclass(frozen=True)
class Limits:
    max_members: int
    max_uncompressed_bytes: int
    max_member_bytes: int
    max_ratio: float
    max_image_pixels: int
    min_image_side: int


@dataclass
class Row:
    """A metadata CSV row, read and checked (ingest_csv.parse_csv)."""

    number: int  # the CSV line number (the header is line 1)
    file: str
    label: str
    condition: str
    skin_tone: int | None
    skin_tone_group: str | None
    split: str | None
    labels: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Problem:
    """Why a row (or the file it names) is refused."""

    row: int | None
    file: str | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"row": self.row, "file": self.file, "reason": self.reason}


# --- archives ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    name: str  # normalised path inside the archive
    size: int


# What a cut-short or damaged archive raises while it is read (a truncated gzip stream is an
# EOFError; a damaged zip member a BadZipFile or a zlib error).
CORRUPT = (EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, tarfile.TarError,
           zipfile.BadZipFile)  # fmt: skip
# The first bytes of the archive kinds read here: zip (a local header, or an empty zip's end
# record), gzip, bzip2, xz.
_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


def _corrupt(exc: BaseException) -> IngestError:
    return IngestError(
        f"archive: the archive is truncated or corrupt ({type(exc).__name__}: {exc})"
    )


@contextmanager
def _reading() -> Iterator[None]:
    """A truncated or corrupt archive, found while reading it, as an IngestError."""
    try:
        yield
    except CORRUPT as exc:
        raise _corrupt(exc) from exc


def _safe_name(name: str) -> str:
    """A normalised relative path; IngestError for one that escapes the archive."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise IngestError(f"archive: member {name!r} escapes the archive")
    return str(path)


class Archive:
    """A zip or tar (optionally gzipped) archive, read member by member within limits."""

    def __init__(self, handle: IO[bytes], limits: Limits) -> None:
        self.limits = limits
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        handle.seek(0)
        magic = handle.read(8)
        handle.seek(0)
        if zipfile.is_zipfile(handle):
            handle.seek(0)
            with _reading():
                self._zip = zipfile.ZipFile(handle)
        else:
            handle.seek(0)
            try:
                self._tar = tarfile.open(fileobj=handle, mode="r:*")  # noqa: SIM115 (closed by close())
            except CORRUPT as exc:
                if magic.startswith(_MAGIC):  # a zip or a compressed stream, cut short
                    raise _corrupt(exc) from exc
                raise IngestError("archive: not a zip or tar (.tar, .tar.gz) archive") from exc
        self._read_total = 0

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._tar is not None:
            self._tar.close()

    def check(self) -> list[Member]:
        """Every regular file member, after checking the whole archive against the limits."""
        with _reading():
            return self._check()

    def _check(self) -> list[Member]:
        members: list[Member] = []
        total = 0
        if self._zip is not None:
            for info in self._zip.infolist():
                name = _safe_name(info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise IngestError(f"archive: member {info.filename!r} is a symbolic link")
                if info.is_dir():
                    continue
                ratio = info.file_size / max(info.compress_size, 1)
                if info.file_size > 1 << 20 and ratio > self.limits.max_ratio:
                    raise IngestError(
                        f"archive: member {info.filename!r} expands {ratio:.0f}x "
                        f"(limit {self.limits.max_ratio:.0f}x): refusing a possible archive bomb"
                    )
                members.append(Member(name, info.file_size))
                total += info.file_size
                self._check_counts(len(members), total, info.filename, info.file_size)
        else:
            assert self._tar is not None
            for tar_info in self._tar:  # streams through a gzip without extracting
                name = _safe_name(tar_info.name)
                if tar_info.issym() or tar_info.islnk():
                    raise IngestError(f"archive: member {tar_info.name!r} is a link")
                if tar_info.isdir():
                    continue
                if not tar_info.isfile():
                    raise IngestError(f"archive: member {tar_info.name!r} is not a regular file")
                members.append(Member(name, tar_info.size))
                total += tar_info.size
                self._check_counts(len(members), total, tar_info.name, tar_info.size)
        return members

    def _check_counts(self, count: int, total: int, name: str, size: int) -> None:
        if count > self.limits.max_members:
            raise IngestError(f"archive: more than {self.limits.max_members} files")
        if total > self.limits.max_uncompressed_bytes:
            raise IngestError(
                f"archive: expands past {self.limits.max_uncompressed_bytes:,} bytes: refusing a "
                "possible archive bomb"
            )
        if size > self.limits.max_member_bytes:
            raise IngestError(
                f"archive: member {name!r} is {size:,} bytes (limit "
                f"{self.limits.max_member_bytes:,})"
            )

    def read(self, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of the wanted members, in archive order, each at most the limit."""
        with _reading():
            yield from self._read(wanted)

    def _read(self, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
        if self._zip is not None:
            for info in self._zip.infolist():
                name = _safe_name(info.filename)
                if name in wanted and not info.is_dir():
                    with self._zip.open(info) as stream:
                        yield name, self._bounded(stream, info.filename)
        else:
            assert self._tar is not None
            for tar_info in self._tar:
                name = _safe_name(tar_info.name)
                if name in wanted and tar_info.isfile():
                    extracted = self._tar.extractfile(tar_info)
                    assert extracted is not None
                    yield name, self._bounded(extracted, tar_info.name)

    def _bounded(self, stream: IO[bytes], name: str) -> bytes:
        # The sizes a header states can lie; count what really comes out.
        data = stream.read(self.limits.max_member_bytes + 1)
        if len(data) > self.limits.max_member_bytes:
            raise IngestError(f"archive: member {name!r} is larger than its header says")
        self._read_total += len(data)
        if self._read_total > self.limits.max_uncompressed_bytes:
            raise IngestError("archive: expands past its limit while reading")
        return data


def find_metadata(members: list[Member]) -> str:
    """The archive's metadata CSV: `metadata.csv`, else its only .csv file."""
    csvs = [m.name for m in members if m.name.lower().endswith(".csv")]
    named = [n for n in csvs if PurePosixPath(n).name.lower() == "metadata.csv"]
    if len(named) == 1:
        return named[0]
    if len(csvs) == 1:
        return csvs[0]
    if not csvs:
        raise IngestError("metadata: no CSV in the archive; send one as the `metadata` field")
    raise IngestError(
        f"metadata: {len(csvs)} CSV files in the archive; name one metadata.csv or send it "
        "as the `metadata` field"
    )


def resolve_files(rows: list[Row], members: list[Member]) -> tuple[dict[str, str], list[Problem]]:
    """Map each row's file to an archive member (exact path, else a unique base name)."""
    by_path = {m.name: m.name for m in members}
    by_base: dict[str, list[str]] = {}
    for m in members:
        by_base.setdefault(PurePosixPath(m.name).name, []).append(m.name)
    found: dict[str, str] = {}
    problems: list[Problem] = []
    for row in rows:
        try:
            wanted = _safe_name(row.file)
        except IngestError:
            problems.append(Problem(row.number, row.file, "the path escapes the archive"))
            continue
        if wanted in by_path:
            found[row.file] = wanted
            continue
        candidates = by_base.get(PurePosixPath(wanted).name, [])
        if len(candidates) == 1:
            found[row.file] = candidates[0]
        elif candidates:
            problems.append(Problem(row.number, row.file, "several archive files have this name"))
        else:
            problems.append(Problem(row.number, row.file, "no such file in the archive"))
    return found, problems


def _facets(row: Row) -> dict[str, str]:
    """What a row says about its image: condition, skin tone and a second label (DDI's
    malignancy); not identifiers such as DDI_ID or md5hash."""
    tone = row.skin_tone if row.skin_tone is not None else row.skin_tone_group
    facets = {"label": row.condition, "skin tone": f"Fitzpatrick {tone or 'unknown'}"}
    facets |= {k: str(row.labels[k]) for k in SECOND_LABELS if k in row.labels}
    return facets


@dataclass
class Copies:
    """Rows whose images are byte-identical, sorted out. A copy annotated the same way as the
    first (condition, skin tone, a second label) is a plain duplicate: the image is kept once,
    under the first row (and its split). Copies that disagree are conflicts: which annotation
    is right cannot be told, so every row of such an image is a problem."""

    duplicates: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[Problem] = field(default_factory=list)
    conflicted: set[str] = field(default_factory=set)  # the sha256 of conflicting images


def sort_copies(copies: dict[str, list[Row]]) -> Copies:
    """`copies` maps each image's sha256 to the rows naming it, in the order they were read
    (the first is the copy stored)."""
    out = Copies()
    for sha256, rows in copies.items():
        if len(rows) < 2:
            continue
        first = rows[0]
        facets = [_facets(r) for r in rows]
        differ = [k for k in facets[0] if len({f.get(k) for f in facets}) > 1]
        if not differ:
            out.duplicates += [
                {
                    "row": r.number,
                    "file": r.file,
                    "duplicate_of_row": first.number,
                    "split": r.split,
                    "kept_split": first.split,
                }
                for r in rows[1:]
            ]
            continue
        out.conflicted.add(sha256)
        said = ", ".join(
            f"{' / '.join(f[k] for k in differ)} (row {r.number})"
            for r, f in zip(rows, facets, strict=True)
        )
        for row in rows:
            numbers = [str(r.number) for r in rows if r is not row]
            others = f"row{'s' if len(numbers) > 1 else ''} {', '.join(numbers)}"
            out.conflicts.append(
                Problem(
                    row.number,
                    row.file,
                    f"the same image (byte-identical) as {others}; the rows disagree on "
                    f"{' and '.join(differ)}: {said}: fix or drop them",
                )
            )
    return out


@dataclass(frozen=True)
class CheckedImage:
    sha256: str
    width: int
    height: int
    extension: str
    content_type: str


def check_image(data: bytes, limits: Limits) -> CheckedImage:
    """Decode fully, convert to RGB, check the size; ValueError saying what is wrong."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            kind = probe.format or ""
            if width * height > limits.max_image_pixels:
                raise ValueError(
                    f"image is {width}x{height}, more than {limits.max_image_pixels:,} pixels"
                )
            probe.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"unreadable image ({type(exc).__name__}: {exc})") from None
    if min(width, height) < limits.min_image_side:
        raise ValueError(f"image is {width}x{height}, smaller than {limits.min_image_side} px")
    if kind not in IMAGE_FORMATS:
        raise ValueError(f"image format {kind or 'unknown'} is not JPEG, PNG, WebP, BMP or TIFF")
    extension, content_type = IMAGE_FORMATS[kind]
    return CheckedImage(hashlib.sha256(data).hexdigest(), width, height, extension, content_type)
