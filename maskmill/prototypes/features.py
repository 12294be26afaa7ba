"""Dense image features for prototype banks: the `FeatureExtractor` interface and SD query features.

A feature extractor maps uint8 images (N, H, W, 3) to dense features (N, C, h, w) whose per-pixel
cosine similarity says "same kind of stuff". Banks built with one extractor only make sense with
the same extractor at inference, so each one states a `fingerprint()` that caches and saved banks
are stamped with.

- `SDQueryFeatures`: OVDiff's features: the queries (`attn2.to_q` outputs) of Stable Diffusion's
  decoder cross-attention layers, from one UNet pass on the noised VAE latent with an empty prompt.
- `CLIPPatchFeatures` (clip_features.py): ViT patch tokens of an OpenAI CLIP checkpoint read from
  a local file; it also scores image/text pairs, which is what the CLIP class pre-filter needs.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..models import model_identity


class FeatureExtractor(ABC):
    """Images in, dense features out. Adding an extractor is one subclass."""

    name: str = "base"

    @abstractmethod
    def fingerprint(self) -> dict:
        """JSON-able description of everything that changes the features (model, layers, timestep...)."""

    @abstractmethod
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        """images: uint8 (N, H, W, 3) -> float32 (N, C, h, w) on CPU."""


# ----------------------------------------------------------------------------------------------
# helpers


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:  # one image
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def _resize_uint8(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize each image to (height, width) with PIL bicubic (torchvision is not a dependency)."""
    h, w = size
    if images.shape[1:3] == (h, w):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BICUBIC)) for im in images])


def config_hash(config: dict) -> str:
    """Stable short hash of a JSON-able config (sorted keys; tuples and lists hash alike)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Config entries that say where a model was loaded from, not what it is: the same weights loaded as
# "shapes-sd" or from a copied folder must give the same fingerprint.
_LOCATION_KEYS = ("_name_or_path", "_use_default_values")


def model_config(config) -> dict:
    """A diffusers config as a dict without its location entries (see `_LOCATION_KEYS`)."""
    return {k: v for k, v in dict(config).items() if k not in _LOCATION_KEYS}


@contextmanager
def capture_outputs(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record each module's forward output under its name while the context is open.

    Hooks are removed on exit even if the forward pass raised, so a pipeline is never left
    with stale hooks.
    """
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            outputs[name] = output.detach()

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _tokens_to_map(tokens: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, C) attention-layer tokens -> (B, C, h, w), inferring (h, w) from the latent's aspect."""
    b, n, c = tokens.shape
    lh, lw = latent_hw
    factor = round((lh * lw / n) ** 0.5)  # the layer's downsampling factor relative to the latent
    h, w = lh // factor, lw // factor
    if h * w != n:
        raise ValueError(f"cannot lay out {n} tokens on a grid of aspect {lh}x{lw}")
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def _normalise_and_concat(maps: list[torch.Tensor]) -> torch.Tensor:
    """Upsample each (N, C_l, h_l, w_l) map to the largest grid, L2-normalise it per pixel, concat.

    Normalising each layer's block gives every layer the same weight in the final cosine,
    whatever its channel count or activation scale.
    """
    h = max(m.shape[-2] for m in maps)
    w = max(m.shape[-1] for m in maps)
    blocks = []
    for m in maps:
        m = m.float()
        if m.shape[-2:] != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        blocks.append(F.normalize(m, dim=1))
    return torch.cat(blocks, dim=1)


# ----------------------------------------------------------------------------------------------
# Stable Diffusion queries (OVDiff)


class SDQueryFeatures(FeatureExtractor):
    """OVDiff features: `attn2.to_q` outputs of the UNet decoder at timestep t, empty prompt.

    pipe: a diffusers StableDiffusionPipeline (only vae, unet, tokenizer/text_encoder, scheduler used).
    layers: module names inside the UNet ending in "attn2"; default all up-block cross-attentions
            (9 on SD 1.x, as in the paper).
    timestep: noise level of the single UNet pass (OVDiff: 200).
    size: side (int) or (height, width) images are resized to before encoding; None keeps the
          image size rounded down to what the UNet accepts.
    noise_seed: the same noise is used for every image, so an image's features do not depend on
          the batch it came in.
    batch_size: images per UNet pass (bounds memory).
    model_id: optional name recorded in the fingerprint (default: the pipeline's name_or_path).
    """

    name = "sd_query"

    def __init__(self, pipe, layers: list[str] | None = None, timestep: int = 200,
                 size: int | tuple[int, int] | None = None, noise_seed: int = 0,
                 batch_size: int = 4, model_id: str | None = None):
        self.pipe = pipe
        unet = pipe.unet
        self.layers = list(layers) if layers is not None else default_query_layers(unet)
        modules = dict(unet.named_modules())
        bad = [n for n in self.layers if n not in modules or not hasattr(modules[n], "to_q")]
        if bad or not self.layers:
            raise ValueError(f"not attention layers with to_q in this UNet: {bad or '(none given)'}; "
                             f"available: {default_query_layers(unet)}")
        self._to_q = {n: modules[n].to_q for n in self.layers}
        self.timestep = int(timestep)
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
        self.noise_seed = int(noise_seed)
        self.batch_size = int(batch_size)
        self.model_id = model_id or getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "")
        self.scheduler = _forward_process_scheduler(pipe.scheduler)
        self._empty_embedding: torch.Tensor | None = None
        self._fingerprint: dict | None = None

    # The UNet needs sides divisible by the VAE factor times 2 per UNet downsampling.
    def _multiple(self) -> int:
        return int(self.pipe.vae_scale_factor) * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            p = self.pipe
            self._fingerprint = {
                "name": self.name,
                "model": {
                    "id": str(self.model_id),
                    "unet_config": config_hash(model_config(p.unet.config)),
                    "vae_config": config_hash(model_config(p.vae.config)),
                    "weights": model_identity(p),
                },
                "layers": list(self.layers),
                "timestep": self.timestep,
                "size": list(self.size) if self.size else None,
                "noise_seed": self.noise_seed,
                "scheduler": {"class": type(self.scheduler).__name__,
                              "config": config_hash(model_config(self.scheduler.config))},
            }
        return self._fingerprint

    def _empty_prompt(self) -> torch.Tensor:
        if self._empty_embedding is None:
            embeds, _ = self.pipe.encode_prompt("", self.pipe.unet.device, 1, False)
            self._empty_embedding = embeds
        return self._empty_embedding

    def _target_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        if self.size is not None:
            h, w = self.size
        else:
            h, w = hw
        m = self._multiple()
        if h < m or w < m:
            raise ValueError(f"image size {h}x{w} is below the UNet's minimum {m}x{m}")
        return h - h % m, w - w % m

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        images = _check_images(images)
        images = _resize_uint8(images, self._target_size(images.shape[1:3]))
        out = [self._batch(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return torch.cat(out)

    def _batch(self, images: np.ndarray) -> torch.Tensor:
        vae, unet = self.pipe.vae, self.pipe.unet
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = x.to(vae.device, vae.dtype)
        # Posterior mean, not a sample: features must be deterministic.
        latents = vae.encode(x).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = (latents - shift) * vae.config.scaling_factor
        # One generator per image from the same seed: identical noise whatever the batch.
        noise = torch.stack([
            torch.randn(latents.shape[1:], generator=torch.Generator("cpu").manual_seed(self.noise_seed))
            for _ in range(len(latents))
        ]).to(latents.device, latents.dtype)
        t = torch.full((len(latents),), self.timestep, dtype=torch.long, device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t).to(unet.dtype)
        context = self._empty_prompt().to(unet.device, unet.dtype).expand(len(latents), -1, -1)
        with capture_outputs(self._to_q) as outputs:
            unet(noisy, t, encoder_hidden_states=context, return_dict=False)
        missing = [n for n in self.layers if n not in outputs]
        if missing:
            raise RuntimeError(f"UNet pass did not run layers {missing}")
        maps = [_tokens_to_map(outputs[n], tuple(latents.shape[-2:])) for n in self.layers]
        return _normalise_and_concat(maps).cpu()


def default_query_layers(unet: torch.nn.Module) -> list[str]:
    """Names of every decoder (up-block) cross-attention module, in forward order."""
    return [n for n, _ in unet.named_modules() if n.startswith("up_blocks.") and n.endswith("attn2")]


def _forward_process_scheduler(scheduler):
    """A scheduler whose add_noise is the DDPM forward process sqrt(a)x0 + sqrt(1-a)eps.

    The UNet is trained on that parameterisation. DDIM, DDPM and PNDM give it; sigma-based
    schedulers (Euler, LMS, ...) return x0 + sigma*eps and need their timesteps set first, so for
    those we build a DDIM scheduler from the same config (same betas, same forward process).
    """
    if hasattr(scheduler, "alphas_cumprod") and not hasattr(scheduler, "sigmas"):
        return scheduler
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler.config)
