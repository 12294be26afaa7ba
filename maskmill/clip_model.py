"""A CLIP from a local file, ready to score images against text: the embedded micro CLIP or a real one.

Both load through one path: the weights are read weight-only (safetensors, or a plain state dict
through `torch.load(weights_only=True)`; a pickle is refused), in OpenAI's key names, and
clip-anytorch's `build_model` builds the architecture from the tensors' shapes. A `config.json`
beside the weights (the embedded model has one) must agree with those shapes.

    model = load_clip("shapes-clip")          # maskmill/assets/shapes-clip/model.safetensors
    model = load_clip("ViT-B-32.safetensors") # a real CLIP converted once to safetensors
"""
from __future__ import annotations

import json
import sys
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .models import CLIP_WEIGHTS_FILE as WEIGHTS_FILE
from .models import resolve_clip

# The constructor arguments of clip.model.CLIP, in its order.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def _load_clip_submodule(name: str):
    """Import clip-anytorch's `model` or `simple_tokenizer` without running `clip/__init__.py`.

    The package's __init__ imports torchvision, which maskmill does not install; these two
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


CONFIG_FILE = "config.json"
ARCHITECTURE_KEYS = ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
                     "context_length", "vocab_size", "transformer_width", "transformer_heads", "transformer_layers")


def architecture_of(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """clip.model.CLIP's arguments as `build_model` infers them from a ViT state dict (heads = width // 64)."""
    vision_width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    transformer_width = state["ln_final.weight"].shape[0]
    return {
        "embed_dim": state["text_projection"].shape[1],
        "image_resolution": patch * grid,
        "vision_layers": len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")}),
        "vision_width": vision_width,
        "vision_patch_size": patch,
        "context_length": state["positional_embedding"].shape[0],
        "vocab_size": state["token_embedding.weight"].shape[0],
        "transformer_width": transformer_width,
        "transformer_heads": transformer_width // 64,
        "transformer_layers": len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}),
    }


class ClipModel:
    """A loaded CLIP in fp32 eval mode with its tokenizer: normalised image and text embeddings."""

    def __init__(self, module: torch.nn.Module, source: Path):
        self.module = module
        self.source = source
        self.resolution = int(module.visual.input_resolution)
        self.context_length = int(module.context_length)
        self._tokenizer = _load_clip_submodule("simple_tokenizer").SimpleTokenizer()
        self._text_cache: dict[str, torch.Tensor] = {}

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """CLIP token ids (N, context_length): start, the text's BPE, end (the highest id), zero padding."""
        tok = self._tokenizer
        sot, eot = tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [sot] + tok.encode(text)[: self.context_length - 2] + [eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def normalise(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, R, R, 3) at the model's resolution -> CLIP-normalised float (N, 3, R, R)."""
        if images.ndim != 4 or images.shape[1:] != (self.resolution, self.resolution, 3):
            raise ValueError(f"expected uint8 images (N, {self.resolution}, {self.resolution}, 3), got {images.shape}")
        x = (images.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def encode_images(self, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
        x = self.normalise(images)
        return torch.cat([F.normalize(self.module.encode_image(x[i : i + batch_size]), dim=-1)
                          for i in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0, self.embed_dim)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Normalised text embeddings (cached: a run scores the same few prompts on every sample)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            emb = F.normalize(self.module.encode_text(self.tokenize(missing)), dim=-1)
            self._text_cache.update(zip(missing, emb))
        return torch.stack([self._text_cache[t] for t in texts])

    @property
    def embed_dim(self) -> int:
        return int(self.module.text_projection.shape[1])

    @property
    def logit_scale(self) -> float:
        return float(self.module.logit_scale.exp())


def load_clip(model: str | Path) -> ClipModel:
    """Load any local CLIP ViT checkpoint (see the module doc); errors name the file and the problem."""
    path = resolve_clip(model)
    state = load_clip_state_dict(path)  # weight-only readers: a pickle is refused here
    arch = architecture_of(state)
    config_path = path.parent / CONFIG_FILE
    if path.name == WEIGHTS_FILE and config_path.is_file():
        declared = json.loads(config_path.read_text()).get("architecture", {})
        wrong = {k: (declared[k], arch[k]) for k in ARCHITECTURE_KEYS if k in declared and declared[k] != arch[k]}
        if wrong:
            raise ValueError(f"{config_path} disagrees with the weights in {path}: "
                             + ", ".join(f"{k} {a} in config, {b} in weights" for k, (a, b) in wrong.items()))
    clip_model = _load_clip_submodule("model")
    module = clip_model.build_model(dict(state)).float().eval()  # build_model casts to fp16; CPU wants fp32
    return ClipModel(module, path)


def new_clip(architecture: dict[str, int]) -> torch.nn.Module:
    """An untrained clip.model.CLIP of the given architecture (fp32), e.g. to train the micro CLIP."""
    missing = [k for k in ARCHITECTURE_KEYS if k not in architecture]
    if missing:
        raise ValueError(f"CLIP architecture lacks {', '.join(missing)}")
    for width in ("vision_width", "transformer_width"):
        if architecture[width] % 64:
            raise ValueError(f"{width} must be a multiple of 64 (build_model infers heads as width // 64), "
                             f"got {architecture[width]}")
    if architecture["transformer_heads"] != architecture["transformer_width"] // 64:
        raise ValueError("transformer_heads must be transformer_width // 64, as build_model infers it")
    args = [architecture[k] for k in ARCHITECTURE_KEYS]
    return _load_clip_submodule("model").CLIP(*args)
