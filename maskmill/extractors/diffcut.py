"""DiffCut (Couairon et al., NeurIPS 2024): recursive normalized cut on UNet features.

The output of the UNet encoder's last self-attention block is a feature map in which
pixels of one object point the same way. DiffCut cuts the graph of those pixels:

1. `affinity`: A = (min-max normalised F^T F of L2-normalised features)^alpha, alpha = 10;
   the power makes weak similarities vanish, so cuts follow strong ones.
2. `recursive_ncut`: normalized cut (Shi & Malik): the second-smallest eigenvector of
   the normalized Laplacian D^-1/2 (D - A) D^-1/2, thresholded at the best of 100
   values by Ncut value; each part is cut again while its best Ncut value is below tau
   (0.2 for SD1.4, the default here; the paper used 0.5 for SSD-1B).
3. `upsample_segments`: concept assignment. Each segment's mean feature is its concept
   embedding; every image pixel takes the concept with the highest cosine to its
   bilinearly upsampled feature, so boundaries land between feature cells.

maskmill then names the segments with the prompt's cross-attention
(`segments.assign_segments`). Upstream DiffCut runs one extra UNet pass at t = 50 with an
empty prompt; here the features come from the capture (`features["encoder_last_attn"]`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch

from ..capture import CaptureConfig
from .base import SampleAttention
from .segments import SegmentingExtractor, upsample

# Up to this many pixels the dense LAPACK solver is used (its cost grows as n^3: seconds at 1024);
# above it, Lanczos (eigsh) finds the two eigenvectors without a full decomposition.
DENSE_EIGEN_LIMIT = 256


def _unit_features(features: np.ndarray | torch.Tensor) -> np.ndarray:
    """(C, h, w) -> float64 (h*w, C), each pixel's feature scaled to unit length."""
    f = torch.as_tensor(features).double().reshape(features.shape[0], -1).T.numpy()
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


# --- step 1: the affinity graph ---------------------------------------------------------------

def affinity(features: np.ndarray | torch.Tensor, alpha: float = 10.0) -> np.ndarray:
    """Step 1: pixel affinity A (h*w, h*w), float64 in [0, 1], from features (C, h, w).

    Cosine similarities F^T F of the unit features, min-max normalised over the whole
    matrix, raised to the power alpha.
    """
    f = _unit_features(features)
    cosine = f @ f.T
    lo, hi = cosine.min(), cosine.max()
    if hi - lo <= 1e-12:  # all pixels alike: one fully connected segment
        return np.ones_like(cosine)
    return ((cosine - lo) / (hi - lo)) ** alpha


# --- step 2: recursive normalized cut ---------------------------------------------------------

def _fiedler_vector(laplacian: np.ndarray, sqrt_degree: np.ndarray) -> np.ndarray:
    """The eigenvector of the second-smallest eigenvalue of the normalized Laplacian.

    The smallest eigenvalue (0) belongs to sqrt(degree). When the graph falls apart into
    pieces, 0 is repeated and a solver may return any mix of the two vectors; taking the
    combination orthogonal to sqrt(degree) gives the wanted vector in both cases.
    """
    n = len(laplacian)
    if n <= DENSE_EIGEN_LIMIT:
        _, vectors = scipy.linalg.eigh(laplacian, subset_by_index=[0, 1])
    else:
        start = np.random.default_rng(0).standard_normal(n)  # fixed start: reproducible cuts
        values, vectors = scipy.sparse.linalg.eigsh(laplacian, k=2, which="SA", v0=start)
        vectors = vectors[:, np.argsort(values)]
    trivial = sqrt_degree / np.linalg.norm(sqrt_degree)
    c0, c1 = vectors.T @ trivial
    return c1 * vectors[:, 0] - c0 * vectors[:, 1]


def ncut_bipartition(a: np.ndarray, num_thresholds: int = 100,
                     min_segment_size: int = 1) -> tuple[np.ndarray | None, float]:
    """Best normalized cut of the graph a (n, n) (symmetric, >= 0, every degree > 0) into two parts.

    Returns (mask, ncut): mask (n,) bool marks one part, ncut = cut/assoc(part) +
    cut/assoc(rest) of the best of `num_thresholds` thresholds, evenly spaced strictly
    inside the range of y = D^-1/2 z (z: second eigenvector of the normalized Laplacian;
    y is Shi & Malik's relaxed cut indicator). The thresholds span only the values that
    leave >= `min_segment_size` pixels on each side. (None, inf) when there is nothing to cut.
    """
    n = len(a)
    if n < max(2, 2 * min_segment_size):
        return None, float("inf")
    degree = a.sum(1)
    inv_sqrt = 1.0 / np.sqrt(degree)
    laplacian = np.eye(n) - inv_sqrt[:, None] * a * inv_sqrt[None, :]  # D^-1/2 (D - A) D^-1/2
    y = inv_sqrt * _fiedler_vector(laplacian, np.sqrt(degree))
    # Thresholds strictly between the m-th smallest and m-th largest y leave >= m pixels
    # on each side (m = 1: the full range, as in the paper).
    ordered = np.sort(y)
    lo, hi = ordered[min_segment_size - 1], ordered[n - min_segment_size]
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi)):
        return None, float("inf")
    thresholds = np.linspace(lo, hi, num_thresholds + 2)[1:-1]
    masks = (y[None, :] > thresholds[:, None]).astype(np.float64)  # (T, n)
    assoc = masks @ degree  # assoc(part, all)
    cut = assoc - ((masks @ a) * masks).sum(1)  # assoc(part, all) - assoc(part, part)
    ncut = cut / assoc + cut / (degree.sum() - assoc)
    best = int(np.argmin(ncut))
    return masks[best].astype(bool), float(ncut[best])


def recursive_ncut(a: np.ndarray, ncut_threshold: float = 0.2, num_thresholds: int = 100,
                   min_segment_size: int = 1) -> np.ndarray:
    """Step 2: cut a (n, n) recursively; returns int64 (n,) segment ids 0..S-1.

    A part is split while its best bipartition has Ncut < ncut_threshold, each piece on
    its own sub-graph a[part][:, part]. Ids are ordered by each segment's first pixel.

    min_segment_size (pixels of the feature map; 1 = the paper): with alpha = 10 a pixel
    whose feature is an outlier keeps almost no affinity to anything, so cutting it off
    alone costs Ncut ~ 0 and noisy features get peeled pixel by pixel (one eigenproblem
    per pixel). Raising it to 2-4 stops that.
    """
    pending = [np.arange(len(a))]
    leaves = []
    while pending:
        part = pending.pop()
        mask, value = ncut_bipartition(a[np.ix_(part, part)], num_thresholds, min_segment_size)
        if mask is not None and value < ncut_threshold:
            pending += [part[mask], part[~mask]]
        else:
            leaves.append(part)
    labels = np.empty(len(a), dtype=np.int64)
    for i, part in enumerate(sorted(leaves, key=lambda p: p.min())):
        labels[part] = i
    return labels


# --- step 3: concept assignment ---------------------------------------------------------------

def upsample_segments(segments: np.ndarray, features: np.ndarray | torch.Tensor,
                      size: tuple[int, int]) -> np.ndarray:
    """Step 3: low-res segments (h, w) + features (C, h, w) -> segments at `size` (H, W).

    Concepts = mean unit feature of each segment, normalised. Each image pixel takes the
    concept with the highest cosine to its bilinearly upsampled feature. Bilinear
    upsampling is linear and the pixel's own norm is common to all concepts, so that
    argmax equals the argmax of the upsampled low-res dot products: only S maps of H x W
    are built, never C of them (C = 1280 at SD's encoder end). Keeps the input's ids.
    """
    h, w = segments.shape
    f = _unit_features(features)  # (h*w, C)
    ids, index = np.unique(segments.ravel(), return_inverse=True)
    concepts = np.stack([f[index == s].mean(0) for s in range(len(ids))])
    concepts /= np.maximum(np.linalg.norm(concepts, axis=1, keepdims=True), 1e-12)
    scores = torch.from_numpy((concepts @ f.T).reshape(len(ids), h, w)).float()
    return ids[upsample(scores, size).argmax(0).numpy()]


# --- the extractor ----------------------------------------------------------------------------

class DiffCutExtractor(SegmentingExtractor):
    """DiffCut segments (recursive Ncut on UNet features) named by the prompt's cross-attention.

    feature_name: key of `SampleAttention.features` holding (C, h, w) features (the
    output of the UNet encoder's last self-attention block). alpha: affinity power.
    ncut_threshold: tau, keep cutting while Ncut < tau (0.2 as for SD1.4; 0.5 for
    SSD-1B in the paper). num_thresholds: candidate cuts per eigenvector.
    min_segment_size: smallest part a cut may leave, in feature-map pixels (see `recursive_ncut`).
    fg_threshold, bg_threshold, margin: segment naming (see `segments.assign_segments`).
    cross_resolutions: sides of the cross-attention layers used to name segments (None: all).
    """

    name = "diffcut"

    def __init__(
        self,
        feature_name: str = "encoder_last_attn",
        alpha: float = 10.0,
        ncut_threshold: float = 0.2,
        num_thresholds: int = 100,
        min_segment_size: int = 1,
        fg_threshold: float = 0.4,
        bg_threshold: float = 0.2,
        margin: float = 0.05,
        cross_resolutions: Sequence[int] | None = None,
    ) -> None:
        if alpha <= 0 or num_thresholds < 1 or min_segment_size < 1:
            raise ValueError("alpha must be > 0, num_thresholds and min_segment_size >= 1")
        self.feature_name = feature_name
        self.alpha = alpha
        self.ncut_threshold = ncut_threshold
        self.num_thresholds = num_thresholds
        self.min_segment_size = min_segment_size
        self.fg_threshold = fg_threshold
        self.bg_threshold = bg_threshold
        self.margin = margin
        self.cross_resolutions = None if cross_resolutions is None else list(cross_resolutions)

    def capture_config(self, unet, latent: tuple[int, int]) -> CaptureConfig:
        """UNet features from the last steps (DiffCut reads t near 0) and cross-attention to name segments;
        no self-attention."""
        return CaptureConfig(self_blocks={}, feature_modules={self.feature_name: encoder_last_attention_path(unet)},
                             steps=(0.9, 1.0))

    def segment(self, attn: SampleAttention, size: tuple[int, int]) -> np.ndarray:
        """Class-agnostic DiffCut segments at `size`: int64 (H, W) ids 0..S-1."""
        if self.feature_name not in attn.features:
            raise ValueError(f"DiffCut needs features[{self.feature_name!r}]; captured: {sorted(attn.features)}")
        features = attn.features[self.feature_name]
        if features.ndim != 3:
            raise ValueError(f"features must be (C, h, w), got {tuple(features.shape)}")
        a = affinity(features, self.alpha)
        low_res = recursive_ncut(a, self.ncut_threshold, self.num_thresholds, self.min_segment_size)
        low_res = low_res.reshape(features.shape[1:])
        full = upsample_segments(low_res, features, size)
        return np.unique(full, return_inverse=True)[1].reshape(full.shape)  # a cell-sized segment may vanish


def encoder_last_attention_path(unet) -> str:
    """Dotted path of the UNet encoder's last attention block (SD1.x: down_blocks.2.attentions.1)."""
    for i in reversed(range(len(unet.down_blocks))):
        attns = getattr(unet.down_blocks[i], "attentions", None)
        if attns:
            return f"down_blocks.{i}.attentions.{len(attns) - 1}"
    raise ValueError("this UNet's encoder has no attention block for DiffCut features")
