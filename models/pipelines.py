"""Loading diffusers pipelines from local directories, and keeping them loaded.

Importable without a database or web server. A worker holds one PipelineCache: loading the
same model twice in one process is a bug, so loads are counted.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

from models.devices import dtype_for

log = logging.getLogger(__name__)


def load_pipeline(
    path: Path, *, device: torch.device, dtype: torch.dtype, compile_unet: bool = False
) -> Any:
    """A pipeline from a local directory, set up as the paper runs it: DPM-Solver++ multistep,
    no safety checker, no progress bars; SDPA attention is diffusers' default on torch 2."""
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    index = (Path(path) / "model_index.json").read_text()
    if '"safety_checker"' in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++"
    )
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
        if compile_unet:
            pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
    return pipe


def weights_bytes(pipeline: Any) -> int:
    """Bytes of every parameter and buffer of the pipeline's modules."""
    total = 0
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            total += sum(p.numel() * p.element_size() for p in component.parameters())
            total += sum(b.numel() * b.element_size() for b in component.buffers())
    return total


@dataclass
class LoadedPipeline:
    model_id: str
    path: Path
    pipeline: Any
    device: torch.device
    dtype: torch.dtype
    size_bytes: int = 0
    # Schedulers keep state between steps: a pipeline must never sample in two threads.
    lock: threading.Lock = field(default_factory=threading.Lock)
    variants: dict[str, Any] = field(default_factory=dict)
    # LoRA adapters loaded into this pipeline (model id -> adapter name); sample with one of
    # them active, or none (the base), by naming it under the lock (models/finetune.use_lora)
    adapters: dict[str, str] = field(default_factory=dict)

    def variant(self, name: str, build: Callable[[Any], Any]) -> Any:
        """A pipeline sharing this one's modules (e.g. img2img), built once."""
        if name not in self.variants:
            self.variants[name] = build(self.pipeline)
        return self.variants[name]


class PipelineCache:
    """An LRU of loaded pipelines keyed by model id, bounded by a count and a memory budget
    (thread-safe)."""

    def __init__(
        self,
        *,
        device: torch.device,
        max_models: int,
        memory_budget_bytes: int = 0,
        compile_unet: bool = False,
    ) -> None:
        self.device = device
        self.dtype = dtype_for(device)
        self.max_models = max_models
        self.memory_budget_bytes = memory_budget_bytes
        self.compile_unet = compile_unet
        self.loads: dict[str, int] = {}
        self._items: OrderedDict[str, LoadedPipeline] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model_id: str, path: Path) -> LoadedPipeline:
        with self._lock:
            item = self._items.get(model_id)
            if item is not None and item.path == Path(path):
                self._items.move_to_end(model_id)
                return item
            self._items.pop(model_id, None)  # a model whose path changed is reloaded
            while len(self._items) >= self.max_models:
                self._evict_oldest()
            log.info("loading pipeline %s from %s on %s", model_id, path, self.device)
            pipeline = load_pipeline(
                Path(path), device=self.device, dtype=self.dtype, compile_unet=self.compile_unet
            )
            item = LoadedPipeline(
                model_id, Path(path), pipeline, self.device, self.dtype, weights_bytes(pipeline)
            )
            self._items[model_id] = item
            self.loads[model_id] = self.loads.get(model_id, 0) + 1
            while (
                self.memory_budget_bytes
                and len(self._items) > 1
                and self.loaded_bytes() > self.memory_budget_bytes
            ):
                self._evict_oldest()
            return item

    def loaded_bytes(self) -> int:
        return sum(item.size_bytes for item in self._items.values())

    def loaded_ids(self) -> list[str]:
        """The model ids held now, least recently used first (a test seam)."""
        return list(self._items)

    def _evict_oldest(self) -> None:
        evicted_id, evicted = self._items.popitem(last=False)
        log.info("unloading pipeline %s (%.1f MB)", evicted_id, evicted.size_bytes / 1e6)
        del evicted
        free_memory(self.device)


def free_memory(device: torch.device) -> None:
    """Return freed tensors' memory to the device (after an eviction or an OOM)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def quiet_loading() -> None:
    """A command's output is its verdict: no loading or saving bars and no transformers
    warnings (the torchvision advice is dropped for every process by models/__init__.py)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
