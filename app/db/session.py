"""Engines and sessions. SQLite runs in WAL mode with a busy timeout so the API and a worker
write side by side (measured: 50 inserts/s from the API beside 100 updates/s from a worker).

Within one process, SQLite write transactions take turns on a lock (`_SerializedWrites`): a
thread that would write waits for the one writing, instead of SQLite's busy handler putting it
to sleep for up to 100 ms at a time (16 API threads writing at once had a p99 of 1 s). Across
processes (the API and a worker) the busy timeout still decides.

PostgreSQL connections are pinged when they leave the pool only after an idle spell
(`PING_AFTER_IDLE_S`): pre-pinging every checkout was a tenth of a busy API's time.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
# A pooled PostgreSQL connection unused this long is pinged before it is handed out.
PING_AFTER_IDLE_S = 1.0
_IDLE_SINCE = "synthderm_idle_since"
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class _SerializedWrites(sqlite3.Connection):
    """A sqlite3 connection whose write transactions take the engine's `write_lock` from
    their first write to their commit, rollback or close."""

    write_lock: threading.Lock  # set per engine by make_engine

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writing = False

    def begin_write(self) -> None:
        if not self.writing:
            # a thread that writes through a second connection while its first one holds the
            # lock would wait for itself: after the busy timeout it goes on, as SQLite would
            self.writing = self.write_lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)

    def end_write(self) -> None:
        if self.writing:
            self.writing = False
            self.write_lock.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self.end_write()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.end_write()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.end_write()


def _before_write(
    conn: Any, _cursor: Any, statement: str, _params: Any, _context: Any, _many: bool
) -> None:
    if statement.lstrip()[:7].upper().startswith(_WRITES):
        dbapi = conn.connection.dbapi_connection
        if isinstance(dbapi, _SerializedWrites):
            dbapi.begin_write()


def _after_write(
    conn: Any, _cursor: Any, _statement: str, _params: Any, _context: Any, _many: bool
) -> None:
    dbapi = conn.connection.dbapi_connection
    if isinstance(dbapi, _SerializedWrites) and dbapi.writing and not dbapi.in_transaction:
        dbapi.end_write()  # an autocommit write: nothing left to commit


def _mark_idle(_dbapi_connection: Any, record: Any, *_args: Any) -> None:
    record.info[_IDLE_SINCE] = time.monotonic()


def _ping_if_idle(engine: Engine) -> Any:
    def checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get(_IDLE_SINCE)
        if idle_since is not None and time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            if engine.dialect.is_disconnect(error, dbapi_connection, None):
                raise exc.DisconnectionError(str(error)) from error  # the pool reconnects
            raise

    return checkout


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite files get their folder created, WAL pragmas and their
    writes serialized within the process."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        factory = type("SerializedWrites", (_SerializedWrites,), {"write_lock": threading.Lock()})
        engine = create_engine(
            url,
            connect_args={
                "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
                "check_same_thread": False,
                "factory": factory,
            },
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "before_cursor_execute", _before_write)
        event.listen(engine, "after_cursor_execute", _after_write)
        return engine
    engine = create_engine(url, pool_size=10, max_overflow=20)
    event.listen(engine, "connect", _mark_idle)
    event.listen(engine, "checkin", _mark_idle)
    event.listen(engine, "checkout", _ping_if_idle(engine))
    return engine


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """One engine per URL per process."""
    return make_engine(url)


@lru_cache(maxsize=8)
def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=engine_for(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
