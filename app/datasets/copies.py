"""The memorisation audit's rows (table `evaluation_pairs`, issue 23): written by an
evaluation's worker, streamed by GET /evaluations/{id}/pairs, and read by `exclude_copies`
(manifests and experiments leave out the synthetic images the latest evaluation flagged).

Here, below the manifest and the experiments, so both can use it; no torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import delete, func, insert, select, true
from sqlalchemy.orm import Session

from app.db.tables import EvaluationPair, Image, Job
from app.errors import InvalidField
from app.schemas import JobStatus

EVALUATION_KIND = "evaluation"
PAIR_COLUMNS = (
    "image_id", "condition", "skin_tone", "strategy", "nearest_image_id", "cosine", "ssim",
    "parent_image_id", "parent_cosine", "parent_ssim", "flagged",
)  # fmt: skip
PAGE = 5000


def latest_evaluation(*, session: Session, owner_id: str, dataset_id: str) -> str | None:
    """The id of the caller's newest succeeded evaluation of a synthetic dataset, or None."""
    return session.scalar(
        select(Job.id)
        .where(
            Job.owner_id == owner_id,
            Job.kind == EVALUATION_KIND,
            Job.dataset_id == dataset_id,
            Job.status == JobStatus.SUCCEEDED.value,
        )
        .order_by(Job.finished_at.desc(), Job.id.desc())
        .limit(1)
    )


def require_evaluation(*, session: Session, owner_id: str, dataset_id: str) -> str:
    """latest_evaluation, or a 422 naming exclude_copies."""
    found = latest_evaluation(session=session, owner_id=owner_id, dataset_id=dataset_id)
    if found is None:
        raise InvalidField(
            f"exclude_copies: dataset {dataset_id} has no finished evaluation, so no image is "
            "known to be a copy; run POST /evaluations on it first",
            field="exclude_copies",
        )
    return found


def flagged_query(evaluation_id: str) -> Any:
    """SELECT image_id of an evaluation's flagged images (for NOT IN)."""
    return select(EvaluationPair.image_id).where(
        EvaluationPair.job_id == evaluation_id, EvaluationPair.flagged == true()
    )


def flagged_ids(*, session: Session, evaluation_id: str) -> set[str]:
    return set(session.scalars(flagged_query(evaluation_id)))


def count_flagged(
    *, session: Session, evaluation_id: str, dataset_id: str, where: Any = None
) -> int:
    """How many images of `dataset_id` the evaluation flagged (and `where` selects, over Image)."""
    query = (
        select(func.count())
        .select_from(Image)
        .where(Image.dataset_id == dataset_id, Image.id.in_(flagged_query(evaluation_id)))
    )
    if where is not None:
        query = query.where(where)
    return int(session.scalar(query) or 0)


def write_pairs(
    *, session: Session, job_id: str, dataset_id: str, rows: Sequence[dict[str, Any]]
) -> None:
    """Replace an evaluation's audit rows (a rerun overwrites). Not committed."""
    session.execute(delete(EvaluationPair).where(EvaluationPair.job_id == job_id))
    for start in range(0, len(rows), PAGE):
        session.execute(
            insert(EvaluationPair),
            [{"job_id": job_id, "dataset_id": dataset_id, **r} for r in rows[start : start + PAGE]],
        )


def iter_pairs(*, session: Session, job_id: str) -> Iterator[dict[str, Any]]:
    """The audit's rows, most similar first (by cosine, then image id), a page at a time."""
    columns = [getattr(EvaluationPair, name) for name in PAIR_COLUMNS]
    offset = 0
    while True:
        rows = session.execute(
            select(*columns)
            .where(EvaluationPair.job_id == job_id)
            .order_by(EvaluationPair.cosine.desc(), EvaluationPair.image_id)
            .offset(offset)
            .limit(PAGE)
        ).all()
        for row in rows:
            yield dict(zip(PAIR_COLUMNS, row, strict=True))
        if len(rows) < PAGE:
            return
        offset += PAGE
