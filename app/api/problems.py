"""problem+json (RFC 9457) rendering for every error the API returns, and its declaration in
the OpenAPI document: routers name the statuses they can answer with `problem_responses`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import ProblemError, Unauthorized
from app.schemas import Problem

PROBLEM_JSON = "application/problem+json"

# What each error status means here, as the document's response descriptions say it.
ERROR_DESCRIPTIONS = {
    400: "The body could not be parsed (not JSON, not UTF-8, a broken multipart form).",
    401: "No API key, or one that is unknown or revoked.",
    403: "Not allowed: a download URL's signature is invalid or has expired, or /metrics was "
    "asked from another host with no metrics token set.",
    404: "No such resource for this key (a path id with a control character is none).",
    409: "A conflict: the idempotency key names another request, or the resource's state "
    "does not allow this.",
    413: "The upload is over the size limit.",
    422: "Invalid input: `errors` names each field (parameter, body field or form part).",
}


def file_responses(description: str, media_types: Iterable[str]) -> dict[int | str, Any]:
    """The OpenAPI `responses` of a route that answers a file (a figure, a table) or a 404."""
    content = {media_type: {"schema": {"type": "string"}} for media_type in media_types}
    return {200: {"description": description, "content": content}, **problem_responses(404)}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of these error statuses: each a Problem, as problem+json (the
    media type is set by `install`'s document hook)."""
    responses: dict[int | str, dict[str, Any]] = {
        s: {"model": Problem, "description": ERROR_DESCRIPTIONS[s]} for s in statuses
    }
    if 401 in responses:  # as _problem_error sends it
        schema = {"type": "string", "enum": ["Bearer"]}
        responses[401]["headers"] = {"WWW-Authenticate": {"schema": schema, "required": True}}
    return responses


def problem(
    status: int, title: str, detail: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _message(err: Any) -> str:
    """Pydantic's message, less the "Value error, " it puts before a validator's own words."""
    return str(err.get("msg", "")).removeprefix("Value error, ")


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field(err.get("loc", ())), "message": _message(err), "type": err["type"]}
        for err in exc.errors()
    ]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem(422, "Invalid request", detail, errors=errors)


async def _problem_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    extra: dict[str, Any] = {}
    if exc.field:
        extra["errors"] = [{"field": exc.field, "message": exc.detail, "type": "invalid"}]
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return problem(exc.status, exc.title, exc.detail, headers=headers, **extra)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers) if exc.headers else None
    return problem(exc.status_code, "Error", str(exc.detail), headers=headers)


def _problems_as_problem_json(document: dict[str, Any]) -> None:
    """FastAPI declares a response model as application/json; ours go out as problem+json."""
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for response in operation.get("responses", {}).values():
                content = response.get("content", {})
                if content.get("application/json", {}).get("schema") == problem_ref:
                    content[PROBLEM_JSON] = content.pop("application/json")


def _document(app: FastAPI) -> Callable[[], dict[str, Any]]:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _problems_as_problem_json(build())  # build() keeps it in app.openapi_schema
        assert app.openapi_schema is not None
        return app.openapi_schema

    return openapi


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ProblemError, _problem_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.openapi = _document(app)  # type: ignore[method-assign]
