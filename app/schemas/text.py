"""Strings without control characters: the one rule for every name, key, id and label a
request carries (and the ids in paths and the labels of uploaded CSVs).

Control characters are C0 and C1: U+0000-U+001F and U+007F-U+009F. PostgreSQL refuses NUL in
text and JSON, and none of them belongs in a name; free text (`FreeText`, a description) may
keep tab, line feed and carriage return.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_TEXT_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # less \t \n \r


def control_character(value: str, *, free_text: bool = False) -> str | None:
    """The first control character in `value` as "U+0000", or None when there is none."""
    found = (_TEXT_CONTROL if free_text else _CONTROL).search(value)
    return f"U+{ord(found.group()):04X}" if found else None


def has_control(value: str) -> bool:
    """Whether `value` holds a control character (C0 or C1)."""
    return _CONTROL.search(value) is not None


def _message(code: str) -> str:
    return f"contains a control character ({code}); control characters are not allowed"


def no_control(value: str | None) -> str | None:
    """A validator: `value` unless it holds a control character (ValueError)."""
    if value is not None and (code := control_character(value)):
        raise ValueError(_message(code))
    return value


def no_control_but_whitespace(value: str | None) -> str | None:
    """A validator for free text: as `no_control`, but tab, line feed and CR are allowed."""
    if value is not None and (code := control_character(value, free_text=True)):
        raise ValueError(_message(code) + " (but tab, line feed and carriage return)")
    return value


# The same rules as JSON Schema patterns, for the OpenAPI document.
NAME_PATTERN = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
FREE_TEXT_PATTERN = "^[^\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f]*$"


class DocumentedPattern:
    """Says a validator's rule in the JSON schema as a `pattern`, without checking it a second
    time: clients keep getting the validator's message."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema: dict[str, Any] = handler(core_schema)
        schema["pattern"] = self.pattern
        return schema


# A name, key, id or label: no control character at all.
Name = Annotated[str, AfterValidator(no_control), DocumentedPattern(NAME_PATTERN)]
# Free text (a description, a negative prompt): tab, line feed and carriage return allowed.
FreeText = Annotated[
    str, AfterValidator(no_control_but_whitespace), DocumentedPattern(FREE_TEXT_PATTERN)
]
