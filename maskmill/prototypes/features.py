"""Dense image features for prototype banks: the `FeatureExtractor` interface and two implementations.

A feature extractor maps uint8 images (N, H, W, 3) to dense features (N, C, h, w) whose per-pixel
cosine similarity says "same kind of stuff". Banks built with one extractor only make sense with
the same extractor at inference, so each one states a `fingerprint()` that caches and saved banks
are stamped with.

- `SDQueryFeatures`: OVDiff's features: the queries (`attn2.to_q` outputs) of Stable Diffusion's
  decoder cross-attention layers, from one UNet pass on the noised VAE latent with an empty prompt.
- `CLIPPatchFeatures`: ViT patch tokens of an OpenAI CLIP checkpoint read from a local file; it
  also scores image/text pairs, which is what the CLIP class pre-filter needs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


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
    """Resize each image to (height, width) with PIL bicubic (no torchvision here, see ANCHORS §1)."""
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


def weights_digest(*modules: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """Cheap digest of model weights: names, shapes, dtypes and a strided sample of each tensor.

    Why not only the config: two trainings of the same architecture (the toy world retrains its
    micro SD) share a config but must not share cached banks. Why a sample and not every byte:
    SD's 1 GB+ of weights would cost seconds per flow run; any retraining moves every tensor, so
    a sample detects it. Not a tamper check.
    """
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            sample = flat[::step][:samples_per_tensor].to("cpu", torch.float32).contiguous()
            h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


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
                    "weights": weights_digest(p.unet, p.vae, p.text_encoder),
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


# ----------------------------------------------------------------------------------------------
# CLIP ViT patch tokens

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def _load_clip_submodule(name: str):
    """Import clip-anytorch's `model` or `simple_tokenizer` without running `clip/__init__.py`.

    The package's __init__ imports torchvision, which is absent here (ANCHORS §1); these two
    files only need torch/numpy (and ftfy/regex), so load them from their file paths.
    """
    key = f"_maskmill_clip_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("clip-anytorch is not installed: `pip install --no-deps clip-anytorch`")
    path = Path(list(spec.submodule_search_locations)[0]) / f"{name}.py"
    module_spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[key] = module
    module_spec.loader.exec_module(module)
    return module


def load_clip_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a CLIP state dict from a local .safetensors or a plain torch state-dict file.

    Only weight-only formats are accepted: `torch.load(weights_only=True)` never runs pickled
    code. OpenAI's released `.pt` files are TorchScript archives; convert one once with
    `torch.jit.load(p, map_location="cpu").state_dict()` saved via safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint not found: {path} (give a local file; nothing is downloaded)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means "not a usable weight file"
        raise ValueError(f"cannot read CLIP weights from {path}: {e}. Expected a safetensors file or a plain "
                         "state dict; OpenAI's TorchScript .pt must be converted first "
                         "(torch.jit.load(p).state_dict() -> safetensors)") from None
    if not isinstance(state, dict) or "visual.proj" not in state:
        raise ValueError(f"{path} is not a CLIP ViT state dict (no 'visual.proj'); ResNet CLIPs give no patch tokens")
    return dict(state)


class CLIPPatchFeatures(FeatureExtractor):
    """Dense CLIP ViT features: every patch token after ln_post and the projection, as (N, D, g, g).

    Preprocessing resizes the whole image to the model's input square (no centre crop) so the
    dense map covers the whole image and can be upsampled back onto it. `class_logits` scores an
    image against class names the usual CLIP way (for the pre-filter).
    """

    name = "clip_patch"

    def __init__(self, checkpoint_path: str | Path, batch_size: int = 8):
        self.checkpoint_path = Path(checkpoint_path)
        state = load_clip_state_dict(self.checkpoint_path)
        clip_model = _load_clip_submodule("model")
        # build_model casts to fp16 (ANCHORS §1); CPU inference wants fp32.
        self.model = clip_model.build_model(state).float().eval()
        self.resolution = int(self.model.visual.input_resolution)
        self.batch_size = int(batch_size)
        self._tokenizer = None
        self._fingerprint: dict | None = None

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = {
                "name": self.name,
                "model": {"file": self.checkpoint_path.name, "sha256": file_sha256(self.checkpoint_path)[:16]},
                "resolution": self.resolution,
                "tokens": "ln_post+proj",
            }
        return self._fingerprint

    def preprocess(self, images: np.ndarray, centre_crop: bool = False) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalised float (N, 3, R, R)."""
        images = _check_images(images)
        r = self.resolution
        if centre_crop:  # CLIP's own recipe: shorter side to R, then the central R x R
            out = []
            for im in images:
                h, w = im.shape[:2]
                s = r / min(h, w)
                pil = Image.fromarray(im).resize((max(r, round(w * s)), max(r, round(h * s))), Image.BICUBIC)
                left, top = (pil.width - r) // 2, (pil.height - r) // 2
                out.append(np.asarray(pil.crop((left, top, left + r, top + r))))
            images = np.stack(out)
        else:
            images = _resize_uint8(images, (r, r))
        x = (images.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = self.preprocess(images)
        return torch.cat([self._patch_tokens(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)])

    def _patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        v = self.model.visual
        x = v.conv1(x)
        b, width, g, _ = x.shape
        x = x.reshape(b, width, g * g).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).expand(b, 1, width)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(x).permute(1, 0, 2)  # NLD -> LND, as clip.model's transformer expects
        x = v.transformer(x).permute(1, 0, 2)
        x = v.ln_post(x[:, 1:, :]) @ v.proj  # patch tokens only, in the joint embedding space
        return x.permute(0, 2, 1).reshape(b, -1, g, g)

    @torch.no_grad()
    def class_logits(self, image: np.ndarray, classes: list[str], template: str = "a photo of a {}.") -> np.ndarray:
        """CLIP logits (K,) of one image against `template.format(class)` for each class."""
        if self._tokenizer is None:
            self._tokenizer = _load_clip_submodule("simple_tokenizer").SimpleTokenizer()
        tok = self._tokenizer
        ctx = self.model.context_length
        tokens = torch.zeros(len(classes), ctx, dtype=torch.long)
        for i, c in enumerate(classes):
            ids = [tok.encoder["<|startoftext|>"]] + tok.encode(template.format(c)) + [tok.encoder["<|endoftext|>"]]
            ids = ids[:ctx - 1] + [tok.encoder["<|endoftext|>"]] if len(ids) > ctx else ids
            tokens[i, : len(ids)] = torch.tensor(ids)
        image_emb = F.normalize(self.model.encode_image(self.preprocess(image, centre_crop=True)), dim=-1)
        text_emb = F.normalize(self.model.encode_text(tokens), dim=-1)
        logits = self.model.logit_scale.exp() * image_emb @ text_emb.T
        return logits[0].numpy()
