"""Load a Stable Diffusion pipeline offline: a local folder, the Hugging Face cache, or the embedded default.

Any SD 1.x / 2.x checkpoint saved with `save_pretrained` (or cached by the hub client) loads
through `from_pretrained(..., local_files_only=True)`; SDXL layouts load as SDXL pipelines.
Nothing here touches the network: a missing model is an error that says where we looked.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
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


class _NoTorchvisionFallbackNote(logging.Filter):
    """Drops transformers' note that an image processor falls back to PIL without torchvision: maskmill
    never installs torchvision and loads no image processor it uses, so the note is noise in every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def quiet_transformers() -> None:
    """transformers' share of `quiet_libraries`: no loading or saving bars, no torchvision note. Jobs that
    load transformers models but no pipeline (the segmenter) call this alone, sparing the diffusers import."""
    import transformers

    note_logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _NoTorchvisionFallbackNote) for f in note_logger.filters):
        note_logger.addFilter(_NoTorchvisionFallbackNote())
    transformers.utils.logging.disable_progress_bar()


def quiet_libraries() -> None:
    """A quiet console inside a run: no loading bars from diffusers or transformers, no torchvision note.
    Warnings and errors otherwise still show. Idempotent; called before every pipeline load."""
    import diffusers

    quiet_transformers()
    diffusers.utils.logging.disable_progress_bar()


def load_pipeline(model: str = DEFAULT_MODEL, scheduler: str | None = None, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None):
    """Load an SD 1.x / 2.x / XL pipeline offline; fp16 on CUDA, fp32 on CPU unless `dtype` says otherwise."""
    quiet_libraries()
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


# --- model identity --------------------------------------------------------------------------
# Which files say what a saved model is: configs are hashed whole, weights by size and samples.
_CONFIG_SUFFIXES = {".json", ".txt", ".model"}
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".ckpt", ".pt", ".pth"}
_IDENTITIES: dict[tuple, str] = {}


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


def model_folder(model: str | os.PathLike) -> Path:
    """The folder holding `model`'s files: the local folder, or the hub id's cached snapshot (offline)."""
    src = resolve_model(str(model))
    if isinstance(src, Path):
        return src
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(src, local_files_only=True, cache_dir=hf_cache_dir()))


@functools.lru_cache(maxsize=8)
def _tokenizer_in(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)


def load_tokenizer(model: str):
    """The model's (first) tokenizer alone, offline: enough to check prompts before any weights load."""
    folder = model_folder(model).resolve()
    if not (folder / "tokenizer").is_dir():
        raise ModelNotFoundError(f"model {model!r} has no tokenizer/ folder in {folder}")
    try:
        return _tokenizer_in(folder)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"model {model!r}: cannot load its tokenizer from {folder / 'tokenizer'}: "
                                 f"{' '.join(str(e).split())}") from None


def _files_identity(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not p.name.startswith(".") and p.suffix in _CONFIG_SUFFIXES | _WEIGHT_SUFFIXES)
    stats = tuple((p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()])
    key = (str(folder.resolve()), stats)  # mtimes only decide whether to re-read, they are not hashed
    if key not in _IDENTITIES:
        h = hashlib.sha256()
        for p, (rel, size, _) in zip(files, stats):
            h.update(f"{rel}\0{size}\0".encode())
            h.update(p.read_bytes() if p.suffix in _CONFIG_SUFFIXES else _sampled_bytes(p))
        _IDENTITIES[key] = "files:" + h.hexdigest()[:16]
    return _IDENTITIES[key]


def _weights_identity(pipe, samples_per_tensor: int = 4096) -> str:
    h = hashlib.sha256()
    for name, module in sorted(pipe.components.items()):
        if not isinstance(module, torch.nn.Module):
            continue
        h.update(f"{name}:{type(module).__name__}|".encode())
        for key, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            sample = flat[::step][:samples_per_tensor].to("cpu", torch.float32).contiguous()
            h.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            h.update(sample.numpy().tobytes())
    return "weights:" + h.hexdigest()[:16]


def model_identity(model) -> str:
    """A short string that changes when the model's weights or configs change, and only then.

    `model` is what a config names (an embedded name, a folder, or a hub id in the local cache)
    or a loaded pipeline:
    - a name: "files:<16 hex>", sha256 over every config file (whole) and every weights file (its
      size and three sampled 1 MiB windows) of the model's folder, by relative path. A hub id is
      its cached snapshot folder, so a snapshot and a copy of it agree; where the folder lives does
      not count. Cached per process while the files' sizes and mtimes are unchanged.
    - a pipeline (anything with diffusers' `.components`): "weights:<16 hex>", over each module's
      parameter names, shapes, dtypes and a strided sample of every tensor: the weights in memory,
      which may not come from any folder.
    Cheap (megabytes read, not gigabytes) and not a tamper check: any retraining moves every
    tensor, so a sample sees it; a model retrained into the same folder gets a new identity.
    """
    if hasattr(model, "components"):
        return _weights_identity(model)
    return _files_identity(model_folder(model))


# --- CLIP checkpoints (loaded by maskmill.clip_model; named here so configs can check them cheaply) ---
EMBEDDED_CLIPS = {"shapes-clip": Path(__file__).parent / "assets" / "shapes-clip"}
CLIP_WEIGHTS_FILE = "model.safetensors"


class ClipNotFoundError(FileNotFoundError):
    pass


def resolve_clip(model: str | Path) -> Path:
    """The weight file of an embedded name, of a folder holding model.safetensors, or the file itself."""
    if str(model) in EMBEDDED_CLIPS:
        path = EMBEDDED_CLIPS[str(model)] / CLIP_WEIGHTS_FILE
        if not path.is_file():
            raise ClipNotFoundError(f"embedded CLIP {model!r} is missing at {path}: train it with "
                                    f"`maskmill toyworld train-clip --out {path.parent}`")
        return path
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / CLIP_WEIGHTS_FILE
    if not path.is_file():
        raise ClipNotFoundError(f"CLIP model {str(model)!r} not found: give a local weight file (.safetensors, or a "
                                f"plain state dict .pt), a folder with {CLIP_WEIGHTS_FILE}, or one of: {', '.join(EMBEDDED_CLIPS)}")
    return path


# How a class is put into words for a CLIP. Real checkpoints were trained on web captions and score
# CLIP's own zero-shot prompt best; the embedded micro CLIP was trained on captions like "a circle"
# and never saw "a photo of" (its default is also the CLIP check's).
CLIP_PHOTO_TEMPLATE = "a photo of a {}."
EMBEDDED_CLIP_TEMPLATE = "a {}"


def check_class_template(template: str) -> str:
    """`template` unchanged if it has exactly one "{}" (the class name's slot) and no other field."""
    import string

    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError:  # an unmatched brace
        fields = None
    if fields != [""]:
        raise ValueError(f"template must contain exactly one '{{}}' (where the class name goes), got {template!r}")
    return template


def clip_class_template(weights: str | Path) -> str:
    """The default prompt of a class for the CLIP at `weights`: an embedded CLIP's own caption form,
    CLIP's photo prompt for any other checkpoint."""
    embedded = {(folder / CLIP_WEIGHTS_FILE).resolve() for folder in EMBEDDED_CLIPS.values()}
    return EMBEDDED_CLIP_TEMPLATE if Path(weights).resolve() in embedded else CLIP_PHOTO_TEMPLATE
