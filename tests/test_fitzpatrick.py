"""app.fitzpatrick: the one Fitzpatrick grouping rule, and its SQL form (the manifest's
skin_tone_group filter) and the export's sample field checked against it."""

from __future__ import annotations

import pytest
from sqlalchemy import insert, select

from app.datasets.export_files import skin_tone_group as export_group
from app.datasets.manifest import skin_tone_group_of
from app.db.session import make_engine, session_factory
from app.db.tables import ApiKey, Base, Dataset, Image
from app.fitzpatrick import UNKNOWN_GROUP, fitzpatrick_group

CASES = [
    (1, None, "I-II"),
    (2, None, "I-II"),
    (3, None, "III-IV"),
    (4, None, "III-IV"),
    (5, None, "V-VI"),
    (6, None, "V-VI"),
    (2, "V-VI", "I-II"),  # a known tone wins over the source's group
    (None, None, "unknown"),
    (-1, None, "unknown"),  # Fitzpatrick17k's "not labelled"
    (0, None, "unknown"),
    (7, None, "unknown"),
    (-1, "V-VI", "V-VI"),  # DDI gives only groups
    (None, "III-IV", "III-IV"),
    (0, "I-II", "I-II"),
    (None, "unknown", "unknown"),
    (None, "VII", "unknown"),
]


@pytest.mark.parametrize(("skin_tone", "skin_tone_group", "expected"), CASES)
def test_fitzpatrick_group(skin_tone: int | None, skin_tone_group: str | None, expected: str):
    assert fitzpatrick_group(skin_tone=skin_tone, skin_tone_group=skin_tone_group) == expected


def test_fitzpatrick_group_defaults_to_no_source_group():
    assert fitzpatrick_group(skin_tone=-1) == "unknown"
    assert fitzpatrick_group(skin_tone=5) == "V-VI"


def test_sql_and_export_groups_follow_the_same_rule(database_url: str) -> None:
    """Every case above, stored as image rows: the SQL expression the manifest filters on and
    the export's sample field give the Python rule's group (NULL/None for unknown)."""
    engine = make_engine(database_url)
    Base.metadata.create_all(engine)
    rows = [
        {"id": f"img-{i}", "dataset_id": "d", "source": "real", "condition": "c",
         "skin_tone": tone, "skin_tone_group": group, "width": 1, "height": 1,
         "sha256": "0" * 64, "size_bytes": 1, "storage_key": f"k{i}", "provenance": {}}
        for i, (tone, group, _) in enumerate(CASES)
    ]  # fmt: skip
    with session_factory(database_url)() as session:
        session.add(ApiKey(id="k", name="k", prefix="k", key_hash="k"))
        session.add(Dataset(id="d", owner_id="k", name="d", kind="real"))
        session.flush()
        session.execute(insert(Image), rows)
        session.commit()
        by_id = dict(session.execute(select(Image.id, skin_tone_group_of())).all())
        images = {image.id: image for image in session.scalars(select(Image))}
    engine.dispose()
    for i, (_, _, expected) in enumerate(CASES):
        want = None if expected == UNKNOWN_GROUP else expected
        assert by_id[f"img-{i}"] == want, CASES[i]
        assert export_group(images[f"img-{i}"]) == want, CASES[i]
