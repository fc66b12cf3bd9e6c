"""Building a dataset from others: e.g. a real dataset's train split plus the synthetic
children of exactly those images (the mixture the classifier protocol trains on).

Rows are copied (the objects are shared, never copied) with ids derived from the new dataset
and the original id, and parent links are remapped to the copies, so the new dataset's
manifest is self-contained; each copy records the id it was copied from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, insert, select, update
from sqlalchemy.orm import Session

from app.db.tables import ApiKey, Dataset, Image, utcnow
from app.errors import InvalidField
from app.ids import copy_id, new_id

BATCH = 5000


@dataclass(frozen=True)
class Part:
    """The images of one dataset to take, with optional filters. `children_of` (an index into
    the parts list) keeps only images whose parent was taken by that part."""

    dataset_id: str
    condition: str | None = None
    skin_tone: int | None = None
    strategy: str | None = None
    source: str | None = None
    split: str | None = None
    children_of: int | None = None


def _selection(part: Part) -> Select[Any]:
    query = select(Image).where(Image.dataset_id == part.dataset_id)
    for column, value in (
        (Image.condition, part.condition),
        (Image.skin_tone, part.skin_tone),
        (Image.strategy, part.strategy),
        (Image.source, part.source),
        (Image.split, part.split),
    ):
        if value is not None:
            query = query.where(column == value)
    return query


def _batches(session: Session, query: Select[Any]) -> Iterator[list[Image]]:
    last: str | None = None
    while True:
        page = query if last is None else query.where(Image.id > last)
        rows = list(session.scalars(page.order_by(Image.id).limit(BATCH)))
        if not rows:
            return
        yield rows
        last = rows[-1].id


def combine(
    *, session: Session, owner: ApiKey, name: str, parts: list[Part], description: str = ""
) -> tuple[Dataset, int]:
    """Create the combined dataset; returns it and its image count. Not committed."""
    # 1. check the parts
    kinds = _checked_kinds(session=session, owner=owner, parts=parts)
    combined = Dataset(
        id=new_id(),
        owner_id=owner.id,
        name=name,
        kind="real" if kinds == {"real"} else "synthetic" if kinds == {"synthetic"} else "mixed",
        description=description,
    )
    session.add(combined)
    session.flush()

    # 2. copy the rows part by part, remapping parent links to the copies
    copier = _Copier(dataset_id=combined.id)
    taken: list[set[str]] = []
    for part in parts:
        allowed = taken[part.children_of] if part.children_of is not None else None
        taken.append(copier.copy_part(session, part, allowed))

    # 3. children copied before their parents: point them at the parents' copies
    for child, parent in copier.orphans:
        if parent in copier.copied:
            session.execute(
                update(Image).where(Image.id == child).values(parent_image_id=copier.copied[parent])
            )
    return combined, copier.total


def _checked_kinds(*, session: Session, owner: ApiKey, parts: list[Part]) -> set[str]:
    """The kinds of the parts' datasets; InvalidField for a part that names no dataset of the
    caller's, or a `children_of` that names no earlier part."""
    if not parts:
        raise InvalidField("parts: at least one part is needed", field="parts")
    kinds = set()
    for number, part in enumerate(parts):
        dataset = session.get(Dataset, part.dataset_id)
        if dataset is None or dataset.owner_id != owner.id:
            raise InvalidField(
                f"parts.{number}.dataset_id: no dataset {part.dataset_id!r}",
                field=f"parts.{number}.dataset_id",
            )
        if part.children_of is not None and not 0 <= part.children_of < number:
            raise InvalidField(
                f"parts.{number}.children_of: must name an earlier part (0..{number - 1})",
                field=f"parts.{number}.children_of",
            )
        kinds.add(dataset.kind)
    return kinds


@dataclass
class _Copier:
    """Copies image rows into one dataset, each image once, and remembers the copies' ids."""

    dataset_id: str
    copied: dict[str, str] = field(default_factory=dict)  # original id -> copy id
    orphans: list[tuple[str, str]] = field(default_factory=list)  # (copy, original parent)
    total: int = 0

    def copy_part(self, session: Session, part: Part, allowed: set[str] | None) -> set[str]:
        """Copy a part's images (when `allowed` is set, only children of those); returns the
        original ids the part took."""
        mine: set[str] = set()
        for rows in _batches(session, _selection(part)):
            values = []
            for row in rows:
                if allowed is not None and row.parent_image_id not in allowed:
                    continue
                mine.add(row.id)
                if row.id not in self.copied:  # the same image named by two parts: once
                    values.append(self._copy(row))
            if values:
                session.execute(insert(Image), values)
                self.total += len(values)
            session.expunge_all()
        return mine

    def _copy(self, row: Image) -> dict[str, Any]:
        new = copy_id(self.dataset_id, row.id)
        self.copied[row.id] = new
        record = {c.key: getattr(row, c.key) for c in Image.__table__.columns}
        record.update(
            id=new,
            dataset_id=self.dataset_id,
            job_id=None,
            index=None,
            created_at=utcnow(),
            parent_image_id=self.copied.get(row.parent_image_id or "", row.parent_image_id),
            provenance={**(row.provenance or {}), "copied_from": row.id,
                        "copied_from_dataset": row.dataset_id, "job_id": row.job_id},
        )  # fmt: skip
        if row.parent_image_id and row.parent_image_id not in self.copied:
            self.orphans.append((new, row.parent_image_id))
        return record
