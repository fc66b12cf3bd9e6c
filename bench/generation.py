"""Generation throughput: a plain diffusers call per image (the baseline) against the worker's
path (batched, fp16 on CUDA, channels_last, PNG encoding and upload overlapped, rows written to
the database), measured in one run; prints img/s for each and the ratio.

    python -m bench.generation                      # CPU: the tiny-random model
    python -m bench.generation --arch sd21 --steps 50 --images 256 --batch 16   # a GPU

On a GPU it builds a random-weight pipeline with the exact stable-diffusion-2-1-base
architecture (the same FLOPs as the real weights): nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def build_sd21_base(out_dir: Path) -> Path:
    """A random-weight pipeline with stable-diffusion-2-1-base's architecture, saved locally."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.tiny_random import build_tokenizer

    if (out_dir / "model_index.json").is_file():
        return out_dir
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=512,
        )
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++",
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    return platform.processor() or "CPU"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def baseline(model_dir: Path, *, images: int, steps: int, device: torch.device) -> float:
    """img/s of a plain diffusers call per image: batch 1, the pipeline as loaded, PNG saved."""
    from diffusers import StableDiffusionPipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    prompt = "An image of psoriasis, a skin disease"
    pipe(prompt, num_inference_steps=steps, guidance_scale=3.0)  # warm-up
    sync(device)
    started = time.perf_counter()
    for i in range(images):
        image = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=3.0,
            generator=torch.Generator(device=device).manual_seed(i),
        ).images[0]
        image.save(io.BytesIO(), format="PNG")
    sync(device)
    elapsed = time.perf_counter() - started
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return images / elapsed


def worker_path(
    model_dir: Path,
    *,
    images: int,
    steps: int,
    batch: int,
    device: torch.device,
    compile_unet: bool,
) -> float:
    """img/s of the worker's own run_chunk: cached pipeline, batches, overlapped PNG upload,
    rows in an embedded database, heartbeats and progress as in production."""
    from app.cli import upgrade_database
    from app.config import Settings
    from app.db.session import session_scope
    from app.engine import claim_chunk
    from app.generation.service import create_job
    from app.keys import create_key
    from app.schemas import JobCreate
    from workers import generate

    with tempfile.TemporaryDirectory() as tmp:
        models_dir = Path(tmp) / "models"
        models_dir.mkdir()
        (models_dir / "bench").symlink_to(model_dir.resolve())
        settings = Settings(
            data_dir=Path(tmp),
            models_dir=models_dir,
            default_model="bench",
            device=str(device),
            chunk_size=images,
            generation_batch_size=batch,
            torch_compile=compile_unet,
            progress_update_interval_s=1.0,
            step_update_interval_s=1.0,
        )
        upgrade_database(settings)

        def one_chunk(count: int, seed: int) -> None:
            with session_scope(settings.database_url) as session:
                owner, _ = create_key(session=session, name="bench")
                job, _ = create_job(
                    session=session,
                    settings=settings,
                    params=JobCreate(
                        condition="psoriasis", count=count, seed=seed, num_inference_steps=steps
                    ),
                    owner=owner,
                )
                job_id = job.id
            with session_scope(settings.database_url) as session:
                claim = claim_chunk(
                    session=session, settings=settings, job_id=job_id, index=0, worker="bench"
                )
            assert claim is not None
            outcome = generate.run_chunk(settings, claim, "bench")
            assert outcome.done == count, outcome

        one_chunk(batch, seed=1)  # warm-up: load (and compile) the pipeline
        sync(device)
        started = time.perf_counter()
        one_chunk(images, seed=2)
        sync(device)
        return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--arch", choices=["tiny", "sd21"], default=None, help="default: sd21 on CUDA, tiny on CPU"
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=None, help="default: 256 on CUDA, 32 on CPU")
    parser.add_argument("--baseline-images", type=int, default=None, help="default: images / 4")
    parser.add_argument("--batch", type=int, default=None, help="default: 16 on CUDA, 8 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--models-dir", type=Path, default=Path("var/bench-models"))
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = args.arch or ("sd21" if device.type == "cuda" else "tiny")
    images = args.images or (256 if device.type == "cuda" else 32)
    batch = args.batch or (16 if device.type == "cuda" else 8)
    baseline_images = args.baseline_images or max(4, images // 4)
    args.models_dir.mkdir(parents=True, exist_ok=True)
    if arch == "sd21":
        model_dir = build_sd21_base(args.models_dir / "sd21-base-random")
    else:
        from models.tiny_random import save

        model_dir = save(args.models_dir / "tiny-random")

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"device: {card}; arch {arch}; {args.steps} steps; worker batch {batch}; "
        f"torch {torch.__version__}"
    )
    base = baseline(model_dir, images=baseline_images, steps=args.steps, device=device)
    print(
        f"baseline (plain pipeline call per image, batch 1): {base:.2f} img/s "
        f"over {baseline_images} images"
    )
    fast = worker_path(
        model_dir,
        images=images,
        steps=args.steps,
        batch=batch,
        device=device,
        compile_unet=args.compile,
    )
    print(f"worker path (run_chunk, batch {batch}): {fast:.2f} img/s over {images} images")
    print(f"ratio worker/baseline: {fast / base:.2f}x")
    if args.json:
        record: dict[str, Any] = {
            "device": card,
            "arch": arch,
            "steps": args.steps,
            "batch": batch,
            "images": images,
            "baseline_img_s": base,
            "worker_img_s": fast,
            "ratio": fast / base,
        }
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
