"""The REST client behind the `synthderm` CLI's user commands: it talks to the API only.

The API URL and key come from SYNTHDERM_API_URL / SYNTHDERM_API_KEY, else from the config file
(`synthderm login` writes it: ~/.config/synthderm/config.json, or SYNTHDERM_CONFIG).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "canceled")


def config_path() -> Path:
    explicit = os.environ.get("SYNTHDERM_CONFIG")
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "synthderm" / "config.json"


def save_config(*, url: str, key: str) -> Path:
    """Write the URL and key for later commands (readable by the user only)."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"api_url": url, "api_key": key}, indent=2))
    path.chmod(0o600)
    return path


class ApiError(Exception):
    """The API answered with an error; the message is its problem+json sentence."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass
class Client:
    url: str
    key: str | None
    timeout: float = 60.0

    @classmethod
    def from_environment(cls) -> Client:
        stored: dict[str, str] = {}
        path = config_path()
        if path.is_file():
            stored = json.loads(path.read_text())
        url = os.environ.get("SYNTHDERM_API_URL") or stored.get("api_url") or DEFAULT_URL
        key = os.environ.get("SYNTHDERM_API_KEY") or stored.get("api_key")
        return cls(url=url.rstrip("/"), key=key)

    def _http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=self.timeout)

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.is_error:
            try:
                detail = response.json().get("detail") or response.text
            except ValueError:
                detail = response.text
            raise ApiError(response.status_code, str(detail))
        return response

    def get(self, path: str, **params: Any) -> Any:
        with self._http() as http:
            clean = {k: v for k, v in params.items() if v is not None}
            return self._check(http.get(path, params=clean)).json()

    def paged(self, path: str, *, page_size: int = 1000, **params: Any) -> Iterator[dict[str, Any]]:
        """Every item of a cursor-paged listing (`items`, `next_cursor`), page after page."""
        cursor = None
        with self._http() as http:
            while True:
                query = {k: v for k, v in params.items() if v is not None}
                query |= {"limit": page_size} | ({"cursor": cursor} if cursor else {})
                body = self._check(http.get(path, params=query)).json()
                yield from body["items"]
                cursor = body.get("next_cursor")
                if not cursor:
                    return

    def get_bytes(self, path: str) -> bytes:
        with self._http() as http:
            return self._check(http.get(path)).content

    def stream_to(self, path: str, handle: IO[bytes], **params: Any) -> int:
        """A GET's body written to `handle` as it arrives; returns the bytes written."""
        clean = {k: v for k, v in params.items() if v is not None}
        written = 0
        with (
            self._http() as http,
            http.stream("GET", path, params=clean, timeout=None) as response,
        ):
            if response.is_error:
                response.read()
                self._check(response)
            for chunk in response.iter_bytes():
                handle.write(chunk)
                written += len(chunk)
        return written

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        with self._http() as http:
            return self._check(http.post(path, json=body or {})).json()

    # --- jobs ------------------------------------------------------------------------------

    def submit_job(self, body: dict[str, Any]) -> dict[str, Any]:
        job: dict[str, Any] = self.post("/jobs", {k: v for k, v in body.items() if v is not None})
        return job

    def wait_job(
        self,
        job_id: str,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        interval: float = 0.5,
        max_interval: float = 2.0,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Poll a job until it ends, reporting each state to `on_progress`: over one connection,
        every `interval` seconds at first and less often (up to `max_interval`) while it runs."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._http() as http:
            while True:
                job: dict[str, Any] = self._check(http.get(f"/jobs/{job_id}")).json()
                if on_progress is not None:
                    on_progress(job)
                if job["status"] in TERMINAL:
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
                time.sleep(interval)
                interval = min(max_interval, interval * 1.25)

    # --- datasets --------------------------------------------------------------------------

    def upload_dataset(
        self,
        archive: Path,
        *,
        metadata: Path | None = None,
        form: dict[str, str | None],
        on_bytes: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Stream an archive (and CSV) to POST /datasets; `on_bytes` sees the bytes sent."""
        with archive.open("rb") as archive_file, self._http() as http:
            files: dict[str, tuple[str, Any, str]] = {
                "archive": (
                    archive.name,
                    _Counting(archive_file, on_bytes),
                    "application/octet-stream",
                )
            }
            handle = metadata.open("rb") if metadata else None
            try:
                if handle is not None and metadata is not None:
                    files["metadata"] = (metadata.name, handle, "text/csv")
                data = {k: v for k, v in form.items() if v is not None}
                response = http.post("/datasets", files=files, data=data, timeout=None)
            finally:
                if handle is not None:
                    handle.close()
        job: dict[str, Any] = self._check(response).json()
        return job

    def manifest(self, dataset_id: str, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every manifest row, streamed as JSON lines."""
        params = {k: v for k, v in filters.items() if v is not None} | {"format": "jsonl"}
        with (
            self._http() as http,
            http.stream(
                "GET", f"/datasets/{dataset_id}/manifest", params=params, timeout=None
            ) as response,
        ):
            if response.is_error:
                response.read()
                self._check(response)
            for line in response.iter_lines():
                if line.strip():
                    yield json.loads(line)

    def download(
        self,
        dataset_id: str,
        folder: Path,
        *,
        workers: int = 8,
        filters: dict[str, Any] | None = None,
        on_file: Callable[[str, int], None] | None = None,
        on_total: Callable[[int], None] | None = None,
    ) -> DownloadReport:
        """Download every image into `folder/{condition}/{image_id}.{ext}` in parallel.

        Resumable: a file already there with the right sha256 is not fetched again. Every
        file is verified against the manifest's sha256 before it takes its final name."""
        folder.mkdir(parents=True, exist_ok=True)
        rows = list(self.manifest(dataset_id, **(filters or {})))
        with (folder / "manifest.jsonl").open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        if on_total is not None:
            on_total(len(rows))
        report = DownloadReport()
        with (
            httpx.Client(timeout=self.timeout, follow_redirects=True) as http,
            ThreadPoolExecutor(max_workers=workers) as pool,
        ):
            futures = {pool.submit(_fetch_one, http, row, folder): row for row in rows}
            for future in as_completed(futures):
                row = futures[future]
                try:
                    outcome = future.result()
                except Exception as exc:
                    report.failed.append((row["image_id"], str(exc)))
                    outcome = "failed"
                else:
                    if outcome == "downloaded":
                        report.downloaded += 1
                    else:
                        report.skipped += 1
                if on_file is not None:
                    on_file(outcome, int(row.get("size_bytes") or 0))
        return report

    def export(self, dataset_id: str, body: dict[str, Any]) -> dict[str, Any]:
        job: dict[str, Any] = self.post(
            f"/datasets/{dataset_id}/exports", {k: v for k, v in body.items() if v is not None}
        )
        return job


@dataclass
class DownloadReport:
    downloaded: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def local_path(folder: Path, row: dict[str, Any]) -> Path:
    extension = Path(row["storage_key"]).suffix or ".png"
    return folder / row["condition"] / f"{row['image_id']}{extension}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _fetch_one(http: httpx.Client, row: dict[str, Any], folder: Path) -> str:
    target = local_path(folder, row)
    if target.is_file() and sha256_of(target) == row["sha256"]:
        return "skipped"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    with http.stream("GET", row["url"]) as response:
        response.raise_for_status()
        with partial.open("wb") as handle:
            for block in response.iter_bytes(1 << 16):
                digest.update(block)
                handle.write(block)
    if digest.hexdigest() != row["sha256"]:
        partial.unlink(missing_ok=True)
        raise ValueError(f"sha256 mismatch for {row['image_id']}")
    partial.replace(target)
    return "downloaded"


class _Counting:
    """A file wrapper reporting how many bytes were read (an upload progress bar)."""

    def __init__(self, handle: IO[bytes], on_bytes: Callable[[int], None] | None) -> None:
        self._handle = handle
        self._on_bytes = on_bytes

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        if self._on_bytes is not None and data:
            self._on_bytes(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)
