"""Object store: S3 (boto3, any S3-compatible endpoint) and a local-directory backend.

Keys are deterministic (`datasets/{dataset_id}/{condition}/{image_id}.png`), so a retried
chunk overwrites instead of duplicating. A put is durable when it returns: local writes go
to a temporary file, are fsynced and renamed into place. No torch imports here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import quote, urlencode

from app.config import Settings


class ObjectNotFound(KeyError):
    """The key names no object."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class ObjectStore(Protocol):
    def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None: ...

    def put_file(self, key: str, handle: IO[bytes], *, content_type: str) -> None: ...

    def get_file(self, key: str, path: Path) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def head(self, key: str) -> ObjectInfo | None: ...

    def delete(self, key: str) -> None: ...

    def iter_keys(self, prefix: str) -> Iterator[str]: ...

    def url(self, key: str) -> str: ...

    def ensure_ready(self) -> None: ...

    def check(self) -> None: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key: {key!r}")
    return key


def _temp_file_in(folder: Path) -> tuple[int, str]:
    """A temporary file in `folder`, made with its parents; again if a concurrent delete
    pruned the folder between the two."""
    for _ in range(10):
        folder.mkdir(parents=True, exist_ok=True)
        try:
            return tempfile.mkstemp(dir=folder, prefix=".tmp-")
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"folder {folder} keeps disappearing")


class LocalStore:
    """Objects as files under a root folder; URLs are HMAC-signed routes of the API."""

    def __init__(self, root: Path, *, base_url: str, secret: str, expiry_s: int) -> None:
        self.root = root
        self.base_url = base_url.rstrip("/")
        self._secret = secret.encode()
        self.expiry_s = expiry_s

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        path = self._path(key)
        fd, tmp = _temp_file_in(path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, handle: IO[bytes], *, content_type: str) -> None:
        """Stream a file object into the store (never whole in memory)."""
        path = self._path(key)
        fd, tmp = _temp_file_in(path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(handle, out, length=1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc

    def open_path(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        if not path.is_file():
            return None
        return ObjectInfo(key=key, size=path.stat().st_size)

    def delete(self, key: str) -> None:
        """Delete an object and the folders it leaves empty, up to the root (a failed upload
        leaves no `uploads/{job}/` behind). A folder a concurrent put fills again stays."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        for folder in path.parents:
            if folder == self.root or self.root not in folder.parents:
                break
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone): the folders above are not empty either
                break

    def iter_keys(self, prefix: str) -> Iterator[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith(".tmp-"):
                yield path.relative_to(self.root).as_posix()

    def signature(self, key: str, expires: int) -> str:
        mac = hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def verify(self, key: str, expires: int, signature: str) -> bool:
        if expires < time.time():
            return False
        # as bytes: compare_digest refuses str with non-ASCII characters (a forged URL's)
        return hmac.compare_digest(self.signature(key, expires).encode(), signature.encode())

    def url(self, key: str) -> str:
        expires = int(time.time()) + self.expiry_s
        query = urlencode({"expires": expires, "signature": self.signature(key, expires)})
        return f"{self.base_url}/files/{quote(key)}?{query}"

    def ensure_ready(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def check(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            raise RuntimeError(f"object store folder {self.root} is missing or not writable")


class S3Store:
    """Objects in one bucket of any S3-compatible service; URLs are presigned GETs."""

    def __init__(self, settings: Settings) -> None:
        import boto3
        from botocore.config import Config

        common: dict[str, Any] = {
            "region_name": settings.s3_region,
            "aws_access_key_id": settings.s3_access_key_id,
            "aws_secret_access_key": settings.s3_secret_access_key,
            "config": Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        }
        self.bucket = settings.s3_bucket
        self.expiry_s = settings.url_expiry_s
        self.client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, **common)
        public = settings.s3_public_endpoint_url or settings.s3_endpoint_url
        self.signer = boto3.client("s3", endpoint_url=public, **common)

    def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        digest = base64.b64encode(hashlib.md5(data).digest()).decode()
        self.client.put_object(
            Bucket=self.bucket,
            Key=_check_key(key),
            Body=data,
            ContentType=content_type,
            ContentMD5=digest,
        )

    def put_file(self, key: str, handle: IO[bytes], *, content_type: str) -> None:
        """Stream a file object (multipart upload for large ones)."""
        self.client.upload_fileobj(
            handle, self.bucket, _check_key(key), ExtraArgs={"ContentType": content_type}
        )

    def get_file(self, key: str, path: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, key, str(path))
        except ClientError as exc:
            raise ObjectNotFound(key) from exc

    def get_bytes(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except self.client.exceptions.NoSuchKey as exc:
            raise ObjectNotFound(key) from exc
        body: bytes = response["Body"].read()
        return body

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            response = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return ObjectInfo(key=key, size=int(response["ContentLength"]))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def iter_keys(self, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"]

    def url(self, key: str) -> str:
        url: str = self.signer.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.expiry_s
        )
        return url

    def ensure_ready(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def make_store(settings: Settings) -> ObjectStore:
    """The object store the settings describe."""
    if settings.storage_backend == "s3":
        return S3Store(settings)
    return LocalStore(
        settings.resolved_storage_dir,
        base_url=settings.public_base_url,
        secret=settings.resolved_signing_secret(),
        expiry_s=settings.url_expiry_s,
    )


def image_key(*, dataset_id: str, condition: str, image_id: str, extension: str = "png") -> str:
    """The deterministic key of an image object."""
    return f"datasets/{dataset_id}/{condition}/{image_id}.{extension}"


def upload_key(job_id: str, name: str) -> str:
    """Where an upload waits for its ingest job."""
    return f"uploads/{job_id}/{name}"
