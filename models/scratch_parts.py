"""The from-scratch generator's parts (issue 24): its settings, a word-level CLIP tokenizer for the
service's own prompts, and the untrained diffusers components. models/scratch.py trains them.

The architecture is Stable Diffusion's at a small scale: an `AutoencoderKL` (4x downsampling,
4 latent channels), a `CLIPTextModel`, a `UNet2DConditionModel` and, for the inpainting
pipeline, the same UNet with 9 input channels. Nothing is downloaded.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.tiny_random import SPECIAL_TOKENS, _bytes_to_unicode

LATENT_CHANNELS = 4
# CLIP's own pre-tokenisation, lowercased: letters, single digits, runs of other symbols
_WORDS = re.compile(r"[^\W\d_]+|\d|[^\w\s]+|_+")


@dataclass(frozen=True)
class ScratchConfig:
    """How the project's own generator is built and trained; the defaults are the committed
    model's (models/synthderm-fitz64/MODEL_CARD.md): 90 minutes on the two cores of an Intel
    Xeon (Sapphire Rapids) VM, about 110 on an AMD EPYC Zen 4 one, 3-4 hours on an older EPYC
    (docs/DEVELOPING.md)."""

    resolution: int = 64
    seed: int = 0
    # the autoencoder: 4x downsampling (64 px -> 16x16x4 latents)
    vae_channels: tuple[int, ...] = (32, 64, 128)
    vae_layers_per_block: int = 1
    vae_steps: int = 2000
    vae_batch_size: int = 16
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_gradient_weight: float = 0.5  # L1 on image gradients: edges, against the blur
    # the text encoder (trains with the UNet)
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_max_tokens: int = 32
    # the UNet (text-to-image), then its 9-channel copy (inpaint)
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_layers_per_block: int = 2
    unet_heads: int = 4
    unet_steps: int = 4000
    unet_batch_size: int = 64
    unet_learning_rate: float = 4e-4
    # both UNet stages keep a moving average of their weights (the text encoder's too) and
    # save it (FinetuneConfig.ema_decay); 0 saves the last weights
    unet_ema_decay: float = 0.0
    inpaint_steps: int = 800
    caption_dropout: float = 0.1
    latent_views: int = 8
    checkpoint_every_steps: int = 100
    validation_every_steps: int = 400

    def __post_init__(self) -> None:
        problems = []
        if self.resolution % 8 or not 16 <= self.resolution <= 512:
            problems.append(
                f"resolution: must be a multiple of 8 in 16..512, got {self.resolution}"
            )
        for name in ("vae_steps", "unet_steps", "inpaint_steps", "vae_batch_size",
                     "unet_batch_size", "checkpoint_every_steps", "validation_every_steps",
                     "text_width", "text_layers", "text_heads", "text_max_tokens",
                     "vae_layers_per_block", "unet_layers_per_block", "unet_heads",
                     "latent_views"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name}: must be a positive integer, got {value!r}")
        for name in ("vae_channels", "unet_channels"):
            value = getattr(self, name)
            if len(value) < 2 or any(c < 8 or c % 8 for c in value):
                problems.append(f"{name}: at least two widths, each a multiple of 8, got {value}")
        if self.text_heads >= 1 and self.text_width % self.text_heads:
            problems.append("text_heads: must divide text_width")
        for name in ("vae_channels", "unet_channels"):
            widths = getattr(self, name)
            groups = min(32, widths[0]) if widths else 1
            if any(c % groups for c in widths):
                problems.append(f"{name}: every width must be a multiple of {groups} (norm groups)")
        factor = 2 ** (len(self.vae_channels) - 1)
        if self.resolution % factor:
            problems.append(
                f"resolution: {len(self.vae_channels)} autoencoder levels downsample "
                f"{factor}x; {self.resolution} is not a multiple of it"
            )
        if not 0 <= self.caption_dropout < 1:
            problems.append(f"caption_dropout: must be in [0, 1), got {self.caption_dropout}")
        if not 0 <= self.unet_ema_decay < 1:
            problems.append(f"unet_ema_decay: must be in [0, 1), got {self.unet_ema_decay}")
        for name in ("vae_learning_rate", "unet_learning_rate"):
            if not 0 < getattr(self, name) <= 1:
                problems.append(f"{name}: must be in (0, 1]")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


def config_dict(config: ScratchConfig) -> dict[str, Any]:
    return {
        f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
        for f in fields(config)
    }


def config_from_dict(values: dict[str, Any]) -> ScratchConfig:
    """A ScratchConfig from plain values (JSON); ValueError naming an unknown field."""
    known = {f.name for f in fields(ScratchConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a scratch setting (known: {', '.join(sorted(known))})")
    plain: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return ScratchConfig(**plain)


def prompt_words(prompts: Iterable[str]) -> list[str]:
    """The words of the prompts as CLIP's tokenizer splits them (lowercased)."""
    return [word for prompt in prompts for word in _WORDS.findall(prompt.lower())]


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Byte-pair merges that make every given word one token (learned on the distinct words:
    the most frequent adjacent pair first, ties by the pair's text, so the result is a pure
    function of the word set)."""
    table = _bytes_to_unicode()
    pieces = {}
    for word in sorted(set(words)):
        symbols = [table[b] for b in word.encode()]
        pieces[word] = [*symbols[:-1], symbols[-1] + "</w>"]
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols in pieces.values():
            pairs.update(itertools.pairwise(symbols))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, symbols in pieces.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            pieces[word] = merged


def build_tokenizer(prompts: Iterable[str], *, max_tokens: int) -> CLIPTokenizer:
    """A CLIP tokenizer whose every prompt word is one token; any other text still tokenizes
    (byte-level, a token per character)."""
    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = learn_merges(prompt_words(prompts))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    pairs: Any = merges  # the tokenizers backend takes (left, right) pairs; the stub says str
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=max_tokens)


def build_vae(config: ScratchConfig) -> AutoencoderKL:
    depth = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        block_out_channels=config.vae_channels,
        latent_channels=LATENT_CHANNELS,
        layers_per_block=config.vae_layers_per_block,
        norm_num_groups=min(32, config.vae_channels[0]),
        sample_size=config.resolution,
    )


def build_text_encoder(config: ScratchConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    bos_id, eos_id = (tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS)
    assert isinstance(bos_id, int) and isinstance(eos_id, int)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_width,
            intermediate_size=4 * config.text_width,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.text_max_tokens,
            projection_dim=config.text_width,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
    )


def build_unet(
    config: ScratchConfig, *, in_channels: int = LATENT_CHANNELS
) -> UNet2DConditionModel:
    """Cross-attention at every level but the first (the largest latents cost the most)."""
    depth = len(config.unet_channels)
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        layers_per_block=config.unet_layers_per_block,
        block_out_channels=config.unet_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
        cross_attention_dim=config.text_width,
        attention_head_dim=config.unet_heads,
        norm_num_groups=min(32, config.unet_channels[0]),
    )


def inpaint_unet_from(unet: Any) -> Any:
    """A 9-channel UNet (latents, mask, masked-image latents) initialised from a trained
    text-to-image one: the extra input channels start at zero, so it begins as that model."""
    settings = dict(unet.config)
    settings["in_channels"] = 2 * LATENT_CHANNELS + 1
    inpaint = UNet2DConditionModel.from_config(settings)
    state = unet.state_dict()
    weight = state["conv_in.weight"]
    wide = torch.zeros(weight.shape[0], settings["in_channels"], *weight.shape[2:])
    wide[:, : weight.shape[1]] = weight
    state["conv_in.weight"] = wide
    inpaint.load_state_dict(state)
    return inpaint


def build_scheduler() -> DPMSolverMultistepScheduler:
    """Stable Diffusion's noise schedule (scaled linear betas, epsilon prediction); training
    draws DDPM noise from the same config, sampling runs DPM-Solver++."""
    return DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++",
        steps_offset=1,
    )


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
