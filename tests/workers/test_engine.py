"""The generation engine inside a real worker: cancel within a step, monotonic progress,
out-of-memory halving, flat memory over 500 images, pipelines loaded once."""

from __future__ import annotations

import time

import psutil
import pytest
import torch
from sqlalchemy import text

from models import strategies
from tests.conftest import Stack, Worker, count_rows, wait_for
from tests.helpers import submit


def test_cancel_interrupts_the_sampler_within_a_step(stack: Stack) -> None:
    client = stack.client(stack.new_key())
    job = submit(client, count=8, num_inference_steps=1000)

    def sampling() -> dict | None:
        running = client.get(f"/jobs/{job['id']}").json()["progress"]["running"]
        return running[0] if running and (running[0]["step"] or 0) >= 3 else None

    chunk = wait_for(sampling, timeout=60, interval=0.05, what="the sampler's first steps")
    assert chunk["steps"] == 1000
    canceled_at = time.monotonic()
    assert client.post(f"/jobs/{job['id']}/cancel").status_code == 200

    running = "SELECT count(*) FROM job_chunks WHERE job_id = :j AND status = 'running'"
    wait_for(lambda: count_rows(stack, running, j=job["id"]) == 0, timeout=30, interval=0.05)
    stopped_in = time.monotonic() - canceled_at
    with stack.session() as session:
        step = session.execute(
            text("SELECT step FROM job_chunks WHERE job_id = :j"), {"j": job["id"]}
        ).scalar_one()
    # one batch of 1000 steps takes far longer than this: the sampler stopped mid-batch
    assert stopped_in < 5, stopped_in
    assert step < 1000
    # the interrupted batch's half-denoised images are discarded
    assert count_rows(stack, "SELECT count(*) FROM images WHERE job_id = :j", j=job["id"]) == 0
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "canceled"


def test_progress_rises_monotonically(deployed: Stack) -> None:
    client = deployed.client(deployed.new_key())
    job = submit(client, count=24, num_inference_steps=8)
    seen: list[int] = []
    steps_seen = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = client.get(f"/jobs/{job['id']}").json()
        seen.append(body["progress"]["done"])
        steps_seen |= any(c["step"] for c in body["progress"]["running"])
        if body["status"] == "succeeded":
            break
        time.sleep(0.05)
    assert seen[-1] == 24
    assert seen == sorted(seen)
    assert len(set(seen)) >= 3  # it rose in steps, not all at once
    assert steps_seen


def test_generate_adaptive_halves_on_out_of_memory() -> None:
    calls: list[list[int]] = []
    halvings: list[tuple[int, int]] = []

    def sample(indices: list[int]) -> list[str]:
        calls.append(indices)
        if len(indices) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return [f"image-{i}" for i in indices]

    result = strategies.generate_adaptive(
        sample, [0, 1, 2, 3, 4, 5, 6, 7], on_oom=lambda a, b: halvings.append((a, b))
    )
    assert result == [
        ([0, 1], ["image-0", "image-1"]),
        ([2, 3], ["image-2", "image-3"]),
        ([4, 5], ["image-4", "image-5"]),
        ([6, 7], ["image-6", "image-7"]),
    ]
    assert halvings == [(8, 4), (4, 2), (4, 2)]

    def broken(indices: list[int]) -> list[str]:
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        strategies.generate_adaptive(broken, [0, 1])

    def always(indices: list[int]) -> list[str]:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):  # a single image that does not fit
        strategies.generate_adaptive(always, [0, 1, 2, 3])


def test_worker_halves_the_batch_on_out_of_memory(deployed: Stack) -> None:
    """An injected CUDA OOM for batches above 1: the job completes, one image per batch."""
    deployed.worker.stop()
    settings = deployed.settings.model_copy(update={"fault_oom_above_batch": 1})
    oom_worker = Worker(settings, deployed.worker.log_path.with_name("worker-oom.log"), "oom")
    oom_worker.start()
    try:
        client = deployed.client(deployed.new_key())
        job = deployed.wait_job(client, submit(client, count=6)["id"], timeout=120)
        assert job["progress"]["done"] == 6
        with deployed.session() as session:
            sizes = (
                session.execute(
                    text("SELECT provenance FROM images WHERE job_id = :j"), {"j": job["id"]}
                )
                .scalars()
                .all()
            )
        assert {p["batch_size"] for p in sizes} == {1}
        log = oom_worker.log()
        assert "out of memory at batch 2: retrying with batch 1" in log
        assert log.count("loading pipeline tiny-random ") == 1  # not leaked, not reloaded
    finally:
        oom_worker.stop()
        deployed.worker.start()


@pytest.mark.slow
def test_memory_stays_flat_over_500_images(embedded: Stack) -> None:
    client = embedded.client(embedded.new_key())
    # warm up: the pipeline is loaded and the first allocations made
    embedded.wait_job(client, submit(client, count=20, num_inference_steps=2)["id"])
    job = submit(client, count=500, num_inference_steps=2)
    assert embedded.worker.proc is not None
    worker = psutil.Process(embedded.worker.proc.pid)

    def progress() -> int:
        return client.get(f"/jobs/{job['id']}").json()["progress"]["done"]

    wait_for(lambda: progress() >= 100, timeout=300, interval=0.2)
    early = worker.memory_info().rss
    peak = early
    while progress() < 500:
        peak = max(peak, worker.memory_info().rss)
        time.sleep(0.2)
    done = embedded.wait_job(client, job["id"], timeout=300)
    assert done["progress"]["done"] == 500
    growth_mb = (peak - early) / 2**20
    assert growth_mb < 40, f"worker RSS grew {growth_mb:.1f} MB from image 100 to 500"


def test_pipeline_cache_loads_once_and_respects_its_budget(models_dir) -> None:
    from models.pipelines import PipelineCache

    cpu = torch.device("cpu")
    cache = PipelineCache(device=cpu, max_models=2)
    first = cache.get("tiny-random", models_dir / "tiny-random")
    assert cache.get("tiny-random", models_dir / "tiny-random") is first
    cache.get("tiny-random-inpaint", models_dir / "tiny-random-inpaint")
    assert cache.loads == {"tiny-random": 1, "tiny-random-inpaint": 1}
    assert cache.loaded_ids() == ["tiny-random", "tiny-random-inpaint"]
    assert first.size_bytes > 0

    # a budget that holds one tiny model: the least recently used one is unloaded
    budget = PipelineCache(device=cpu, max_models=5, memory_budget_bytes=first.size_bytes + 1)
    budget.get("tiny-random", models_dir / "tiny-random")
    budget.get("tiny-random-inpaint", models_dir / "tiny-random-inpaint")
    assert budget.loaded_ids() == ["tiny-random-inpaint"]
    assert budget.loads == {"tiny-random": 1, "tiny-random-inpaint": 1}

    # one by count
    single = PipelineCache(device=cpu, max_models=1)
    single.get("tiny-random", models_dir / "tiny-random")
    single.get("tiny-random-inpaint", models_dir / "tiny-random-inpaint")
    single.get("tiny-random", models_dir / "tiny-random")
    assert single.loads == {"tiny-random": 2, "tiny-random-inpaint": 1}
    assert single.loaded_ids() == ["tiny-random"]
