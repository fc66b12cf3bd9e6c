"""The Celery application of the workers: `celery -A workers.celery_app worker -Q gpu,train`.

Thin: tasks load rows through app/, call models/, write results. On start a worker registers
the generator directories it can see and starts the recovery step.
"""

from __future__ import annotations

import os

# OpenMP threads that busy-wait between torch ops make a CPU worker 10-15x slower when other
# processes share the cores (the embedded default runs the API and this worker on the same
# CPU): measured here, 9.8 s against 0.74 s an image at load 7; passive waiting costs little
# on a quiet CPU. Set before anything imports torch; an operator's own value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from app.broker import celery_config
from app.config import get_settings
from app.db.session import session_scope
from app.vocabulary import register_models_in
from workers.recovery import RecoveryLoop

log = logging.getLogger(__name__)

settings = get_settings()
app = Celery("synthderm")
app.conf.update(celery_config(settings))
app.conf.include = [
    "workers.generate",
    "workers.ingest",
    "workers.export",
    "workers.train",
    "workers.finetune",
    "workers.evaluate",
    "workers.webhooks",
]

_recovery: RecoveryLoop | None = None


@worker_ready.connect
def _on_ready(**_kwargs: Any) -> None:
    global _recovery
    with session_scope(settings.database_url) as session:
        found = register_models_in(session=session, models_dir=settings.resolved_models_dir)
    log.info("models available in %s: %s", settings.resolved_models_dir, ", ".join(found) or "none")
    _recovery = RecoveryLoop(settings)
    _recovery.start()


@worker_shutdown.connect
def _on_shutdown(**_kwargs: Any) -> None:
    if _recovery is not None:
        _recovery.stop()
