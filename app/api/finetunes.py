"""/finetunes: fine-tune a generator on a real dataset (the paper's DreamBooth per condition or
joint, its inpainting variant, LoRA); progress, validation images, loss curves, cancel."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Query, Response, status

from app import engine
from app.api.accepted import accept
from app.api.deps import CallerDep, CursorQuery, SessionDep, SettingsDep, StoreDep
from app.api.problems import file_responses, problem_responses
from app.errors import NotFound
from app.finetunes import plots
from app.finetunes import service as finetunes
from app.finetunes.views import finetune_out, loss_curves, samples_of
from app.schemas import Name
from app.schemas.finetunes import FinetuneCreate, FinetuneList, FinetuneOut, FinetuneSampleList

router = APIRouter(tags=["finetunes"], responses=problem_responses(401, 422))

_PLOT = file_responses("The figure.", plots.FORMATS.values())


@router.post(
    "/finetunes",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=FinetuneOut,
    responses=problem_responses(400, 409),
)
def create_finetune(
    body: FinetuneCreate,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    background: BackgroundTasks,
    response: Response,
) -> FinetuneOut:
    """Queue a fine-tune on the `gpu` queue: one model per condition (or one joint model),
    each registered under GET /models when it finishes."""
    job, created = finetunes.create_finetune(
        session=session, settings=settings, params=body, owner=caller
    )
    accept(session=session, settings=settings, background=background, response=response,
           job=job, location=f"/finetunes/{job.id}", created=created)  # fmt: skip
    return finetune_out(session, job)


@router.get("/finetunes", response_model=FinetuneList)
def list_finetunes(
    session: SessionDep,
    caller: CallerDep,
    limit: int = Query(50, ge=1, le=1000),
    cursor: CursorQuery = None,
) -> FinetuneList:
    """The caller's fine-tunes, newest first."""
    rows, next_cursor = engine.list_jobs(
        session=session,
        owner=caller,
        status=None,
        limit=limit,
        cursor=cursor,
        kind=finetunes.FINETUNE_KIND,
    )
    return FinetuneList(items=[finetune_out(session, j) for j in rows], next_cursor=next_cursor)


@router.get(
    "/finetunes/{finetune_id}", response_model=FinetuneOut, responses=problem_responses(404)
)
def get_finetune(finetune_id: str, session: SessionDep, caller: CallerDep) -> FinetuneOut:
    """Status; progress in steps with the current loss, elapsed and estimated time left, per
    model; the images that trained; the error."""
    job = finetunes.get_finetune(session=session, finetune_id=finetune_id, owner=caller)
    return finetune_out(session, job)


@router.post(
    "/finetunes/{finetune_id}/cancel",
    response_model=FinetuneOut,
    responses=problem_responses(404, 409),
)
def cancel_finetune(
    finetune_id: str, session: SessionDep, settings: SettingsDep, caller: CallerDep
) -> FinetuneOut:
    """Cancel: models not started never start; a training model stops at its next step and is
    not registered. Models already registered stay."""
    job = finetunes.cancel_finetune(session=session, finetune_id=finetune_id, owner=caller)
    engine.emit_job_events(session=session, job_id=job.id, settings=settings)  # job.completed
    session.commit()
    return finetune_out(session, job)


@router.get(
    "/finetunes/{finetune_id}/samples",
    response_model=FinetuneSampleList,
    responses=problem_responses(404),
)
def list_samples(
    finetune_id: str,
    session: SessionDep,
    store: StoreDep,
    caller: CallerDep,
    model: Name | None = Query(None, max_length=120, description="One model's images only."),
) -> FinetuneSampleList:
    """The validation images: fixed prompts and seeds every validation_every_steps, each with
    its step and a download URL."""
    job = finetunes.get_finetune(session=session, finetune_id=finetune_id, owner=caller)
    return FinetuneSampleList(items=samples_of(session, job, store, model_id=model))


@router.get("/finetunes/{finetune_id}/plots/{filename}", response_class=Response, responses=_PLOT)
def finetune_plot(
    finetune_id: str, filename: str, session: SessionDep, caller: CallerDep
) -> Response:
    """The loss curves (loss.png or loss.svg): a line per model."""
    name, _, fmt = filename.rpartition(".")
    if name not in plots.PLOTS or fmt not in plots.FORMATS:
        raise NotFound(f"no plot {filename!r}; ask for loss.png or loss.svg")
    job = finetunes.get_finetune(session=session, finetune_id=finetune_id, owner=caller)
    title = f"Fine-tune {job.params.get('name') or job.params['family_id']}: training loss"
    figure = plots.loss_figure(loss_curves(session, job), title=title)
    return Response(plots.render(figure, fmt), media_type=plots.FORMATS[fmt])
