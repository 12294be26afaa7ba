"""Attention baselines SeeDiff is measured against (same captured maps, same label rules).

- `cross`: the class tokens' cross-attention, thresholded.
- `propagated`: Dataset Diffusion style, self-attention^k @ cross-attention, thresholded.
- `cross_x_propagated`: the product of both (propagation alone separates
  foreground from background, not one object from another; the product stays on the object).
"""
from __future__ import annotations

import numpy as np
import torch

from .attention_ops import class_cross_map, minmax, propagate, resize
from .base import ClassSpec, Extractor, MaskResult, SampleAttention, resolve_labels


class _AttentionBaseline(Extractor):
    def __init__(self, side: int | None = None, threshold: float = 0.5, power: int = 4, margin: float = 0.05):
        self.side = side
        self.threshold = threshold
        self.power = power
        self.margin = margin

    def _side(self, attn: SampleAttention) -> int:
        if self.side is not None:
            return self.side
        sides = sorted(attn.self_attn) or sorted(set(attn.cross_resolution.values()))
        big = [s for s in sides if s >= 16]
        return big[0] if big else sides[-1]

    def class_map(self, attn: SampleAttention, spec: ClassSpec, side: int) -> torch.Tensor:
        raise NotImplementedError

    def extract(self, attn: SampleAttention, classes: list[ClassSpec], image: np.ndarray) -> MaskResult:
        h, w = image.shape[:2]
        side = self._side(attn)
        soft = torch.stack([minmax(resize(self.class_map(attn, c, side), (h, w))) for c in classes]) \
            if classes else torch.zeros(0, h, w)
        s = soft.numpy().astype(np.float32)
        labels = resolve_labels(s, s > self.threshold, self.margin)
        conf = np.array([float(s[k][labels == k + 1].mean()) if (labels == k + 1).any() else 0.0
                         for k in range(len(classes))], dtype=np.float32)
        return MaskResult(labels=labels, soft=s, confidence=conf)


class CrossAttentionBaseline(_AttentionBaseline):
    name = "cross"

    def class_map(self, attn, spec, side):
        return class_cross_map(attn, spec, side, sorted(set(attn.cross_resolution.values())))


class PropagatedBaseline(_AttentionBaseline):
    name = "propagated"

    def class_map(self, attn, spec, side):
        ca = class_cross_map(attn, spec, side, sorted(set(attn.cross_resolution.values())))
        return propagate(attn.self_attn[side], ca, self.power).reshape(side, side)


class ProductBaseline(_AttentionBaseline):
    name = "cross_x_propagated"

    def class_map(self, attn, spec, side):
        ca = class_cross_map(attn, spec, side, sorted(set(attn.cross_resolution.values())))
        prop = minmax(propagate(attn.self_attn[side], ca, self.power).reshape(side, side))
        return ca * prop
