"""Signed webhooks (issue 21) end to end: real receivers on 127.0.0.1 sockets that verify the
Standard Webhooks signature with the key's secret, one that fails twice then succeeds, one
that never answers, and one holding the wrong secret; the delivery log; refused URLs.

The stack's workers consume `gpu` and `train`; a worker of the `webhooks` queue (threads, as
`synthderm run` and compose start it) is started here per stack with short webhook settings.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.db.tables import ApiKey
from app.keys import authenticate
from tests.conftest import Stack, Worker, wait_for
from tests.factories import make_classification_data
from tests.helpers import assert_problem, submit

# what the webhooks worker runs with: quick timeouts and retries
WEBHOOK_SETTINGS = {
    "webhook_timeout_s": 1.0,
    "webhook_max_attempts": 3,
    "webhook_backoff_s": 0.3,
    "webhook_redeliver_after_s": 3.0,
}
TRAINING = {"image_size": 64, "max_epochs": 1, "validation_per_class": 2, "seeds": [1]}


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: int = 300) -> bool:
    """A receiver's check, written from the Standard Webhooks specification (as the README
    shows it): HMAC-SHA256 over id.timestamp.body, keyed by the base64 part of the secret."""
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance_s:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    expected = base64.b64encode(digest).decode()
    offered = [s.removeprefix("v1,") for s in headers["webhook-signature"].split()]
    return any(hmac.compare_digest(expected, s) for s in offered)


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 in a thread. `script` says how to answer each request in
    turn (the last entry repeats): an HTTP status, or "hang" (never answer in time). With a
    secret it answers 401 to a request whose signature does not verify."""

    script: list[int | str]
    secret: str | None = None
    requests: list[tuple[dict[str, str], bytes, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                valid = receiver.secret is None or verify(receiver.secret, headers, body)
                turn = len(receiver.requests)
                receiver.requests.append((headers, body, valid))
                answer = receiver.script[min(turn, len(receiver.script) - 1)]
                if answer == "hang":
                    time.sleep(4)
                    return  # the connection closes without an answer
                code = int(answer) if valid else 401
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _headers, body, _valid in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class WebhookWorker(Worker):
    """The `webhooks` queue's worker, as `synthderm run` starts it."""

    def command(self) -> list[str]:
        return ["celery", "-A", "workers.celery_app", "worker", "-Q", "webhooks", "--pool",
                "threads", "--concurrency", "4", "-n", f"hooks-{uuid.uuid4().hex[:6]}@%h",
                "--loglevel", "INFO"]  # fmt: skip


@pytest.fixture(scope="module")
def webhook_workers() -> Iterator[dict[str, WebhookWorker]]:
    started: dict[str, WebhookWorker] = {}
    yield started
    for worker in started.values():
        worker.stop()


@pytest.fixture
def hooks(stack: Stack, webhook_workers: dict[str, WebhookWorker]) -> Stack:
    """A stack whose `webhooks` queue has a worker."""
    worker = webhook_workers.get(stack.name)
    if worker is None or worker.proc is None or worker.proc.poll() is not None:
        settings = stack.settings.model_copy(update=WEBHOOK_SETTINGS)
        log = stack.api.log_path.parent / f"webhooks-{stack.name}.log"
        worker = webhook_workers[stack.name] = WebhookWorker(settings, log, stack.name)
        worker.start()
        worker.wait_ready()
    return stack


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.close()


def secret_of(stack: Stack, raw_key: str) -> str:
    with stack.session() as session:
        key = authenticate(session=session, raw_key=raw_key)
        assert key is not None
        return key.webhook_secret


def deliveries(client: httpx.Client, path: str) -> list[dict[str, Any]]:
    response = client.get(f"{path}/deliveries")
    assert response.status_code == 200, response.text
    return response.json()["items"]


def settled(client: httpx.Client, path: str, count: int) -> list[dict[str, Any]]:
    """The delivery log once it holds `count` deliveries, none pending."""

    def done() -> list[dict[str, Any]] | None:
        items = deliveries(client, path)
        return (
            items if len(items) >= count and all(d["status"] != "pending" for d in items) else None
        )

    return wait_for(done, timeout=60, interval=0.3, what=f"{count} deliveries of {path} settled")


def test_signed_events_reach_a_receiver_that_checks_them(hooks: Stack, receivers) -> None:
    raw = hooks.new_key()
    secret = secret_of(hooks, raw)
    receiver = Receiver([200], secret=secret)
    receivers.append(receiver)
    client = hooks.client(raw)

    # 2 chunks (8 and 2 images); progress is throttled (the tests' stacks: one event per 600
    # s): the first chunk's progress goes, and the end is sent whatever the throttle says
    job = submit(client, count=10, webhook=receiver.url)
    assert job["webhook"] == receiver.url
    assert job["webhook_events"] == ["started", "progress", "completed"]
    assert secret not in json.dumps(job)
    hooks.wait_job(client, job["id"], timeout=300)
    log = settled(client, f"/jobs/{job['id']}", 3)

    assert [d["event"] for d in log] == ["job.completed", "job.progress", "job.started"]
    assert all(d["status"] == "delivered" and d["attempts"] == 1 for d in log), log
    assert all(d["response_code"] == 200 and d["error"] is None for d in log), log
    assert [valid for _h, _b, valid in receiver.requests] == [True, True, True]
    # the webhook-id is the delivery's id; the body is the payload logged
    assert {h["webhook-id"] for h, _b, _v in receiver.requests} == {d["id"] for d in log}
    order = ["job.started", "job.progress", "job.completed"]
    events = sorted(receiver.events(), key=lambda e: order.index(e["type"]))
    started, progress, completed = (e["data"] for e in events)
    assert started["id"] == job["id"] and started["status"] == "running"
    # the first chunk to finish (8 images, or the last 2: chunks may run in any order)
    assert progress["done"] in (2, 8) and progress["status"] == "running"
    assert completed["status"] == "succeeded" and completed["done"] == 10
    assert completed["count"] == 10 and completed["error"] is None
    assert {d["payload"]["type"] for d in log} == {"job.started", "job.progress", "job.completed"}

    # another key sees no log of this job
    other = hooks.client(hooks.new_key())
    assert_problem(other.get(f"/jobs/{job['id']}/deliveries"), 404)


def test_a_receiver_failing_twice_then_answering_gets_it_on_the_third_attempt(
    hooks: Stack, receivers
) -> None:
    raw = hooks.new_key()
    receiver = Receiver([500, 503, 200], secret=secret_of(hooks, raw))
    receivers.append(receiver)
    client = hooks.client(raw)
    job = submit(client, count=2, webhook=receiver.url, webhook_events=["completed"])
    hooks.wait_job(client, job["id"], timeout=300)

    [delivery] = settled(client, f"/jobs/{job['id']}", 1)
    assert delivery["status"] == "delivered", delivery
    assert delivery["attempts"] == 3 and delivery["response_code"] == 200, delivery
    # one delivery: the same id and body on every attempt (receivers deduplicate on the id)
    assert len(receiver.requests) == 3
    assert {h["webhook-id"] for h, _b, _v in receiver.requests} == {delivery["id"]}
    assert len({body for _h, body, _v in receiver.requests}) == 1
    assert all(valid for _h, _b, valid in receiver.requests)


def test_a_receiver_that_never_answers_fails_after_the_last_attempt(
    hooks: Stack, receivers
) -> None:
    raw = hooks.new_key()
    receiver = Receiver(["hang"])
    receivers.append(receiver)
    client = hooks.client(raw)
    job = submit(client, count=2, webhook=receiver.url, webhook_events=["completed"])
    hooks.wait_job(client, job["id"], timeout=300)

    [delivery] = settled(client, f"/jobs/{job['id']}", 1)
    assert delivery["status"] == "failed", delivery
    assert delivery["attempts"] == WEBHOOK_SETTINGS["webhook_max_attempts"]
    assert delivery["response_code"] is None
    assert "no answer within 1s" in delivery["error"]
    assert len(receiver.requests) == 3


def test_a_receiver_with_another_secret_refuses_and_the_delivery_fails_at_once(
    hooks: Stack, receivers
) -> None:
    raw = hooks.new_key()
    wrong = "whsec_" + base64.b64encode(b"not the key's secret at all").decode()
    receiver = Receiver([200], secret=wrong)
    receivers.append(receiver)
    client = hooks.client(raw)
    job = submit(client, count=2, webhook=receiver.url, webhook_events=["completed"])
    hooks.wait_job(client, job["id"], timeout=300)

    [delivery] = settled(client, f"/jobs/{job['id']}", 1)
    # a 4xx other than 429 is final: no retry
    assert (delivery["status"], delivery["attempts"], delivery["response_code"]) == (
        "failed", 1, 401)  # fmt: skip
    assert [valid for _h, _b, valid in receiver.requests] == [False]


def test_a_canceled_experiment_sends_its_end(hooks: Stack, receivers) -> None:
    raw = hooks.new_key()
    real, _synthetic = make_classification_data(
        hooks, raw, pool_per_class=6, test_per_class=2, children_per_parent=0
    )
    receiver = Receiver([200], secret=secret_of(hooks, raw))
    receivers.append(receiver)
    client = hooks.client(raw)
    created = client.post(
        "/experiments",
        json={
            "dataset": real,
            **TRAINING,
            "webhook": receiver.url,
            "webhook_events": ["completed"],
        },
    )
    assert created.status_code == 202, created.text
    experiment = created.json()
    assert experiment["webhook"] == receiver.url
    assert experiment["webhook_events"] == ["completed"]
    assert client.post(f"/experiments/{experiment['id']}/cancel").status_code == 200

    [delivery] = settled(client, f"/experiments/{experiment['id']}", 1)
    assert delivery["status"] == "delivered" and delivery["event"] == "job.completed"
    assert delivery["payload"]["data"]["status"] == "canceled"
    assert delivery["payload"]["data"]["kind"] == "experiment"
    assert [e["data"]["status"] for e in receiver.events()] == ["canceled"]
    assert all(valid for _h, _b, valid in receiver.requests)
    # the same log under /jobs; another key's request is a 404
    assert [d["id"] for d in deliveries(client, f"/jobs/{experiment['id']}")] == [delivery["id"]]
    other = hooks.client(hooks.new_key())
    assert_problem(other.get(f"/experiments/{experiment['id']}/deliveries"), 404)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"webhook": "http://10.1.2.3/hook"}, "webhook"),  # private
        ({"webhook": "http://169.254.169.254/latest"}, "webhook"),  # link-local (metadata)
        ({"webhook": "http://[fd00::1]/hook"}, "webhook"),  # unique local IPv6
        ({"webhook": "ftp://127.0.0.1/hook"}, "webhook"),
        ({"webhook": "http://user:pw@127.0.0.1/hook"}, "webhook"),
        ({"webhook": "http://127.0.0.1/\x00"}, "webhook"),
        ({"webhook_events": ["completed"]}, "webhook_events"),  # events without a URL
        ({"webhook": "http://127.0.0.1/h", "webhook_events": ["finished"]}, "webhook_events.0"),
    ],
)
def test_refused_webhooks_are_422_naming_the_field(stack: Stack, body: dict, field: str) -> None:
    client = stack.client(stack.new_key())
    response = client.post("/jobs", json={"condition": "psoriasis", "count": 1, **body})
    assert_problem(response, 422, field)
    assert client.get("/jobs").json()["items"] == []


def test_keys_get_distinct_secrets(stack: Stack) -> None:
    first, second = stack.new_key(), stack.new_key()
    secrets = {secret_of(stack, first), secret_of(stack, second)}
    assert len(secrets) == 2
    for secret in secrets:
        assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24
    with stack.session() as session:  # every key has one
        assert None not in session.scalars(select(ApiKey.webhook_secret)).all()
