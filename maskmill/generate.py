"""Generate one batch of images with attention capture.

Each sample has its own CPU `torch.Generator` seeded from its own seed, so a sample's
image depends on its seed, not on which batch or GPU produced it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .capture import CaptureConfig, SampleAttention, capture_attention


@dataclass
class GenerationSettings:
    steps: int = 25
    guidance: float = 4.0
    height: int = 32
    width: int = 32


def latent_hw(pipe, height: int, width: int) -> tuple[int, int]:
    f = pipe.vae_scale_factor
    return height // f, width // f


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def _to_uint8(images) -> list[np.ndarray]:
    if isinstance(images, np.ndarray):  # output_type="np": (B, H, W, 3) in [0, 1]
        return [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]
    return [np.asarray(im.convert("RGB")) for im in images]


@torch.no_grad()
def generate_plain(pipe, prompts: list[str], seeds: list[int], settings: GenerationSettings) -> list[np.ndarray]:
    """The pipeline as is, no capture: the reference for identity tests and benchmarks."""
    out = pipe(prompts, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
               height=settings.height, width=settings.width, generator=generators(seeds), output_type="np")
    return _to_uint8(out.images)


@torch.no_grad()
def generate_with_attention(pipe, prompts: list[str], seeds: list[int], settings: GenerationSettings,
                            capture: CaptureConfig | None = None,
                            timing: dict[str, float] | None = None) -> tuple[list[np.ndarray], list[SampleAttention]]:
    """Images (uint8 HxWx3) and the captured attention of each sample.

    timing: if given, gets "capture" = the seconds spent recording inside the UNet (part of this call's time).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    capture = capture or CaptureConfig()
    cfg = settings.guidance > 1.0  # diffusers skips the unconditional half at guidance <= 1
    with capture_attention(pipe.unet, capture, batch_size=len(prompts), cfg=cfg,
                           latent_hw=latent_hw(pipe, settings.height, settings.width),
                           num_steps=settings.steps) as store:
        images = generate_plain(pipe, prompts, seeds, settings)
    if timing is not None:
        timing["capture"] = store.seconds
    return images, store.results()
