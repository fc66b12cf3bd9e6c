"""Training mixtures: which real and synthetic images a classifier run trains, validates and
tests on (PAPER.md sections 1 and 4). Pure selection logic plus the queries that feed it.

No torch here. Every choice is seeded, and sets are nested: the 8 real images per class of a
seed are the first 8 of its 16, and the k=10 children of an image are the first 10 of its 25,
so points of a dose-response curve differ only by what was added.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from app.db.tables import Dataset, Image
from app.errors import InvalidField

# Parent ids looked up per query (an IN list).
LOOKUP_BATCH = 500


@dataclass(frozen=True)
class ImageRef:
    """What a run needs of one image row."""

    id: str
    sha256: str
    condition: str
    storage_key: str
    skin_tone: int | None = None
    skin_tone_group: str | None = None
    parent_image_id: str | None = None
    strategy: str | None = None
    split: str | None = None


VALIDATION_SPLIT = "validation"


@dataclass(frozen=True)
class Example:
    """One labelled input of a run."""

    image: ImageRef
    label: int
    synthetic: bool = False


@dataclass
class Split:
    """The images of one run, by part, and a summary of the counts per class."""

    classes: list[str]
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    summary: dict[str, Any] = field(default_factory=dict)


def _seeded(seed: int, *parts: str) -> random.Random:
    """A generator for one seed and one purpose (a class, a parent): independent of the order
    in which other classes or parents are visited."""
    text = ":".join([str(seed), *parts]).encode()
    return random.Random(int.from_bytes(hashlib.sha256(text).digest()[:8], "big"))


def _content_order(image: ImageRef) -> tuple[str, str]:
    """Images in the order of their bytes' sha256 before a seeded shuffle, not of their ids:
    ids are drawn at upload, so the same files uploaded again get other ids, and a seed must
    still give the same split (a report remade on a new deployment)."""
    return image.sha256, image.id


def choose_classes(
    *,
    counts: Mapping[str, int],
    conditions: list[str] | None,
    top_n: int | None,
    validation_per_class: int,
) -> list[str]:
    """The run's classes: the given conditions or all of the pool's, optionally the top N by
    count (ties by name); each needs more images than the validation takes. `counts`: the
    training pool's images per condition."""
    if conditions:
        missing = [c for c in conditions if counts.get(c, 0) == 0]
        if missing:
            raise InvalidField(
                f"conditions: no training images of {', '.join(missing)}", field="conditions"
            )
        classes = list(dict.fromkeys(conditions))
    else:
        classes = list(counts)
    classes.sort(key=lambda c: (-counts.get(c, 0), c))
    if top_n is not None:
        classes = classes[:top_n]
    short = [f"{c} ({counts[c]})" for c in classes if counts[c] <= validation_per_class]
    if short and validation_per_class == 0:  # validation comes from the dataset's own split
        raise InvalidField(
            f"conditions: no training images (outside the test and validation splits) of "
            f"{', '.join(c for c in classes if not counts[c])}",
            field="conditions",
        )
    if short:
        raise InvalidField(
            f"conditions: every class needs more than validation_per_class="
            f"{validation_per_class} training images; too few: {', '.join(short)}",
            field="conditions",
        )
    if len(classes) < 2:
        raise InvalidField(
            "conditions: a classifier needs at least two classes", field="conditions"
        )
    return sorted(classes)


def hold_out(
    *, pool: Sequence[ImageRef], classes: list[str], per_class: int
) -> tuple[list[ImageRef], list[ImageRef]]:
    """(the rest of the pool, the test set): `per_class` images of each class drawn once
    for all runs (seed 0, whatever the run's seed), so every run and seed of an experiment,
    and any later experiment, scores the same test images; never from the dataset's own
    validation split. Copies of a test image's bytes stay out of the rest (`split_real` drops
    them)."""
    wanted = set(classes)
    by_class: dict[str, list[ImageRef]] = defaultdict(list)
    seen: set[str] = set()
    for image in sorted(pool, key=_content_order):
        declared = image.split == VALIDATION_SPLIT  # the dataset's own validation stays so
        if image.condition in wanted and image.sha256 not in seen and not declared:
            seen.add(image.sha256)
            by_class[image.condition].append(image)
    test: list[ImageRef] = []
    for condition in classes:
        images = by_class[condition]
        _seeded(0, "test", condition).shuffle(images)
        test.extend(images[:per_class])
    held = {image.id for image in test}
    return [image for image in pool if image.id not in held], test


def split_real(
    *,
    pool: Sequence[ImageRef],
    test: Sequence[ImageRef],
    classes: list[str],
    validation_per_class: int,
    n_real_per_class: int | None,
    seed: int,
) -> tuple[list[ImageRef], list[ImageRef], list[ImageRef], list[ImageRef]]:
    """(training, validation, test, dropped) real images. Training-pool images whose bytes
    are also in the test set are dropped (PAPER.md section 1, step 1); validation is
    `validation_per_class` per class, then training `n_real_per_class` of the rest, both with
    the seed. When the pool has images of the dataset's own validation split, validation is
    drawn from those alone (all of a class's when it has fewer) and none of them trains."""
    wanted = set(classes)
    test_kept = sorted((i for i in test if i.condition in wanted), key=_content_order)
    test_sha = {i.sha256 for i in test_kept}
    by_class: dict[str, list[ImageRef]] = defaultdict(list)
    declared: dict[str, list[ImageRef]] = defaultdict(list)
    dropped: list[ImageRef] = []
    seen: set[str] = set()
    for image in sorted(pool, key=_content_order):
        if image.condition not in wanted:
            continue
        if image.sha256 in test_sha or image.sha256 in seen:
            dropped.append(image)  # the same bytes as a test image, or a duplicate
            continue
        seen.add(image.sha256)
        part = declared if image.split == VALIDATION_SPLIT else by_class
        part[image.condition].append(image)
    train: list[ImageRef] = []
    validation: list[ImageRef] = []
    has_declared = bool(declared)
    for condition in classes:
        images = by_class[condition]
        _seeded(seed, "split", condition).shuffle(images)
        if has_declared:
            candidates = declared[condition]
            _seeded(seed, "validation", condition).shuffle(candidates)
            validation.extend(candidates[:validation_per_class])
            rest = images
        else:
            validation.extend(images[:validation_per_class])
            rest = images[validation_per_class:]
        train.extend(rest if n_real_per_class is None else rest[:n_real_per_class])
    return train, validation, test_kept, dropped


def select_children(
    *,
    children: Iterable[ImageRef],
    parent_sha256: dict[str, str],
    train_real: Sequence[ImageRef],
    synthetic_per_real: int,
    seed: int,
) -> tuple[list[ImageRef], dict[str, int]]:
    """The first k children (in a seeded order per parent) of each selected training image,
    matched by the parent's bytes (sha256), so children of copies in combined datasets count
    and children of validation or test images can never be chosen. Returns the children and,
    per class, how many children were missing (parents with fewer than k)."""
    if synthetic_per_real == 0:
        return [], {}
    wanted = {image.sha256: image for image in train_real}
    by_parent: dict[str, list[ImageRef]] = defaultdict(list)
    for child in children:
        sha = parent_sha256.get(child.parent_image_id or "")
        if sha is not None and sha in wanted:
            by_parent[sha].append(child)
    chosen: list[ImageRef] = []
    missing: Counter[str] = Counter()
    for sha, parent in sorted(wanted.items(), key=lambda item: _content_order(item[1])):
        family = sorted(by_parent.get(sha, []), key=_content_order)
        _seeded(seed, "children", sha).shuffle(family)
        # the parent's label, not the child's: a child is an example of its parent's class
        chosen.extend(
            replace(child, condition=parent.condition) for child in family[:synthetic_per_real]
        )
        missing[parent.condition] += max(0, synthetic_per_real - len(family))
    return chosen, dict(missing)


def build_split(
    *,
    pool: Sequence[ImageRef],
    test: Sequence[ImageRef],
    children: Iterable[ImageRef],
    parent_sha256: dict[str, str],
    classes: list[str],
    validation_per_class: int,
    n_real_per_class: int | None,
    synthetic_per_real: int,
    seed: int,
    test_per_class: int | None = None,
) -> Split:
    """The whole mixture of one run, with its per-class counts. With `test_per_class` the
    test set is held out of `pool` (`test` is then not used)."""
    if test_per_class is not None:
        pool, test = hold_out(pool=pool, classes=classes, per_class=test_per_class)
    train_real, validation, test_kept, dropped = split_real(
        pool=pool,
        test=test,
        classes=classes,
        validation_per_class=validation_per_class,
        n_real_per_class=n_real_per_class,
        seed=seed,
    )
    synthetic, missing = select_children(
        children=children,
        parent_sha256=parent_sha256,
        train_real=train_real,
        synthetic_per_real=synthetic_per_real,
        seed=seed,
    )
    label = {c: i for i, c in enumerate(classes)}

    def examples(images: Iterable[ImageRef], synthetic: bool = False) -> list[Example]:
        return [Example(image=i, label=label[i.condition], synthetic=synthetic) for i in images]

    def per_class(images: Iterable[ImageRef]) -> dict[str, int]:
        counts = Counter(i.condition for i in images)
        return {c: counts[c] for c in classes}

    summary = {
        "classes": classes,
        "train_real": per_class(train_real),
        "train_synthetic": per_class(synthetic),
        "validation": per_class(validation),
        "test": per_class(test_kept),
        "synthetic_missing": {c: missing.get(c, 0) for c in classes},
        "dropped_duplicates_of_test": len(dropped),
        "validation_from": (
            "validation split"
            if any(i.split == VALIDATION_SPLIT for i in validation)
            else "training pool"
        ),
    }
    return Split(
        classes=classes,
        train=examples(train_real) + examples(synthetic, synthetic=True),
        validation=examples(validation),
        test=examples(test_kept),
        summary=summary,
    )


def paper_batch_size(training_rows: int) -> int:
    """The paper's rule (PAPER.md section 4): rows / 10 >= 500 -> 128, >= 100 -> 64,
    >= 10 -> 32, else 8."""
    tenth = training_rows / 10
    if tenth >= 500:
        return 128
    if tenth >= 100:
        return 64
    if tenth >= 10:
        return 32
    return 8


# --- queries ------------------------------------------------------------------------------


def _refs(session: Session, query: Any) -> list[ImageRef]:
    columns = (
        Image.id,
        Image.sha256,
        Image.condition,
        Image.storage_key,
        Image.skin_tone,
        Image.skin_tone_group,
        Image.parent_image_id,
        Image.strategy,
        Image.split,
    )
    rows = session.execute(query.with_only_columns(*columns))
    return [ImageRef(*row) for row in rows]


def real_pool(
    *,
    session: Session,
    dataset_id: str,
    test_split: str,
    test_dataset: str | None,
    test_per_class: int | None = None,
) -> tuple[list[ImageRef], list[ImageRef]]:
    """(training pool, test set) of real images: the dataset's rows outside the test split and
    those in it, or all of its rows and all of the held-out dataset's; with `test_per_class`
    all of its rows and no test set yet (`build_split` holds it out)."""
    base = select(Image).where(Image.dataset_id == dataset_id)
    if test_per_class is not None:
        return _refs(session, base), []
    if test_dataset is not None:
        return _refs(session, base), _refs(
            session, select(Image).where(Image.dataset_id == test_dataset)
        )
    pool = base.where(or_(Image.split.is_(None), Image.split != test_split))
    return _refs(session, pool), _refs(session, base.where(Image.split == test_split))


def synthetic_children(
    *, session: Session, dataset_ids: list[str], strategy: str | None
) -> tuple[list[ImageRef], dict[str, str]]:
    """The images with a parent in the synthetic datasets (of one strategy when given) and the
    sha256 of each of their parents."""
    if not dataset_ids:
        return [], {}
    query = select(Image).where(
        Image.dataset_id.in_(dataset_ids), Image.parent_image_id.is_not(None)
    )
    if strategy is not None:
        query = query.where(Image.strategy == strategy)
    children = _refs(session, query)
    parent_ids = sorted({c.parent_image_id for c in children if c.parent_image_id})
    parent_sha: dict[str, str] = {}
    for start in range(0, len(parent_ids), LOOKUP_BATCH):
        batch = parent_ids[start : start + LOOKUP_BATCH]
        rows = session.execute(select(Image.id, Image.sha256).where(Image.id.in_(batch)))
        parent_sha.update({image_id: sha for image_id, sha in rows})
    return children, parent_sha


def data_fingerprint(*, session: Session, dataset_ids: list[str]) -> dict[str, list[Any]]:
    """Per dataset: image count and the newest image's time, so a run over data that changed
    since is not taken for a finished one."""
    rows = session.execute(
        select(Image.dataset_id, func.count(), func.max(Image.created_at))
        .where(Image.dataset_id.in_(dataset_ids))
        .group_by(Image.dataset_id)
    )
    found = {d: [n, newest.isoformat() if newest else None] for d, n, newest in rows}
    return {d: found.get(d, [0, None]) for d in sorted(set(dataset_ids))}


def pool_counts(
    *,
    session: Session,
    dataset_id: str,
    test_split: str,
    test_dataset: str | None,
    test_per_class: int | None = None,
) -> tuple[dict[str, int], int, dict[str, int]]:
    """(training-pool images per condition, test images, images of the dataset's validation
    split per condition) without loading the rows; with `test_per_class`, the pool is what is
    left of each condition after its test images."""
    base = select(Image.condition, func.count()).where(Image.dataset_id == dataset_id)
    declared = base.where(Image.split == VALIDATION_SPLIT)
    base = base.where(or_(Image.split.is_(None), Image.split != VALIDATION_SPLIT))
    if test_per_class is not None:
        test_count = 0
        counts = {}
        for condition, n in session.execute(base.group_by(Image.condition)):
            counts[condition] = max(n - test_per_class, 0)
            test_count += min(n, test_per_class)
    else:
        if test_dataset is None:
            base = base.where(or_(Image.split.is_(None), Image.split != test_split))
            test = select(func.count()).where(
                Image.dataset_id == dataset_id, Image.split == test_split
            )
        else:
            test = select(func.count()).where(Image.dataset_id == test_dataset)
        counts = {c: n for c, n in session.execute(base.group_by(Image.condition))}
        test_count = int(session.scalar(test) or 0)
    if test_dataset is None and test_per_class is None and test_split == VALIDATION_SPLIT:
        return counts, test_count, {}  # the validation split is the test set here
    validation = {c: n for c, n in session.execute(declared.group_by(Image.condition))}
    return counts, test_count, validation


def check_datasets(
    *,
    session: Session,
    owner_id: str,
    dataset: str,
    test_dataset: str | None,
    synthetic_datasets: list[str],
) -> None:
    """Each named dataset exists, belongs to the caller and is of the right kind."""
    named = [("dataset", dataset, "real"), ("test_dataset", test_dataset, "real")]
    named += [("synthetic_datasets", d, "synthetic") for d in synthetic_datasets]
    for name, dataset_id, kind in named:
        if dataset_id is None:
            continue
        row = session.get(Dataset, dataset_id)
        if row is None or row.owner_id != owner_id:
            raise InvalidField(f"{name}: no dataset {dataset_id!r}", field=name)
        if row.kind != kind:
            raise InvalidField(f"{name}: {dataset_id} is not a {kind} dataset", field=name)
