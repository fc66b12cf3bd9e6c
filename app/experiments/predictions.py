"""The predictions tables of runs and experiments: a run's stored JSON lines as JSON lines or
CSV, and every finished run of an experiment in one table, each row with its run and setting.

Torch-free, and no queries: it reads the run rows it is given and objects from the store.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any, Literal

from app.db.tables import Run
from app.errors import NotFound
from app.experiments.report_text import setting_label, shown_datasets
from app.storage import ObjectNotFound, ObjectStore

PredictionFormat = Literal["jsonl", "csv"]  # the query value; FastAPI refuses others (422)
MEDIA_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv"}
PREDICTION_COLUMNS = (
    "image_id",
    "sha256",
    "true_label",
    "skin_tone",
    "fitzpatrick_group",
    "correct",
    "top1_label",
    "top1_probability",
    "top2_label",
    "top2_probability",
    "top3_label",
    "top3_probability",
)
# GET /experiments/{id}/predictions: which run a row comes from, before the run's columns
RUN_COLUMNS = (
    "run_id",
    "setting",
    "seed",
    "n_real_per_class",
    "synthetic_per_real",
    "strategy",
    "synthetic_dataset",
    "augmentation",
)


def run_table(*, store: ObjectStore, key: str, fmt: str) -> bytes | str:
    """One run's predictions (stored as JSON lines) in `fmt`."""
    data = _read(store, key)
    return data if fmt == "jsonl" else _as_csv(data)


def experiment_table(
    *, store: ObjectStore, runs: list[Run], names: dict[str, str], fmt: str
) -> Iterator[str]:
    """Every given (finished) run's predictions as one table, lines in `fmt`. Every file is
    checked before the first line: once a table streams, an error can only cut it short."""
    datasets = shown_datasets([r.config for r in runs], names)
    stored = [(r.id, r.config, str(r.predictions_key)) for r in runs]
    missing = [run_id for run_id, _config, key in stored if store.head(key) is None]
    if missing:
        raise NotFound(f"the predictions of run {missing[0]} are missing from the store")
    return _experiment_lines(store, stored, datasets, fmt)


def _experiment_lines(
    store: ObjectStore, stored: list[tuple[str, dict[str, Any], str]], datasets: Any, fmt: str
) -> Iterator[str]:
    if fmt == "csv":
        yield _csv_line([*RUN_COLUMNS, *PREDICTION_COLUMNS])
    for run_id, config, key in stored:
        about: dict[str, Any] = {
            "run_id": run_id,
            "setting": setting_label(config, datasets=datasets),
            **{name: config.get(name) for name in RUN_COLUMNS[2:]},
        }
        for line in _read(store, key).decode().splitlines():
            row = json.loads(line)
            if fmt == "jsonl":
                yield json.dumps({**about, **row}) + "\n"
            else:
                yield _csv_line([_cell(about[c]) for c in RUN_COLUMNS] + _csv_cells(row))


def _read(store: ObjectStore, key: str) -> bytes:
    """A run's stored predictions (JSON lines); NotFound when the object is gone."""
    try:
        return store.get_bytes(key)
    except ObjectNotFound:
        raise NotFound(f"the predictions file {key} is missing from the store") from None


def _cell(value: Any) -> Any:
    """A CSV cell: empty for None."""
    return "" if value is None else value


def _csv_cells(row: dict[str, Any]) -> list[Any]:
    """A stored prediction row as PREDICTION_COLUMNS."""
    top = row["predictions"] + [{"label": "", "probability": ""}] * 3
    return [row["image_id"], row["sha256"], row["true_label"], _cell(row["skin_tone"]),
            row["fitzpatrick_group"], row["correct"]] + [
        v for p in top[:3] for v in (p["label"], p["probability"])]  # fmt: skip


def _csv_line(cells: list[Any]) -> str:
    """One CSV line."""
    out = io.StringIO()
    csv.writer(out).writerow(cells)
    return out.getvalue()


def _as_csv(jsonl: bytes) -> str:
    """A run's stored predictions as CSV, PREDICTION_COLUMNS first."""
    lines = [_csv_line(list(PREDICTION_COLUMNS))]
    lines += [_csv_line(_csv_cells(json.loads(line))) for line in jsonl.decode().splitlines()]
    return "".join(lines)
