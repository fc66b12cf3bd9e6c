"""Classifier runs and experiments: every query on `runs`, from the API's side (create, list,
cancel, resume) and the worker's (claim, epochs, results, a finished twin's reuse).

An experiment is a job of kind `experiment` whose chunk i is run i, so dispatch, recovery,
cancel and progress are the jobs' own. The grid and the config key are in grid.py. No torch
here: the training is in workers/train.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from app import engine
from app.config import Settings
from app.datasets import copies
from app.db.owned import get_owned
from app.db.paging import newest_first
from app.db.tables import ApiKey, Dataset, Job, JobChunk, Run, utcnow
from app.engine import ChunkStatus
from app.errors import Conflict, InvalidField
from app.experiments.grid import SHARED_FIELDS, config_key, expand_grid
from app.experiments.leakage import check_generator_leakage
from app.experiments.mixtures import check_datasets, choose_classes, data_fingerprint, pool_counts
from app.ids import new_id
from app.schemas import ExperimentCreate, JobStatus, RunCreate

EXPERIMENT_KIND = "experiment"
# kept on the job's own columns, not in its params
WEBHOOK_FIELDS = ("webhook", "webhook_events")


def _check_classes(*, session: Session, shared: dict[str, Any]) -> list[str]:
    """The classes a request trains on, or InvalidField when its test or validation lacks them."""
    if shared["test_per_class"] is not None and shared["test_dataset"] is not None:
        raise InvalidField(
            "test_per_class: the test set is either held out of the dataset or test_dataset, "
            "not both",
            field="test_per_class",
        )
    counts, test_count, declared = pool_counts(
        session=session,
        dataset_id=shared["dataset"],
        test_split=shared["test_split"],
        test_dataset=shared["test_dataset"],
        test_per_class=shared["test_per_class"],
    )
    if test_count == 0:
        where = (
            f"dataset {shared['test_dataset']}"
            if shared["test_dataset"]
            else f"split {shared['test_split']!r} of dataset {shared['dataset']}"
        )
        field = "test_dataset" if shared["test_dataset"] else "test_split"
        raise InvalidField(f"{field}: no test images in {where}", field=field)
    classes = choose_classes(
        counts=counts,
        conditions=shared["conditions"],
        top_n=shared["top_n_classes"],
        # validation drawn from the dataset's own validation split leaves the pool whole
        validation_per_class=0 if declared else shared["validation_per_class"],
    )
    unvalidated = [c for c in classes if not declared.get(c)] if declared else []
    if unvalidated:
        raise InvalidField(
            f"conditions: the dataset's validation split has no images of "
            f"{', '.join(unvalidated)}; validation is drawn from that split when the dataset "
            "has one",
            field="conditions",
        )
    return classes


def create_experiment(
    *,
    session: Session,
    settings: Settings,
    params: ExperimentCreate,
    owner: ApiKey,
    name: str | None = None,
    digest: str | None = None,
) -> tuple[Job, bool]:
    """Validate a grid and insert its job, chunks and runs; (job, created). Not committed.
    `digest`: the request's hash when it is not this body's (POST /runs)."""
    # 1. idempotency: the same key and request return the experiment they made before (a key
    # is scoped to the owner and the kind; another request with it is a Conflict)
    digest = digest or engine.request_hash(
        "POST /experiments", params.model_dump(mode="json", exclude={"idempotency_key"})
    )
    existing = engine.job_for_request(session=session, owner_id=owner.id, kind=EXPERIMENT_KIND,
                                      key=params.idempotency_key, request_hash=digest)  # fmt: skip
    if existing is not None:
        return existing, False

    # 2. the data: datasets, classes, the grid
    check_datasets(
        session=session,
        owner_id=owner.id,
        dataset=params.dataset,
        test_dataset=params.test_dataset,
        synthetic_datasets=params.synthetic_datasets,
    )
    shared = {name: getattr(params, name) for name in SHARED_FIELDS}
    shared["backbone"] = shared["backbone"] or settings.classifier_backbone
    if params.exclude_copies:  # the evaluation each synthetic dataset's flags come from (only
        # when asked, so the config keys of earlier runs stay as they were)
        shared["copy_audits"] = {
            d: copies.require_evaluation(session=session, owner_id=owner.id, dataset_id=d)
            for d in params.synthetic_datasets
        }
    classes = _check_classes(session=session, shared=shared)
    configs = expand_grid(params)
    leakage = check_generator_leakage(session=session, params=params, classes=classes)
    fingerprint = data_fingerprint(
        session=session,
        dataset_ids=[params.dataset, *params.synthetic_datasets]
        + ([params.test_dataset] if params.test_dataset else []),
    )

    # 3. the job, one chunk and one run per grid point
    webhook = engine.subscription(settings=settings, params=params)
    now = utcnow()
    try:
        job = engine.insert_job(
            session=session,
            owner=owner,
            kind=EXPERIMENT_KIND,
            dataset_id=params.dataset,
            count=len(configs),
            chunk_size=1,
            seed=params.seeds[0],
            params={
                **params.model_dump(mode="json", exclude={"idempotency_key", *WEBHOOK_FIELDS}),
                **shared,
                "name": name or params.name or f"experiment on {params.dataset}",
                "classes": classes,
                **({"generator_leakage": leakage} if leakage else {}),
            },
            idempotency_key=params.idempotency_key,
            request_hash=digest,
            created_at=now,
            **webhook,
        )
    except engine.KeyRace as race:  # a concurrent request with this key made it first
        return race.job, False
    session.execute(
        insert(Run),
        [
            {
                "id": new_id(),
                "owner_id": owner.id,
                "job_id": job.id,
                "index": i,
                "status": JobStatus.QUEUED.value,
                "config": {**shared, **config},
                "config_key": config_key(shared=shared, config=config, fingerprint=fingerprint),
                "epoch": 0,
                "created_at": now,
            }
            for i, config in enumerate(configs)
        ],
    )
    return job, True


def create_run(
    *, session: Session, settings: Settings, params: RunCreate, owner: ApiKey
) -> tuple[Job, bool]:
    """One run: an experiment of a single grid point. Not committed."""
    if params.synthetic_per_real > 0 and len(params.synthetic_datasets) != 1:
        raise InvalidField(
            "synthetic_datasets: a run with synthetic_per_real > 0 takes exactly one "
            "synthetic dataset (an experiment takes several)",
            field="synthetic_datasets",
        )
    grid = ExperimentCreate(
        **params.model_dump(
            exclude={
                "n_real_per_class",
                "synthetic_per_real",
                "strategy",
                "augmentation",
                "seed",
                "synthetic_datasets",
            }
        ),
        n_real_per_class=[params.n_real_per_class],
        synthetic_per_real=[params.synthetic_per_real],
        synthetic_datasets=params.synthetic_datasets if params.synthetic_per_real else [],
        strategies=[params.strategy],
        augmentation=[params.augmentation],
        seeds=[params.seed],
    )
    digest = engine.request_hash(
        "POST /runs", params.model_dump(mode="json", exclude={"idempotency_key"})
    )
    return create_experiment(session=session, settings=settings, params=grid, owner=owner,
                             name=params.name or "run", digest=digest)  # fmt: skip


def get_experiment(*, session: Session, experiment_id: str, owner: ApiKey) -> Job:
    """The caller's experiment (its job), or NotFound."""
    return get_owned(
        session=session,
        table=Job,
        row_id=experiment_id,
        owner_id=owner.id,
        what="experiment",
        kind=EXPERIMENT_KIND,
    )


def runs_of(*, session: Session, experiment_id: str) -> list[Run]:
    """An experiment's runs in grid order."""
    return list(session.scalars(select(Run).where(Run.job_id == experiment_id).order_by(Run.index)))


def synthetic_dataset_names(*, session: Session, job: Job) -> dict[str, str]:
    """id -> name of the synthetic datasets an experiment draws from (for its labels)."""
    ids = list(job.params.get("synthetic_datasets") or [])
    if not ids:
        return {}
    rows = session.execute(select(Dataset.id, Dataset.name).where(Dataset.id.in_(ids)))
    return {dataset_id: name for dataset_id, name in rows}


def get_run(*, session: Session, run_id: str, owner: ApiKey) -> Run:
    """The caller's run, or NotFound."""
    return get_owned(session=session, table=Run, row_id=run_id, owner_id=owner.id, what="run")


def list_runs(
    *, session: Session, owner: ApiKey, limit: int, cursor: str | None
) -> tuple[list[Run], str | None]:
    """The caller's runs, newest first, keyset-paged on (created_at, id)."""
    query = select(Run).where(Run.owner_id == owner.id)
    return newest_first(
        session=session, query=query, table=Run, owner_id=owner.id, limit=limit, cursor=cursor
    )


def cancel_experiment(*, session: Session, experiment_id: str, owner: ApiKey) -> Job:
    """Cancel an experiment: queued runs never start, a running one stops at its next epoch.
    Not committed."""
    job = get_experiment(session=session, experiment_id=experiment_id, owner=owner)
    engine.cancel_job(session=session, job_id=job.id, owner=owner)
    session.execute(
        update(Run)
        .where(Run.job_id == job.id, Run.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.CANCELED.value, finished_at=utcnow())
    )
    return job


def resume_experiment(*, session: Session, experiment_id: str, owner: ApiKey) -> Job:
    """Queue again the runs of a canceled or failed experiment that did not finish; finished
    runs are not redone. Not committed; the caller dispatches after the commit."""
    job = get_experiment(session=session, experiment_id=experiment_id, owner=owner)
    if job.status not in (JobStatus.CANCELED.value, JobStatus.FAILED.value):
        raise Conflict(f"experiment {job.id} is {job.status}; only canceled or failed ones resume")
    unfinished = [s.value for s in ChunkStatus if s != ChunkStatus.SUCCEEDED]
    session.execute(
        update(JobChunk)
        .where(JobChunk.job_id == job.id, JobChunk.status.in_(unfinished))
        .values(
            status=ChunkStatus.PENDING.value,
            dispatched_at=None,
            worker=None,
            error=None,
            attempts=0,
        )
    )
    session.execute(
        update(Run)
        .where(Run.job_id == job.id, Run.status != JobStatus.SUCCEEDED.value)
        .values(status=JobStatus.QUEUED.value, error=None, epoch=0, finished_at=None)
    )
    job.status = JobStatus.QUEUED.value
    job.error = None
    job.canceled_at = None
    job.finished_at = None
    return job


# --- the worker's side --------------------------------------------------------------------


@dataclass(frozen=True)
class RunClaim:
    """What a worker needs to train one run."""

    run_id: str
    experiment_id: str
    index: int
    config: dict[str, Any]
    config_key: str
    owner_id: str


def run_of_chunk(*, session: Session, job_id: str, index: int) -> RunClaim:
    """The run that chunk `index` of an experiment trains."""
    run = session.scalar(select(Run).where(Run.job_id == job_id, Run.index == index))
    if run is None:
        raise LookupError(f"experiment {job_id} has no run {index}")
    return RunClaim(
        run_id=run.id,
        experiment_id=job_id,
        index=index,
        config=dict(run.config),
        config_key=run.config_key,
        owner_id=run.owner_id,
    )


def finished_twin(*, session: Session, claim: RunClaim) -> Run | None:
    """A succeeded run of the same owner, config and data: its results are reused."""
    return session.scalar(
        select(Run)
        .where(
            Run.owner_id == claim.owner_id,
            Run.config_key == claim.config_key,
            Run.status == JobStatus.SUCCEEDED.value,
            Run.id != claim.run_id,
        )
        .order_by(Run.finished_at)
        .limit(1)
    )


def start_run(*, session: Session, run_id: str) -> None:
    """Mark a run running (a retry starts over). Commits."""
    session.execute(
        update(Run)
        .where(Run.id == run_id)
        .values(status=JobStatus.RUNNING.value, started_at=utcnow(), epoch=0, history=[],
                error=None)
    )  # fmt: skip
    session.commit()


def record_epoch(
    *, session: Session, run_id: str, epoch: int, history: list[dict[str, Any]], split: Any
) -> None:
    """A finished epoch: the run's curve so far. Commits."""
    session.execute(
        update(Run).where(Run.id == run_id).values(epoch=epoch, history=history, split=split)
    )
    session.commit()


def finish_run(*, session: Session, run_id: str, status: str, **values: Any) -> None:
    """Close a run with its results (metrics, history, split, ...) or its error. Commits."""
    session.execute(
        update(Run).where(Run.id == run_id).values(status=status, finished_at=utcnow(), **values)
    )
    session.commit()


def copy_results(*, session: Session, run_id: str, twin: Run) -> None:
    """Reuse a finished twin's results instead of training again. Commits."""
    finish_run(
        session=session,
        run_id=run_id,
        status=JobStatus.SUCCEEDED.value,
        split=twin.split,
        history=twin.history,
        epoch=twin.epoch,
        best_epoch=twin.best_epoch,
        metrics=twin.metrics,
        predictions_key=twin.predictions_key,
        timings=twin.timings,
        reused_from=twin.reused_from or twin.id,
    )
