"""Open-vocabulary segmentation with a prototype bank (OVDiff inference).

Per pixel, a class scores the max cosine between the pixel's feature and the class's foreground
prototypes; background scores the max over the background prototypes of the classes being
segmented; the label is the argmax. `segment_image` works on one feature map at feature
resolution; `segment_images` runs an extractor, optionally pre-filters classes per image
(CLIP: keep classes with probability >= 1/|C|, at most 10), upsamples the scores bilinearly to
the image, optionally refines them (`make_refiner`: PAMR, the CLI's default), then takes the argmax.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..models import CLIP_PHOTO_TEMPLATE
from .bank import PrototypeBank, drop_confusing_background
from .features import FeatureExtractor

# Score of a class with no usable prototype (or filtered out): below any cosine, and finite so
# bilinear upsampling never produces NaN (0 * -inf).
ABSENT = -4.0
MAX_CLASSES = 254  # labels are uint8 and 255 means "ignore" across maskmill

# (image uint8 (H, W, 3), classes) -> logits (K,) of the image against each class name
ClassLogitsFn = Callable[[np.ndarray, list[str]], np.ndarray]
# (image, classes) -> the candidate classes to segment in this image
ClassPrefilter = Callable[[np.ndarray, list[str]], list[str]]
# (scores (K+1, H, W), image) -> refined scores (e.g. PAMR)
ScoreRefiner = Callable[[torch.Tensor, np.ndarray], torch.Tensor]


def _prototype_groups(bank: PrototypeBank, classes: list[str], candidates: list[str], use_background: bool,
                      use_parts: bool, use_instances: bool) -> torch.Tensor:
    """(P,) score channel of each prototype: 0 background, k for classes[k-1], -1 unused."""
    kinds = {"class"} | ({"part"} if use_parts else set()) | ({"instance"} if use_instances else set())
    channel = {c: i + 1 for i, c in enumerate(classes)}
    active = set(candidates)
    groups = []
    for m in bank.meta:
        if m.kind not in kinds or m.class_name not in active:
            groups.append(-1)
        elif m.side == "fg":
            groups.append(channel[m.class_name])
        else:
            groups.append(0 if use_background else -1)
    return torch.tensor(groups, dtype=torch.long)


def prototype_scores(features: torch.Tensor, bank: PrototypeBank, classes: list[str],
                     candidates: list[str] | None = None, use_background: bool = True, use_parts: bool = True,
                     use_instances: bool = True, chunk: int = 4096) -> torch.Tensor:
    """(K+1, h, w) scores of `features` (C, h, w): channel 0 background, channel k classes[k-1].

    Similarities are computed `chunk` prototypes at a time and max-reduced into the score
    channels at once, so peak memory is (h*w, chunk) whatever the bank size.
    candidates: classes allowed in this image (default all); the others score ABSENT and
    their background prototypes are not used.
    """
    if len(classes) > MAX_CLASSES:
        raise ValueError(f"at most {MAX_CLASSES} classes per segmentation, got {len(classes)}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"duplicate class names in {classes}")
    have = set(m.class_name for m in bank.meta if m.side == "fg")
    missing = [c for c in classes if c not in have]
    if missing:
        raise ValueError(f"no foreground prototypes for {missing} in the bank (it has {sorted(have)})")
    c, h, w = features.shape
    if c != bank.channels:
        raise ValueError(f"features have {c} channels, the bank {bank.channels}: built with another extractor?")
    candidates = classes if candidates is None else [x for x in classes if x in set(candidates)]
    groups = _prototype_groups(bank, classes, candidates, use_background, use_parts, use_instances)
    used = torch.nonzero(groups >= 0).flatten()
    pixels = F.normalize(features.float().reshape(c, h * w).T, dim=1)  # (hw, C)
    scores = torch.full((len(classes) + 1, h * w), ABSENT)
    for start in range(0, len(used), chunk):
        idx = used[start : start + chunk]
        sims = bank.vectors[idx].float() @ pixels.T  # (chunk, hw); prototypes are unit-norm
        index = groups[idx][:, None].expand_as(sims)
        scores.scatter_reduce_(0, index, sims, reduce="amax", include_self=True)
        del sims, index  # else the next chunk is computed while this one is still held: 2 chunks at peak
    return scores.reshape(-1, h, w)


# ----------------------------------------------------------------------------------------------
# refinement


def pamr_refiner(iterations: int = 10, dilations: tuple[int, ...] = (1, 2, 4)) -> ScoreRefiner:
    """PAMR on the (K+1, H, W) score maps, guided by the image's colours.

    Why: prototype scores come from a feature grid 2-8x coarser than the image and are noisy within
    an object; PAMR propagates them between neighbouring pixels of similar colour, so object edges
    follow the image and each object converges to one label.
    """
    from ..extractors.pamr import pamr

    def refine(scores: torch.Tensor, image: np.ndarray) -> torch.Tensor:
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
        return pamr(img, scores, iterations, dilations)

    return refine


REFINERS = {"none": None, "pamr": pamr_refiner}
DEFAULT_REFINER = "pamr"


def make_refiner(name: str) -> ScoreRefiner | None:
    """The refine hook called `name` ("none" or "pamr"); a ValueError names the choices otherwise."""
    if name not in REFINERS:
        raise ValueError(f"unknown refinement {name!r}; choose one of: {', '.join(REFINERS)}")
    factory = REFINERS[name]
    return factory() if factory is not None else None


def segment_image(features: torch.Tensor, bank: PrototypeBank, classes: list[str], use_background: bool = True,
                  use_parts: bool = True, use_instances: bool = True, chunk: int = 4096,
                  candidates: list[str] | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """Labels at feature resolution: (labels uint8 (h, w): 0 background, k = classes[k-1]; scores (K+1, h, w))."""
    scores = prototype_scores(features, bank, classes, candidates, use_background, use_parts, use_instances, chunk)
    return scores.argmax(0).numpy().astype(np.uint8), scores


# ----------------------------------------------------------------------------------------------
# class pre-filter


def make_class_prefilter(logits_fn: ClassLogitsFn, max_classes: int = 10) -> ClassPrefilter:
    """OVDiff's pre-filter: softmax the image/class logits, keep classes with p >= 1/|C|, at most
    `max_classes` (highest first). Never empty: the most likely class is always >= 1/|C|."""

    def prefilter(image: np.ndarray, classes: list[str]) -> list[str]:
        if len(classes) <= 1:
            return list(classes)
        logits = torch.as_tensor(np.asarray(logits_fn(image, classes)), dtype=torch.float64)
        probs = torch.softmax(logits, 0)
        order = torch.argsort(probs, descending=True).tolist()
        keep = [i for i in order if probs[i] >= 1.0 / len(classes)][:max_classes]
        return [classes[i] for i in sorted(keep)]

    return prefilter


def clip_prefilter(clip_model, template: str = CLIP_PHOTO_TEMPLATE, max_classes: int = 10) -> ClassPrefilter:
    """The pre-filter scored by a `CLIPPatchFeatures` model (any object with `class_logits`)."""
    return make_class_prefilter(lambda image, classes: clip_model.class_logits(image, classes, template), max_classes)


# ----------------------------------------------------------------------------------------------
# whole images


@dataclass
class Segmentation:
    """labels: uint8 (H, W) (0 background, k = classes[k-1]); scores: float32 (K+1, H, W);
    candidates: the classes the pre-filter kept for this image."""

    labels: np.ndarray
    scores: np.ndarray
    candidates: list[str]


def _same_shape_batches(images: list[np.ndarray], batch_size: int):
    batch: list[int] = []
    for i, im in enumerate(images):
        if batch and (len(batch) == batch_size or images[batch[0]].shape != im.shape):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def segment_images(extractor: FeatureExtractor, images, bank: PrototypeBank, classes: list[str], *,
                   use_background: bool = True, use_parts: bool = True, use_instances: bool = True,
                   confusing_bg_threshold: float | None = 0.85, prefilter: ClassPrefilter | None = None,
                   refine: ScoreRefiner | None = None, chunk: int = 4096, batch_size: int = 4) -> list[Segmentation]:
    """Extract features, score against the bank, upsample scores to each image, refine, argmax.

    images: uint8 (N, H, W, 3) or a list of (H, W, 3) arrays (sizes may differ).
    confusing_bg_threshold: drop bg prototypes closer than this to another *requested* class's fg
        (OVDiff: 0.85); None keeps them.
    """
    images = [np.asarray(im) for im in images]
    bank = bank.subset(bank.mask(classes=classes))  # only the requested classes matter
    if confusing_bg_threshold is not None:
        bank = drop_confusing_background(bank, confusing_bg_threshold)
    results: list[Segmentation | None] = [None] * len(images)
    for batch in _same_shape_batches(images, batch_size):
        features = extractor(np.stack([images[i] for i in batch]))
        for feat, i in zip(features, batch):
            image = images[i]
            candidates = prefilter(image, list(classes)) if prefilter is not None else list(classes)
            scores = prototype_scores(feat, bank, classes, candidates, use_background, use_parts, use_instances, chunk)
            scores = F.interpolate(scores[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
            if refine is not None:
                scores = refine(scores, image)
            labels = scores.argmax(0).numpy().astype(np.uint8)
            results[i] = Segmentation(labels, scores.numpy().astype(np.float32), candidates)
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# files


def label_palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, PASCAL VOC's bit-interleaved palette (0 = black background)."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def save_segmentation(labels: np.ndarray, image: np.ndarray, classes: list[str], out_dir: str | Path,
                      stem: str, alpha: float = 0.5) -> dict[str, Path]:
    """Write `<stem>.labels.png` (single channel, value k = classes[k-1]), `<stem>.overlay.png`
    (classes tinted over the image) and `<stem>.classes.json` (the legend)."""
    if not stem or stem in (".", "..") or Path(stem).name != stem or "\\" in stem:
        raise ValueError(f"stem must be a plain file name, got {stem!r}")
    labels = np.asarray(labels)
    image = np.asarray(image)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {image.shape[:2]} differ in size")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    palette = label_palette(len(classes) + 1)
    colours = palette[np.minimum(labels, len(classes))].astype(np.float32)
    tinted = np.where((labels > 0)[..., None], (1 - alpha) * image + alpha * colours, image)
    paths = {"labels": out_dir / f"{stem}.labels.png", "overlay": out_dir / f"{stem}.overlay.png",
             "legend": out_dir / f"{stem}.classes.json"}
    Image.fromarray(labels.astype(np.uint8)).save(paths["labels"])
    Image.fromarray(tinted.round().clip(0, 255).astype(np.uint8)).save(paths["overlay"])
    legend = {"0": {"name": "background", "rgb": palette[0].tolist()}}
    legend.update({str(k): {"name": c, "rgb": palette[k].tolist()} for k, c in enumerate(classes, 1)})
    paths["legend"].write_text(json.dumps(legend, indent=1))
    return paths
