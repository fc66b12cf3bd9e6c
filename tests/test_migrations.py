"""Alembic migrations on a fresh PostgreSQL database and a fresh SQLite file: upgrade, the
seeded vocabulary, downgrade, upgrade again, and no drift from the ORM's metadata."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.session import make_engine
from app.db.tables import Base
from app.vocabulary import list_conditions
from tests.conftest import ROOT

TABLES = {
    "api_keys",
    "conditions",
    "condition_owners",
    "generator_models",
    "finetune_members",
    "finetune_images",
    "finetune_losses",
    "evaluation_pairs",
    "datasets",
    "jobs",
    "job_chunks",
    "job_parents",
    "images",
    "runs",
    "feature_cache",
    "webhook_deliveries",
}
NOW = datetime(2026, 12, 2, tzinfo=UTC)
PAPER_SLUGS = [
    "allergic-contact-dermatitis",
    "basal-cell-carcinoma",
    "folliculitis",
    "lichen-planus",
    "lupus-erythematosus",
    "neutrophilic-dermatoses",
    "photodermatoses",
    "psoriasis",
    "sarcoidosis",
    "squamous-cell-carcinoma",
]


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def alembic_config(database_url: str) -> Config:
    """The configuration app.cli.upgrade_database uses."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def slugs(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT slug FROM conditions ORDER BY slug")).scalars())


def revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def schema(engine: Engine) -> dict[str, object]:
    """What inspection sees of every table: columns, keys, indexes."""
    inspector = inspect(engine)
    out: dict[str, object] = {}
    for table in sorted(inspector.get_table_names()):
        out[table] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)
            ],
            "pk": inspector.get_pk_constraint(table)["constrained_columns"],
            "fks": sorted(
                (tuple(f["constrained_columns"]), f["referred_table"])
                for f in inspector.get_foreign_keys(table)
            ),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                for i in inspector.get_indexes(table)
            ),
            "uniques": sorted(
                tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)
            ),
        }
    return out


def drift(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, Base.metadata))


def test_upgrade_downgrade_upgrade(database_url: str, engine: Engine) -> None:
    config = alembic_config(database_url)
    assert tables(engine) == set()

    command.upgrade(config, "head")
    assert tables(engine) == TABLES | {"alembic_version"}
    assert slugs(engine) == PAPER_SLUGS
    first = schema(engine)
    with engine.connect() as conn:
        names = {s: n for s, n in conn.execute(text("SELECT slug, name FROM conditions"))}
    assert names["basal-cell-carcinoma"] == "basal cell carcinoma"
    assert revision(engine) is not None

    command.downgrade(config, "base")
    assert tables(engine) - {"alembic_version"} == set()
    assert revision(engine) is None

    command.upgrade(config, "head")
    assert tables(engine) == TABLES | {"alembic_version"}
    assert slugs(engine) == PAPER_SLUGS  # seeded once, not twice
    assert schema(engine) == first


def test_migrated_schema_matches_the_orm(database_url: str, engine: Engine) -> None:
    command.upgrade(alembic_config(database_url), "head")
    assert drift(engine) == []


def test_comparison_notices_drift(database_url: str, engine: Engine) -> None:
    """The drift check above is not blind: a schema missing an index is reported."""
    command.upgrade(alembic_config(database_url), "head")
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_jobs_status"))
    diffs = drift(engine)
    assert any(d[0] == "add_index" and d[1].name == "ix_jobs_status" for d in diffs), diffs  # type: ignore[index]


def test_condition_names_become_words(database_url: str, engine: Engine) -> None:
    """0005: a condition ingested before it as 'acne-vulgaris' is named in words after it."""
    config = alembic_config(database_url)
    command.upgrade(config, "0004")
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO conditions (slug, name, created_at) VALUES (:s, :n, :t)"),
            [
                {"s": "acne-vulgaris", "n": "acne-vulgaris", "t": NOW},
                {"s": "nail-fungus", "n": "nail_fungus", "t": NOW},
                {"s": "t-cell-lymphoma", "n": "t-cell lymphoma", "t": NOW},  # a space: kept
            ],
        )
    command.upgrade(config, "0005")  # (0007 drops conditions no data uses, as these are)
    with engine.connect() as conn:
        names = dict(conn.execute(text("SELECT slug, name FROM conditions")).all())
    assert names["acne-vulgaris"] == "acne vulgaris"
    assert names["nail-fungus"] == "nail fungus"
    assert names["t-cell-lymphoma"] == "t-cell lymphoma"
    assert names["basal-cell-carcinoma"] == "basal cell carcinoma"


def test_idempotency_keys_become_per_kind_and_rows_survive(
    database_url: str, engine: Engine
) -> None:
    """0006: a key is unique per (owner, kind, key); on SQLite the rebuild of `jobs` keeps the
    rows that reference it (chunks would cascade away with foreign keys enforced)."""
    config = alembic_config(database_url)
    command.upgrade(config, "0005")
    job = {"owner_id": "k1", "status": "queued", "count": 1, "seed": 0, "chunk_size": 1,
           "params": "{}", "done": 0, "t": NOW}  # fmt: skip
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO api_keys (id, name, prefix, key_hash, created_at) "
                 "VALUES ('k1', 'n', 'p', 'h', :t)"), {"t": NOW},
        )  # fmt: skip
        conn.execute(
            text("INSERT INTO jobs (id, owner_id, kind, status, count, seed, chunk_size, params, "
                 "done, idempotency_key, created_at) VALUES ('j1', :owner_id, 'generate', "
                 ":status, :count, :seed, :chunk_size, :params, :done, 'K', :t)"), job,
        )  # fmt: skip
        conn.execute(
            text('INSERT INTO job_chunks (job_id, "index", start, stop, status, done, attempts, '
                 "dispatches) VALUES ('j1', 0, 0, 1, 'pending', 0, 0, 0)"),
        )  # fmt: skip
    command.upgrade(config, "head")
    insert_other = text(
        "INSERT INTO jobs (id, owner_id, kind, status, count, seed, chunk_size, params, done, "
        "idempotency_key, created_at) VALUES (:id, :owner_id, :kind, :status, :count, :seed, "
        ":chunk_size, :params, :done, 'K', :t)"
    )
    with engine.begin() as conn:  # the same key, another kind: allowed now
        conn.execute(insert_other, {**job, "id": "j2", "kind": "experiment"})
    with pytest.raises(IntegrityError), engine.begin() as conn:  # the same kind: refused
        conn.execute(insert_other, {**job, "id": "j3", "kind": "experiment"})
    assert count_where(engine, "SELECT count(*) FROM job_chunks WHERE job_id = 'j1'") == 1
    assert count_where(engine, "SELECT count(*) FROM jobs WHERE request_hash IS NULL") == 2

    command.downgrade(config, "0005")  # the later job of another kind loses the shared key
    with engine.connect() as conn:
        keys = dict(conn.execute(text("SELECT id, idempotency_key FROM jobs")).all())
    assert keys == {"j1": "K", "j2": None}
    assert count_where(engine, "SELECT count(*) FROM job_chunks WHERE job_id = 'j1'") == 1


def test_condition_owners_backfilled_from_datasets_and_jobs(
    database_url: str, engine: Engine
) -> None:
    """0007: a condition that is not seeded belongs to the keys whose datasets hold images of
    it and whose jobs name it; a seeded one stays everyone's; one nobody uses is dropped."""
    config = alembic_config(database_url)
    command.upgrade(config, "0006")
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO api_keys (id, name, prefix, key_hash, created_at) "
                 "VALUES (:id, :id, 'p', :id, :t)"),
            [{"id": k, "t": NOW} for k in ("k1", "k2", "k3")],
        )  # fmt: skip
        conn.execute(
            text("INSERT INTO conditions (slug, name, created_at) VALUES (:s, :n, :t)"),
            [{"s": "junk-a", "n": "junk a", "t": NOW},  # k1's images
             {"s": "granuloma-annulare", "n": "granuloma annulare", "t": NOW},  # k1 and k2
             {"s": "orphan", "n": "orphan", "t": NOW}],  # nobody's
        )  # fmt: skip
        conn.execute(
            text("INSERT INTO datasets (id, owner_id, name, kind, description, created_at) "
                 "VALUES (:id, :o, 'd', 'real', '', :t)"),
            [{"id": "d1", "o": "k1", "t": NOW}, {"id": "d2", "o": "k3", "t": NOW}],
        )  # fmt: skip
        conn.execute(
            text("INSERT INTO images (id, dataset_id, source, condition, width, height, sha256, "
                 "size_bytes, storage_key, provenance, created_at) VALUES (:id, :d, 'real', :c, "
                 "8, 8, 'x', 1, 'k', '{}', :t)"),
            [{"id": "i1", "d": "d1", "c": "junk-a", "t": NOW},
             {"id": "i2", "d": "d1", "c": "junk-a", "t": NOW},
             {"id": "i3", "d": "d1", "c": "granuloma-annulare", "t": NOW},
             {"id": "i4", "d": "d2", "c": "psoriasis", "t": NOW}],  # seeded: no owner
        )  # fmt: skip
        conn.execute(
            text("INSERT INTO jobs (id, owner_id, kind, status, condition, count, seed, "
                 "chunk_size, params, done, created_at) VALUES (:id, :o, 'generate', "
                 "'succeeded', :c, 1, 0, 1, '{}', 1, :t)"),
            [{"id": "j1", "o": "k2", "c": "granuloma-annulare", "t": NOW},
             {"id": "j2", "o": "k1", "c": "granuloma-annulare", "t": NOW},
             {"id": "j3", "o": "k3", "c": "psoriasis", "t": NOW}],
        )  # fmt: skip
    command.upgrade(config, "0007")
    with engine.connect() as conn:
        owners = set(conn.execute(text("SELECT slug, owner_id, name FROM condition_owners")))
    assert owners == {
        ("junk-a", "k1", "junk a"),
        ("granuloma-annulare", "k1", "granuloma annulare"),
        ("granuloma-annulare", "k2", "granuloma annulare"),
    }
    assert slugs(engine) == sorted([*PAPER_SLUGS, "junk-a", "granuloma-annulare"])
    with Session(engine) as session:  # what each key sees now
        visible = {
            key: {c.slug for c in list_conditions(session=session, owner_id=key)}
            for key in ("k1", "k2", "k3")
        }
    assert visible == {
        "k1": {*PAPER_SLUGS, "junk-a", "granuloma-annulare"},
        "k2": {*PAPER_SLUGS, "granuloma-annulare"},
        "k3": set(PAPER_SLUGS),
    }

    command.downgrade(config, "0006")  # the vocabulary is global again; nothing else is lost
    assert "condition_owners" not in tables(engine)
    assert slugs(engine) == sorted([*PAPER_SLUGS, "junk-a", "granuloma-annulare"])
    assert count_where(engine, "SELECT count(*) FROM jobs") == 3


def count_where(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar_one())
