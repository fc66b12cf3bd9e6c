"""The fine-tuning loop (issue 22): the paper's DreamBooth (PAPER.md section 3: the full UNet
trains, text encoder and VAE frozen), its inpainting variant, and LoRA beyond it. Resumable
bit-identically from checkpoint bytes. Pure training: no database, no web server, no app/; the
worker moves checkpoints, samples and the trained folder where they belong.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from models.finetune_checkpoint import (
    load_lora,
    pack_checkpoint,
    save_trained,
    unpack_checkpoint,
    use_lora,
)
from models.finetune_config import (
    LORA_ADAPTER,
    FinetuneConfig,
    StepReport,
    TrainingImage,
    TrainResult,
    ValidationImage,
    ema_decay_at,
    learning_rate_at,
)
from models.finetune_data import (
    center_view,
    draw_masks,
    epoch_order,
)
from models.finetune_steps import (
    Context,
    cached_batch,
    caption_states,
    diffusion_loss,
    encode_pixels,
    fresh_batch,
    inpaint_conditioning,
    prepare,
    to_pil,
)
from models.masks import central_mask

__all__ = [
    "FinetuneConfig",
    "StepReport",
    "TrainResult",
    "TrainingImage",
    "ValidationImage",
    "fixed_batch_loss",
    "load_lora",
    "save_trained",
    "train",
    "use_lora",
]

OOM_ADVICE = (
    "CUDA ran out of memory while fine-tuning; settings that need less memory: a smaller "
    "train_batch_size, gradient_checkpointing=true, mixed_precision='bf16' (or 'fp16'), a "
    "smaller resolution, or method='lora'"
)
# The generators whose states a checkpoint carries (the data order needs none: it is a pure
# function of (seed, epoch), finetune_data.epoch_order).
_STREAMS = ("augment", "mask", "noise")


def _freeze(context: Context) -> dict[str, torch.nn.Parameter]:
    """The UNet (dreambooth) or a new LoRA adapter on it (lora) trains, nothing else; returns
    the trainable parameters by name."""
    pipeline, config = context.pipeline, context.config
    unet = pipeline.unet  # the text encoder and VAE were frozen by prepare()
    # fp32 master weights: autocast computes in bf16/fp16, the optimizer updates fp32 (a base
    # loaded in fp16 for sampling is upcast: load a separate one for training)
    if unet.dtype != torch.float32:
        unet.to(dtype=torch.float32)
    if config.method == "dreambooth":
        unet.requires_grad_(True)
    else:
        from peft import LoraConfig

        if LORA_ADAPTER in (getattr(unet, "peft_config", None) or {}):
            raise ValueError(
                f"method: the UNet already has a {LORA_ADAPTER!r} adapter; train on a fresh base"
            )
        unet.requires_grad_(False)
        # peft annotates lora_alpha as int; a float works (the scale is alpha / rank)
        alpha: Any = config.lora_alpha
        unet.add_adapter(
            LoraConfig(
                r=config.lora_rank,
                lora_alpha=alpha,
                init_lora_weights="gaussian",
                target_modules=list(config.lora_target_modules),
            ),
            adapter_name=LORA_ADAPTER,
        )
        unet.set_adapter(LORA_ADAPTER)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = {name: param for name, param in unet.named_parameters() if param.requires_grad}
    if config.train_text_encoder:
        if config.method != "dreambooth":
            raise ValueError("train_text_encoder: only a full (dreambooth) fine-tune trains it")
        text_encoder = pipeline.text_encoder.to(dtype=torch.float32)
        text_encoder.requires_grad_(True).train()
        for name, param in text_encoder.named_parameters():
            trainable[f"text_encoder.{name}"] = param
    return trainable


def _explain_oom(function: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
    """A CUDA OOM becomes a RuntimeError that names the settings that need less memory."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> TrainResult:
        try:
            return function(*args, **kwargs)
        except torch.OutOfMemoryError as error:
            raise RuntimeError(f"{OOM_ADVICE} ({error})") from error

    return wrapper


@_explain_oom
def train(
    pipeline: Any,
    images: Sequence[TrainingImage],
    config: FinetuneConfig,
    *,
    device: torch.device,
    resume: bytes | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    on_checkpoint: Callable[[int, bytes], None] | None = None,
    on_validation: Callable[[int, list[ValidationImage]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    validation_prompts: Sequence[str] = (),
) -> TrainResult:
    """Fine-tune the pipeline's UNet on the images in place (for lora, the UNet keeps the
    trained adapter, active); `resume` continues from checkpoint bytes bit-identically."""
    state = unpack_checkpoint(resume, config) if resume is not None else None
    # 1. freeze: the text encoder and VAE never train (prepare), the UNet or its LoRA does;
    # 2. captions -> text embeddings once per distinct caption, each photo resized once
    context = prepare(pipeline, images, config, device)
    trainable = _freeze(context)
    # 3. the optimizer: AdamW as the paper (constant learning rate), fused on CUDA
    optimizer = torch.optim.AdamW(
        list(trainable.values()),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
        fused=device.type == "cuda",
    )
    scaler = torch.amp.GradScaler("cuda", enabled=context.amp_dtype == torch.float16)
    # the moving average of the trained weights (fp32, on the training device), when asked
    average = (
        {name: param.detach().clone() for name, param in trainable.items()}
        if config.ema_decay > 0
        else None
    )
    # 4. every random stream seeded from config.seed (data order: epoch_order(seed, epoch))
    generators = {
        name: torch.Generator().manual_seed(config.seed + offset)
        for offset, name in enumerate(_STREAMS, start=1)
    }
    n_images, batch_size = len(images), config.train_batch_size
    steps_per_epoch = math.ceil(n_images / batch_size)
    total_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    step, losses, images_seen, elapsed_before = 0, [], 0, 0.0
    # 5. resume: weights, optimizer, generators, position and history from the checkpoint
    if state is not None:
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(state["trainable"][name])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        for name, generator in generators.items():
            generator.set_state(state["generators"][name])
        step, losses = state["step"], list(state["losses"])
        images_seen, elapsed_before = state["images_seen"], state["elapsed_s"]
        if average is not None:
            average = {name: value.to(device) for name, value in state["average"].items()}
    prompts = list(validation_prompts) or context.captions
    session_images, session_train_s, stopped = 0, 0.0, False
    order: list[int] = []
    order_epoch = -1
    while step < total_steps:
        if should_stop is not None and should_stop():
            stopped = True
            break
        started = time.perf_counter()
        # 6. the batch: this epoch's order from the position the step implies
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(n_images, seed=config.seed, epoch=epoch), epoch
        indices = order[position * batch_size : (position + 1) * batch_size]
        # 7. latents (augmented now, or a cached view) and the captions' embeddings
        if config.cache_latents:
            mean, std, conditioning = cached_batch(context, indices, epoch % config.latent_views)
        else:
            mean, std, conditioning = fresh_batch(context, indices, generators)
        eps = torch.randn(mean.shape, generator=generators["noise"]).to(device)
        latents = mean + std * eps  # a sample of the VAE posterior
        rows = [context.caption_index[index] for index in indices]
        if config.caption_dropout > 0:  # drawn only then: other runs' streams are unchanged
            draws = torch.rand(len(rows), generator=generators["augment"]).tolist()
            empty = context.captions.index("")
            rows = [
                empty if u < config.caption_dropout else row
                for row, u in zip(rows, draws, strict=True)
            ]
        embeddings = caption_states(context, rows)
        # 8. noise, predict, MSE; backward, clip, step
        loss = diffusion_loss(context, latents, conditioning, embeddings, generators["noise"])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(config, step, total_steps)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if average is not None:
            _update_average(average, trainable, ema_decay_at(config.ema_decay, step))
        loss_value = float(loss.detach())  # synchronises: the step's time is real
        losses.append(loss_value)
        images_seen += len(indices)
        session_images += len(indices)
        session_train_s += time.perf_counter() - started
        # 9. report, checkpoint (not after the last step: save_trained writes the product),
        # validate (own generators: the training streams are untouched)
        if on_step is not None:
            on_step(
                StepReport(
                    step=step,
                    total_steps=total_steps,
                    epoch=epoch,
                    loss=loss_value,
                    images_per_s=session_images / max(session_train_s, 1e-9),
                    elapsed_s=elapsed_before + session_train_s,
                )
            )
        if (
            on_checkpoint is not None
            and step % config.checkpoint_every_steps == 0
            and step < total_steps
        ):
            next_epoch, next_position = divmod(step, steps_per_epoch)
            on_checkpoint(
                step,
                pack_checkpoint(
                    config=config,
                    step=step,
                    epoch=next_epoch,
                    position=next_position,
                    trainable=dict(trainable),
                    optimizer=optimizer.state_dict(),
                    scaler=scaler.state_dict(),
                    generators={name: g.get_state() for name, g in generators.items()},
                    average=average,
                    losses=losses,
                    images_seen=images_seen,
                    elapsed_s=elapsed_before + session_train_s,
                ),
            )
        if (
            on_validation is not None
            and config.validation_images > 0
            and step % config.validation_every_steps == 0
        ):
            on_validation(step, _validate(context, prompts))
    if average is not None and not stopped:  # the product is the average
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(average[name])
    pipeline.unet.eval()
    pipeline.text_encoder.requires_grad_(False).eval()
    return TrainResult(
        steps=step,
        final_loss=losses[-1] if losses else float("nan"),
        losses=losses,
        stopped=stopped,
        images_seen=images_seen,
        elapsed_s=elapsed_before + session_train_s,
    )


@torch.no_grad()
def _update_average(
    average: dict[str, torch.Tensor], trainable: dict[str, torch.nn.Parameter], decay: float
) -> None:
    for name, param in trainable.items():
        average[name].lerp_(param.detach(), 1 - decay)


@torch.no_grad()
def _validate(context: Context, prompts: list[str]) -> list[ValidationImage]:
    """Fixed prompts and seeds (config.seed + k for image k), sampled by the pipeline itself;
    inpaint: training image k with the paper's central mask (PAPER.md section 2b)."""
    config, pipeline = context.config, context.pipeline
    count = config.validation_images
    chosen = [prompts[k % len(prompts)] for k in range(count)]
    seeds = [config.seed + k for k in range(count)]
    kwargs: dict[str, Any] = {
        "prompt": chosen,
        "num_inference_steps": config.validation_inference_steps,
        "guidance_scale": config.validation_guidance_scale,
        "generator": [torch.Generator().manual_seed(seed) for seed in seeds],
        "height": context.resolution,
        "width": context.resolution,
    }
    if context.inpaint:
        n = len(context.sources)
        kwargs["image"] = [
            to_pil(
                center_view(
                    context.sources[k % n], resolution=context.resolution, device=context.device
                )
            )
            for k in range(count)
        ]
        mask = central_mask(size=context.resolution, latent_size=context.latent_size)
        kwargs["mask_image"] = [mask] * count
    pipeline.unet.eval()
    pipeline.set_progress_bar_config(disable=True)
    try:
        with context.autocast():
            output = pipeline(**kwargs).images
    finally:
        pipeline.unet.train()
    return [
        ValidationImage(prompt=prompt, seed=seed, image=image)
        for prompt, seed, image in zip(chosen, seeds, output, strict=True)
    ]


@torch.no_grad()
def fixed_batch_loss(
    pipeline: Any,
    images: Sequence[TrainingImage],
    config: FinetuneConfig,
    *,
    device: torch.device,
    seed: int,
) -> float:
    """The UNet's mean loss on the first train_batch_size images, un-augmented, with noise,
    timesteps and (inpaint) masks fixed by `seed`: comparable before and after training."""
    batch = list(images)[: config.train_batch_size]
    context = prepare(pipeline, batch, config, device)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.cat(
        [center_view(s, resolution=context.resolution, device=device) for s in context.sources]
    )
    conditioning = None
    if context.inpaint:
        masks = draw_masks(len(batch), resolution=context.resolution, generator=generator).masks
        conditioning = inpaint_conditioning(context, pixels, masks)
    latents, _ = encode_pixels(context, pixels)  # the posterior mean: no sampling noise
    embeddings = context.embeddings[context.caption_index]
    was_training = pipeline.unet.training
    pipeline.unet.eval()
    try:
        loss = diffusion_loss(context, latents, conditioning, embeddings, generator)
    finally:
        pipeline.unet.train(was_training)
    return float(loss)
