"""The paper's generation strategies (PAPER.md section 2) on diffusers pipelines, plus
SDEdit-style image-to-image: one sampler call per batch, one torch.Generator per image.

Importable without a database or web server. Progress, heartbeats and cancellation come in
through a per-step callback; a cancel interrupts the pipeline at its next step. The same
callback limits classifier-free guidance to a part of the schedule when a job asks
(`guidance_interval`, Kynkäänniemi et al. 2024, "Applying guidance in a limited interval").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image

from models.masks import central_mask, central_mask_params, frame_mask, frame_mask_params
from models.pipelines import free_memory

TEXT_TO_IMAGE = "text-to-image"
INPAINT = "inpaint"
INPAINT_OUTPAINT = "inpaint-outpaint"
IMAGE_TO_IMAGE = "image-to-image"
STRATEGIES = (TEXT_TO_IMAGE, INPAINT, INPAINT_OUTPAINT, IMAGE_TO_IMAGE)
# Strategies that edit a real parent image, and those that need an inpainting pipeline (the
# service's app.schemas.Strategy and EDIT_STRATEGIES/INPAINT_STRATEGIES are tied to these by
# tests/models/test_strategy_contract.py).
EDITS_PARENT = frozenset({INPAINT, INPAINT_OUTPAINT, IMAGE_TO_IMAGE})
NEEDS_INPAINT_PIPELINE = frozenset({INPAINT, INPAINT_OUTPAINT})

# Paper defaults (PAPER.md section 2b); image-to-image is beyond the paper. app/schemas/jobs.py
# holds the service's copy (models/ never imports app/); tests/models/test_strategy_contract.py
# ties the two.
DEFAULT_STRENGTH = {INPAINT: 0.97, INPAINT_OUTPAINT: 0.97, IMAGE_TO_IMAGE: 0.75}
DEFAULT_OUTPAINT_STRENGTH = 0.95
DEFAULT_MASK_FRACTION = 0.25
DEFAULT_FRAME_PX = 16

# Outside a guidance interval: above 1, so the pipeline keeps computing both predictions (its
# prompt embeddings stay doubled), and the guided prediction is then the conditional one.
GUIDANCE_OFF = 1.0 + 1e-6

# on_step(step, total_steps) -> True to interrupt the sampler.
StepCallback = Callable[[int, int], bool]


class Interrupted(Exception):
    """The sampler was interrupted by the step callback (a cancel): its output is discarded."""


def build_prompt(*, condition_name: str, skin_tone: int | None, template: str, suffix: str) -> str:
    """'An image of psoriasis, a skin disease' (+ ', Fitzpatrick skin type 5' when set)."""
    prompt = template.format(condition=condition_name)
    if skin_tone is not None:
        prompt += suffix.format(skin_tone=skin_tone)
    return prompt


@dataclass(frozen=True)
class SampleParams:
    """Everything that decides a batch's pixels besides the seeds and the parents."""

    strategy: str
    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    guidance_interval: tuple[float, float] | None = None  # None: guidance on every step
    strength: float | None = None
    outpaint_strength: float = DEFAULT_OUTPAINT_STRENGTH
    mask_fraction: float = DEFAULT_MASK_FRACTION
    frame_px: int = DEFAULT_FRAME_PX

    @property
    def effective_strength(self) -> float | None:
        """The strength the sampler uses: the job's, else its strategy's default (None: t2i)."""
        if self.strategy not in EDITS_PARENT:
            return None
        return self.strength if self.strength is not None else DEFAULT_STRENGTH[self.strategy]

    def guidance_at(self, step: int) -> float:
        """The guidance scale of step `step` (0-based) of the num_inference_steps schedule: the
        job's inside its guidance interval, GUIDANCE_OFF outside."""
        if self.guidance_interval is None or self.guidance_scale <= 1:
            return self.guidance_scale
        start, end = self.guidance_interval
        inside = start <= step / self.num_inference_steps < end
        return self.guidance_scale if inside else GUIDANCE_OFF

    def provenance(self) -> dict[str, Any]:
        """The parameters to record with every image."""
        record: dict[str, Any] = asdict(self)
        record["strength"] = self.effective_strength
        if self.strategy in NEEDS_INPAINT_PIPELINE:
            record["mask"] = central_mask_params(**_central_geometry(self))
        else:
            record.pop("mask_fraction")
        if self.strategy == INPAINT_OUTPAINT:
            record["outpaint_mask"] = frame_mask_params(size=self.width, frame_px=self.frame_px)
        else:
            record.pop("outpaint_strength")
            record.pop("frame_px")
        return record


def _central_geometry(params: SampleParams) -> dict[str, Any]:
    # The paper builds the mask on SD's 8x-downsampled latent grid (64x64 for 512 pixels).
    return {
        "size": params.width,
        "latent_size": params.width // 8,
        "mask_fraction": params.mask_fraction,
    }


def default_size(pipeline: Any) -> tuple[int, int]:
    """The pipeline's native (width, height): UNet sample size times the VAE scale factor."""
    size = int(pipeline.unet.config.sample_size) * int(pipeline.vae_scale_factor)
    return size, size


def check_inputs(
    pipeline: Any, params: SampleParams, seeds: Sequence[int], parents: Sequence[Image.Image] | None
) -> None:
    """Raise an actionable ValueError for a request the pipeline cannot serve."""
    # 1. the request alone, 2. against the pipeline, 3. the parents, 4. the strengths
    _check_request(params, seeds)
    _check_pipeline(pipeline, params)
    _check_parents(params, seeds, parents)
    _check_strengths(params)


def _check_request(params: SampleParams, seeds: Sequence[int]) -> None:
    """The strategy, the seeds, the size and the steps."""
    if params.strategy not in STRATEGIES:
        raise ValueError(
            f"strategy must be one of {', '.join(STRATEGIES)}, got {params.strategy!r}"
        )
    if not seeds:
        raise ValueError("seeds: at least one image must be asked for")
    if params.width % 8 or params.height % 8:
        raise ValueError(
            f"width and height must be multiples of 8, got {params.width}x{params.height}"
        )
    if params.num_inference_steps < 1:
        raise ValueError("num_inference_steps must be at least 1")
    if params.guidance_interval is not None:
        start, end = params.guidance_interval
        if not 0 <= start < end <= 1:
            raise ValueError(f"guidance_interval must be 0 <= start < end <= 1, got {[start, end]}")
    if params.strategy in NEEDS_INPAINT_PIPELINE and params.width != params.height:
        raise ValueError(
            f"the paper's masks are square: width {params.width} != height {params.height}"
        )


def _check_pipeline(pipeline: Any, params: SampleParams) -> None:
    """An inpainting pipeline (a 9-channel UNet) for the inpainting strategies, else not."""
    is_inpaint = int(pipeline.unet.config.in_channels) == 9
    if params.strategy in NEEDS_INPAINT_PIPELINE and not is_inpaint:
        raise ValueError(
            f"strategy {params.strategy} needs an inpainting pipeline (a 9-channel UNet), "
            f"got {type(pipeline).__name__}"
        )
    if params.strategy not in NEEDS_INPAINT_PIPELINE and is_inpaint:
        raise ValueError(
            f"strategy {params.strategy} needs a text-to-image pipeline, not an inpainting one"
        )


def _check_parents(
    params: SampleParams, seeds: Sequence[int], parents: Sequence[Image.Image] | None
) -> None:
    """One parent per seed, prepared to the output size, for the strategies that edit one."""
    if params.strategy not in EDITS_PARENT:
        return
    if parents is None or len(parents) != len(seeds):
        raise ValueError(f"strategy {params.strategy} needs one parent image per seed")
    wrong = [p.size for p in parents if p.size != (params.width, params.height)]
    if wrong:
        raise ValueError(
            f"parents must be prepared to {params.width}x{params.height}, got {wrong[0]}"
        )


def _check_strengths(params: SampleParams) -> None:
    """Strengths in (0, 1] that leave at least one denoising step."""
    strength = params.effective_strength
    if strength is not None and not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    # diffusers runs int(steps * strength) steps; zero would fail deep inside the pipeline
    for name, value in (("strength", strength), ("outpaint_strength", params.outpaint_strength)):
        if value is not None and int(params.num_inference_steps * value) < 1:
            if name == "outpaint_strength" and params.strategy != INPAINT_OUTPAINT:
                continue
            raise ValueError(
                f"{name} {value} x num_inference_steps {params.num_inference_steps} runs no step; "
                "raise one of them"
            )


class _StepHook:
    """callback_on_step_end adaptor for one sampler call of `steps_run` steps, the last ones of
    the num_inference_steps schedule: reports steps, interrupts the pipeline when asked and
    sets the next step's guidance scale (params.guidance_at)."""

    def __init__(
        self,
        on_step: StepCallback | None,
        *,
        params: SampleParams,
        steps_run: int,
        offset: int,
        total: int,
    ) -> None:
        self.on_step = on_step
        self.params = params
        # diffusers' editing pipelines skip the schedule's first steps (get_timesteps)
        self.first = params.num_inference_steps - steps_run
        self.offset = offset
        self.total = total
        self.interrupted = False

    @property
    def initial_guidance(self) -> float:
        return self.params.guidance_at(self.first)

    def __call__(
        self, pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        if self.on_step is not None and self.on_step(self.offset + step + 1, self.total):
            self.interrupted = True
            pipe._interrupt = True  # diffusers skips the remaining steps
        if self.params.guidance_interval is not None:
            # read by the pipeline's next step (the route diffusers' callback docs show)
            pipe._guidance_scale = self.params.guidance_at(self.first + step + 1)
        return kwargs


def _steps_run(params: SampleParams, strength: float | None) -> int:
    """Denoising steps diffusers runs: int(steps * strength) for the editing pipelines."""
    if strength is None:
        return params.num_inference_steps
    return min(params.num_inference_steps, int(params.num_inference_steps * strength))


def image_to_image_pipeline(pipeline: Any) -> Any:
    """An img2img pipeline sharing the text-to-image pipeline's modules (no copy, no load)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    variant = StableDiffusionImg2ImgPipeline(**pipeline.components)
    variant.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    return variant


def generate(
    pipeline: Any,
    *,
    params: SampleParams,
    seeds: Sequence[int],
    device: torch.device,
    parents: Sequence[Image.Image] | None = None,
    on_step: StepCallback | None = None,
    img2img: Any = None,
) -> list[Image.Image]:
    """One image per seed (and parent), in one batched sampler call per stage."""
    # 1. check inputs
    check_inputs(pipeline, params, seeds, parents)
    n = len(seeds)
    strength = params.effective_strength
    first_steps = _steps_run(params, strength)
    second_steps = (
        _steps_run(params, params.outpaint_strength) if params.strategy == INPAINT_OUTPAINT else 0
    )
    total = first_steps + second_steps

    # 2. one generator per image: an image depends only on its seed, parent and batch
    def generators() -> list[torch.Generator]:
        return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]

    common: dict[str, Any] = {
        "prompt": [params.prompt] * n,
        "negative_prompt": [params.negative_prompt] * n if params.negative_prompt else None,
        "num_inference_steps": params.num_inference_steps,
        "output_type": "pil",
    }

    def run(pipe: Any, hook: _StepHook, **kwargs: Any) -> list[Image.Image]:
        with torch.inference_mode():
            result = pipe(
                **common, **kwargs, guidance_scale=hook.initial_guidance, callback_on_step_end=hook
            )
        if hook.interrupted:
            raise Interrupted()
        images: list[Image.Image] = result.images
        return images

    # 3. sample
    hook = _StepHook(on_step, params=params, steps_run=first_steps, offset=0, total=total)
    size = {"width": params.width, "height": params.height}
    if params.strategy == TEXT_TO_IMAGE:
        return run(pipeline, hook, generator=generators(), **size)
    assert parents is not None
    if params.strategy == IMAGE_TO_IMAGE:
        variant = img2img if img2img is not None else image_to_image_pipeline(pipeline)
        return run(variant, hook, image=list(parents), strength=strength, generator=generators())
    # inpaint: the central square regenerated at strength 0.97 (PAPER.md 2b, step 1)
    mask = central_mask(**_central_geometry(params))
    inpainted = run(
        pipeline,
        hook,
        image=list(parents),
        mask_image=[mask] * n,
        strength=strength,
        generator=generators(),
        **size,
    )
    # the pipeline decodes the whole image: the pixels outside the mask go back as they were,
    # or a small autoencoder's blur would replace the frame the paper keeps
    inpainted = keep_outside_mask(inpainted, list(parents), mask)
    if params.strategy == INPAINT:
        return inpainted
    # inpaint-outpaint: everything but a 16-px frame regenerated at 0.95 (PAPER.md 2b, step 2)
    frame = frame_mask(size=params.width, frame_px=params.frame_px)
    hook = _StepHook(
        on_step, params=params, steps_run=second_steps, offset=first_steps, total=total
    )
    outpainted = run(
        pipeline,
        hook,
        image=inpainted,
        mask_image=[frame] * n,
        strength=params.outpaint_strength,
        generator=generators(),
        **size,
    )
    return keep_outside_mask(outpainted, inpainted, frame)


def keep_outside_mask(
    generated: Sequence[Image.Image], originals: Sequence[Image.Image], mask: Image.Image
) -> list[Image.Image]:
    """Each generated image inside the mask (255) and its original outside it (0)."""
    kept = []
    for image, original in zip(generated, originals, strict=True):
        if original.size != image.size or original.mode != "RGB":
            original = original.convert("RGB").resize(image.size, Image.Resampling.BILINEAR)
        region = mask if mask.size == image.size else mask.resize(image.size)
        kept.append(Image.composite(image.convert("RGB"), original, region.convert("L")))
    return kept


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (or MPS) out-of-memory, whatever class this torch raises it as."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def generate_adaptive(
    sample: Callable[[list[int]], list[Image.Image]],
    indices: list[int],
    *,
    on_oom: Callable[[int, int], None] | None = None,
) -> list[tuple[list[int], list[Image.Image]]]:
    """(batch indices, images) per batch sampled: `indices` at once, halved on out-of-memory."""
    # Each batch actually sampled is returned so that it is recorded with its images (an
    # image's exact bytes depend on its batch).
    try:
        return [(indices, sample(indices))]
    except Exception as exc:
        if not is_out_of_memory(exc) or len(indices) == 1:
            raise
    free_memory(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    half = len(indices) // 2
    if on_oom is not None:
        on_oom(len(indices), half)
    return generate_adaptive(sample, indices[:half], on_oom=on_oom) + generate_adaptive(
        sample, indices[half:], on_oom=on_oom
    )
