"""How a request that queues a job answers: commit, then 202 with Location and dispatch after
the response, or 200 with the job an idempotency key already made (nothing sent again)."""

from __future__ import annotations

from fastapi import BackgroundTasks, Response, status
from pydantic import BaseModel
from sqlalchemy.orm import Session

from app import engine
from app.config import Settings
from app.db.tables import Job


def accept(
    *,
    session: Session,
    settings: Settings,
    background: BackgroundTasks,
    response: Response,
    job: Job,
    location: str,
    created: bool = True,
) -> None:
    """Commit the request's unit of work and answer for `job` (the route's status is 202)."""
    session.commit()
    response.headers["Location"] = location
    if created:
        engine.enqueue_after_commit(background, settings, job)
    else:
        response.status_code = status.HTTP_200_OK


def accepted_response(response: Response, body: BaseModel) -> Response:
    """The answer `accept` prepared (status, Location) with `body` as its JSON, serialized
    once. A route that returns the model itself has FastAPI validate it again against its
    response_model (in the thread pool) before serializing it; the route keeps declaring
    response_model, so the OpenAPI document is the same."""
    answer = Response(
        content=body.model_dump_json(),
        media_type="application/json",
        status_code=response.status_code or status.HTTP_202_ACCEPTED,
    )
    answer.headers.raw.extend(response.headers.raw)
    return answer
