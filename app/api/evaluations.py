"""/evaluations: the quality and privacy report of a synthetic dataset against real data
(issue 23): fidelity and diversity with their real-vs-real floor, utility, skin-tone fidelity
and a memorisation audit; progress, cancel, figures and the audit table."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Query, Response, status
from fastapi.responses import StreamingResponse

from app import engine
from app.api.accepted import accept
from app.api.deps import CallerDep, CursorQuery, SessionDep, SettingsDep, StoreDep
from app.api.problems import file_responses, problem_responses
from app.datasets.copies import EVALUATION_KIND
from app.errors import NotFound
from app.evaluations import plot_key
from app.evaluations import service as evaluations
from app.evaluations.views import evaluation_out, pair_lines
from app.schemas import FIGURE_FORMATS, JobStatus
from app.schemas.evaluations import (
    CONDITION_SHEET_PREFIX,
    EVALUATION_PLOTS,
    EvaluationCreate,
    EvaluationList,
    EvaluationOut,
    PairsFormat,
)

router = APIRouter(tags=["evaluations"], responses=problem_responses(401, 422))

PAIR_MEDIA_TYPES = {PairsFormat.CSV: "text/csv", PairsFormat.JSONL: "application/x-ndjson"}


@router.post(
    "/evaluations",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=EvaluationOut,
    responses=problem_responses(400, 409),
)
def create_evaluation(
    body: EvaluationCreate,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    background: BackgroundTasks,
    response: Response,
) -> EvaluationOut:
    """Queue an evaluation on the `train` queue (one task): features from the classifiers'
    cache, then fidelity, utility, skin-tone fidelity, the memorisation audit and figures."""
    job, created = evaluations.create_evaluation(
        session=session, settings=settings, params=body, owner=caller
    )
    accept(session=session, settings=settings, background=background, response=response,
           job=job, location=f"/evaluations/{job.id}", created=created)  # fmt: skip
    return evaluation_out(session, job)


@router.get("/evaluations", response_model=EvaluationList)
def list_evaluations(
    session: SessionDep,
    caller: CallerDep,
    limit: int = Query(50, ge=1, le=1000),
    cursor: CursorQuery = None,
) -> EvaluationList:
    """The caller's evaluations, newest first."""
    rows, next_cursor = engine.list_jobs(
        session=session, owner=caller, status=None, limit=limit, cursor=cursor,
        kind=EVALUATION_KIND,
    )  # fmt: skip
    return EvaluationList(items=[evaluation_out(session, j) for j in rows], next_cursor=next_cursor)


@router.get(
    "/evaluations/{evaluation_id}", response_model=EvaluationOut, responses=problem_responses(404)
)
def get_evaluation(evaluation_id: str, session: SessionDep, caller: CallerDep) -> EvaluationOut:
    """Status, the stage running, and the report once it succeeded."""
    job = evaluations.get_evaluation(session=session, evaluation_id=evaluation_id, owner=caller)
    return evaluation_out(session, job)


@router.post(
    "/evaluations/{evaluation_id}/cancel",
    response_model=EvaluationOut,
    responses=problem_responses(404, 409),
)
def cancel_evaluation(
    evaluation_id: str, session: SessionDep, settings: SettingsDep, caller: CallerDep
) -> EvaluationOut:
    """Cancel: a queued evaluation never starts; a running one stops at its next stage (or
    batch of features) and keeps no result."""
    job = evaluations.cancel_evaluation(session=session, evaluation_id=evaluation_id, owner=caller)
    engine.emit_job_events(session=session, job_id=job.id, settings=settings)  # job.completed
    session.commit()
    return evaluation_out(session, job)


@router.get(
    "/evaluations/{evaluation_id}/plots/{filename}",
    response_class=Response,
    responses=file_responses("The figure.", FIGURE_FORMATS.values()),
)
def evaluation_plot(
    evaluation_id: str, filename: str, session: SessionDep, store: StoreDep, caller: CallerDep
) -> Response:
    """A figure drawn by the worker: contact-sheet, closest-pairs, ita, pca or prdc, or a
    condition's own contact sheet (contact-sheet-<condition>, as the result's `figures` names
    it), as .png or .svg."""
    name, _, fmt = filename.rpartition(".")
    known = name in EVALUATION_PLOTS or name.startswith(CONDITION_SHEET_PREFIX)
    if not known or fmt not in FIGURE_FORMATS:
        raise NotFound(
            f"no plot {filename!r}; evaluations have {', '.join(EVALUATION_PLOTS)} and "
            f"{CONDITION_SHEET_PREFIX}<condition> (.png or .svg)"
        )
    job = evaluations.get_evaluation(session=session, evaluation_id=evaluation_id, owner=caller)
    if job.status != JobStatus.SUCCEEDED.value or name not in (job.result or {}).get("figures", []):
        raise NotFound(f"evaluation {job.id} has no {name} figure (it is {job.status})")
    return Response(store.get_bytes(plot_key(job.id, name, fmt)), media_type=FIGURE_FORMATS[fmt])


@router.get(
    "/evaluations/{evaluation_id}/pairs",
    response_class=StreamingResponse,
    responses=file_responses("The memorisation audit table.", PAIR_MEDIA_TYPES.values()),
)
def evaluation_pairs(
    evaluation_id: str,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    format: PairsFormat = PairsFormat.CSV,
) -> StreamingResponse:
    """Every synthetic image audited, most similar first: its nearest real training image,
    the pair's cosine and SSIM, its own parent's for a child, and whether it is flagged."""
    job = evaluations.get_evaluation(session=session, evaluation_id=evaluation_id, owner=caller)
    if job.status != JobStatus.SUCCEEDED.value:
        raise NotFound(f"evaluation {job.id} has no audit yet (it is {job.status})")
    lines = pair_lines(database_url=settings.database_url, job_id=job.id, fmt=format)
    return StreamingResponse(lines, media_type=PAIR_MEDIA_TYPES[format])
