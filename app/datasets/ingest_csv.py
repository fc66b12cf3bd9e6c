"""The metadata CSV of an upload, read into rows: generic, Fitzpatrick17k and DDI formats as
they are, columns mapped by the caller or by the format, every row checked and every problem
reported by row number. No archive and no image here (app/datasets/ingest.py).
"""

from __future__ import annotations

import csv
import difflib
import io
from dataclasses import dataclass
from typing import Any

from app.datasets.ingest import IngestError, Problem, Row
from app.schemas.text import control_character, has_control
from app.vocabulary import slugify

FORMATS = ("generic", "fitzpatrick17k", "ddi")
NO_COLUMN = "none"  # skin_tone_column / split_column: read no such column
FITZPATRICK17K_COLUMNS = [
    "md5hash",
    "fitzpatrick_scale",
    "fitzpatrick_centaur",
    "label",
    "nine_partition_label",
    "three_partition_label",
    "qc",
    "url",
    "url_alphanum",
]
DDI_COLUMNS = ["DDI_ID", "DDI_file", "skin_tone", "malignant", "disease"]
DDI_GROUPS = {"12": "I-II", "34": "III-IV", "56": "V-VI"}
SPLITS = {"train": "train", "training": "train", "validation": "validation", "val": "validation",
          "valid": "validation", "test": "test", "held_out": "test", "heldout": "test"}  # fmt: skip


@dataclass(frozen=True)
class Mapping:
    """Which CSV columns mean what; None fields take the format's own column."""

    csv_format: str = "auto"
    file_column: str | None = None
    label_column: str | None = None
    skin_tone_column: str | None = None
    split_column: str | None = None


def detect_format(header: list[str]) -> str:
    """The CSV format a header belongs to."""
    columns = set(header)
    if {"md5hash", "fitzpatrick_scale", "label"} <= columns:
        return "fitzpatrick17k"
    if {"DDI_file", "disease", "skin_tone"} <= columns:
        return "ddi"
    return "generic"


def _fitzpatrick(value: str) -> int | None:
    """1..6, or None for empty/-1/unknown; ValueError for anything else."""
    text = value.strip()
    if text in ("", "-1", "unknown", "nan", "NA"):
        return None
    try:
        number = int(float(text))
    except ValueError:
        raise ValueError(f"skin type {value!r} is not 1..6, -1 or empty") from None
    if number == -1 or number == 0:
        return None
    if not 1 <= number <= 6 or float(text) != number:
        raise ValueError(f"skin type {value!r} is not 1..6, -1 or empty")
    return number


def _split(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    key = value.strip().lower()
    if key not in SPLITS:
        raise ValueError(
            f"split {value!r} is not train, validation or test (split_column=none reads no split)"
        )
    return SPLITS[key]


@dataclass
class ParsedCsv:
    csv_format: str
    rows: list[Row]
    problems: list[Problem]
    columns: dict[str, str | None]  # role (file, label, skin_tone, split) -> the column read
    ignored_columns: list[str]


def _lookalike(header: str, column: str) -> bool:
    name = header.lower()
    return column in name or difflib.SequenceMatcher(None, name, column).ratio() >= 0.8


def _column(mapped: str | None, default: str) -> str | None:
    """The column a role reads: the mapped one, else the format's; None for "none"."""
    if mapped == NO_COLUMN:
        return None
    return mapped or default


@dataclass(frozen=True)
class _Roles:
    """The column each role reads (None: no such column is read)."""

    file: str
    label: str
    skin_tone: str | None
    split: str | None


_DEFAULT_COLUMNS = {  # file, label, skin tone, split
    "generic": ("file", "label", "fitzpatrick", "split"),
    "fitzpatrick17k": ("md5hash", "label", "fitzpatrick_scale", "split"),
    "ddi": ("DDI_file", "disease", "skin_tone", "split"),
}


def parse_csv(text: str, mapping: Mapping) -> ParsedCsv:
    """The format, the good rows and the row problems of a metadata CSV, and which columns
    were read. Other columns are ignored (and listed), except one that looks like a missing
    skin-tone or split column, which is refused: read silently as unknown it would empty the
    per-skin-tone results or the test split."""
    # 1. the header and the format
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise IngestError("metadata CSV: empty file or no header line")
    for column in header:
        if code := control_character(column):
            raise IngestError(f"metadata CSV: column {column!r} has a control character ({code})")
    reader.fieldnames = header
    csv_format = mapping.csv_format if mapping.csv_format != "auto" else detect_format(header)
    if csv_format not in FORMATS:
        raise IngestError(f"csv_format: {csv_format!r} is not one of auto, {', '.join(FORMATS)}")

    # 2. the columns read, and those ignored
    roles = _roles(header, csv_format, mapping)
    ignored = _ignored_columns(header, csv_format, roles)
    columns = {
        "file": roles.file,
        "label": roles.label,
        "skin_tone": roles.skin_tone if roles.skin_tone in header else None,
        "split": roles.split if roles.split in header else None,
    }

    # 3. every row, checked
    rows: list[Row] = []
    problems: list[Problem] = []
    for number, record in enumerate(reader, start=2):
        try:
            rows.append(_row(record, number, csv_format, roles, mapping))
        except ValueError as exc:
            raw_file = (record.get(roles.file) or "").strip()
            shown = repr(raw_file)[1:-1] if has_control(raw_file) else raw_file  # NUL-free
            problems.append(Problem(number, shown or None, str(exc)))
    if not rows and not problems:
        raise IngestError("metadata CSV: no data rows")
    return ParsedCsv(csv_format, rows, problems, columns, ignored)


def _roles(header: list[str], csv_format: str, mapping: Mapping) -> _Roles:
    """The columns the mapping (else the format) names; IngestError for a missing one."""
    defaults = _DEFAULT_COLUMNS[csv_format]
    roles = _Roles(
        file=mapping.file_column or defaults[0],
        label=mapping.label_column or defaults[1],
        # "none": read no skin tone (every image unknown) or no split, whatever the CSV holds
        skin_tone=_column(mapping.skin_tone_column, defaults[2]),
        split=_column(mapping.split_column, defaults[3]),
    )
    tone_mapped = roles.skin_tone is not None and bool(mapping.skin_tone_column)
    for name, column, required in (
        ("file_column", roles.file, True),
        ("label_column", roles.label, True),
        ("skin_tone_column", roles.skin_tone, csv_format == "generic" and tone_mapped),
        ("split_column", roles.split, roles.split is not None and bool(mapping.split_column)),
    ):
        if required and column not in header:
            raise IngestError(
                f"{name}: the CSV has no column {column!r} (columns: {', '.join(header)})"
            )
    return roles


def _ignored_columns(header: list[str], csv_format: str, roles: _Roles) -> list[str]:
    """The columns nothing reads; IngestError for one that looks like a missing skin-tone or
    split column."""
    known = {roles.file, roles.label, roles.skin_tone, roles.split}
    if csv_format == "fitzpatrick17k":
        known |= set(FITZPATRICK17K_COLUMNS)
    elif csv_format == "ddi":
        known |= set(DDI_COLUMNS)
    ignored = [h for h in header if h not in known]
    for field_name, column in (
        ("skin_tone_column", roles.skin_tone),
        ("split_column", roles.split),
    ):
        if column is None or column in header:
            continue
        lookalikes = [h for h in ignored if _lookalike(h, column)]
        if lookalikes:
            raise IngestError(
                f"{field_name}: the CSV has no column {column!r} but has {lookalikes[0]!r}; "
                f"rename it, send {field_name}={lookalikes[0]}, or {field_name}=none to read "
                f"none (columns: {', '.join(header)})"
            )
    return ignored


def _row(
    record: dict[Any, Any], number: int, csv_format: str, roles: _Roles, mapping: Mapping
) -> Row:
    """One data row, read; ValueError saying what is wrong with it."""
    # checked before stripping: str.strip() takes NEL (U+0085) and U+001C-U+001F for
    # whitespace, and a control character at an end is refused as one anywhere else is
    for column in (roles.file, roles.label):
        value = record.get(column) or ""
        if code := control_character(value):
            raise ValueError(f"{column} {value!r} has a control character ({code})")
    raw_file = (record.get(roles.file) or "").strip()
    if not raw_file:
        raise ValueError(f"empty {roles.file}")
    label = (record.get(roles.label) or "").strip()
    file = f"{raw_file}.jpg" if csv_format == "fitzpatrick17k" else raw_file
    condition = slugify(label)
    if not condition:
        raise ValueError(f"empty {roles.label}")
    tone: int | None = None
    group: str | None = None
    extra: dict[str, Any] = {}
    if csv_format == "ddi" and not mapping.skin_tone_column:
        group, extra = _ddi_labels(record, roles.skin_tone)
    elif roles.skin_tone in record:
        tone = _fitzpatrick(record.get(roles.skin_tone) or "")
        if tone is None and csv_format == "fitzpatrick17k":
            tone = _fitzpatrick(record.get("fitzpatrick_centaur") or "")
    if csv_format == "fitzpatrick17k":
        extra = {
            k: record.get(k)
            for k in ("md5hash", "fitzpatrick_scale", "fitzpatrick_centaur",
                      "nine_partition_label", "three_partition_label", "qc")
            if record.get(k) not in (None, "")
        }  # fmt: skip
    for name, value in extra.items():
        if isinstance(value, str) and (code := control_character(value)):
            raise ValueError(f"{name} {value!r} has a control character ({code})")
    split = _split(record.get(roles.split)) if roles.split in record else None
    return Row(number, file, label, condition, tone, group, split, extra)


def _ddi_labels(
    record: dict[Any, Any], tone_column: str | None
) -> tuple[str | None, dict[str, Any]]:
    """A DDI row's Fitzpatrick group (DDI gives 12, 34 or 56) and its malignancy and id."""
    value = (record.get(tone_column) or "").strip()
    if value and value not in DDI_GROUPS:
        raise ValueError(f"skin_tone {value!r} is not one of 12, 34, 56")
    malignant = (record.get("malignant") or "").strip().lower()
    if malignant not in ("true", "false", "1", "0", ""):
        raise ValueError(f"malignant {malignant!r} is not True or False")
    return DDI_GROUPS.get(value), {
        "malignant": malignant in ("true", "1"),
        "ddi_id": record.get("DDI_ID"),
    }


def merged_labels(rows: list[Row]) -> dict[str, list[str]]:
    """The slugs that labels written differently became, each with those labels in the order
    the CSV first has them: {"cafe-au-lait-macule": ["café au lait macule", "cafe au lait
    macule"]}. One class each: say so, in case they were meant to be two."""
    labels: dict[str, list[str]] = {}
    for row in rows:
        seen = labels.setdefault(row.condition, [])
        if row.label not in seen:
            seen.append(row.label)
    return {slug: written for slug, written in sorted(labels.items()) if len(written) > 1}
