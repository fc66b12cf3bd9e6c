"""The dispatch window on a live stack (embedded broker and Redis): one key's huge job keeps at
most the window in the broker, another key's small job submitted behind it starts within a
chunk or two, and a cancel leaves at most the window of messages to drain."""

from __future__ import annotations

from sqlalchemy import func, select

from app.broker import GPU_QUEUE, queue_depth
from app.db.tables import Job, JobChunk
from tests.conftest import Stack, count_rows, wait_for
from tests.helpers import submit

HUGE_CHUNKS = 400


def started_ahead(stack: Stack, huge_id: str, small_id: str) -> int:
    """Chunks of the huge job that started after the small job was submitted and before it
    started."""
    with stack.session() as session:
        submitted = session.scalar(select(Job.created_at).where(Job.id == small_id))
        started = session.scalar(
            select(func.min(JobChunk.started_at)).where(JobChunk.job_id == small_id)
        )
        return session.scalar(
            select(func.count())
            .select_from(JobChunk)
            .where(
                JobChunk.job_id == huge_id,
                JobChunk.started_at > submitted,
                JobChunk.started_at < started,
            )
        )


def test_small_job_behind_a_huge_one_starts_within_the_window(stack: Stack) -> None:
    window = stack.settings.dispatch_window
    chunk = stack.settings.chunk_size
    huge_client = stack.client(stack.new_key("huge"))
    small_client = stack.client(stack.new_key("small"))
    huge = submit(huge_client, count=HUGE_CHUNKS * chunk, num_inference_steps=2, seed=1)
    stack.wait_job(huge_client, huge["id"], statuses=("running",), timeout=60)
    # two chunks finished: the workers' refills ran
    wait_for(
        lambda: huge_client.get(f"/jobs/{huge['id']}").json()["progress"]["done"] >= 2 * chunk,
        timeout=60,
        what="two chunks of the huge job",
    )
    assert queue_depth(stack.settings, GPU_QUEUE) <= window
    sent = "SELECT count(*) FROM job_chunks WHERE job_id = :j AND dispatched_at IS NOT NULL"
    assert count_rows(stack, sent, j=huge["id"]) < HUGE_CHUNKS // 2  # the database holds the rest

    small = submit(small_client, count=1, num_inference_steps=2, seed=2)
    done = stack.wait_job(small_client, small["id"], timeout=90)
    assert done["progress"]["done"] == 1
    ahead = started_ahead(stack, huge["id"], small["id"])
    # at most the chunk that was running and the window's messages went first
    assert ahead <= window, ahead

    canceled = huge_client.post(f"/jobs/{huge['id']}/cancel")
    assert canceled.status_code == 200, canceled.text
    assert queue_depth(stack.settings, GPU_QUEUE) <= window
    never = "SELECT count(*) FROM job_chunks WHERE job_id = :j AND dispatched_at IS NULL"
    assert count_rows(stack, never, j=huge["id"]) > HUGE_CHUNKS // 2
    # what is left drains in a moment (claims of a canceled job's chunks are dropped)
    wait_for(lambda: queue_depth(stack.settings, GPU_QUEUE) == 0, timeout=20, what="an empty queue")
    assert count_rows(stack, sent, j=huge["id"]) <= HUGE_CHUNKS // 2
