"""The OpenAPI document is the contract (issue 21): its security schemes are the ways a key is
sent, and schemathesis, reading /openapi.json from a live API, sends every operation generated
requests (valid and invalid) and checks that no answer is a server error and that each one's
status, media type, headers and body are what the document says.

The API runs on PostgreSQL (stricter than SQLite: NUL in text is an error there) with no
worker: nothing runs the jobs schemathesis makes, a count of 1,000,000 included, and its broker
is its own embedded one, so no other test's worker sees them either.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from sqlalchemy import text

from app.cli import upgrade_database
from app.config import Settings
from app.db.session import session_factory
from app.storage import make_store
from tests.conftest import ROOT, ApiServer, Stack, Worker, free_port, fresh_pg_database
from tests.factories import SEPARABLE, make_classification_data

ST = str(Path(sys.executable).with_name("st"))
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)
MAX_EXAMPLES = 10  # per operation and phase; deterministic: every run sends the same requests
# File names the plot routes serve, for schemathesis to try beside generated ones
PLOTS = ("accuracy-vs-n-real.png", "skin-tone.svg", "training-curves.png", "training-curves.svg")


@pytest.fixture(scope="module")
def contract_api(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The API alone on a fresh PostgreSQL database, with an embedded broker of its own."""
    tmp = tmp_path_factory.mktemp("contract")
    port = free_port()
    with fresh_pg_database("synthderm_contract") as database_url:
        settings = Settings(
            data_dir=tmp,
            database_url=database_url,
            models_dir=models_dir,
            public_base_url=f"http://127.0.0.1:{port}",
            signing_secret="contract-secret",
        )
        upgrade_database(settings)
        api = ApiServer(settings, port, tmp / "api-contract.log")
        api.start()
        never_started = Worker(settings, tmp / "worker-contract.log", "contract")
        try:
            yield Stack("contract", settings, api, never_started, settings.public_base_url,
                        make_store(settings))  # fmt: skip
        finally:
            api.stop()
            session_factory(database_url).kw["bind"].dispose()
            session_factory.cache_clear()


def seed(stack: Stack, key: str) -> dict[str, list[str] | list[int]]:
    """Datasets with images, a generation job, an export, an experiment and a run, made as a
    client makes them: the ids (and slugs) schemathesis may use."""
    real, synthetic = make_classification_data(
        stack, key, pool_per_class=6, test_per_class=2, children_per_parent=1
    )
    client = stack.client(key)
    job = client.post("/jobs", json={"condition": "psoriasis", "count": 1})
    export = client.post(f"/datasets/{real}/exports", json={"shard_size": 4})
    grid = {
        "dataset": real,
        "validation_per_class": 2,
        "n_real_per_class": [2],
        "synthetic_per_real": [0, 1],
        "synthetic_datasets": [synthetic],
        "seeds": [1],
    }
    experiment = client.post("/experiments", json=grid)
    run = client.post("/runs", json={"dataset": real, "validation_per_class": 2, "seed": 1})
    for response in (job, export, experiment, run):
        assert response.status_code == 202, response.text
    return {
        "datasets": [real, synthetic],
        "real": [real],
        "synthetic": [synthetic],
        "jobs": [job.json()["id"], export.json()["id"]],
        "experiments": [experiment.json()["id"]],
        "runs": [run.json()["id"]],
        "conditions": sorted(SEPARABLE),
        "plots": list(PLOTS),
        "few": [1, 2],  # validation images per class the seeded pool has room for
    }


# Which dictionary a parameter draws from, and how often: path ids half of the time (else an
# unknown id, a 404), references in bodies mostly, so that bodies get past them
BINDINGS = {
    "path.dataset_id": ("datasets", 0.5),
    "path.job_id": ("jobs", 0.5),
    "path.experiment_id": ("experiments", 0.5),
    "path.run_id": ("runs", 0.5),
    "path.filename": ("plots", 0.5),
    "body.condition": ("conditions", 0.8),
    "body.conditions[*]": ("conditions", 0.8),
    "body.source_dataset": ("real", 0.8),
    "body.dataset": ("real", 0.8),
    "body.test_dataset": ("real", 0.8),
    "body.dataset_id": ("synthetic", 0.8),
    "body.synthetic_datasets[*]": ("synthetic", 0.8),
    "body.parts[*].dataset_id": ("datasets", 0.8),
    "body.validation_per_class": ("few", 0.8),
}


def config_toml(dictionaries: dict[str, list[str] | list[int]], key: str) -> str:
    """schemathesis.toml: the key as a bearer token, the seeded values as dictionaries."""
    lines = [f"headers = {{ Authorization = {json.dumps('Bearer ' + key)} }}", ""]
    for name, values in dictionaries.items():
        lines += [f"[dictionaries.{name}]", f"values = {json.dumps(values)}", ""]
    lines.append("[parameters]")
    for parameter, (name, probability) in BINDINGS.items():
        lines.append(f'"{parameter}" = {{ dictionary = "{name}", probability = {probability} }}')
    return "\n".join(lines) + "\n"


def test_every_operation_keeps_to_the_document(contract_api: Stack, tmp_path: Path) -> None:
    key = contract_api.new_key("contract")
    config = tmp_path / "schemathesis.toml"
    config.write_text(config_toml(seed(contract_api, key), key))
    document = contract_api.client().get("/openapi.json").json()
    operations = sum(len(methods) for methods in document["paths"].values())
    jobs_before = count(contract_api, "SELECT count(*) FROM jobs")

    started = time.monotonic()
    run = subprocess.run(
        [ST, "--config-file", str(config), "--no-color", "run",
         f"{contract_api.base_url}/openapi.json", "--checks", ",".join(CHECKS),
         "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic", "--no-shrink",
         "--workers", "1", "--request-timeout", "60", "--max-failures", "25",
         "--report", "junit", "--report-dir", str(tmp_path / "report")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    output = run.stdout + run.stderr
    api_log = contract_api.api.log()[-6000:]
    assert run.returncode == 0, f"{output[-20000:]}\n--- the API's log (end):\n{api_log}"
    # not vacuous: every operation was tested, and requests got as far as making jobs
    tested = re.search(r"Tested:\s+(\d+)", output)
    assert tested is not None and int(tested.group(1)) == operations, output[-3000:]
    cases = re.search(r"(\d+) generated, \1 passed", output)
    assert cases is not None, output[-3000:]
    assert count(contract_api, "SELECT count(*) FROM jobs") > jobs_before + 10
    print(f"schemathesis: {operations} operations, {cases.group(1)} cases in {elapsed:.0f} s")


def count(stack: Stack, sql: str) -> int:
    with stack.session() as session:
        return int(session.execute(text(sql)).scalar_one())


def test_manifest_lines_are_manifest_rows(contract_api: Stack) -> None:
    """The one body schemathesis cannot read (JSON lines): each line against the document."""
    key = contract_api.new_key("manifest")
    real, _ = make_classification_data(
        contract_api, key, pool_per_class=2, test_per_class=1, children_per_parent=0
    )
    client = contract_api.client(key)
    document = client.get("/openapi.json").json()
    operation = document["paths"]["/datasets/{dataset_id}/manifest"]["get"]
    row_schema = operation["responses"]["200"]["content"]["application/x-ndjson"]["schema"]
    response = client.get(f"/datasets/{real}/manifest")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = response.text.splitlines()
    assert len(lines) == 3 * len(SEPARABLE)
    for line in lines:
        jsonschema.validate(json.loads(line), row_schema)
    # and a row that breaks the schema is caught: the check can fail
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**json.loads(lines[0]), "width": "wide"}, row_schema)


# --- the security schemes ------------------------------------------------------------------


def test_document_declares_both_ways_to_send_a_key(contract_api: Stack) -> None:
    document = contract_api.client().get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {
        "type": "http", "scheme": "bearer", "description": schemes["bearer"]["description"],
    }  # fmt: skip
    assert schemes["apiKey"]["type"] == "apiKey"
    assert (schemes["apiKey"]["in"], schemes["apiKey"]["name"]) == ("header", "X-API-Key")

    paths = document["paths"]
    # a protected operation takes either scheme, and says it answers 401 with a problem
    for path, method in (("/jobs", "post"), ("/datasets/{dataset_id}/manifest", "get")):
        operation = paths[path][method]
        assert operation["security"] == [{"bearer": []}, {"apiKey": []}], path
        unauthorized = operation["responses"]["401"]
        assert set(unauthorized["content"]) == {"application/problem+json"}
        assert unauthorized["headers"]["WWW-Authenticate"]["required"] is True
    # health and the signed downloads need none (the URL's signature is the credential)
    for path in ("/healthz", "/readyz", "/files/{key}"):
        assert "security" not in paths[path]["get"], path
    # every operation but those names its schemes
    public = {"/healthz", "/readyz", "/metrics", "/files/{key}"}
    unprotected = [
        f"{method.upper()} {path}"
        for path, methods in paths.items()
        for method, operation in methods.items()
        if path not in public and not operation.get("security")
    ]
    assert unprotected == []


def test_document_matches_validation(contract_api: Stack) -> None:
    """Where validation refuses a value, the document says so (issue 21's examples)."""
    document = contract_api.client().get("/openapi.json").json()
    schemas = document["components"]["schemas"]

    def query(path: str, name: str) -> dict:
        parameters = document["paths"][path]["get"]["parameters"]
        return next(p["schema"] for p in parameters if p["name"] == name)

    backbone = schemas["ExperimentCreate"]["properties"]["backbone"]
    assert not re.search(backbone["pattern"], "")  # an empty backbone is refused
    assert re.search(backbone["pattern"], "efficientnet-lite0")
    assert re.search(backbone["pattern"], "timm:resnet50")
    assert not re.search(backbone["pattern"], "timm:")
    manifest_format = query("/datasets/{dataset_id}/manifest", "format")
    assert schemas[manifest_format["$ref"].rsplit("/", 1)[1]]["enum"] == ["jsonl", "csv", "parquet"]
    for path in ("/jobs", "/datasets", "/experiments", "/runs"):
        cursor = query(path, "cursor")["anyOf"][0]
        assert re.search(cursor["pattern"], "6113b0c9-0d4e-4c0b-9c36-0b9c1e4f1a2b"), path
        assert not re.search(cursor["pattern"], "no-such-job"), path
    predictions = query("/runs/{run_id}/predictions", "format")
    assert predictions["enum"] == ["jsonl", "csv"]

    # and the server refuses what the document refuses, with the document's problem
    client = contract_api.client(contract_api.new_key("strict"))
    refused = client.get("/jobs", params={"cursor": "no-such-job"})
    assert refused.status_code == 422
    assert refused.headers["content-type"] == "application/problem+json"
    problem = {"$ref": "#/components/schemas/Problem", "components": {"schemas": schemas}}
    jsonschema.validate(refused.json(), problem)
