"""Loading diffusers pipelines from local directories, and keeping them loaded.

Importable without a database or web server. A worker holds one PipelineCache: loading the
same model twice in one process is a bug, so loads are counted.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

log = logging.getLogger(__name__)


def resolve_device(setting: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def dtype_for(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (PAPER.md section 2), fp32 on the CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_pipeline(path: Path, *, device: torch.device, dtype: torch.dtype) -> Any:
    """A pipeline from a local directory, set up as the paper runs it: DPM-Solver++ multistep,
    no safety checker, no progress bars; SDPA attention is diffusers' default on torch 2."""
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": True}
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
    return pipe


@dataclass
class LoadedPipeline:
    model_id: str
    path: Path
    pipeline: Any
    device: torch.device
    dtype: torch.dtype
    # Schedulers keep state between steps: a pipeline must never sample in two threads.
    lock: threading.Lock = field(default_factory=threading.Lock)


class PipelineCache:
    """An LRU of loaded pipelines keyed by model id (thread-safe)."""

    def __init__(self, *, device: torch.device, max_models: int) -> None:
        self.device = device
        self.dtype = dtype_for(device)
        self.max_models = max_models
        self.loads: dict[str, int] = {}
        self._items: OrderedDict[str, LoadedPipeline] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model_id: str, path: Path) -> LoadedPipeline:
        with self._lock:
            item = self._items.get(model_id)
            if item is not None and item.path == Path(path):
                self._items.move_to_end(model_id)
                return item
            while len(self._items) >= self.max_models:
                evicted_id, _evicted = self._items.popitem(last=False)
                log.info("unloading pipeline %s", evicted_id)
                del _evicted
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            log.info("loading pipeline %s from %s on %s", model_id, path, self.device)
            pipeline = load_pipeline(Path(path), device=self.device, dtype=self.dtype)
            item = LoadedPipeline(model_id, Path(path), pipeline, self.device, self.dtype)
            self._items[model_id] = item
            self.loads[model_id] = self.loads.get(model_id, 0) + 1
            return item
