"""DiffSeg (Tian et al., CVPR 2024): segments from self-attention alone, then named by the prompt.

A pixel's self-attention row is a probability map over the image that covers "the
object this pixel belongs to". Pixels of one object have similar maps, so grouping maps
by KL divergence groups pixels into objects. The method, step by step:

1. `aggregate_self_attention`: bring every captured resolution to one R x R grid
   (key maps upsampled and renormalised, query grid repeated) and average them with
   weights proportional to resolution -> one (R^2, R^2) attention matrix.
2. `merge_attention_maps`: iterative attention merging. An anchor grid (16 x 16) samples
   query pixels; each anchor averages every map within symmetric KL < tau of its own
   map into a proposal (iteration 1); later iterations merge proposals within tau of
   each other, which removes duplicates (3 iterations in all).
3. `nms_segments`: upsample the proposals to image size and take the per-pixel argmax
   (the paper's "non-maximum suppression") -> class-agnostic segment map.

maskmill then names the segments with the prompt's cross-attention
(`segments.assign_segments`). Upstream DiffSeg runs one extra UNet pass on the clean
latent at t = 300 with an empty prompt; here the self-attention captured during
generation is used, so no extra pass and no model access is needed.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import SampleAttention
from .segments import SegmentingExtractor, upsample

# Rows of anchors per KL block. The KL of a block is computed with matrix products, so
# its working set is chunk x N KL values (N = R^2 = 4096 at R = 64: 4 MB per block) on
# top of the log-maps (N x N, 64 MB at R = 64); never an (anchors, N, N) tensor.
KL_CHUNK = 256
LOG_EPS = 1e-8  # attention maps can hold exact zeros (fp16 underflow); log(0) would make KL nan


# --- step 1: one attention matrix over all resolutions ----------------------------------------

def _resize(maps: torch.Tensor, side: int, upsample_mode: str) -> torch.Tensor:
    """(C, h, h) -> (C, side, side): `upsample_mode` when growing, area average when shrinking."""
    h = maps.shape[-1]
    if h == side:
        return maps
    mode = upsample_mode if side > h else "area"
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(maps[None], size=(side, side), mode=mode, **kwargs)[0]


def aggregate_self_attention(self_attn: dict[int, torch.Tensor], resolution: int | None = None) -> torch.Tensor:
    """Step 1: self-attention of every captured resolution on one R x R grid.

    self_attn: side h -> (h*h, h*h) attention, row = query pixel, rows sum to 1.
    resolution: R, the common side (default: the largest captured side).
    Returns float32 (R*R, R*R), rows sum to 1: row i is query pixel i's key map on R x R.

    Per resolution h: each query's key map (h, h) is resized to (R, R) (bilinear) and
    renormalised to sum 1; the query grid is resized too (nearest: each coarse query
    pixel lends its map to the R/h x R/h fine pixels it covers). Resolutions are then
    averaged with weights proportional to h, as in the paper: finer maps carry finer detail.
    """
    if not self_attn:
        raise ValueError("DiffSeg needs self-attention; the sample has none captured")
    sides = sorted(self_attn)
    r = resolution or sides[-1]
    total = torch.zeros(r * r, r * r)
    for h in sides:
        a = self_attn[h].float()
        if a.shape != (h * h, h * h):
            raise ValueError(f"self-attention at side {h} must be ({h * h}, {h * h}), got {tuple(a.shape)}")
        keys = _resize(a.reshape(h * h, h, h), r, "bilinear").reshape(h * h, r * r)
        keys = keys / keys.sum(1, keepdim=True).clamp_min(1e-12)
        # Key maps as channels, query grid as the image: resizing it spreads queries to R x R.
        queries = _resize(keys.T.reshape(r * r, h, h), r, "nearest").reshape(r * r, r * r)
        total += (h / sum(sides)) * queries.T
    return total


# --- step 2: iterative attention merging ------------------------------------------------------

def symmetric_kl(p: torch.Tensor, q: torch.Tensor, chunk_size: int = KL_CHUNK) -> torch.Tensor:
    """Symmetric KL between every row of p (M, N) and every row of q (L, N) -> (M, L).

    D(p, q) = (KL(p||q) + KL(q||p)) / 2 = 1/2 * sum (p - q)(log p - log q), DiffSeg's
    definition (tau = 1.1 refers to it). Expanded, it is
        1/2 * [sum p log p + sum q log q - p . log q - log p . q],
    two matrix products instead of an (M, L, N) tensor; p is processed `chunk_size` rows
    at a time to bound the (chunk, L) block. Logs use max(x, 1e-8), so zeros are safe.
    """
    log_q = q.clamp_min(LOG_EPS).log()
    neg_entropy_q = (q * log_q).sum(1)
    out = torch.empty(p.shape[0], q.shape[0])
    for start in range(0, p.shape[0], chunk_size):
        pc = p[start:start + chunk_size]
        log_pc = pc.clamp_min(LOG_EPS).log()
        neg_entropy_p = (pc * log_pc).sum(1)
        out[start:start + chunk_size] = 0.5 * (
            neg_entropy_p[:, None] + neg_entropy_q[None, :] - pc @ log_q.T - log_pc @ q.T
        )
    return out.clamp_min(0.0)  # rounding can dip just below 0 for identical maps


def anchor_indices(side: int, grid: int = 16) -> torch.Tensor:
    """Flat indices of a grid x grid lattice of anchor pixels on a side x side map, centred.

    Mirrors DiffSeg's sampling grid (on 64 x 64: rows/columns 1, 5, ..., 61); `grid` is
    clipped to `side`, so a 16 x 16 map uses every pixel as an anchor.
    """
    n = max(1, min(grid, side))
    step = (side - 1) // (n - 1) if n > 1 else 0
    start = (side - 1 - step * (n - 1)) // 2
    coords = start + step * torch.arange(n)
    return (coords[:, None] * side + coords[None, :]).reshape(-1)


def _per_iteration(kl_threshold: float | Sequence[float], iterations: int) -> list[float]:
    if isinstance(kl_threshold, (int, float)):
        return [float(kl_threshold)] * iterations
    taus = [float(t) for t in kl_threshold]
    if len(taus) != iterations:
        raise ValueError(f"{len(taus)} KL thresholds given for {iterations} iterations")
    return taus


def _merge_proposals(proposals: torch.Tensor, tau: float, chunk_size: int) -> torch.Tensor:
    """Iterations 2..n: greedily, each proposal not yet taken absorbs all proposals within tau."""
    kl = symmetric_kl(proposals, proposals, chunk_size)
    taken = torch.zeros(len(proposals), dtype=torch.bool)
    merged = []
    for i in range(len(proposals)):
        if taken[i]:
            continue
        group = kl[i] < tau
        group[i] = True
        taken |= group
        merged.append(proposals[group].mean(0))  # as upstream: over all close ones, taken or not
    return torch.stack(merged)


def merge_attention_maps(
    attention: torch.Tensor,
    anchor_grid: int = 16,
    kl_threshold: float | Sequence[float] = 1.1,
    iterations: int = 3,
    chunk_size: int = KL_CHUNK,
) -> torch.Tensor:
    """Step 2: iterative attention merging -> proposals (M, R*R), each a map summing to 1.

    attention: (R*R, R*R) from `aggregate_self_attention`.
    kl_threshold: tau, one value for all iterations or one per iteration (paper: 1.1 on
    COCO-Stuff, 0.9 on Cityscapes). Lower tau -> more, smaller segments.
    Iteration 1 compares the anchors' maps with all R*R maps; the others merge proposals.
    """
    taus = _per_iteration(kl_threshold, iterations)
    side = math.isqrt(attention.shape[0])
    if side * side != attention.shape[0] or attention.shape[0] != attention.shape[1]:
        raise ValueError(f"attention must be (R*R, R*R), got {tuple(attention.shape)}")
    anchors = anchor_indices(side, anchor_grid)
    close = (symmetric_kl(attention[anchors], attention, chunk_size) < taus[0]).float()
    close[torch.arange(len(anchors)), anchors] = 1.0  # an anchor always belongs to its own group
    proposals = (close @ attention) / close.sum(1, keepdim=True)
    for tau in taus[1:]:
        proposals = _merge_proposals(proposals, tau, chunk_size)
    return proposals


# --- step 3: non-maximum suppression ----------------------------------------------------------

def nms_segments(proposals: torch.Tensor, size: tuple[int, int], peak_normalize: bool = False,
                 chunk_size: int = 16) -> np.ndarray:
    """Step 3: upsample proposals (M, R*R) to `size` (bilinear), per-pixel argmax.

    Returns int64 (H, W) segment ids 0..S-1 (proposals that win no pixel are dropped).
    Proposals are upsampled `chunk_size` at a time with a running max, so memory stays
    at chunk x H x W whatever M is.

    peak_normalize: the paper compares the proposals as they are (each sums to 1), so a
    small segment's map stands taller than a large one's and wins the pixels its
    bilinear upsampling spreads over: small segments grow by up to one attention cell
    per side (at 16 -> 32 px: a 12 px object comes out 14 px wide). Scaling each map to
    peak 1 first removes that bias, but lets a flat, everywhere-attending proposal
    compete on equal terms. Default False (the paper).
    """
    side = math.isqrt(proposals.shape[1])
    maps = proposals.reshape(-1, side, side)
    if peak_normalize:
        maps = maps / maps.amax((1, 2), keepdim=True).clamp_min(1e-12)
    best_value = torch.full(tuple(size), -torch.inf)
    best_index = torch.zeros(tuple(size), dtype=torch.long)
    for start in range(0, len(maps), chunk_size):
        value, index = upsample(maps[start:start + chunk_size], size).max(0)
        better = value > best_value  # strict: ties keep the earlier proposal, like argmax
        best_value = torch.where(better, value, best_value)
        best_index = torch.where(better, index + start, best_index)
    _, consecutive = np.unique(best_index.numpy(), return_inverse=True)
    return consecutive.reshape(size).astype(np.int64)


# --- the extractor ----------------------------------------------------------------------------

class DiffSegExtractor(SegmentingExtractor):
    """DiffSeg segments (self-attention merging) named by the prompt's cross-attention.

    resolution: common side R (None: largest captured). anchor_grid: anchors per side
    (clipped to R). kl_threshold, iterations: merging (see `merge_attention_maps`).
    chunk_size: anchor rows per KL block. nms_peak_normalize: scale proposals to peak 1
    before the argmax (see `nms_segments`). fg_threshold, bg_threshold, margin: segment
    naming (see `segments.assign_segments`). cross_resolutions: sides of the cross-
    attention layers used to name segments (None: all).
    """

    name = "diffseg"

    def __init__(
        self,
        resolution: int | None = None,
        anchor_grid: int = 16,
        kl_threshold: float | Sequence[float] = 1.1,
        iterations: int = 3,
        chunk_size: int = KL_CHUNK,
        nms_peak_normalize: bool = False,
        fg_threshold: float = 0.4,
        bg_threshold: float = 0.2,
        margin: float = 0.05,
        cross_resolutions: Sequence[int] | None = None,
    ) -> None:
        if iterations < 1 or anchor_grid < 1 or chunk_size < 1:
            raise ValueError("iterations, anchor_grid and chunk_size must be >= 1")
        _per_iteration(kl_threshold, iterations)  # fail early on a wrong-length list
        self.resolution = resolution
        self.anchor_grid = anchor_grid
        self.kl_threshold = kl_threshold if isinstance(kl_threshold, (int, float)) else list(kl_threshold)
        self.iterations = iterations
        self.chunk_size = chunk_size
        self.nms_peak_normalize = nms_peak_normalize
        self.fg_threshold = fg_threshold
        self.bg_threshold = bg_threshold
        self.margin = margin
        self.cross_resolutions = None if cross_resolutions is None else list(cross_resolutions)

    def segment(self, attn: SampleAttention, size: tuple[int, int]) -> np.ndarray:
        """Class-agnostic DiffSeg segments at `size`: int64 (H, W) ids 0..S-1."""
        attention = aggregate_self_attention(attn.self_attn, self.resolution)
        proposals = merge_attention_maps(attention, self.anchor_grid, self.kl_threshold,
                                         self.iterations, self.chunk_size)
        return nms_segments(proposals, size, self.nms_peak_normalize)
