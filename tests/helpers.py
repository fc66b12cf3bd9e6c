"""Helpers that tests share: request bodies and their checks, small images, CSVs and archives
to upload. Test modules import from here, never from each other."""

from __future__ import annotations

import csv
import io
import tarfile
import zipfile

import httpx
import numpy as np
from PIL import Image


def submit(client: httpx.Client, **body: object) -> dict:
    """POST /jobs with a small text-to-image body (overridden by `body`); the 202 job."""
    payload = {"condition": "psoriasis", "skin_tone": 5, "strategy": "text-to-image", "count": 20}
    payload.update(body)
    response = client.post("/jobs", json=payload)
    assert response.status_code == 202, response.text
    return response.json()


def assert_problem(response: httpx.Response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert isinstance(body["detail"], str) and body["detail"]
    if field is not None:
        assert field in [e["field"] for e in body["errors"]], body
        assert field in body["detail"], body
    return body


def png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A PNG of seeded noise."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def csv_text(header: list[str], rows: list[list[object]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def make_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def make_tar(
    files: dict[str, bytes], *, gz: bool = True, links: dict[str, str] | None = None
) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


def upload(client, archive: bytes, *, filename: str = "data.zip", metadata: bytes | None = None,
           **form: str) -> dict:  # fmt: skip
    files = {"archive": (filename, archive, "application/octet-stream")}
    if metadata is not None:
        files["metadata"] = ("metadata.csv", metadata, "text/csv")
    response = client.post("/datasets", files=files, data=form)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["kind"] == "ingest"
    return body
