"""Scoring OVDiff on the shapes world: rendered test scenes with exact truth, confusion matrices, mIoU.

The test scenes are rendered (`render.sample_scene` + `render`), never generated: label = 1 + the
index of each object's shape in SHAPES, 0 background. mIoU is the IoU per class (background
included) accumulated over the whole test set, then averaged; `mean_table` averages the tables
of several support draws.
"""
from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..prototypes.bank import PrototypeBank
from ..prototypes.features import FeatureExtractor
from ..prototypes.segment import make_refiner, segment_images
from .render import SHAPES, render, sample_scene

if TYPE_CHECKING:
    from .ovdiff_settings import BenchSettings

TEST_SEED = 20261123
# Rendered scenes per split: "test" for every reported figure, "tune" for choosing feature
# settings without looking at the test scenes.
SCENE_SEEDS = {"test": TEST_SEED, "tune": 11}
CLASS_NAMES = ["background", *SHAPES]


class CachedFeatures(FeatureExtractor):
    """Remembers each image's features (keyed by its bytes), so every variant segments the same features
    and only the first pass pays (and times) the UNet."""

    def __init__(self, inner: FeatureExtractor):
        self.inner = inner
        self.name = inner.name
        self._cache: dict[str, torch.Tensor] = {}

    def fingerprint(self) -> dict:
        return self.inner.fingerprint()

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        images = np.asarray(images)
        keys = [hashlib.sha1(im.tobytes()).hexdigest() + str(im.shape) for im in images]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        if todo:
            feats = self.inner(images[todo])
            for i, f in zip(todo, feats):
                self._cache[keys[i]] = f
        return torch.stack([self._cache[k] for k in keys])


def rendered_test_set(n: int, seed: int = TEST_SEED, transform=None) -> tuple[np.ndarray, np.ndarray]:
    """n rendered scenes: images uint8 (n, 32, 32, 3) and labels uint8 (n, 32, 32) (0 bg, 1 + SHAPES index).

    transform: optional Scene -> Scene applied before rendering (the colour-coded control)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        scene = sample_scene(rng)
        if transform is not None:
            scene = transform(scene)
        image, inst = render(scene)
        lab = np.zeros(inst.shape, np.uint8)
        for j, obj in enumerate(scene.objects):
            lab[inst == j + 1] = SHAPES.index(obj.shape) + 1
        images.append(image)
        labels.append(lab)
    return np.stack(images), np.stack(labels)


def confusion(pred: np.ndarray, gt: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(gt.reshape(-1).astype(np.int64) * k + pred.reshape(-1), minlength=k * k).reshape(k, k)


def iou_table(cm: np.ndarray) -> dict:
    inter = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    ious = {CLASS_NAMES[i]: (float(inter[i] / union[i]) if union[i] else float("nan")) for i in range(len(cm))}
    valid = [v for v in ious.values() if not np.isnan(v)]
    return {"miou": float(np.mean(valid)), "per_class": ious, "pixel_acc": float(inter.sum() / cm.sum())}


def evaluate_bank(extractor: FeatureExtractor, bank: PrototypeBank, images: np.ndarray, labels: np.ndarray,
                  settings: BenchSettings, **variant) -> tuple[dict, float]:
    """(iou table, seconds) of segmenting the test set with one variant of the method, refined with
    `settings.refine` unless the variant names its own `refine`."""
    t0 = time.perf_counter()
    variant.setdefault("refine", make_refiner(settings.refine))
    results = segment_images(extractor, images, bank, list(SHAPES),
                             confusing_bg_threshold=settings.confusing_bg_threshold, **variant)
    seconds = time.perf_counter() - t0
    cm = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), np.int64)
    for res, gt in zip(results, labels):
        cm += confusion(res.labels, gt, len(CLASS_NAMES))
    return iou_table(cm), seconds


def mean_table(tables: list[dict]) -> dict:
    """Average of iou tables (one per support draw): mIoU, per-class IoU and pixel accuracy, plus the
    per-draw mIoUs and their standard deviation."""
    def mean_present(values):  # NaN = class absent from that draw's truth and prediction
        present = [v for v in values if not np.isnan(v)]
        return float(np.mean(present)) if present else float("nan")

    mious = [t["miou"] for t in tables]
    return {"miou": float(np.mean(mious)),
            "per_class": {c: mean_present([t["per_class"][c] for t in tables]) for c in tables[0]["per_class"]},
            "pixel_acc": float(np.mean([t["pixel_acc"] for t in tables])),
            "miou_per_draw": mious, "miou_std": float(np.std(mious))}


def prefilter_figures(prefilter, images: np.ndarray, labels: np.ndarray) -> dict:
    """How the class pre-filter treats the test scenes: classes present / kept per image, the share of
    present classes it keeps (a dropped one cannot be segmented) and of absent ones it drops."""
    present = kept = kept_present = absent = dropped_absent = 0
    for image, gt in zip(images, labels):
        truth = {SHAPES[v - 1] for v in np.unique(gt) if v > 0}
        keep = set(prefilter(image, list(SHAPES)))
        present += len(truth)
        kept += len(keep)
        kept_present += len(truth & keep)
        absent += len(SHAPES) - len(truth)
        dropped_absent += len(set(SHAPES) - truth - keep)
    n = max(1, len(images))
    return {"classes_present_per_image": present / n, "classes_kept_per_image": kept / n,
            "present_kept": kept_present / max(1, present), "absent_dropped": dropped_absent / max(1, absent)}
