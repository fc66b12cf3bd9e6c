"""Fine-tuning state as bytes (checkpoints to resume from) and the trained product on disk (a full
pipeline for DreamBooth, LoRA weights for LoRA), plus switching LoRA adapters on one loaded base.
No database or object store here: the worker moves the bytes and folders where they belong."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from models.finetune_config import LORA_ADAPTER, FinetuneConfig, config_dict

CHECKPOINT_FORMAT = 1
# Settings a run may change between sessions of one fine-tune (they decide when callbacks
# fire, not what the weights become); any other difference refuses the resume.
_RESUMABLE_CHANGES = frozenset(
    {
        "checkpoint_every_steps",
        "validation_every_steps",
        "validation_images",
        "validation_inference_steps",
        "validation_guidance_scale",
    }
)


def pack_checkpoint(*, config: FinetuneConfig, **state: Any) -> bytes:
    """Everything a resumed run needs, as torch.save bytes (tensors moved to the CPU)."""

    def to_cpu(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {key: to_cpu(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(to_cpu(item) for item in value)
        return value

    buffer = io.BytesIO()
    payload = {"format": CHECKPOINT_FORMAT, "config": config_dict(config), **to_cpu(state)}
    torch.save(payload, buffer)
    return buffer.getvalue()


def load_checkpoint(data: bytes, *, kind: str, version: int) -> dict[str, Any]:
    """Checkpoint bytes -> their state; ValueError("resume: ...") if they are not a `kind`
    checkpoint of format `version`."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds on corrupt bytes
        raise ValueError(f"resume: not a {kind} checkpoint ({error})") from error
    if not isinstance(state, dict) or state.get("format") != version:
        raise ValueError(f"resume: not a {kind} checkpoint of this version")
    return state


def refuse_changed_settings(
    saved: dict[str, Any], current: dict[str, Any], *, may_change: Iterable[str]
) -> None:
    """ValueError naming every setting of `current` that differs from the checkpoint's
    `saved`, but those in `may_change`."""
    allowed = set(may_change)
    changed = sorted(
        name for name in current if name not in allowed and saved.get(name) != current[name]
    )
    if changed:
        detail = ", ".join(
            f"{name}={saved.get(name)!r} (now {current[name]!r})" for name in changed
        )
        raise ValueError(f"resume: the checkpoint was made with other settings: {detail}")


def unpack_checkpoint(data: bytes, config: FinetuneConfig) -> dict[str, Any]:
    """Checkpoint bytes -> their state; ValueError("resume: ...") if they do not fit `config`."""
    state = load_checkpoint(data, kind="fine-tuning", version=CHECKPOINT_FORMAT)
    refuse_changed_settings(state["config"], config_dict(config), may_change=_RESUMABLE_CHANGES)
    return state


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move a finished folder into place; a folder already there is replaced, never half-written."""
    if out_dir.exists():
        old = staging.parent / "old"
        out_dir.rename(old)
    staging.rename(out_dir)


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained adapter's weights, with the key names `load_lora_weights` reads."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(
        get_peft_model_state_dict(unet, adapter_name=LORA_ADAPTER)
    )


def save_trained(pipeline: Any, config: FinetuneConfig, out_dir: Path) -> list[Path]:
    """Write the fine-tune's product to out_dir (staged beside it, then renamed into place):
    dreambooth, the full pipeline (`DiffusionPipeline.from_pretrained(out_dir)` loads it);
    lora, the adapter's weights only (`pipeline.load_lora_weights(out_dir)` reads them)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        staging = Path(tmp) / "new"
        if config.method == "dreambooth":
            pipeline.save_pretrained(staging, safe_serialization=True)
        else:
            unet = pipeline.unet
            if LORA_ADAPTER not in getattr(unet, "peft_config", {}):
                raise ValueError("method: the pipeline's UNet has no trained LoRA adapter")
            type(pipeline).save_lora_weights(
                staging,
                unet_lora_layers=lora_state_dict(unet),
                safe_serialization=True,
                # rank and alpha travel with the weights, so alpha != rank loads right
                unet_lora_adapter_metadata=unet.peft_config[LORA_ADAPTER].to_dict(),
            )
        _replace_dir(staging, out_dir)
    return sorted(path for path in out_dir.rglob("*") if path.is_file())


def load_lora(pipeline: Any, lora_dir: Path, adapter_name: str) -> None:
    """Add the LoRA in lora_dir to the loaded base pipeline as `adapter_name` (no base reload)."""
    pipeline.load_lora_weights(str(lora_dir), adapter_name=adapter_name)


def use_lora(pipeline: Any, adapter_name: str | None) -> None:
    """Make `adapter_name` the only active adapter; None: the base, exactly as loaded."""
    unet = pipeline.unet
    if not getattr(unet, "peft_config", None):
        if adapter_name is None:
            return
        raise ValueError(f"adapter_name: no adapter {adapter_name!r} is loaded")
    if adapter_name is None:
        pipeline.disable_lora()
        return
    if adapter_name not in unet.peft_config:
        loaded = ", ".join(sorted(unet.peft_config))
        raise ValueError(f"adapter_name: no adapter {adapter_name!r} is loaded (loaded: {loaded})")
    pipeline.enable_lora()
    pipeline.set_adapters([adapter_name])
