"""The `synthderm` command, run as a user runs it: a subprocess on a fresh embedded install."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from app.config import Settings
from app.db.session import session_scope
from app.db.tables import ApiKey, GeneratorModel
from app.keys import authenticate
from app.vocabulary import BUILTIN_MODELS
from tests.conftest import ROOT, settings_env


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    empty_models = tmp_path / "models"
    empty_models.mkdir()
    return Settings(data_dir=tmp_path, models_dir=empty_models)


def synthderm(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = settings_env(settings)
    env["COLUMNS"] = "200"  # rich wraps its stderr messages at the terminal width
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    return result


@pytest.fixture
def migrated(settings: Settings) -> Settings:
    ok(synthderm(settings, "db", "upgrade"))
    return settings


def test_db_upgrade_creates_the_database(settings: Settings) -> None:
    database = settings.data_dir / "synthderm.sqlite"
    assert not database.exists()
    result = ok(synthderm(settings, "db", "upgrade"))
    assert database.is_file()
    assert "database at head" in result.stderr
    # again: nothing to do, still fine
    ok(synthderm(settings, "db", "upgrade"))


def test_admin_commands_before_any_migration_say_what_to_run(settings: Settings) -> None:
    # a fresh machine: `keys create` before `make run` (or `db upgrade`) has made the tables
    for args in (("keys", "create", "--name", "alice"), ("keys", "list"), ("models", "list")):
        result = synthderm(settings, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "has no synthderm tables yet: run `synthderm db upgrade` first" in result.stderr
        assert "Traceback" not in result.stdout + result.stderr
    ok(synthderm(settings, "db", "upgrade"))
    assert ok(synthderm(settings, "keys", "create", "--name", "alice")).stdout.startswith("sdk_")


def test_keys_create_list_revoke(migrated: Settings) -> None:
    created = ok(synthderm(migrated, "keys", "create", "--name", "alice"))
    lines = created.stdout.splitlines()
    assert len(lines) == 1, created.stdout
    raw = lines[0]
    assert raw.startswith("sdk_") and len(raw) > 20
    assert raw not in created.stderr

    with session_scope(migrated.database_url) as session:
        row = authenticate(session=session, raw_key=raw)
        assert row is not None
        assert row.name == "alice"
        key_id = row.id
        assert row.key_hash == hashlib.sha256(raw.encode()).hexdigest()
        assert session.scalars(select(ApiKey.name)).all() == ["alice"]

    listed = ok(synthderm(migrated, "keys", "list"))
    assert "alice" in listed.stdout
    assert key_id in listed.stdout
    assert "active" in listed.stdout
    assert raw not in listed.stdout + listed.stderr
    assert raw[len(raw) // 2 :] not in listed.stdout  # at most the prefix shows

    # the webhook signing secret: printed once on stderr, the one stored; rotated on demand
    with session_scope(migrated.database_url) as session:
        secret = session.scalars(select(ApiKey.webhook_secret)).one()
    assert secret.startswith("whsec_")
    assert f"webhook signing secret (shown only now): {secret}" in created.stderr
    assert secret not in listed.stdout + listed.stderr
    rotated = ok(synthderm(migrated, "keys", "rotate-webhook-secret", key_id))
    new_secret = rotated.stdout.strip()
    assert new_secret.startswith("whsec_") and new_secret != secret
    with session_scope(migrated.database_url) as session:
        assert session.scalars(select(ApiKey.webhook_secret)).one() == new_secret
    missing = synthderm(migrated, "keys", "rotate-webhook-secret", "no-such-key")
    assert missing.returncode == 1 and "no key 'no-such-key'" in missing.stderr

    revoked = ok(synthderm(migrated, "keys", "revoke", key_id))
    assert key_id in revoked.stdout
    with session_scope(migrated.database_url) as session:
        assert authenticate(session=session, raw_key=raw) is None
    assert "revoked" in ok(synthderm(migrated, "keys", "list")).stdout


def test_keys_revoke_unknown_key_fails(migrated: Settings) -> None:
    result = synthderm(migrated, "keys", "revoke", "no-such-key")
    assert result.returncode != 0
    assert "no-such-key" in result.stderr


def test_models_register_reads_the_models_own_sampler_defaults(
    migrated: Settings, models_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "guided"
    shutil.copytree(models_dir / "tiny-random", folder)
    settings_file = folder / "synthderm.json"

    def registered() -> GeneratorModel | None:
        with session_scope(migrated.database_url) as session:
            return session.get(GeneratorModel, "guided")

    for bad, says in (
        ("{not json", "is not JSON"),
        ('{"guidance": 12}', '"sampling"'),
        ('{"sampling": {"guidance_scale": 51}}', "sampling.guidance_scale"),
        ('{"sampling": {"guidance_scale": 12, "sheduler": "ddim"}}', "sampling.sheduler"),
    ):
        settings_file.write_text(bad)
        refused = synthderm(migrated, "models", "register", "guided", str(folder))
        assert refused.returncode == 1, bad
        assert "synthderm.json" in refused.stderr and says in refused.stderr, refused.stderr
        assert registered() is None  # nothing half-registered

    settings_file.write_text('{"sampling": {"guidance_scale": 7.5, "num_inference_steps": 30}}')
    ok(synthderm(migrated, "models", "register", "guided", str(folder)))
    row = registered()
    assert row is not None
    assert row.sampling_defaults == {"guidance_scale": 7.5, "num_inference_steps": 30}
    settings_file.unlink()  # registering again follows the folder
    ok(synthderm(migrated, "models", "register", "guided", str(folder)))
    row = registered()
    assert row is not None and row.sampling_defaults is None


def listed_ids(settings: Settings) -> list[str]:
    return [
        line.split("\t")[0]
        for line in ok(synthderm(settings, "models", "list")).stdout.splitlines()
    ]


def test_models_register_and_list(migrated: Settings, models_dir: Path, tmp_path: Path) -> None:
    # `db upgrade` registers the committed generators (issue 24) and nothing else
    builtins = sorted(BUILTIN_MODELS)
    assert listed_ids(migrated) == builtins

    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    refused = synthderm(migrated, "models", "register", "broken", str(not_a_model))
    assert refused.returncode != 0
    assert "model_index.json" in refused.stderr
    assert listed_ids(migrated) == builtins

    tiny = models_dir / "tiny-random"
    ok(synthderm(migrated, "models", "register", "tiny-x", str(tiny)))
    listed = ok(synthderm(migrated, "models", "list")).stdout.splitlines()
    assert [line.split("\t")[0] for line in listed] == sorted([*builtins, "tiny-x"])
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in listed}
    pipeline_class, path = rows["tiny-x"]
    assert pipeline_class.endswith("Pipeline")
    assert Path(path) == tiny.resolve()
    with session_scope(migrated.database_url) as session:
        assert sorted(session.scalars(select(GeneratorModel.id)).all()) == sorted(
            [*builtins, "tiny-x"]
        )
