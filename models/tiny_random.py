"""`tiny-random`: random-weight SD and SD-inpaint pipelines built from the real diffusers classes.

Saved to a local directory and loaded with `from_pretrained(local_dir)` exactly as a real
checkpoint is, so tests exercise the real loading and sampling code in about a second.
Run: `python -m models.tiny_random var/models/tiny-random` (add `--inpaint` for the inpainter).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
LATENT_CHANNELS = 4
# The inpainting UNet sees latents + mask + masked-image latents (PAPER.md section 2b).
INPAINT_UNET_IN_CHANNELS = LATENT_CHANNELS + 1 + LATENT_CHANNELS


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (CLIP's byte-level BPE)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def build_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges: any text tokenizes, nothing is downloaded."""
    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _components(seed: int, *, unet_in_channels: int) -> dict[str, Any]:
    """The tiny components shared by both pipelines; only the UNet's input channels differ."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    bos_id, eos_id = (tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS)
    assert isinstance(bos_id, int) and isinstance(eos_id, int)
    unet = UNet2DConditionModel(
        sample_size=32,  # latents (B, 4, 32, 32) -> images (B, 3, 64, 64)
        in_channels=unet_in_channels,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++",
        steps_offset=1,
    )
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def build_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A tiny SD pipeline: 64x64 images (latents 4x32x32), a few hundred thousand weights."""
    return StableDiffusionPipeline(**_components(seed, unet_in_channels=LATENT_CHANNELS))


def build_inpaint_pipeline(seed: int = 0) -> StableDiffusionInpaintPipeline:
    """The same tiny pipeline as an inpainter: its UNet takes 9 channels (latents, mask, masked)."""
    return StableDiffusionInpaintPipeline(
        **_components(seed, unet_in_channels=INPAINT_UNET_IN_CHANNELS)
    )


def save(out_dir: Path, seed: int = 0, *, inpaint: bool = False) -> Path:
    """Build and save the pipeline to `out_dir` (atomically: a folder appears complete)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build: Callable[[int], Any] = build_inpaint_pipeline if inpaint else build_pipeline
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".tiny-") as tmp:
        staging = Path(tmp) / "pipeline"
        build(seed).save_pretrained(staging)
        if out_dir.exists():
            return out_dir
        staging.rename(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--inpaint", action="store_true", help="build a StableDiffusionInpaintPipeline instead"
    )
    args = parser.parse_args()
    from models.pipelines import quiet_loading

    quiet_loading()
    print(save(args.out_dir, args.seed, inpaint=args.inpaint))


if __name__ == "__main__":
    main()
