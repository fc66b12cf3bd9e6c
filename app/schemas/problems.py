"""The contract of every error: an RFC 9457 problem, sent as application/problem+json.

app/api/problems.py renders these bodies and declares them in the OpenAPI document; this
module only says their shape.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class FieldError(BaseModel):
    field: str = Field(description="The field, parameter or form part at fault ('body': all).")
    message: str
    type: str = Field(description="What kind of fault: pydantic's error type, or 'invalid'.")


class Problem(BaseModel):
    """An error (RFC 9457 problem details)."""

    type: str = Field("about:blank", description="Always about:blank: the status says it.")
    title: str = Field(examples=["Invalid request"])
    status: int = Field(ge=400, le=599, description="The response's HTTP status.")
    detail: str = Field(description="A sentence for a person, naming the field when one is.")
    errors: list[FieldError] | None = Field(
        None, description="Each field at fault (422 and some 409), in the order found."
    )
