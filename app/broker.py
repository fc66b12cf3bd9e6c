"""The broker side of the service: the embedded SQLite transport and task dispatch.

The broker only delivers; the database holds job state. The API sends tasks by name so it
never imports workers/ (nor torch). The embedded transport is kombu's SQLAlchemy transport on
its own SQLite file in WAL mode (kombu's filesystem transport loses messages under concurrent
producers, kombu issue #1551).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

import kombu.transport
from celery import Celery
from kombu.transport import sqlalchemy as kombu_sqla
from sqlalchemy import create_engine, event

from app.config import Settings
from app.db.session import SQLITE_BUSY_TIMEOUT_MS, _sqlite_pragmas

log = logging.getLogger(__name__)

GENERATE_TASK = "synthderm.generate_chunk"
INGEST_TASK = "synthderm.ingest_dataset"
EXPORT_TASK = "synthderm.export_dataset"
TRAIN_TASK = "synthderm.train_run"
GPU_QUEUE = "gpu"
# CPU work (ingest, export, classifier training) goes to the `train` queue's workers.
TRAIN_QUEUE = "train"
# job kind -> (task name, queue)
JOB_TASKS = {
    "generate": (GENERATE_TASK, GPU_QUEUE),
    "ingest": (INGEST_TASK, TRAIN_QUEUE),
    "export": (EXPORT_TASK, TRAIN_QUEUE),
    "experiment": (TRAIN_TASK, TRAIN_QUEUE),
}


class _SQLiteWALChannel(kombu_sqla.Channel):
    def _engine_from_config(self) -> Any:
        conninfo = self.connection.client
        engine = create_engine(
            conninfo.hostname,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine


class SQLiteWALTransport(kombu_sqla.Transport):
    """kombu's SQLAlchemy transport on a SQLite file in WAL mode with a busy timeout."""

    Channel = _SQLiteWALChannel


kombu.transport.TRANSPORT_ALIASES["sqlitewal"] = "app.broker:SQLiteWALTransport"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by the API's producer and the workers."""
    transport_options: dict[str, Any] = {}
    if settings.broker_is_embedded:
        path = settings.broker_url.split("///", 1)[-1]
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        transport_options["polling_interval"] = settings.broker_polling_interval_s
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": GPU_QUEUE,
        "task_routes": {task: {"queue": queue} for task, queue in JOB_TASKS.values()},
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "broker_heartbeat": 0,
    }


@lru_cache(maxsize=4)
def _producer(broker_url: str, settings_json: str) -> Celery:
    settings = Settings.model_validate_json(settings_json)
    app = Celery("synthderm-producer")
    app.conf.update(celery_config(settings))
    return app


def producer(settings: Settings) -> Celery:
    """A Celery app that only sends tasks (one per settings per process)."""
    return _producer(settings.broker_url, settings.model_dump_json())


def send_chunk(settings: Settings, *, kind: str, job_id: str, chunk_index: int) -> None:
    """Enqueue one chunk of a job on its kind's queue; raises if the broker refuses."""
    task, queue = JOB_TASKS[kind]
    producer(settings).send_task(
        task,
        kwargs={"job_id": job_id, "chunk_index": chunk_index},
        queue=queue,
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
    )


def queue_depth(settings: Settings, queue: str) -> int:
    """Messages waiting (not yet delivered) in `queue`."""
    app = producer(settings)
    with app.connection_for_write() as connection, connection.channel() as channel:
        try:
            _name, count, _consumers = channel.queue_declare(queue=queue, passive=True)
        except Exception:  # the queue does not exist yet: nothing waits in it
            return 0
        return int(count)


def check_broker(settings: Settings) -> None:
    """Raise unless the broker accepts a connection."""
    app = producer(settings)
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=3)
        if settings.broker_is_embedded:
            with connection.channel() as channel:
                channel.queue_declare(queue=GPU_QUEUE, durable=True)
