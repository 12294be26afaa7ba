"""Small operations on captured attention maps, shared by SeeDiff and the baselines."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.filters import threshold_otsu

from .base import ClassSpec, SampleAttention


def minmax(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo).clamp_min(eps)


def resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (h, w) or (K, h, w) map."""
    squeeze = x.ndim == 2
    t = x[None, None] if squeeze else x[None]
    if tuple(t.shape[-2:]) != tuple(hw):
        t = F.interpolate(t.float(), size=hw, mode="bilinear", align_corners=False)
    return t[0, 0] if squeeze else t[0]


def otsu(x: torch.Tensor) -> float:
    v = x.detach().cpu().numpy().ravel()
    if np.ptp(v) < 1e-8:
        return float(v[0])
    return float(threshold_otsu(v))


def cross_attention_sides(attn: SampleAttention) -> list[int]:
    return sorted(set(attn.cross_resolution.values()))


def class_cross_map(attn: SampleAttention, spec: ClassSpec, side: int, sides: list[int] | None = None) -> torch.Tensor:
    """A class's cross-attention at `side`: its tokens summed, each layer min-max normalised, layers summed.

    sides: which layer resolutions contribute (upsampled/downsampled to `side`); None = only `side`.
    """
    sides = sides or [side]
    layers = [n for n, s in attn.cross_resolution.items() if s in sides]
    if not layers:
        raise ValueError(f"no cross-attention captured at sides {sides}; captured: {cross_attention_sides(attn)}")
    total = None
    for name, m in attn.class_cross_attention(spec, layers).items():
        m = minmax(resize(m, (side, side)))
        total = m if total is None else total + m
    return minmax(total)


def expand(self_attn: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """SeeDiff expansion: score(p) = sum over seeds s of cos(SA[s], SA[p]), min-max normalised.

    self_attn: (N, N) rows = query pixels; seeds: bool (N,). Returns (N,).
    """
    if not bool(seeds.any()):
        return torch.zeros(self_attn.shape[0])
    rows = F.normalize(self_attn.float(), dim=1)
    return minmax(rows @ rows[seeds].sum(0))


def propagate(self_attn: torch.Tensor, values: torch.Tensor, power: int = 4) -> torch.Tensor:
    """Dataset Diffusion: SA^power @ values (N,) -> (N,)."""
    v = values.float().reshape(-1)
    for _ in range(power):
        v = self_attn.float() @ v
    return v
