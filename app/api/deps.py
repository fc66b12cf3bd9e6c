"""Dependencies shared by the routers: settings, a database session, the store, the caller.

They are coroutines that do no I/O on their common path: FastAPI runs a plain `def`
dependency in its thread pool, and each such hop costs more CPU than the dependency itself
(POST /jobs made seven per request). Only a session closed inside a transaction and a key not
checked in the last `auth_cache_ttl_s` go to the thread pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Query, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from app.db.session import session_factory
from app.db.tables import ApiKey
from app.errors import InvalidField, NotFound, Unauthorized
from app.keys import authenticate, cached_key
from app.schemas.text import has_control
from app.storage import ObjectStore


def get_settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_app_settings(request: Request) -> Settings:
    return get_settings_of(request)


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_session(settings: SettingsDep) -> AsyncIterator[Session]:
    """A session for the request; closed after it (in the thread pool when a transaction is
    still open: its rollback talks to the database)."""
    session = session_factory(settings.database_url)()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]


async def get_store(request: Request) -> ObjectStore:
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


async def get_caller(
    request: Request, session: SessionDep, bearer: BearerDep, api_key: ApiKeyHeaderDep
) -> ApiKey:
    """The API key making the request (a bearer token first, else X-API-Key); 401 without a
    valid one. A key checked less than `auth_cache_ttl_s` ago is not read again."""
    raw = bearer.credentials if bearer is not None else api_key
    if raw is None:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
    ttl = get_settings_of(request).auth_cache_ttl_s
    key = cached_key(raw, max_age_s=ttl)
    if key is None:
        key = await run_in_threadpool(authenticate, session=session, raw_key=raw, remember=ttl > 0)
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
