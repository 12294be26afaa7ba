"""From class-agnostic segments to prompt classes: the step DiffSeg and DiffCut share.

DiffSeg and DiffCut are unsupervised: they cut an image into segments but do not say
what any segment is. maskmill knows the prompt, so it names the segments with the
prompt's own cross-attention:

1. `class_attention_maps`: per class, its tokens' cross-attention (summed over the
   class's seed tokens), min-max normalised per layer, upsampled to image size,
   averaged over layers and min-max normalised again -> (K, H, W) maps in [0, 1].
2. `assign_segments`: each segment scores each class by the mean of the class map
   over the segment; it becomes the best class if that score is high and clear,
   background if every score is low, IGNORE (255) otherwise.

Both extractors end here, so their output is the same `MaskResult` as SeeDiff's.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import IGNORE, ClassSpec, Extractor, MaskResult, SampleAttention


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1]; a constant map carries no location, so it becomes all zeros."""
    lo, hi = x.min(), x.max()
    if hi - lo <= 1e-12:
        return torch.zeros_like(x)
    return (x - lo) / (hi - lo)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (..., h, w) maps to (..., H, W) (identity when already that size)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(1, -1, *maps.shape[-2:])
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)


def class_attention_maps(
    attn: SampleAttention,
    classes: list[ClassSpec],
    size: tuple[int, int],
    resolutions: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Per class, where its tokens look: float32 (K, H, W) in [0, 1].

    Each layer's class map (sum over the class's tokens) is min-max normalised on its
    own, because layers differ in scale by orders of magnitude; the layers are then
    averaged at image size. `resolutions` keeps only layers of those sides (None: all).
    The average is min-max normalised once more so that thresholds on it mean the same
    from sample to sample, whatever the layers' agreement.
    """
    h, w = size
    layers = [n for n in attn.cross if resolutions is None or attn.cross_resolution.get(n) in resolutions]
    out = np.zeros((len(classes), h, w), dtype=np.float32)
    if not layers:
        return out
    for k, spec in enumerate(classes):
        per_layer = attn.class_cross_attention(spec, layers)
        total = torch.zeros(h, w)
        for m in per_layer.values():
            total += upsample(_min_max(m.float()), size)
        out[k] = _min_max(total / len(per_layer)).numpy()
    return out


def segment_scores(segments: np.ndarray, class_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each class map over each segment.

    Returns (index, scores): index (H, W) maps each pixel to its segment's row in
    scores (S, K). Segment ids may be any integers; they need not be consecutive.
    """
    ids, index = np.unique(segments, return_inverse=True)
    index = index.reshape(segments.shape)
    area = np.bincount(index.ravel(), minlength=len(ids)).astype(np.float64)
    scores = np.stack(
        [np.bincount(index.ravel(), weights=m.ravel().astype(np.float64), minlength=len(ids)) / area
         for m in class_maps], axis=1,
    ) if len(class_maps) else np.zeros((len(ids), 0))
    return index, scores


def assign_segments(
    segments: np.ndarray,
    class_maps: np.ndarray,
    fg_threshold: float = 0.4,
    bg_threshold: float = 0.2,
    margin: float = 0.05,
) -> MaskResult:
    """Name class-agnostic segments with the prompt's classes.

    segments: int (H, W) segment ids; class_maps: float (K, H, W) in [0, 1]
    (see `class_attention_maps`). Per segment, with s_k = mean of class map k over it:
      - label k+1 if max_k s_k >= fg_threshold and it beats the runner-up by >= margin;
      - background (0) if max_k s_k < bg_threshold;
      - IGNORE (255) otherwise: too weak to call a class, too strong to call background,
        or two classes within `margin` of each other.
    soft: (K, H, W), each pixel holds its segment's score s_k, so the labels are a pure
    function of soft and the thresholds. confidence: per class, the mean of soft[k] over
    the pixels labelled k (0 when the class got no pixel).
    """
    if segments.shape != class_maps.shape[1:]:
        raise ValueError(f"segments {segments.shape} and class maps {class_maps.shape} differ in size")
    if not bg_threshold <= fg_threshold:
        raise ValueError(f"bg_threshold {bg_threshold} must not exceed fg_threshold {fg_threshold}")
    k = class_maps.shape[0]
    index, scores = segment_scores(segments, class_maps)

    seg_label = np.zeros(len(scores), dtype=np.uint8)
    if k:
        order = np.argsort(-scores, axis=1)
        best = order[:, 0]
        top = scores[np.arange(len(scores)), best]
        second = scores[np.arange(len(scores)), order[:, 1]] if k > 1 else np.full_like(top, -np.inf)
        clear = (top >= fg_threshold) & (top - second >= margin)
        seg_label[:] = IGNORE
        seg_label[clear] = (best[clear] + 1).astype(np.uint8)
        seg_label[top < bg_threshold] = 0

    labels = seg_label[index]
    soft = np.moveaxis(scores[index], -1, 0).astype(np.float32)  # (K, H, W)
    soft = np.clip(soft, 0.0, 1.0)
    confidence = np.array(
        [soft[c][labels == c + 1].mean() if (labels == c + 1).any() else 0.0 for c in range(k)],
        dtype=np.float32,
    )
    return MaskResult(labels=labels, soft=soft, confidence=confidence)


class SegmentingExtractor(Extractor):
    """An extractor that finds class-agnostic segments (`segment`), then names them from cross-attention.

    Subclasses set fg_threshold, bg_threshold, margin and cross_resolutions and implement `segment`.
    """

    def segment(self, attn: SampleAttention, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def extract(self, attn: SampleAttention, classes: list[ClassSpec], image: np.ndarray) -> MaskResult:
        size = tuple(image.shape[:2])
        segments = self.segment(attn, size)
        resolutions = None if self.cross_resolutions is None else tuple(self.cross_resolutions)
        class_maps = class_attention_maps(attn, classes, size, resolutions)
        return assign_segments(segments, class_maps, self.fg_threshold, self.bg_threshold, self.margin)
