"""CLIP consistency check: does each class's masked region look like that class?

Text-to-image models often draw something other than the prompt asks (a circle for a star, a
missing object); the mask is then tight around the wrong thing. For each class of a sample, its
region is cut out the way region-level CLIP checks do it (crop to the mask's box, made square,
everything outside the mask filled with CLIP's mean colour, resized to the model's input) and
scored against "a {class}" for the run's classes and a background prompt. A class whose own text
does not beat every other prompt by `min_margin` (cosine similarity) is flagged:

- action "reject": the sample is dropped with reason `clip mismatch: <class>`;
- action "ignore": the sample is kept and the flagged class's pixels become 255 (ignored).

All regions of a batch go through the image encoder together.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .clip_model import ClipModel
from .config import ClipCheckConfig
from .clip_model import CLIP_MEAN

IGNORE = 255
FILL = tuple(int(round(v * 255)) for v in CLIP_MEAN)  # zero after CLIP's normalisation


@dataclass
class ClipDecision:
    """One sample's verdict. `labels` is the label map to write (flagged classes set to 255 under "ignore")."""

    keep: bool
    reason: str
    labels: np.ndarray
    flagged: list[str] = field(default_factory=list)
    margins: list[float | None] = field(default_factory=list)  # per label k = 1..K; None: empty mask


def region_crop(image: np.ndarray, mask: np.ndarray, size: int, box_margin: float = 0.1,
                fill: tuple[int, int, int] = FILL) -> np.ndarray:
    """uint8 (size, size, 3): the mask's box grown to a square (+ margin), pixels outside the mask filled."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("empty mask: no region to crop")
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    side = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) * (1 + box_margin)
    side = max(2, int(np.ceil(side)))
    y0, x0 = int(np.floor(cy - side / 2)), int(np.floor(cx - side / 2))
    masked = np.where(mask[..., None], image, np.asarray(fill, dtype=np.uint8))
    h, w = mask.shape
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[:] = np.asarray(fill, dtype=np.uint8)  # the square may run past the image's edge
    sy0, sx0, sy1, sx1 = max(0, y0), max(0, x0), min(h, y0 + side), min(w, x0 + side)
    out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = masked[sy0:sy1, sx0:sx1]
    if side == size:
        return out
    t = torch.from_numpy(out).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _check_inputs(images, label_maps, class_names) -> None:
    if not (len(images) == len(label_maps) == len(class_names)):
        raise ValueError(f"clip check: {len(images)} images, {len(label_maps)} label maps and "
                         f"{len(class_names)} class lists must be as many")
    for i, (im, lab, names) in enumerate(zip(images, label_maps, class_names)):
        if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            raise ValueError(f"clip check: image {i} must be uint8 (H, W, 3), got {im.dtype} {im.shape}")
        if lab.shape != im.shape[:2]:
            raise ValueError(f"clip check: label map {i} is {lab.shape}, its image {im.shape[:2]}")
        bad = set(np.unique(lab).tolist()) - set(range(len(names) + 1)) - {IGNORE}
        if bad:
            raise ValueError(f"clip check: label map {i} has labels {sorted(bad)} beyond its {len(names)} classes")


class ClipCheck:
    """The configured check with its model loaded once; call `check` on batches of samples."""

    def __init__(self, config: ClipCheckConfig, model: ClipModel | None = None):
        from .clip_model import load_clip

        self.config = config
        self.model = model or load_clip(config.model)

    def margins(self, images: list[np.ndarray], label_maps: list[np.ndarray], class_names: list[list[str]],
                prompt_classes: list[str] | None = None) -> list[list[float | None]]:
        """Per sample, per label k = 1..K: own-class similarity minus the best other prompt's (None: no pixels)."""
        _check_inputs(images, label_maps, class_names)
        cfg = self.config
        classes = list(dict.fromkeys(prompt_classes or [n for names in class_names for n in names]))
        missing = {n for names in class_names for n in names} - set(classes)
        if missing:
            raise ValueError(f"clip check: classes {sorted(missing)} are not among the prompt classes {classes}")
        prompts = [cfg.template.format(c) for c in classes] + [cfg.background_prompt]
        crops, where = [], []
        for i, (im, lab, names) in enumerate(zip(images, label_maps, class_names)):
            for k in range(1, len(names) + 1):
                m = lab == k
                if m.any():
                    crops.append(region_crop(im, m, self.model.resolution, cfg.box_margin))
                    where.append((i, k))
        out: list[list[float | None]] = [[None] * len(names) for names in class_names]
        if not crops:
            return out
        sims = self.model.encode_images(np.stack(crops), cfg.batch_size) @ self.model.encode_texts(prompts).T
        for (i, k), row in zip(where, sims):
            own = classes.index(class_names[i][k - 1])
            others = torch.cat([row[:own], row[own + 1 :]])
            out[i][k - 1] = float(row[own] - others.max())
        return out

    def check(self, images: list[np.ndarray], label_maps: list[np.ndarray], class_names: list[list[str]],
              prompt_classes: list[str] | None = None) -> list[ClipDecision]:
        """One decision per sample. `prompt_classes`: the run's classes (default: every class in the batch)."""
        decisions = []
        for lab, names, margins in zip(label_maps, class_names,
                                       self.margins(images, label_maps, class_names, prompt_classes)):
            flagged_k = [k for k, m in enumerate(margins, 1) if m is not None and m < self.config.min_margin]
            flagged = list(dict.fromkeys(names[k - 1] for k in flagged_k))
            if not flagged:
                decisions.append(ClipDecision(True, "", lab, [], margins))
            elif self.config.action == "reject":
                decisions.append(ClipDecision(False, f"clip mismatch: {flagged[0]}", lab, flagged, margins))
            else:
                labels = lab.copy()
                labels[np.isin(lab, flagged_k)] = IGNORE
                decisions.append(ClipDecision(True, "", labels, flagged, margins))
        return decisions
