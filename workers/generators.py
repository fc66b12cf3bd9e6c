"""Where a generator's weights come from on this worker, and the loaded pipeline a job samples.

A base model loads from its directory. A fine-tuned model's weights live in the object store
(issue 22): a worker downloads them once into a local cache keyed by their sha256 (checked
after the download). A DreamBooth model stores only its UNet; its local directory is the base
model's other components (linked) with that UNet. A scratch model (issue 24) stores its whole
pipeline, which is its local directory. A LoRA model is applied to the base pipeline already
in the pipeline cache, without reloading the base: two LoRAs of one base serve alternating
jobs from one loaded pipeline.

A worker module, not a task: workers/generate.py, workers/regenerate.py and
workers/finetune.py import it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Settings
from app.db.session import session_factory
from app.db.tables import GeneratorModel
from app.vocabulary import get_model, weights_sha256
from workers.chunk_task import object_store
from workers.sampling import model_path, pipeline_cache

log = logging.getLogger(__name__)

CACHE_FOLDER = ".store-cache"
# model_index.json and the UNet come from the fine-tune; every other component from the base
FINETUNED_PARTS = ("unet", "model_index.json")
_download_lock = threading.Lock()


@dataclass
class Generator:
    """A job's pipeline: the loaded (cached) pipeline and the LoRA adapter to sample with
    (None: the pipeline's own weights)."""

    loaded: Any  # models.pipelines.LoadedPipeline
    adapter: str | None
    path: Path


def is_lora(model: GeneratorModel) -> bool:
    return bool(model.training and model.training.get("method") == "lora")


def download_weights(settings: Settings, model: GeneratorModel) -> Path:
    """The model's stored files in the local cache (downloaded once; sha256 checked)."""
    assert model.weights_key and model.weights_sha256 and model.training
    root = settings.resolved_models_dir / CACHE_FOLDER
    target = root / model.weights_sha256
    if (target / ".complete").is_file():
        return target
    with _download_lock:
        if (target / ".complete").is_file():
            return target
        root.mkdir(parents=True, exist_ok=True)
        store = object_store(settings)
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
            staging = Path(tmp) / "weights"
            for name in model.training["files"]:
                local = staging / name
                local.parent.mkdir(parents=True, exist_ok=True)
                store.get_file(f"{model.weights_key}/{name}", local)
            found = weights_sha256(staging)
            if found != model.weights_sha256:
                raise RuntimeError(
                    f"the stored weights of {model.id} hash to {found}, not the registered "
                    f"{model.weights_sha256}: refusing to load them"
                )
            (staging / ".complete").write_text(model.id)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        log.info("downloaded the weights of %s into %s", model.id, target)
    return target


def _base_of(settings: Settings, model: GeneratorModel) -> GeneratorModel:
    with session_factory(settings.database_url)() as session:
        base = get_model(session=session, model_id=model.base_model_id or "")
        if base is None:
            raise LookupError(f"the base model {model.base_model_id} of {model.id} is gone")
        session.expunge(base)
    return base


def local_pipeline_dir(settings: Settings, model: GeneratorModel) -> Path:
    """A diffusers pipeline directory of a base, DreamBooth or scratch model (not a LoRA)."""
    if model.weights_key is None:
        return model_path(settings, model)
    weights = download_weights(settings, model)
    if model.base_model_id is None:  # scratch: the whole pipeline was stored
        return weights
    base_dir = local_pipeline_dir(settings, _base_of(settings, model))
    assembled = weights.parent / f"{weights.name}-pipeline"
    if (assembled / "model_index.json").is_file():
        return assembled
    with tempfile.TemporaryDirectory(dir=weights.parent, prefix=".assemble-") as tmp:
        staging = Path(tmp) / "pipeline"
        staging.mkdir()
        for part in base_dir.iterdir():
            if part.name not in FINETUNED_PARTS:
                (staging / part.name).symlink_to(part.resolve())
        for name in FINETUNED_PARTS:
            (staging / name).symlink_to((weights / name).resolve())
        if not assembled.exists():
            staging.rename(assembled)
    return assembled


def load_generator(settings: Settings, model: GeneratorModel) -> Generator:
    """The cached pipeline a job of `model` samples with, and its adapter."""
    cache = pipeline_cache(settings)
    if not is_lora(model):
        path = local_pipeline_dir(settings, model)
        return Generator(cache.get(model.id, path), None, path)
    from models.finetune import load_lora

    base = _base_of(settings, model)
    path = local_pipeline_dir(settings, base)
    loaded = cache.get(base.id, path)
    adapter = f"lora_{model.weights_sha256[:16]}" if model.weights_sha256 else model.id
    if model.id not in loaded.adapters:
        weights = download_weights(settings, model)
        with loaded.lock:
            if model.id not in loaded.adapters:
                load_lora(loaded.pipeline, weights, adapter_name=adapter)
                loaded.adapters[model.id] = adapter
                log.info("LoRA %s applied to the loaded %s", model.id, base.id)
    return Generator(loaded, adapter, path)
