"""Pixel-adaptive mask refinement (PAMR, Araslanov & Roth 2020), our own implementation.

Each iteration replaces a pixel's mask value by an average of its dilated 3x3 neighbours,
weighted by a softmax over their colour similarity (scaled by the local colour spread).
A fixed number of iterations bounds the time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _neighbours(x: torch.Tensor, dilations: tuple[int, ...]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 8 * len(dilations), H, W): values at the dilated 3x3 ring."""
    out = []
    for d in dilations:
        xp = F.pad(x, (d, d, d, d), mode="replicate")
        h, w = x.shape[-2:]
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy == 0 and dx == 0:
                    continue
                out.append(xp[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w])
    return torch.stack(out, dim=2)


def pamr(image: torch.Tensor, masks: torch.Tensor, iterations: int = 10,
         dilations: tuple[int, ...] = (1, 2, 4), sigma_scale: float = 0.1) -> torch.Tensor:
    """Refine soft masks with the image's local colour affinities.

    image: (3, H, W) float; masks: (K, H, W) in [0, 1]. Returns (K, H, W).
    """
    img = image[None].float()
    nb = _neighbours(img, dilations)  # (1, 3, P, H, W)
    centre = img[:, :, None]
    std = nb.std(dim=2, keepdim=True)
    affinity = -(nb - centre).abs() / (std + 1e-8) / sigma_scale
    weights = affinity.mean(1).softmax(dim=1)  # (1, P, H, W)
    m = masks[None].float()
    for _ in range(iterations):
        m = (_neighbours(m, dilations) * weights[:, None]).sum(2)
    return m[0]
