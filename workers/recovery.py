"""The recovery step: finds chunks whose messages were lost and sends them again.

Neither embedded broker redelivers a task whose worker was SIGKILLed, and Redis redelivers
only after its visibility timeout (an hour) or forgets everything when it restarts empty; the
database knows which chunks are unfinished, so each worker checks it periodically.
"""

from __future__ import annotations

import logging
import threading

from app import engine
from app.broker import JOB_TASKS, queue_depth, send_chunk
from app.config import Settings
from app.db.session import session_factory

log = logging.getLogger(__name__)


def recover_once(settings: Settings) -> int:
    """One pass over every job kind: re-dispatch each lost chunk (and each webhook delivery
    whose message was lost); returns how many were sent."""
    chunks = sum(recover_kind(settings, kind) for kind in JOB_TASKS)
    return chunks + engine.resend_lost_deliveries(settings)


def recover_kind(settings: Settings, kind: str) -> int:
    make_session = session_factory(settings.database_url)
    with make_session() as session, session.begin():
        closed = engine.close_abandoned_chunks(session=session, settings=settings, kind=kind)
    if closed:
        log.warning("closed %s chunk(s) a dead worker left running after their job ended", closed)
    with make_session() as session:
        if not engine.has_active_chunks(session=session, kind=kind):
            return 0
    depth = queue_depth(settings, JOB_TASKS[kind][1])
    with make_session() as session:
        lost = engine.find_lost_chunks(
            session=session, settings=settings, kind=kind, queue_is_empty=depth == 0
        )
    sent = 0
    for chunk in lost:
        with make_session() as session, session.begin():
            won = engine.requeue_chunk(session=session, settings=settings, chunk=chunk)
        if not won:
            continue  # another worker's recovery took it, or a worker claimed it meanwhile
        send_chunk(settings, kind=kind, job_id=chunk.job_id, chunk_index=chunk.index)
        log.warning("re-dispatched chunk %s/%s (%s)", chunk.job_id, chunk.index, chunk.reason)
        sent += 1
    # chunks that were never sent (the API's broker refused, or their turn came) go now
    fresh = engine.refill(settings, kind)
    if fresh:
        log.info("dispatched %s waiting chunk(s) of %s jobs", fresh, kind)
    return sent + fresh


class RecoveryLoop:
    """Runs `recover_once` every `recovery_interval_s` in a daemon thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="synthderm-recovery", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                recover_once(self.settings)
            except Exception:
                log.exception(
                    "recovery pass failed; trying again in %ss", self.settings.recovery_interval_s
                )
            self._stop.wait(self.settings.recovery_interval_s)
