"""Sampling that generation and regeneration share: the worker's pipeline cache, a job's
sampler parameters and parents, one sampler call, and the batch limit.

A worker module, not a task: workers/generate.py and workers/regenerate.py import it (a task
never imports another task). No job state here: the chunk's bookkeeping is the generation
task's, and the engine's.
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

from app.config import Settings
from app.datasets import repository as datasets
from app.db.session import session_factory
from app.db.tables import GeneratorModel
from app.ids import image_seed
from app.schemas.jobs import ModelSampling, SamplerOptions
from workers.chunk_task import object_store

log = logging.getLogger(__name__)

_state_lock = threading.Lock()
_pipelines: Any = None


def pipeline_cache(settings: Settings) -> Any:
    """The worker's one PipelineCache (models are loaded once per process)."""
    global _pipelines
    with _state_lock:
        if _pipelines is None:
            from models.devices import resolve_device
            from models.pipelines import PipelineCache

            _pipelines = PipelineCache(
                device=resolve_device(settings.device),
                max_models=settings.pipeline_cache_size,
                memory_budget_bytes=int(settings.pipeline_memory_budget_gb * 2**30),
                compile_unet=settings.torch_compile,
            )
        return _pipelines


def encode_png(image: PILImage.Image) -> bytes:
    """The image as PNG bytes (the bytes a job stores and regeneration compares)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def model_path(settings: Settings, model: GeneratorModel) -> Path:
    """Where a model's weights load from: the models folder's copy, else its registered path."""
    path = settings.resolved_models_dir / model.id
    return path if (path / "model_index.json").is_file() else Path(model.path)


def sample_params(
    settings: Settings,
    *,
    strategy: str,
    condition_name: str,
    skin_tone: int | None,
    options: SamplerOptions,
    pipeline: Any,
    model_defaults: dict[str, Any] | None = None,
) -> Any:
    """The SampleParams of a job: its options, else the model's own defaults (its registered
    `sampling_defaults`), else the settings', the pipeline's and the paper's."""
    from models import strategies

    width, height = strategies.default_size(pipeline)
    own = ModelSampling.model_validate(model_defaults) if model_defaults else None
    knobs = options.over(own).filled(
        guidance_scale=settings.default_guidance_scale,
        num_inference_steps=settings.default_num_inference_steps,
        width=width,
        height=height,
    )
    return strategies.SampleParams(
        strategy=strategy,
        prompt=strategies.build_prompt(
            condition_name=condition_name,
            skin_tone=skin_tone,
            template=settings.prompt_template,
            suffix=settings.skin_tone_prompt_suffix,
        ),
        **knobs.model_dump(),
    )


class ParentImages:
    """The real parents of a job's images, read from the store and prepared once each."""

    def __init__(self, settings: Settings, *, job_id: str, k: int, size: int) -> None:
        self.settings = settings
        self.job_id = job_id
        self.k = k
        self.size = size
        self._rows: dict[int, Any] = {}
        self._images: dict[int, PILImage.Image] = {}

    def load_rows(self, indices: range | list[int]) -> None:
        """Read the rows of the parents of images `indices`."""
        positions = sorted({i // self.k for i in indices})
        with session_factory(self.settings.database_url)() as session:
            self._rows.update(
                datasets.parents_of_job(session=session, job_id=self.job_id, positions=positions)
            )

    def image_id(self, index: int) -> str | None:
        """The id of image `index`'s parent (None: it has none)."""
        row = self._rows.get(index // self.k)
        return row.id if row is not None else None

    def image(self, index: int) -> PILImage.Image:
        """Image `index`'s parent, prepared to the output size (read once per parent)."""
        from models.parents import load_parent

        position = index // self.k
        if position not in self._images:
            row = self._rows.get(position)
            if row is None:
                raise RuntimeError(f"job {self.job_id} has no parent at position {position}")
            data = object_store(self.settings).get_bytes(row.storage_key)
            self._images[position] = load_parent(data, size=self.size)
        return self._images[position]


def sample_batch(
    loaded: Any,
    params: Any,
    *,
    job_seed: int,
    indices: list[int],
    parents: ParentImages,
    on_step: Any = None,
    adapter: str | None = None,
) -> list[PILImage.Image]:
    """One sampler call for images `indices` of a job (generation and regeneration alike),
    with LoRA `adapter` active (None: the pipeline's own weights)."""
    from models import strategies

    edits = params.strategy in strategies.EDITS_PARENT
    img2img = (
        loaded.variant("img2img", strategies.image_to_image_pipeline)
        if params.strategy == strategies.IMAGE_TO_IMAGE
        else None
    )
    with loaded.lock:  # one sampler call at a time per pipeline
        if loaded.adapters:  # a base with LoRAs loaded samples with the job's one, or none
            from models.finetune import use_lora

            use_lora(loaded.pipeline, adapter)
        images: list[PILImage.Image] = strategies.generate(
            loaded.pipeline,
            params=params,
            seeds=[image_seed(job_seed, i) for i in indices],
            device=loaded.device,
            parents=[parents.image(i) for i in indices] if edits else None,
            on_step=on_step,
            img2img=img2img,
        )
    return images


class BatchLimit:
    """The largest batch this process can sample; halved on out-of-memory, for good."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def shrink(self, tried: int, new: int) -> None:
        """Lower the limit to `new` after batch `tried` ran out of memory."""
        log.warning("out of memory at batch %s: retrying with batch %s", tried, new)
        self.limit = min(self.limit, new)


_batch_limit: BatchLimit | None = None


def batch_limit(settings: Settings) -> BatchLimit:
    """The worker's one BatchLimit."""
    global _batch_limit
    with _state_lock:
        if _batch_limit is None:
            _batch_limit = BatchLimit(settings.generation_batch_size)
        return _batch_limit


def fixed_batches(start: int, stop: int, size: int) -> list[list[int]]:
    """Fixed groups of indices: a rerun samples each image in the same batch as before."""
    # (an image's exact bytes depend on its batch)
    return [list(range(first, min(first + size, stop))) for first in range(start, stop, size)]
