"""/experiments and /runs: classifier runs on real and synthetic mixtures, their metrics,
predictions and plots (PAPER.md section 4)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Query, Response, status
from fastapi.responses import StreamingResponse

from app import engine
from app.api.accepted import accept
from app.api.deps import CallerDep, CursorQuery, SessionDep, SettingsDep, StoreDep
from app.api.problems import file_responses, problem_responses
from app.api.views import delivery_page, experiment_out, experiment_with_report, run_out
from app.errors import NotFound
from app.experiments import plots, predictions
from app.experiments import runs as service
from app.experiments.predictions import PredictionFormat
from app.experiments.reports import compare_settings
from app.schemas import (
    DeliveryList,
    ExperimentCreate,
    ExperimentList,
    ExperimentOut,
    JobStatus,
    Name,
    RunCreate,
    RunList,
    RunOut,
)

router = APIRouter(tags=["experiments"], responses=problem_responses(401, 422))


_PLOT = file_responses("The figure.", plots.FORMATS.values())
_PREDICTIONS = file_responses("The predictions table.", predictions.MEDIA_TYPES.values())


@router.post(
    "/experiments",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ExperimentOut,
    responses=problem_responses(400, 409),
)
def create_experiment(
    body: ExperimentCreate,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    background: BackgroundTasks,
    response: Response,
) -> ExperimentOut:
    """Queue a grid of runs on the `train` queue."""
    job, created = service.create_experiment(
        session=session, settings=settings, params=body, owner=caller
    )
    location = f"/experiments/{job.id}"
    accept(session=session, settings=settings, background=background, response=response,
           job=job, location=location, created=created)  # fmt: skip
    return experiment_with_report(session, job)


@router.get("/experiments", response_model=ExperimentList)
def list_experiments(
    session: SessionDep,
    caller: CallerDep,
    limit: int = Query(50, ge=1, le=1000),
    cursor: CursorQuery = None,
) -> ExperimentList:
    """The caller's experiments (single runs included), newest first, without reports."""
    rows, next_cursor = engine.list_jobs(
        session=session,
        owner=caller,
        status=None,
        limit=limit,
        cursor=cursor,
        kind=service.EXPERIMENT_KIND,
    )
    return ExperimentList(items=[experiment_out(j) for j in rows], next_cursor=next_cursor)


@router.get(
    "/experiments/{experiment_id}", response_model=ExperimentOut, responses=problem_responses(404)
)
def get_experiment(
    experiment_id: str,
    session: SessionDep,
    caller: CallerDep,
    runs: bool = Query(True, description="Include every run (config, curve, metrics)."),
) -> ExperimentOut:
    """Status, progress, the report (per setting over seeds, per skin tone, differences from
    real-only with bootstrap CIs) and the runs."""
    job = service.get_experiment(session=session, experiment_id=experiment_id, owner=caller)
    return experiment_with_report(session, job, detail=runs)


@router.post(
    "/experiments/{experiment_id}/cancel",
    response_model=ExperimentOut,
    responses=problem_responses(404, 409),
)
def cancel_experiment(experiment_id: str, session: SessionDep, caller: CallerDep) -> ExperimentOut:
    """Cancel: queued runs never start, a running one stops at its next epoch; finished runs
    keep their results."""
    job = service.cancel_experiment(session=session, experiment_id=experiment_id, owner=caller)
    engine.emit_job_events(session=session, job_id=job.id)  # job.completed
    session.commit()
    return experiment_with_report(session, job)


@router.get(
    "/experiments/{experiment_id}/deliveries",
    response_model=DeliveryList,
    responses=problem_responses(404),
)
def experiment_deliveries(
    experiment_id: str,
    session: SessionDep,
    caller: CallerDep,
    limit: int = Query(50, ge=1, le=1000),
    cursor: CursorQuery = None,
) -> DeliveryList:
    """The experiment's webhook delivery log, newest first."""
    job = service.get_experiment(session=session, experiment_id=experiment_id, owner=caller)
    return delivery_page(session=session, job=job, limit=limit, cursor=cursor)


@router.post(
    "/experiments/{experiment_id}/resume",
    response_model=ExperimentOut,
    responses=problem_responses(404, 409),
)
def resume_experiment(
    experiment_id: str,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    background: BackgroundTasks,
) -> ExperimentOut:
    """Queue again what a canceled or failed experiment did not finish; finished runs are
    not redone."""
    job = service.resume_experiment(session=session, experiment_id=experiment_id, owner=caller)
    session.commit()
    engine.enqueue_after_commit(background, settings, job)
    return experiment_with_report(session, job)


@router.get(
    "/experiments/{experiment_id}/plots/{filename}", response_class=Response, responses=_PLOT
)
def experiment_plot(
    experiment_id: str, filename: str, session: SessionDep, caller: CallerDep
) -> Response:
    """A figure as PNG or SVG: accuracy-vs-n-real, dose-response, skin-tone,
    skin-tone-difference, training-curves."""
    name, _, fmt = filename.rpartition(".")
    if fmt not in plots.FORMATS:
        raise NotFound(f"no plot {filename!r}; ask for NAME.png or NAME.svg")
    job = service.get_experiment(session=session, experiment_id=experiment_id, owner=caller)
    runs = service.runs_of(session=session, experiment_id=job.id)
    classes = list(job.params.get("classes", []))
    names = service.synthetic_dataset_names(session=session, job=job)
    body = plots.experiment_plot(
        name=name, fmt=fmt, runs=runs, classes=classes, dataset_names=names
    )
    return Response(body, media_type=plots.FORMATS[fmt])


@router.get("/experiments/{experiment_id}/compare", responses=problem_responses(404))
def experiment_compare(
    experiment_id: str,
    session: SessionDep,
    caller: CallerDep,
    a: Annotated[Name, Query(description="A setting's label, e.g. 'n=16 k=10 inpaint'.")],
    b: Annotated[Name, Query(description="The setting it is compared with, e.g. 'n=16 k=0'.")],
) -> dict[str, Any]:
    """Setting `a` minus setting `b`: top-1 and top-3 with paired bootstrap 95% CIs over the
    shared test images, and top-1 per Fitzpatrick group with the change of the gap (as the
    report's comparison with real-only, for any two settings: strategies, datasets, k)."""
    job = service.get_experiment(session=session, experiment_id=experiment_id, owner=caller)
    return compare_settings(
        runs=service.runs_of(session=session, experiment_id=job.id),
        a=a,
        b=b,
        classes=list(job.params.get("classes", [])),
        dataset_names=service.synthetic_dataset_names(session=session, job=job),
    )


@router.get(
    "/experiments/{experiment_id}/predictions",
    response_class=StreamingResponse,
    responses=_PREDICTIONS,
)
def experiment_predictions(
    experiment_id: str,
    session: SessionDep,
    store: StoreDep,
    caller: CallerDep,
    format: PredictionFormat = "csv",
) -> StreamingResponse:
    """Every finished run's per-image predictions in one table, each row with its run, setting
    and seed: for analyses the report does not make (by skin type, by class, across seeds)."""
    job = service.get_experiment(session=session, experiment_id=experiment_id, owner=caller)
    finished = [
        r
        for r in service.runs_of(session=session, experiment_id=job.id)
        if r.status == JobStatus.SUCCEEDED.value and r.predictions_key
    ]
    if not finished:
        raise NotFound(f"experiment {job.id} has no finished run yet (it is {job.status})")
    names = service.synthetic_dataset_names(session=session, job=job)
    lines = predictions.experiment_table(store=store, runs=finished, names=names, fmt=format)
    return StreamingResponse(lines, media_type=predictions.MEDIA_TYPES[format])


@router.post(
    "/runs",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=RunOut,
    responses=problem_responses(400, 409),
)
def create_run(
    body: RunCreate,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    background: BackgroundTasks,
    response: Response,
) -> RunOut:
    """Queue one training run (an experiment of one grid point)."""
    job, created = service.create_run(session=session, settings=settings, params=body, owner=caller)
    run = service.runs_of(session=session, experiment_id=job.id)[0]
    accept(session=session, settings=settings, background=background, response=response,
           job=job, location=f"/runs/{run.id}", created=created)  # fmt: skip
    return run_out(run)


@router.get("/runs", response_model=RunList)
def list_runs(
    session: SessionDep,
    caller: CallerDep,
    limit: int = Query(50, ge=1, le=1000),
    cursor: CursorQuery = None,
) -> RunList:
    """The caller's runs, newest first."""
    rows, next_cursor = service.list_runs(session=session, owner=caller, limit=limit, cursor=cursor)
    return RunList(items=[run_out(r) for r in rows], next_cursor=next_cursor)


@router.get("/runs/{run_id}", response_model=RunOut, responses=problem_responses(404))
def get_run(run_id: str, session: SessionDep, caller: CallerDep) -> RunOut:
    """A run's config, split counts, per-epoch curve, and test metrics (overall and per
    Fitzpatrick group)."""
    return run_out(service.get_run(session=session, run_id=run_id, owner=caller))


@router.get("/runs/{run_id}/predictions", response_class=Response, responses=_PREDICTIONS)
def run_predictions(
    run_id: str,
    session: SessionDep,
    store: StoreDep,
    caller: CallerDep,
    format: PredictionFormat = "jsonl",
) -> Response:
    """Per test image: id, true label, Fitzpatrick group, the top-3 labels and probabilities."""
    run = service.get_run(session=session, run_id=run_id, owner=caller)
    if run.predictions_key is None:
        raise NotFound(f"run {run.id} has no predictions yet (it is {run.status})")
    body = predictions.run_table(store=store, key=run.predictions_key, fmt=format)
    return Response(body, media_type=predictions.MEDIA_TYPES[format])


@router.get("/runs/{run_id}/plots/{filename}", response_class=Response, responses=_PLOT)
def run_plot(run_id: str, filename: str, session: SessionDep, caller: CallerDep) -> Response:
    """The run's training curve: training-curves.png or training-curves.svg."""
    name, _, fmt = filename.rpartition(".")
    if name != "training-curves" or fmt not in plots.FORMATS:
        raise NotFound(f"no plot {filename!r}; runs have training-curves.png and .svg")
    run = service.get_run(session=session, run_id=run_id, owner=caller)
    return Response(plots.run_plot(run=run, fmt=fmt), media_type=plots.FORMATS[fmt])
