"""The embedded broker (app/broker.py) deletes acked messages, polls through an index and keeps
its file bounded; a file from an earlier version is cleaned on start; a message fetched but
not acked is put back on close (at least once)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from queue import Empty
from typing import Any

from kombu import Connection
from kombu.transport import sqlalchemy as kombu_sqla
from sqlalchemy import event

import app.broker  # registers the sqlitewal transport

COUNT = 2_000


def _url(path: Path, scheme: str = "sqlitewal+sqlite") -> str:
    return f"{scheme}:///{path.as_posix()}"


def _rows(path: Path, where: str = "1") -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(f"SELECT count(*) FROM kombu_message WHERE {where}").fetchone()[0])


def _size(path: Path) -> int:
    return path.stat().st_size  # the WAL beside it is bounded by journal_size_limit


def _round(queue: Any, count: int) -> None:
    for i in range(count):
        queue.put({"i": i})
    for _ in range(count):
        queue.get(timeout=5).ack()


def test_acked_messages_are_deleted_and_the_file_does_not_grow(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite"
    with Connection(_url(path), transport_options={"polling_interval": 0.01}) as connection:
        queue = connection.SimpleQueue("gpu")
        _round(queue, COUNT)
        assert _rows(path) == 0
        first = _size(path)
        _round(queue, COUNT)
        assert _rows(path) == 0
        assert _size(path) <= first + 16 * 4096  # a checkpoint apart; kept rows: +1 MB a round
        queue.close()


def test_the_poll_searches_an_index(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite"
    with Connection(_url(path)) as connection:
        channel = connection.default_channel
        channel.queue_declare(queue="gpu")
        statements: list[tuple[str, Any]] = []
        engine = channel.session.get_bind()

        def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
            if "FROM kombu_message" in statement and statement.lstrip().startswith("SELECT"):
                statements.append((statement, parameters))

        event.listen(engine, "before_cursor_execute", record)
        try:
            with contextlib.suppress(Empty):
                channel._get("gpu")
        finally:
            event.remove(engine, "before_cursor_execute", record)
        assert statements
        with sqlite3.connect(path) as db:
            for statement, parameters in statements:
                plan = db.execute("EXPLAIN QUERY PLAN " + statement, parameters).fetchall()
                details = [row[-1] for row in plan]
                assert all(d.startswith("SEARCH") and "INDEX" in d for d in details), details


def test_unacked_message_is_put_back_and_the_hidden_row_goes(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite"
    url = _url(path)
    with Connection(url) as connection:
        queue = connection.SimpleQueue("gpu")
        queue.put({"n": 1})
        message = queue.get(timeout=5)
        assert message.payload == {"n": 1}
        assert _rows(path, "visible = 0") == 1  # fetched, not acked: still there
        queue.close()  # the consumer goes away without acking
    assert _rows(path) == 1 and _rows(path, "visible = 1") == 1
    with Connection(url) as connection:
        queue = connection.SimpleQueue("gpu")
        again = queue.get(timeout=5)
        assert again.payload == {"n": 1}
        again.reject(requeue=True)
        assert _rows(path) == 1 and _rows(path, "visible = 1") == 1
        queue.get(timeout=5).ack()
        queue.close()
    assert _rows(path) == 0


def test_a_file_from_kombus_stock_transport_is_cleaned_on_start(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite"
    stock = _url(path, "sqla+sqlite")
    with Connection(stock) as connection:
        queue = connection.SimpleQueue("gpu")
        _round(queue, 200)
        queue.put({"left": True})
        queue.close()
    engine, _ = kombu_sqla.Channel._engines.pop(f"sqlite:///{path.as_posix()}")
    engine.dispose()
    assert _rows(path, "visible = 0") == 200
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    with Connection(_url(path)) as connection:
        queue = connection.SimpleQueue("gpu")
        assert _rows(path) == 1  # the 200 delivered rows went, the waiting one stays
        queue.get(timeout=5).ack()
        queue.close()
    assert _rows(path) == 0
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2


def test_a_restarted_worker_opens_a_file_with_free_pages(tmp_path: Path) -> None:
    """A worker killed with a round's pages freed but not yet given back: the next process's
    first open runs the incremental vacuum (which may answer with no rows) and then serves.
    (It once raised ResourceClosedError there, and the restarted worker never came up.)"""
    path = tmp_path / "broker.sqlite"
    with Connection(_url(path), transport_options={"polling_interval": 0.01}) as connection:
        queue = connection.SimpleQueue("gpu")
        _round(queue, COUNT)
        queue.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA freelist_count").fetchone()[0] > 0  # pages left to give back
    for _ in range(2):  # a new process each time: the file is prepared on its first open
        app.broker._PREPARED.clear()
        with Connection(_url(path), transport_options={"polling_interval": 0.01}) as connection:
            queue = connection.SimpleQueue("gpu")
            _round(queue, 10)
            queue.close()
    assert _rows(path) == 0
