"""Pixel-adaptive mask refinement (PAMR, Araslanov & Roth 2020), our own implementation.

Each iteration replaces a pixel's mask value by an average of its dilated 3x3 neighbours,
weighted by a softmax over their colour similarity (scaled by the local colour spread).
A fixed number of iterations bounds the time.

The ring of neighbours is never materialised as one (.., P, H, W) tensor: every sum over it
streams over P shifted views of a padded copy. At 512 px this is ~9x faster than stacking the
ring (the stack is 24 image-sized copies per iteration; `benchmarks/bench_cpu_side.py`), with
the same result up to float32 rounding (the sums run in another order).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F


def ring(x: torch.Tensor, dilations: tuple[int, ...]) -> Iterator[torch.Tensor]:
    """(B, C, H, W) -> 8 * len(dilations) views (B, C, H, W): x shifted to each dilated 3x3 neighbour."""
    h, w = x.shape[-2:]
    for d in dilations:
        xp = F.pad(x, (d, d, d, d), mode="replicate")
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    yield xp[..., d + dy * d: d + dy * d + h, d + dx * d: d + dx * d + w]


def affinity_weights(img: torch.Tensor, dilations: tuple[int, ...], sigma_scale: float) -> torch.Tensor:
    """(1, 3, H, W) image -> (1, P, H, W): softmax over the ring of -|colour difference| / local spread.

    The spread is each channel's standard deviation over the ring, computed in two passes (mean,
    then squared deviations): one pass (E[x^2] - E[x]^2) loses the small spreads of flat regions
    to float32 rounding, and dividing by them is what the weights do.
    """
    n = 8 * len(dilations)
    mean = sum(ring(img, dilations)) / n
    spread = (sum((v - mean).square() for v in ring(img, dilations)) / (n - 1)).sqrt_().add_(1e-8)
    out = torch.empty(img.shape[0], n, *img.shape[-2:], dtype=img.dtype)
    for p, v in enumerate(ring(img, dilations)):
        torch.sum((v - img).abs_().div_(spread), dim=1, out=out[:, p])
    return out.mul_(-1.0 / (img.shape[1] * sigma_scale)).softmax(dim=1)


def pamr(image: torch.Tensor, masks: torch.Tensor, iterations: int = 10,
         dilations: tuple[int, ...] = (1, 2, 4), sigma_scale: float = 0.1) -> torch.Tensor:
    """Refine soft masks with the image's local colour affinities.

    image: (3, H, W) float; masks: (K, H, W) in [0, 1]. Returns (K, H, W).
    """
    weights = affinity_weights(image[None].float(), dilations, sigma_scale)
    m = masks[None].float()
    for _ in range(iterations):
        acc = None
        for p, v in enumerate(ring(m, dilations)):
            wp = weights[:, p:p + 1]
            acc = v * wp if acc is None else acc.addcmul_(v, wp)
        m = acc
    return m[0]
