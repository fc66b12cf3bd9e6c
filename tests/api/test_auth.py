"""API keys: every route but health, docs and signed downloads needs one; keys see only their
own jobs and datasets; only a key's hash is stored."""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Sequence

import httpx
import pytest
from fastapi.routing import APIRoute
from sqlalchemy import text
from starlette.routing import BaseRoute, Mount, Route

from app.keys import authenticate, cached_key, revoke_key
from app.main import create_app
from tests.conftest import Stack, count_rows, wait_for
from tests.helpers import submit

# Routes that answer without a key, on purpose.
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/files/{key:path}"),  # the URL's signature is the credential
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
}

# For operators, not API keys: its own token, or loopback (tests/api/test_health.py).
OPERATOR = {("GET", "/metrics")}

# The protected endpoints the service must have (the route walk below covers any others).
PROTECTED = {
    ("GET", "/jobs"),
    ("POST", "/jobs"),
    ("GET", "/jobs/{job_id}"),
    ("POST", "/jobs/{job_id}/cancel"),
    ("GET", "/datasets"),
    ("GET", "/datasets/{dataset_id}"),
    ("GET", "/datasets/{dataset_id}/manifest"),
    ("GET", "/models"),
    ("GET", "/conditions"),
    ("POST", "/experiments"),
    ("GET", "/experiments/{experiment_id}"),
    ("GET", "/experiments/{experiment_id}/plots/{filename}"),
    ("POST", "/runs"),
    ("GET", "/runs/{run_id}"),
    ("GET", "/runs/{run_id}/predictions"),
}

JOB_BODY = {"condition": "psoriasis", "skin_tone": 5, "count": 2}


def _walk(routes: Sequence[BaseRoute], prefix: str, found: set[tuple[str, str]]) -> None:
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI's include_router
        if included is not None:
            context = getattr(route, "include_context", None)
            _walk(included.routes, prefix + getattr(context, "prefix", ""), found)
        elif isinstance(route, Mount):
            _walk(route.routes, prefix + route.path, found)
        elif isinstance(route, Route | APIRoute):
            for method in route.methods or ():
                if method != "HEAD":
                    found.add((method, prefix + route.path))
        else:  # a kind of route this walk cannot see into: look at it before trusting it
            raise AssertionError(f"unknown route kind {route!r}")


def app_routes(stack: Stack) -> set[tuple[str, str]]:
    """(method, path template) of every route of the application (HEAD left out)."""
    app = create_app(stack.settings)
    found: set[tuple[str, str]] = set()
    _walk(app.routes, "", found)
    # the walk sees at least every operation the OpenAPI document lists
    documented = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    walked = {(m, re.sub(r"\{(\w+):\w+\}", r"{\1}", p)) for m, p in found}
    assert documented <= walked, documented - walked
    return found


def concrete(path: str) -> str:
    """A request path for a template: every parameter replaced by an unknown id."""
    return re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path)


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, (response.request.method, response.url, response.text)
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers.get("www-authenticate") == "Bearer"
    body = response.json()
    assert body["status"] == 401
    assert isinstance(body["detail"], str) and len(body["detail"].split()) >= 3


def call(client: httpx.Client, method: str, path: str, **kwargs: object) -> httpx.Response:
    if method == "POST" and path == "/jobs":
        kwargs.setdefault("json", JOB_BODY)
    return client.request(method, path, **kwargs)  # type: ignore[arg-type]


def test_route_table_is_what_the_tests_cover(deployed: Stack) -> None:
    routes = app_routes(deployed)
    assert routes >= PROTECTED, PROTECTED - routes
    assert routes >= PUBLIC, PUBLIC - routes
    assert routes >= OPERATOR, OPERATOR - routes


def test_every_route_but_the_public_ones_needs_a_key(deployed: Stack) -> None:
    routes = app_routes(deployed) - PUBLIC - OPERATOR
    assert routes  # never vacuous
    jobs_before = count_rows(deployed, "SELECT count(*) FROM jobs")
    wrong = "sdk_" + uuid.uuid4().hex
    anonymous = deployed.client()
    with_wrong_bearer = deployed.client(wrong)
    with_wrong_header = httpx.Client(
        base_url=deployed.base_url, headers={"X-API-Key": wrong}, timeout=30
    )
    not_bearer = httpx.Client(
        base_url=deployed.base_url, headers={"Authorization": f"Basic {wrong}"}, timeout=30
    )
    for method, template in sorted(routes):
        path = concrete(template)
        for client in (anonymous, with_wrong_bearer, with_wrong_header, not_bearer):
            assert_unauthorized(call(client, method, path))
    assert count_rows(deployed, "SELECT count(*) FROM jobs") == jobs_before


def test_missing_and_wrong_key_say_different_things(deployed: Stack) -> None:
    missing = deployed.client().get("/jobs").json()["detail"]
    wrong = deployed.client("sdk_" + uuid.uuid4().hex).get("/jobs").json()["detail"]
    assert missing != wrong
    assert "Bearer" in missing


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json", "/docs", "/redoc"])
def test_public_routes_answer_without_a_key(deployed: Stack, path: str) -> None:
    response = deployed.client().get(path)
    assert response.status_code == 200, response.text


def test_signed_file_route_checks_its_signature(stack: Stack) -> None:
    client = stack.client()  # no key: the signature is the credential
    key = "datasets/x/psoriasis/y.png"
    response = client.get(f"/files/{key}")
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    fields = {e["field"] for e in response.json()["errors"]}
    assert fields == {"expires", "signature"}

    bad = client.get(f"/files/{key}", params={"expires": 4102444800, "signature": "forged"})
    if stack.name == "embedded":
        assert bad.status_code == 403, bad.text
    else:  # S3: downloads go to presigned S3 URLs, never through the API
        assert bad.status_code == 404, bad.text
    assert bad.headers["content-type"].startswith("application/problem+json")
    assert bad.content != b""
    # a signature with a non-ASCII character is as wrong as any other (it was a 500:
    # hmac.compare_digest refuses such a str), found by tests/api/test_openapi_contract.py
    odd = client.get(f"/files/{key}", params={"expires": 4102444800, "signature": "\u00bf"})
    assert odd.status_code == bad.status_code, odd.text


def test_signed_file_route_rejects_a_tampered_or_expired_url(embedded: Stack) -> None:
    client = embedded.client(embedded.new_key())
    job = embedded.wait_job(client, submit(client, count=1)["id"])
    line = client.get(f"/datasets/{job['dataset_id']}/manifest").text.splitlines()[0]
    url = httpx.URL(json.loads(line)["url"])
    good = httpx.get(url, timeout=30)
    assert good.status_code == 200 and good.content[:4] == b"\x89PNG"

    params = dict(url.params)
    tampered = url.copy_with(params={**params, "signature": params["signature"][::-1]})
    assert httpx.get(tampered, timeout=30).status_code == 403
    other_key = url.copy_with(path=url.path.replace(".png", "-other.png"))
    assert httpx.get(other_key, timeout=30).status_code == 403
    later = url.copy_with(params={**params, "expires": str(int(params["expires"]) + 1)})
    assert httpx.get(later, timeout=30).status_code == 403

    # correctly signed by the service's own secret, but expired: refused
    key = json.loads(line)["storage_key"]
    past = int(time.time()) - 10
    signature = embedded.store.signature(key, past)
    expired = url.copy_with(params={"expires": past, "signature": signature})
    assert httpx.get(expired, timeout=30).status_code == 403
    # correctly signed for an object that does not exist: 404
    gone = key.replace(".png", "-gone.png")
    future = int(time.time()) + 600
    missing = httpx.get(
        f"{embedded.base_url}/files/{gone}",
        params={"expires": future, "signature": embedded.store.signature(gone, future)},
        timeout=30,
    )
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")


def test_revoked_key_is_refused(stack: Stack) -> None:
    raw = stack.new_key("soon-revoked")
    key_id = stack.owners[-1]
    client = stack.client(raw)
    assert client.get("/jobs").status_code == 200  # the API now remembers the key
    with stack.session() as session:
        assert revoke_key(session=session, key_id=key_id)
    # revoked by another process (as `synthderm keys revoke` does): the API refuses the key
    # once it has remembered it for auth_cache_ttl_s (README: the revocation delay)
    ttl = stack.settings.auth_cache_ttl_s
    wait_for(lambda: client.get("/jobs").status_code == 401, timeout=ttl + 10, what="401")
    for method, path in (("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/conditions")):
        assert_unauthorized(call(client, method, path))
    assert count_rows(stack, "SELECT count(*) FROM jobs WHERE owner_id = :o", o=key_id) == 0


def test_revoking_forgets_the_key_in_its_own_process(embedded: Stack) -> None:
    raw = embedded.new_key("revoked-here")
    with embedded.session() as session:
        key = authenticate(session=session, raw_key=raw, remember=True)
        assert key is not None
    assert cached_key(raw, max_age_s=60) is key  # remembered: no query for a minute
    assert cached_key(raw, max_age_s=0) is None  # a TTL of 0 remembers nothing
    with embedded.session() as session:
        assert revoke_key(session=session, key_id=key.id)
    assert cached_key(raw, max_age_s=60) is None  # forgotten at once, in this process
    with embedded.session() as session:
        assert authenticate(session=session, raw_key=raw, remember=True) is None


def test_x_api_key_header_works(stack: Stack) -> None:
    raw = stack.new_key()
    client = httpx.Client(base_url=stack.base_url, headers={"X-API-Key": raw}, timeout=30)
    assert client.get("/conditions").status_code == 200
    slugs = {c["slug"] for c in client.get("/conditions").json()["items"]}
    assert "psoriasis" in slugs
    job = submit(client, count=1)
    assert client.get(f"/jobs/{job['id']}").json()["id"] == job["id"]
    stack.wait_job(client, job["id"])


def test_tenancy_other_keys_see_nothing(stack: Stack) -> None:
    a = stack.client(stack.new_key("alice"))
    b_key = stack.new_key("bob")
    b_id = stack.owners[-1]
    b = stack.client(b_key)

    job = stack.wait_job(a, submit(a, count=2)["id"])
    dataset_id = job["dataset_id"]
    # A's own view, so the 404s below are about ownership, not about missing rows
    assert a.get(f"/datasets/{dataset_id}").status_code == 200
    assert len(a.get(f"/datasets/{dataset_id}/manifest").text.splitlines()) == 2

    for method, path in (
        ("GET", f"/jobs/{job['id']}"),
        ("POST", f"/jobs/{job['id']}/cancel"),
        ("GET", f"/datasets/{dataset_id}"),
        ("GET", f"/datasets/{dataset_id}/manifest"),
        ("GET", f"/datasets/{dataset_id}/manifest?format=csv"),
    ):
        response = b.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert b".png" not in response.content

    # B's cancel of A's active job is refused and leaves it active
    active = submit(a, count=16)
    assert b.post(f"/jobs/{active['id']}/cancel").status_code == 404
    assert a.get(f"/jobs/{active['id']}").json()["status"] in ("queued", "running")
    # canceling while its running chunk finishes the batch it is sampling
    assert a.post(f"/jobs/{active['id']}/cancel").json()["status"] in ("canceled", "canceling")

    assert b.get("/jobs").json() == {"items": [], "next_cursor": None}
    assert b.get("/jobs", params={"status": "succeeded"}).json()["items"] == []
    assert b.get("/datasets").json()["items"] == []
    a_jobs = {j["id"] for j in a.get("/jobs").json()["items"]}
    assert a_jobs == {job["id"], active["id"]}
    assert dataset_id in {d["id"] for d in a.get("/datasets").json()["items"]}

    # B cannot append to A's dataset, and nothing is created for B
    response = b.post("/jobs", json={**JOB_BODY, "dataset_id": dataset_id})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert [e["field"] for e in response.json()["errors"]] == ["dataset_id"]
    assert "dataset_id" in response.json()["detail"]
    assert count_rows(stack, "SELECT count(*) FROM jobs WHERE owner_id = :o", o=b_id) == 0
    assert count_rows(stack, "SELECT count(*) FROM datasets WHERE owner_id = :o", o=b_id) == 0
    assert count_rows(stack, "SELECT count(*) FROM jobs WHERE dataset_id = :d", d=dataset_id) == 1
    assert len(a.get(f"/datasets/{dataset_id}/manifest").text.splitlines()) == 2


def test_only_the_hash_of_a_key_is_stored(stack: Stack) -> None:
    raw = stack.new_key("hashed")
    key_id = stack.owners[-1]
    with stack.session() as session:
        rows = session.execute(text("SELECT * FROM api_keys")).mappings().all()
    assert len(rows) >= 1
    for row in rows:
        for column, value in row.items():
            assert value is None or raw not in str(value), column
    mine = next(r for r in rows if r["id"] == key_id)
    assert mine["key_hash"] == hashlib.sha256(raw.encode()).hexdigest()
    assert mine["name"] == "hashed"
    assert raw.startswith(mine["prefix"]) and len(mine["prefix"]) < len(raw)
