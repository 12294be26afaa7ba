"""The extractor contract: attention captured during generation in, a labelled mask out.

Every extractor (SeeDiff, DiffSeg, DiffCut, the baselines) takes one sample's
`SampleAttention` plus the classes of its prompt and returns a `MaskResult`, so
flows and shard writers never care which one ran: the config picks it by name.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch

IGNORE = 255  # label for uncertain pixels; training ignores them


@dataclass(frozen=True)
class ClassSpec:
    """One class of a sample's prompt: its name and the prompt token positions that seed it."""

    name: str
    token_indices: tuple[int, ...]


@dataclass
class SampleAttention:
    """What capture recorded for one sample, averaged over heads and captured steps (conditional half).

    cross:  layer name -> (n_tokens, h, w) cross-attention probabilities of every prompt token.
    self_attn: resolution side h -> (h*w, h*w) self-attention, mean over the captured layers of that side;
            row i is where query pixel i attends (rows sum to 1).
    cross_resolution: layer name -> h, for selecting layers by resolution.
    features: optional named UNet feature maps (C, h, w), e.g. for DiffCut.
    self_attn_layers: layer name -> (h*w, h*w), each layer on its own (diagnostics only).
    """

    cross: dict[str, torch.Tensor] = field(default_factory=dict)
    self_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    cross_resolution: dict[str, int] = field(default_factory=dict)
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    self_attn_layers: dict[str, torch.Tensor] = field(default_factory=dict)  # only with per_layer_self

    def class_cross_attention(self, spec: ClassSpec, layers: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Per layer, the cross-attention of a class: the sum over its seed tokens, (h, w)."""
        names = layers if layers is not None else list(self.cross)
        idx = list(spec.token_indices)
        return {n: self.cross[n][idx].sum(0) for n in names}


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
    """Turns one sample's captured attention into a MaskResult at the image's size."""

    name: str = "base"

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


_REGISTRY: dict[str, type[Extractor]] = {}


def register(cls: type[Extractor]) -> type[Extractor]:
    _REGISTRY[cls.name] = cls
    return cls


def get_extractor(name: str, **params) -> Extractor:
    """Instantiate a registered extractor by name with its parameters."""
    from . import available  # noqa: F401  (imports every implementation so it registers)

    if name not in _REGISTRY:
        raise ValueError(f"unknown extractor {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**params)
    except TypeError as e:
        raise ValueError(f"bad parameters for extractor {name!r}: {e}") from None


def extractor_names() -> list[str]:
    from . import available  # noqa: F401

    return sorted(_REGISTRY)
