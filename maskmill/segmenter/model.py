"""The segmenter: transformers' SegformerForSemanticSegmentation, built small or loaded offline.

Class id 0 is "background" and ids 1..K are the label space's names, in the config's id2label,
so a checkpoint carries its own label space. Inputs are [0, 1] images normalised with the
ImageNet mean/std that MiT checkpoints were trained with.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..models import quiet_transformers
from .config import SegmenterSize

BACKGROUND = "background"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def label_maps(classes: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    names = [BACKGROUND, *classes]
    return dict(enumerate(names)), {n: i for i, n in enumerate(names)}


def build_model(classes: list[str], size: SegmenterSize, init: str | None = None):
    """A config-initialised SegFormer of `size`, or the local checkpoint `init` with a new head."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    id2label, label2id = label_maps(classes)
    if init is not None:
        quiet_transformers()
        return SegformerForSemanticSegmentation.from_pretrained(
            init, local_files_only=True, num_labels=len(id2label), id2label=id2label, label2id=label2id,
            ignore_mismatched_sizes=True)  # the decode head is replaced when the label space differs
    cfg = SegformerConfig(num_channels=3, num_encoder_blocks=4, num_labels=len(id2label), id2label=id2label,
                          label2id=label2id, semantic_loss_ignore_index=255,
                          **{k: list(v) if isinstance(v, tuple) else v for k, v in size.model_dump().items()})
    return SegformerForSemanticSegmentation(cfg)


def load_model(ckpt: str | Path):
    """A saved segmenter (safetensors + config.json), offline, in eval mode."""
    from transformers import SegformerForSemanticSegmentation

    path = Path(ckpt)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt}: no segmenter checkpoint (config.json) there")
    quiet_transformers()  # transformers 5 draws a "Loading weights" bar per load
    return SegformerForSemanticSegmentation.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()


def save_model(model, folder: str | Path) -> None:
    """Save a segmenter as `load_model` reads it (model.safetensors + config.json), without a console bar."""
    quiet_transformers()  # transformers 5 draws a "Writing model shards" bar per save
    model.save_pretrained(folder, safe_serialization=True)


def model_classes(model) -> list[str]:
    """The label space of a model (names of ids 1..K)."""
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    return [id2label[i] for i in range(1, len(id2label))]


def logits_at(model, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Class logits (B, C, H, W) upsampled to `size` from images (B, 3, h, w) in [0, 1]."""
    logits = model(pixel_values=(images - MEAN) / STD).logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def predict(model, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Label maps (B, H, W) long for images (B, 3, H, W) in [0, 1]."""
    model.eval()
    out = [logits_at(model, images[i:i + batch], images.shape[-2:]).argmax(1) for i in range(0, len(images), batch)]
    return torch.cat(out)
