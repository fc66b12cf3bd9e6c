"""Errors the service raises on purpose; the HTTP layer renders them as problem+json."""

from __future__ import annotations


class ProblemError(Exception):
    """An error with an HTTP status, a title and a human sentence (RFC 9457)."""

    status = 400
    title = "Bad request"

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


class InvalidField(ProblemError):
    """A request field names something that does not exist or is not allowed."""

    status = 422
    title = "Invalid request"


class NotFound(ProblemError):
    status = 404
    title = "Not found"


class Conflict(ProblemError):
    status = 409
    title = "Conflict"


class Unauthorized(ProblemError):
    status = 401
    title = "Unauthorized"


class Forbidden(ProblemError):
    """The caller is known or the rule is clear, and it still may not have this."""

    status = 403
    title = "Forbidden"
