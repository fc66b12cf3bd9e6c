"""Dependencies shared by the routers: settings, a database session, the store, the caller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Query, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.session import session_factory
from app.db.tables import ApiKey
from app.errors import InvalidField, NotFound, Unauthorized
from app.keys import authenticate
from app.schemas.text import has_control
from app.storage import ObjectStore


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    session = session_factory(settings.database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def get_store(request: Request) -> ObjectStore:
    store: ObjectStore = request.app.state.store
    return store


StoreDep = Annotated[ObjectStore, Depends(get_store)]


# The two ways to send a key, declared so that the OpenAPI document lists them as security
# schemes; neither refuses a request by itself (auto_error=False): get_caller says why.
bearer_scheme = HTTPBearer(
    scheme_name="bearer", auto_error=False, description="`Authorization: Bearer <API key>`."
)
api_key_scheme = APIKeyHeader(
    name="X-API-Key", scheme_name="apiKey", auto_error=False, description="`X-API-Key: <API key>`."
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]
ApiKeyHeaderDep = Annotated[str | None, Security(api_key_scheme)]


def get_caller(
    request: Request, session: SessionDep, bearer: BearerDep, api_key: ApiKeyHeaderDep
) -> ApiKey:
    """The API key making the request (a bearer token first, else X-API-Key); 401 without a
    valid one."""
    raw = bearer.credentials if bearer is not None else api_key
    if raw is None:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
    key = authenticate(session=session, raw_key=raw)
    if key is None:
        raise Unauthorized("the API key is not valid (unknown or revoked)")
    _check_control_characters(request)
    return key


def _check_control_characters(request: Request) -> None:
    """Before any lookup by the request's path ids or query values: a path id with a control
    character cannot exist (404), and a query value with one is refused (422 naming it).
    PostgreSQL cannot even compare a string holding NUL."""
    for name, value in request.path_params.items():
        if isinstance(value, str) and has_control(value):
            raise NotFound(f"no {name.removesuffix('_id')} {value!r}")
    for name, value in request.query_params.multi_items():
        if has_control(name) or has_control(value):
            field = name if not has_control(name) else repr(name)
            raise InvalidField(
                f"{field}: contains a control character; control characters are not allowed",
                field=field,
            )


CallerDep = Annotated[ApiKey, Depends(get_caller)]

# Every id the service makes is a lowercase uuid (app.ids); a page cursor is one of them.
ID_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
CursorQuery = Annotated[
    str | None,
    Query(pattern=ID_PATTERN, description="Page start: the last page's next_cursor (an id)."),
]
