"""Attention of an existing image: one UNet pass on its noised latent, empty prompt.

DiffSeg reads self-attention at t = 300 and DiffCut encoder features at t = 50 this way
(ANCHORS §2), so both extractors also segment images the generator never made.
"""
from __future__ import annotations

import numpy as np
import torch

from .capture import CaptureConfig, capture_attention
from .extractors.base import SampleAttention


@torch.no_grad()
def encode_images(pipe, images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> scaled VAE latents (mean of the posterior)."""
    x = torch.stack([torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1) for im in images])
    x = x.to(pipe.device, pipe.vae.dtype) / 127.5 - 1.0
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def attention_of_images(pipe, images: list[np.ndarray], timestep: int = 300, capture: CaptureConfig | None = None,
                        prompt: str = "", seed: int = 0) -> list[SampleAttention]:
    """Capture attention (and requested features) of one UNet pass per image at `timestep`."""
    if not images:
        return []
    sizes = {im.shape[:2] for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images must share one size to be batched, got {sorted(sizes)}")
    latents = encode_images(pipe, images)
    g = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g).to(latents.device, latents.dtype)
    t = torch.full((len(images),), int(timestep), device=latents.device, dtype=torch.long)
    noisy = pipe.scheduler.add_noise(latents, noise, t) if hasattr(pipe.scheduler, "add_noise") else latents
    ids = pipe.tokenizer([prompt] * len(images), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(pipe.device)
    context = pipe.text_encoder(ids)[0]
    with capture_attention(pipe.unet, capture or CaptureConfig(), batch_size=len(images), cfg=False,
                           latent_hw=tuple(latents.shape[-2:]), num_steps=1) as store:
        pipe.unet(noisy, t, encoder_hidden_states=context)
    return store.results()
