"""The split logic of classifier runs on a crafted dataset (PAPER.md sections 1 and 4):
validation and test never leak into training, children of excluded parents never appear,
counts per class are n_real and n_real x k, and a seed always gives the same split."""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.errors import InvalidField
from app.experiments.mixtures import (
    ImageRef,
    build_split,
    choose_classes,
    paper_batch_size,
    select_children,
)

CLASSES = ["acne", "eczema", "psoriasis"]


def image(name: str, condition: str, sha: str | None = None, **extra: object) -> ImageRef:
    return ImageRef(
        id=name, sha256=sha or f"sha-{name}", condition=condition, storage_key=f"k/{name}",
        **extra,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.fixture
def crafted() -> dict[str, object]:
    """60 training-pool images and 10 test images per class; 6 children of every pool image
    (ids c-<parent>-<j>), and 6 children of every test image."""
    pool = [image(f"{c}-{i:03d}", c) for c in CLASSES for i in range(60)]
    test = [image(f"test-{c}-{i:02d}", c) for c in CLASSES for i in range(10)]
    parents = pool + test
    children = [
        image(f"c-{p.id}-{j}", p.condition, parent_image_id=p.id, strategy="inpaint")
        for p in parents
        for j in range(6)
    ]
    parent_sha = {p.id: p.sha256 for p in parents}
    return {"pool": pool, "test": test, "children": children, "parent_sha": parent_sha}


def split_of(crafted: dict[str, object], *, n_real: int | None, k: int, seed: int = 7):
    return build_split(
        pool=crafted["pool"],  # type: ignore[arg-type]
        test=crafted["test"],  # type: ignore[arg-type]
        children=crafted["children"],  # type: ignore[arg-type]
        parent_sha256=crafted["parent_sha"],  # type: ignore[arg-type]
        classes=CLASSES,
        validation_per_class=40,
        n_real_per_class=n_real,
        synthetic_per_real=k,
        seed=seed,
    )


def test_counts_per_class_are_n_real_and_n_real_times_k(crafted):
    split = split_of(crafted, n_real=8, k=5)
    assert split.summary["train_real"] == dict.fromkeys(CLASSES, 8)
    assert split.summary["train_synthetic"] == dict.fromkeys(CLASSES, 40)
    assert split.summary["validation"] == dict.fromkeys(CLASSES, 40)
    assert split.summary["test"] == dict.fromkeys(CLASSES, 10)
    assert len(split.train) == 3 * 8 + 3 * 40
    # every label is its image's condition; synthetic rows are flagged
    for example in split.train + split.validation + split.test:
        assert CLASSES[example.label] == example.image.condition
    assert sum(e.synthetic for e in split.train) == 120


def test_validation_and_test_never_leak_into_training(crafted):
    split = split_of(crafted, n_real=None, k=6)
    train_real = {e.image.id for e in split.train if not e.synthetic}
    validation = {e.image.id for e in split.validation}
    test = {e.image.id for e in split.test}
    assert not train_real & validation and not train_real & test and not validation & test
    # n_real = all: the rest of the pool, 60 - 40 per class
    assert split.summary["train_real"] == dict.fromkeys(CLASSES, 20)
    # children only of training images: never of validation or test images
    parents = {e.image.parent_image_id for e in split.train if e.synthetic}
    assert parents == train_real
    assert not parents & validation and not parents & test


def test_same_seed_same_split_other_seed_other_split(crafted):
    ids = lambda s: [e.image.id for e in s.train + s.validation]  # noqa: E731
    assert ids(split_of(crafted, n_real=8, k=3, seed=1)) == ids(
        split_of(crafted, n_real=8, k=3, seed=1)
    )
    assert ids(split_of(crafted, n_real=8, k=3, seed=1)) != ids(
        split_of(crafted, n_real=8, k=3, seed=2)
    )


def test_same_files_uploaded_again_give_the_same_split(crafted):
    """Ids are drawn at upload; the split follows the bytes, so a dataset uploaded again (new
    ids, rows in another order) gives the same images per seed, children included."""
    renamed = {i.id: f"again-{len(crafted['pool']) - n:04d}" for n, i in enumerate(
        crafted["pool"] + crafted["test"])}  # fmt: skip
    again = {
        "pool": [replace(i, id=renamed[i.id]) for i in reversed(crafted["pool"])],
        "test": [replace(i, id=renamed[i.id]) for i in crafted["test"]],
        "children": [
            replace(c, id=f"again-{c.id}", parent_image_id=renamed[c.parent_image_id])
            for c in reversed(crafted["children"])
        ],
        "parent_sha": {renamed[k]: v for k, v in crafted["parent_sha"].items()},
    }
    first, second = split_of(crafted, n_real=8, k=3), split_of(again, n_real=8, k=3)
    sha = lambda s: [e.image.sha256 for e in s.train + s.validation + s.test]  # noqa: E731
    assert sha(first) == sha(second)
    children = lambda s: [e.image.id.removeprefix("again-") for e in s.train if e.synthetic]  # noqa: E731
    assert children(first) == children(second)


def test_a_test_set_held_out_per_class_is_one_draw_for_every_seed(crafted):
    """test_per_class: the test set is drawn from the pool once, whatever the run's seed;
    it never meets training or validation, nor does a copy of its bytes or its children."""
    copy = image("acne-copy", "acne", sha="sha-acne-000")  # the bytes of acne-000
    pool = [*crafted["pool"], copy]
    splits = [
        build_split(pool=pool, test=[], children=crafted["children"],
                    parent_sha256=crafted["parent_sha"], classes=CLASSES,
                    validation_per_class=20, n_real_per_class=None, synthetic_per_real=2,
                    seed=seed, test_per_class=10)
        for seed in (1, 2)
    ]  # fmt: skip
    tests = [[e.image.id for e in s.test] for s in splits]
    assert tests[0] == tests[1] and splits[0].summary["test"] == dict.fromkeys(CLASSES, 10)
    for split in splits:
        held = {e.image.sha256 for e in split.test}
        used = {e.image.sha256 for e in split.train + split.validation if not e.synthetic}
        assert not held & used
        parents = {e.image.parent_image_id for e in split.train if e.synthetic}
        assert not parents & set(tests[0])
        # 60 images per class: 10 test, 20 validation, 30 to train; acne's 61st, a copy of
        # acne-000, is dropped whether acne-000 was drawn for the test set or not
        assert split.summary["train_real"] == dict.fromkeys(CLASSES, 30)
    # the draw does not move with the run's seed, but the validation does
    assert [e.image.id for e in splits[0].validation] != [e.image.id for e in splits[1].validation]


def test_sets_are_nested_across_n_real_and_k(crafted):
    small = split_of(crafted, n_real=4, k=2)
    large = split_of(crafted, n_real=8, k=5)
    assert [e.image.id for e in small.validation] == [e.image.id for e in large.validation]
    assert {e.image.id for e in small.train} <= {e.image.id for e in large.train}


def test_test_duplicates_in_the_pool_are_dropped(crafted):
    # a pool image with the same bytes as a test image is not trained or validated on
    pool = list(crafted["pool"])  # type: ignore[call-overload]
    twin = image("acne-twin", "acne", sha="sha-test-acne-00")
    split = build_split(
        pool=[*pool, twin], test=crafted["test"], children=[],  # type: ignore[arg-type]
        parent_sha256={}, classes=CLASSES, validation_per_class=40, n_real_per_class=None,
        synthetic_per_real=0, seed=3,
    )  # fmt: skip
    used = {e.image.id for e in split.train + split.validation}
    assert "acne-twin" not in used
    assert split.summary["dropped_duplicates_of_test"] == 1


def test_children_match_parents_by_bytes_and_take_the_parent_label():
    # a combined dataset copies the parent under a new id: its children still count
    parent = image("copy-of-p", "acne", sha="sha-p")
    children = [
        image(f"c{j}", "eczema", parent_image_id="original-p", strategy="inpaint") for j in range(4)
    ]
    chosen, missing = select_children(
        children=children, parent_sha256={"original-p": "sha-p"}, train_real=[parent],
        synthetic_per_real=6, seed=0,
    )  # fmt: skip
    assert len(chosen) == 4 and {c.condition for c in chosen} == {"acne"}
    assert missing == {"acne": 2}  # k = 6 asked, 4 exist


def test_children_of_excluded_parents_never_appear(crafted):
    split = split_of(crafted, n_real=3, k=6)
    chosen_parents = {e.image.parent_image_id for e in split.train if e.synthetic}
    assert len(chosen_parents) == 9
    excluded = {p.id for p in crafted["pool"]} - {  # type: ignore[attr-defined]
        e.image.id for e in split.train if not e.synthetic
    }
    assert not chosen_parents & excluded


def test_choose_classes_top_n_and_errors_name_the_class():
    counts = {"acne": 100, "eczema": 80, "psoriasis": 50, "rare": 30}
    assert choose_classes(counts=counts, conditions=None, top_n=2, validation_per_class=40) == [
        "acne",
        "eczema",
    ]
    with pytest.raises(InvalidField, match=r"rare \(30\)"):
        choose_classes(counts=counts, conditions=None, top_n=None, validation_per_class=40)
    with pytest.raises(InvalidField, match="no training images of vitiligo"):
        choose_classes(counts=counts, conditions=["acne", "vitiligo"], top_n=None,
                       validation_per_class=40)  # fmt: skip


@pytest.mark.parametrize(
    ("rows", "expected"), [(5000, 128), (4999, 64), (1000, 64), (999, 32), (100, 32), (99, 8)]
)
def test_paper_batch_size_rule(rows, expected):
    assert paper_batch_size(rows) == expected


def test_the_datasets_own_validation_split_is_the_validation(crafted):
    """A dataset uploaded with train / validation / test: validation is drawn from its
    validation split (all of a class's when fewer than validation_per_class), and no image
    of that split ever trains."""
    declared = [image(f"val-{c}-{i}", c, split="validation") for c in CLASSES for i in range(5)]
    pool = [*crafted["pool"], *declared]
    for seed in (1, 2):
        split = build_split(pool=pool, test=crafted["test"], children=[], parent_sha256={},
                            classes=CLASSES, validation_per_class=3, n_real_per_class=None,
                            synthetic_per_real=0, seed=seed)  # fmt: skip
        validation = [e.image for e in split.validation]
        assert {i.split for i in validation} == {"validation"}
        assert split.summary["validation_from"] == "validation split"
        assert split.summary["validation"] == dict.fromkeys(CLASSES, 3)
        # the 60 pool images per class all train; none of the 15 validation-split images
        assert split.summary["train_real"] == dict.fromkeys(CLASSES, 60)
        assert not {e.image.id for e in split.train} & {i.id for i in declared}
    wide = build_split(pool=pool, test=crafted["test"], children=[], parent_sha256={},
                       classes=CLASSES, validation_per_class=40, n_real_per_class=8,
                       synthetic_per_real=0, seed=1)  # fmt: skip
    assert wide.summary["validation"] == dict.fromkeys(CLASSES, 5)  # all there is
