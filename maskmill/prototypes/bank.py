"""Prototype banks (OVDiff): per class, L2-normalised feature prototypes of its foreground and background.

For one class, from its support images' dense features and fg/bg masks, `build_class_bank` keeps
for the foreground and for the background alike:
  - "class": the mean over every masked pixel of every support image,
  - "instance": one mean per support image,
  - "part": k-means centroids of the masked pixels (K = 32 by default).
Stuff classes ("sky", "grass") keep no background prototypes: their "background" is other stuff.

Banks merge (`merge_banks`) and lose background prototypes that look like another class's
foreground (`drop_confusing_background`); bank_files.py saves and loads them, fingerprint.py says
what they were built with.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .fingerprint import fingerprint_differences

SIDES = ("fg", "bg")
KINDS = ("class", "instance", "part")


@dataclass(frozen=True)
class PrototypeMeta:
    """Where one prototype comes from."""

    class_name: str
    side: str  # "fg" | "bg"
    kind: str  # "class" | "instance" | "part"
    support_keys: tuple[str, ...]  # the support samples whose pixels it averages


@dataclass
class PrototypeBank:
    """vectors: float32 (P, C), each row L2-normalised; meta: one PrototypeMeta per row."""

    vectors: torch.Tensor
    meta: list[PrototypeMeta]
    fingerprint: dict | None = None

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or len(self.meta) != self.vectors.shape[0]:
            raise ValueError(f"vectors (P, C) and meta must agree: {tuple(self.vectors.shape)} vs {len(self.meta)} meta")

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def channels(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def classes(self) -> list[str]:
        """Class names in first-appearance order."""
        return list(dict.fromkeys(m.class_name for m in self.meta))

    def mask(self, classes: list[str] | None = None, side: str | None = None,
             kinds: tuple[str, ...] | None = None) -> torch.Tensor:
        """Boolean (P,) selecting prototypes of these classes / side / kinds (None = any)."""
        wanted = set(classes) if classes is not None else None
        return torch.tensor([
            (wanted is None or m.class_name in wanted) and (side is None or m.side == side)
            and (kinds is None or m.kind in kinds)
            for m in self.meta
        ], dtype=torch.bool)

    def subset(self, keep: torch.Tensor) -> "PrototypeBank":
        idx = torch.nonzero(keep, as_tuple=False).flatten().tolist()
        return PrototypeBank(self.vectors[idx].clone(), [self.meta[i] for i in idx], self.fingerprint)

    def counts(self) -> dict[str, dict[str, int]]:
        """class -> {"fg": n, "bg": n}: a quick look at what a bank holds."""
        out: dict[str, dict[str, int]] = {}
        for m in self.meta:
            out.setdefault(m.class_name, {"fg": 0, "bg": 0})[m.side] += 1
        return out


# ----------------------------------------------------------------------------------------------
# building


def masks_at(masks: np.ndarray, hw: tuple[int, int], min_fraction: float) -> torch.Tensor:
    """bool (N, H, W) -> bool (N, h, w): a feature cell is in the mask when >= min_fraction of its
    area is. An image whose mask is non-empty but covers no cell that much keeps its best-covered
    cell(s), so small objects still give prototypes."""
    m = torch.as_tensor(np.asarray(masks)).float()
    if m.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got {tuple(m.shape)}")
    frac = F.interpolate(m[:, None], size=hw, mode="area")[:, 0] if tuple(m.shape[-2:]) != tuple(hw) else m
    out = frac >= min_fraction
    best = frac.flatten(1).max(1).values
    fallback = (~out.flatten(1).any(1)) & (best > 0)
    for i in torch.nonzero(fallback).flatten().tolist():
        out[i] = frac[i] >= best[i]
    return out


def _kmeans_parts(points: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """(centroids (k', C), point -> centroid labels). k' <= k: never more parts than distinct points,
    never an empty part.

    scipy's kmeans2 with k-means++ init and a seeded Generator: deterministic, and no k-means of
    our own to maintain. float32 throughout: SD features have thousands of channels.
    """
    from scipy.cluster.vq import kmeans2

    data = points.contiguous().numpy().astype(np.float32)
    unique, inverse = np.unique(data, axis=0, return_inverse=True)
    if len(unique) <= k:  # no more distinct points than parts: each point is its own part
        return torch.from_numpy(unique).float(), inverse.reshape(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "one of the clusters is empty": dropped below
        centroids, labels = kmeans2(data, k, minit="++", seed=np.random.default_rng(seed))
    used = np.unique(labels)
    remap = np.full(k, -1)
    remap[used] = np.arange(len(used))
    return torch.from_numpy(centroids[used]).float(), remap[labels]


def _masked_pixels(features: torch.Tensor, i: int, mask: torch.Tensor) -> torch.Tensor:
    """Image i's masked pixels as unit vectors (M, C), fp32. Gathered per image so only one
    image's pixels are ever copied (32 SD support maps at 64x64 are ~3.5 GB in fp32)."""
    return F.normalize(features[i].permute(1, 2, 0)[mask].float(), dim=1)


def _side_prototypes(class_name: str, side: str, features: torch.Tensor, masks: torch.Tensor,
                     support_keys: list[str], k_parts: int, seed: int, max_points: int):
    """Class mean, per-image means and k-means parts of the masked pixels of one side."""
    counts = masks.flatten(1).sum(1).tolist()
    present = [i for i, n in enumerate(counts) if n]
    if not present:
        return [], []
    total = sum(counts)
    # The k-means sample, drawn up front as global pixel indices (seeded) so it can be gathered
    # image by image; each part then knows which support images it came from.
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(total, max_points, replace=False)) if total > max_points else np.arange(total)
    starts = np.cumsum([0] + counts)
    class_sum = torch.zeros(features.shape[1])
    instance_means, sampled, owners = [], [], []
    for i in present:
        pixels = _masked_pixels(features, i, masks[i])
        class_sum += pixels.sum(0)
        instance_means.append(pixels.mean(0))
        local = sample[(sample >= starts[i]) & (sample < starts[i + 1])] - starts[i]
        sampled.append(pixels[torch.from_numpy(local)])
        owners.append(np.full(len(local), i))
    vectors = [class_sum / total] + instance_means
    meta = [PrototypeMeta(class_name, side, "class", tuple(support_keys[i] for i in present))]
    meta += [PrototypeMeta(class_name, side, "instance", (support_keys[i],)) for i in present]
    if k_parts > 0:
        owner = np.concatenate(owners)
        centroids, labels = _kmeans_parts(torch.cat(sampled), k_parts, seed)
        for j in range(len(centroids)):
            vectors.append(centroids[j])
            from_images = sorted(set(owner[labels == j].tolist()))
            meta.append(PrototypeMeta(class_name, side, "part", tuple(support_keys[i] for i in from_images)))
    return vectors, meta


def build_class_bank(class_name: str, features: torch.Tensor, fg_masks, bg_masks, support_keys: list[str],
                     k_parts: int = 32, seed: int = 0, stuff: bool = False,
                     max_kmeans_points: int = 20000, fingerprint: dict | None = None) -> PrototypeBank:
    """One class's bank from its support set.

    features: (N, C, h, w) dense features of the N support images (any scale: pixels are
              L2-normalised first so every pixel weighs the same in the means).
    fg_masks, bg_masks: bool (N, h, w) (or larger: area-downsampled to the feature grid, `masks_at`).
    support_keys: one id per support image, recorded in the prototypes' metadata.
    stuff: keep no background prototypes.
    """
    features = torch.as_tensor(features)  # any float dtype; cast per image, not as a whole
    if features.ndim != 4:
        raise ValueError(f"features must be (N, C, h, w), got {tuple(features.shape)}")
    n, _, h, w = features.shape
    if len(support_keys) != n:
        raise ValueError(f"{len(support_keys)} support keys for {n} feature maps")
    vectors: list[torch.Tensor] = []
    meta: list[PrototypeMeta] = []
    sides = [("fg", fg_masks)] + ([] if stuff else [("bg", bg_masks)])
    for side, masks in sides:
        masks = masks_at(masks, (h, w), 0.5)
        if len(masks) != n:
            raise ValueError(f"{len(masks)} {side} masks for {n} feature maps")
        v, m = _side_prototypes(class_name, side, features, masks, list(support_keys), k_parts, seed, max_kmeans_points)
        if side == "fg" and not v:
            raise ValueError(f"class {class_name!r}: every foreground mask is empty, no prototype can be built")
        vectors += v
        meta += m
    return PrototypeBank(F.normalize(torch.stack(vectors), dim=1), meta, fingerprint)


# ----------------------------------------------------------------------------------------------
# combining


def merge_banks(banks: list[PrototypeBank]) -> PrototypeBank:
    """Concatenate banks of distinct classes built with the same features.

    Refuses a class present in two banks (a caching bug would otherwise double-count it) and
    banks whose feature extractors differ (their prototypes are not comparable). The merged
    fingerprint keeps the entries all banks agree on.
    """
    if not banks:
        raise ValueError("no banks to merge")
    seen: dict[str, int] = {}
    for i, bank in enumerate(banks):
        for c in bank.classes:
            if c in seen:
                raise ValueError(f"class {c!r} is in bank {seen[c]} and bank {i}")
            seen[c] = i
    channels = {b.channels for b in banks}
    if len(channels) > 1:
        raise ValueError(f"banks have different feature sizes: {sorted(channels)}")
    extractors = [b.fingerprint.get("feature_extractor") for b in banks if b.fingerprint]
    if any(e != extractors[0] for e in extractors[1:]):
        raise ValueError("banks were built with different feature extractors: "
                         + "; ".join(fingerprint_differences(extractors[0], e)[0] for e in extractors[1:] if e != extractors[0]))
    fingerprint = None
    if all(b.fingerprint for b in banks):
        first = banks[0].fingerprint
        fingerprint = {k: v for k, v in first.items() if all(b.fingerprint.get(k) == v for b in banks[1:])}
    return PrototypeBank(torch.cat([b.vectors for b in banks]), [m for b in banks for m in b.meta], fingerprint)


def drop_confusing_background(bank: PrototypeBank, threshold: float = 0.85) -> PrototypeBank:
    """Drop bg prototypes whose cosine to some *other* class's fg prototype exceeds `threshold`.

    A dog image's background may contain a cat; kept, that prototype would label cats background.
    """
    bg_idx = [i for i, m in enumerate(bank.meta) if m.side == "bg"]
    fg_idx = [i for i, m in enumerate(bank.meta) if m.side == "fg"]
    if not bg_idx or not fg_idx:
        return bank
    sims = bank.vectors[bg_idx] @ bank.vectors[fg_idx].T  # (B, F), rows unit-norm
    bg_class = [bank.meta[i].class_name for i in bg_idx]
    fg_class = [bank.meta[i].class_name for i in fg_idx]
    other = torch.tensor([[b != f for f in fg_class] for b in bg_class], dtype=torch.bool)
    confusing = ((sims > threshold) & other).any(1)
    keep = torch.ones(len(bank), dtype=torch.bool)
    keep[torch.tensor(bg_idx)[confusing]] = False
    return bank.subset(keep)
