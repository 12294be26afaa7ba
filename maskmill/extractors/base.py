"""The extractor contract: attention captured during generation in, a labelled mask out.

Every extractor (SeeDiff, DiffSeg, DiffCut, the baselines) says what generation must capture
for it (`capture_config`), then takes one sample's `SampleAttention` (maskmill.capture) plus the
classes of its prompt (`ClassSpec`, maskmill.tokens) and returns a `MaskResult`, so flows and
shard writers never care which one ran: the config picks it by name (`registry.get_extractor`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ..capture import CaptureConfig, SampleAttention
from ..tokens import ClassSpec

__all__ = ["IGNORE", "ClassSpec", "Extractor", "MaskResult", "SampleAttention", "resolve_labels"]

IGNORE = 255  # label for uncertain pixels; training ignores them


@dataclass
class MaskResult:
    """labels: uint8 (H, W), 0 background, k for the k-th class of the prompt (1-based), 255 ignore.
    soft: float32 (K, H, W) per-class maps in [0, 1]. confidence: float32 (K,) per-class score in [0, 1]."""

    labels: np.ndarray
    soft: np.ndarray
    confidence: np.ndarray

    def __post_init__(self) -> None:
        if self.labels.dtype != np.uint8 or self.labels.ndim != 2:
            raise ValueError(f"labels must be a uint8 (H, W) array, got {self.labels.dtype} {self.labels.shape}")
        if self.soft.ndim != 3 or self.soft.shape[1:] != self.labels.shape:
            raise ValueError(f"soft must be (K, H, W) matching labels {self.labels.shape}, got {self.soft.shape}")
        if self.confidence.shape != (self.soft.shape[0],):
            raise ValueError(f"confidence must have one score per class ({self.soft.shape[0]}), got {self.confidence.shape}")


class Extractor(ABC):
    """Turns one sample's captured attention into a MaskResult at the image's size.

    The whole contract: `name` (what configs call it; `registry.EXTRACTORS` maps names to
    classes), `capture_config` (what generation must record for it), `extract`, and `params`.
    """

    name: str = "base"

    def capture_config(self, unet, latent: tuple[int, int]) -> CaptureConfig:
        """What to record while generating for this extractor, given the UNet and the latent (h, w).

        The default records everything; implementations narrow it to what they read (capture
        cost grows with every self-attention side recorded).
        """
        return CaptureConfig()

    @abstractmethod
    def extract(self, attn: SampleAttention, classes: list[ClassSpec], image: np.ndarray) -> MaskResult:
        """image: uint8 (H, W, 3) generated image (for size and for refinement)."""

    def params(self) -> dict:
        """The extractor's parameters, recorded in every sample's metadata."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def resolve_labels(soft: np.ndarray, foreground: np.ndarray, margin: float = 0.05) -> np.ndarray:
    """Per pixel: the class with the highest soft score among pixels marked foreground.

    soft: (K, H, W); foreground: bool (H, W) or (K, H, W) (each class's own foreground mask).
    Pixels where the best two classes are within `margin` of each other become IGNORE.
    """
    k, h, w = soft.shape
    fg = foreground if foreground.ndim == 3 else np.broadcast_to(foreground, soft.shape)
    scores = np.where(fg, soft, -np.inf)
    labels = np.zeros((h, w), dtype=np.uint8)
    if k == 0:
        return labels
    best = scores.argmax(0)
    top = np.take_along_axis(scores, best[None], 0)[0]
    any_fg = np.isfinite(top)
    labels[any_fg] = (best[any_fg] + 1).astype(np.uint8)
    if k > 1:
        second = np.sort(scores, axis=0)[-2]
        with np.errstate(invalid="ignore"):  # -inf - -inf where no class is foreground: masked out below
            tie = any_fg & np.isfinite(second) & (top - second < margin)
        labels[tie] = IGNORE
    return labels
