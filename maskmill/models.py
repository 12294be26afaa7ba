"""Load a Stable Diffusion pipeline offline: a local folder, the Hugging Face cache, or the embedded default.

Any SD 1.x / 2.x checkpoint saved with `save_pretrained` (or cached by the hub client) loads
through `from_pretrained(..., local_files_only=True)`; SDXL layouts load as SDXL pipelines.
Nothing here touches the network: a missing model is an error that says where we looked.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

EMBEDDED = {"shapes-sd": Path(__file__).parent / "assets" / "shapes-sd"}
DEFAULT_MODEL = "shapes-sd"

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


class ModelNotFoundError(FileNotFoundError):
    pass


def hf_cache_dir() -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(os.environ.get("HF_HUB_CACHE", HF_HUB_CACHE))


def resolve_model(model: str) -> Path | str:
    """A local folder (embedded names first) or a hub id that must already be in the local cache."""
    if model in EMBEDDED:
        path = EMBEDDED[model]
        if not (path / "model_index.json").exists():
            raise ModelNotFoundError(
                f"embedded model {model!r} is missing at {path}: train it with "
                f"`python -m maskmill.toyworld.train --out {path}`")
        return path
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists():
            raise ModelNotFoundError(
                f"model folder {path} has no model_index.json: save a pipeline there with "
                f"`pipe.save_pretrained('{path}')` or point to a Hugging Face snapshot folder")
        return path
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        cache = hf_cache_dir() / ("models--" + model.replace("/", "--"))
        if cache.exists():
            return model
        raise ModelNotFoundError(
            f"model {model!r} not found: no local folder {path.resolve()} and not in the Hugging Face cache "
            f"({cache}). Downloads are disabled: fetch it where there is network "
            f"(`huggingface-cli download {model}`) and copy the cache, or pass a folder saved with save_pretrained")
    raise ModelNotFoundError(
        f"model {model!r} not found: no folder at {path.resolve()}; give a local folder with model_index.json, "
        f"a Hugging Face id already in the cache ({hf_cache_dir()}), or one of: {', '.join(EMBEDDED)}")


def pipeline_class_name(model: str) -> str:
    src = resolve_model(model)
    if isinstance(src, Path):
        index = json.loads((src / "model_index.json").read_text())
    else:
        from huggingface_hub import hf_hub_download

        index = json.loads(Path(hf_hub_download(src, "model_index.json", local_files_only=True,
                                                cache_dir=hf_cache_dir())).read_text())
    return index.get("_class_name", "StableDiffusionPipeline")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(model: str = DEFAULT_MODEL, scheduler: str | None = None, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None):
    """Load an SD 1.x / 2.x / XL pipeline offline; fp16 on CUDA, fp32 on CPU unless `dtype` says otherwise."""
    import diffusers

    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
    src = resolve_model(model)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    cls_name = pipeline_class_name(model)
    kwargs = dict(local_files_only=True, dtype=dtype)
    if not isinstance(src, Path):  # a hub id: read the same cache resolve_model looked in
        kwargs["cache_dir"] = hf_cache_dir()
    if "XL" in cls_name:
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(src, **kwargs)
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            src, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kwargs)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _sampled_bytes(path: Path, window: int = 1 << 20) -> bytes:
    """Three 1 MiB windows (start, middle, end) of a weights file.

    Retraining changes every tensor but not the file size or header, so sizes alone would call a
    retrained model unchanged; reading 3 MiB stays cheap for multi-GB checkpoints.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        parts = []
        for start in sorted({0, max(0, size // 2 - window // 2), max(0, size - window)}):
            f.seek(start)
            parts.append(f.read(window))
    return b"".join(parts)


def model_fingerprint(model: str) -> dict:
    """What identifies a model's weights without hashing gigabytes: configs, file sizes, sampled bytes."""
    import hashlib

    src = resolve_model(model)
    if not isinstance(src, Path):  # a hub id: the snapshot its main ref points to in the local cache
        from huggingface_hub import snapshot_download

        src = Path(snapshot_download(src, local_files_only=True, cache_dir=hf_cache_dir()))
    h = hashlib.sha256()
    for f in sorted(src.rglob("*.json")):
        h.update(f.relative_to(src).as_posix().encode())
        h.update(f.read_bytes())
    for f in sorted(src.rglob("*.safetensors")):
        h.update(f"{f.relative_to(src).as_posix()}:{f.stat().st_size}".encode())
        h.update(_sampled_bytes(f))
    return {"model": str(model), "config_hash": h.hexdigest()[:16]}
