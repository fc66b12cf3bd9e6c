"""/files: downloads from the local object store through HMAC-signed, expiring URLs.

The signature in the URL is the credential (as with an S3 presigned URL), so a manifest's
URLs work in any HTTP client. With the S3 backend clients download from S3 directly.
"""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from app.api.deps import StoreDep
from app.api.problems import problem_responses
from app.errors import NotFound, ProblemError
from app.storage import LocalStore, ObjectNotFound

router = APIRouter(tags=["files"])


class Forbidden(ProblemError):
    status = 403
    title = "Forbidden"


_FILE = {
    "description": "The object's bytes.",
    "content": {
        media_type: {"schema": {"type": "string", "format": "binary"}}
        for media_type in ("image/png", "application/octet-stream")
    },
}


# No API key: the URL's signature is the credential.
@router.get(
    "/files/{key:path}",
    response_class=FileResponse,
    responses={200: _FILE, **problem_responses(403, 404, 422)},
)
def get_file(
    key: str, store: StoreDep, expires: int = Query(...), signature: str = Query(...)
) -> FileResponse:
    if not isinstance(store, LocalStore):
        raise NotFound("this service stores objects in S3: use the presigned URL")
    if not store.verify(key, expires, signature):
        raise Forbidden("the URL signature is invalid or has expired")
    try:
        path = store.open_path(key)
    except (ObjectNotFound, ValueError) as exc:
        raise NotFound(f"no object {key!r}") from exc
    media = "image/png" if key.endswith(".png") else "application/octet-stream"
    return FileResponse(path, media_type=media)
