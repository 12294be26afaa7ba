"""CLIP ViT patch tokens as dense features (`CLIPPatchFeatures`), read from a local checkpoint file.

Besides dense features, it scores an image against class names the usual CLIP way, which is what
OVDiff's class pre-filter needs (`segment.clip_prefilter`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..clip_model import CLIP_MEAN, CLIP_STD, _load_clip_submodule, load_clip_state_dict  # noqa: F401 (re-exported)
from ..models import CLIP_PHOTO_TEMPLATE
from .features import FeatureExtractor, _check_images, _resize_uint8




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
        # build_model casts to fp16; CPU inference wants fp32.
        self.model = clip_model.build_model(state).float().eval()
        self.resolution = int(self.model.visual.input_resolution)
        self.batch_size = int(batch_size)
        self._tokenizer = None
        self._fingerprint: dict | None = None

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = {
                "name": self.name,
                "model": {"file": self.checkpoint_path.name, "sha256": _file_sha256(self.checkpoint_path)[:16]},
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
    def class_logits(self, image: np.ndarray, classes: list[str], template: str = CLIP_PHOTO_TEMPLATE) -> np.ndarray:
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


def _file_sha256(path: Path, block: int = 1 << 20) -> str:
    """sha256 of a whole checkpoint file (CLIP's are a few hundred MB: read once per extractor)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
