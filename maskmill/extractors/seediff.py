"""SeeDiff (AAAI 2025): seed masks from cross-attention, grown through self-attention.

For each class of the prompt:
1. seeds: the class tokens' cross-attention at the seed resolution (per layer min-max
   normalised, summed, normalised), squared, Otsu threshold -> seed pixels;
2. expansion: score(p) = sum over seeds s of cos(SA[s], SA[p]), min-max normalised;
3. background refinement at each finer self-attention resolution: upsample the map, square,
   Otsu; pixels *below* are background seeds, expanded the same way, inverted and multiplied
   with the upsampled map;
4. final: upsample to the image, > fg_threshold, PAMR refinement, > final_threshold.
Several classes are resolved per pixel by argmax with a margin (ties -> 255).
"""
from __future__ import annotations

import numpy as np
import torch

from ..capture import CaptureConfig
from .attention_ops import class_cross_map, expand, minmax, otsu, propagate, resize
from .base import ClassSpec, Extractor, MaskResult, SampleAttention, resolve_labels
from .pamr import pamr


def default_seed_side(sides: list[int]) -> int:
    """SeeDiff seeds at 16x16 on SD's 64x64 latents: the coarsest side >= 16, else the finest there is."""
    big = [s for s in sides if s >= 16]
    return big[0] if big else sides[-1]


def seed_map(attn: SampleAttention, spec: ClassSpec, side: int, cross_sides: list[int] | None) -> torch.Tensor:
    """Step 1: the squared, normalised class cross-attention at `side` (h, w)."""
    return class_cross_map(attn, spec, side, cross_sides) ** 2


def expand_seeds(self_attn: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Step 2: Otsu seeds of `seed` (h, w) grown through self-attention (N, N) -> (h, w)."""
    seeds = (seed > otsu(seed)).reshape(-1)
    return expand(self_attn, seeds).reshape(seed.shape)


def refine_background(self_attn: torch.Tensor, previous: torch.Tensor, side: int) -> torch.Tensor:
    """Step 3 at one finer resolution: remove what background seeds expand to."""
    up = minmax(resize(previous, (side, side)))
    sq = up**2
    background = (sq < otsu(sq)).reshape(-1)
    bg_score = expand(self_attn, background).reshape(side, side)
    return minmax((1 - bg_score) * up)


class SeeDiffExtractor(Extractor):
    """SeeDiff with parameters for any model: resolutions are chosen from what was captured."""

    name = "seediff"

    def __init__(self, seed_side: int | None = None, cross_sides: list[int] | None = None,
                 refine_sides: list[int] | None = None, fg_threshold: float = 0.3, final_threshold: float = 0.8,
                 pamr_iterations: int = 10, pamr_dilations: tuple[int, ...] = (1, 2, 4), margin: float = 0.05,
                 capture_steps: tuple[float, float] = (0.0, 1.0), separate_by_cross: bool = True,
                 refine_steps: tuple[float, float] | None = None):
        for name, window in (("capture_steps", capture_steps), ("refine_steps", refine_steps)):
            if window is not None and not 0.0 <= window[0] < window[1] <= 1.0:
                raise ValueError(f"{name} must be [start, end) fractions with 0 <= start < end <= 1, "
                                 f"got {list(window)}")
        self.seed_side = seed_side
        self.cross_sides = cross_sides
        self.refine_sides = refine_sides
        self.fg_threshold = fg_threshold
        self.final_threshold = final_threshold
        self.pamr_iterations = pamr_iterations
        self.pamr_dilations = tuple(pamr_dilations)
        self.margin = margin
        # the authors average all steps; a later window captures less (cheaper) where masks allow it
        self.capture_steps = (float(capture_steps[0]), float(capture_steps[1]))
        # the refinement sides (SD's 64x64 layers: most of capture's cost) only in this window of the
        # schedule, within capture_steps; None: the same steps as the seed side
        self.refine_steps = None if refine_steps is None else (float(refine_steps[0]), float(refine_steps[1]))
        # Expansion separates foreground from background, not one object from another:
        # with several classes in a prompt, weight each class's score by its own propagated
        # cross-attention before the per-pixel argmax.
        self.separate_by_cross = bool(separate_by_cross)

    def _seed_side(self, attn: SampleAttention) -> int:
        if not attn.self_attn:
            raise ValueError("SeeDiff needs captured self-attention; none was recorded")
        return self.seed_side or default_seed_side(sorted(attn.self_attn))

    def capture_config(self, unet, latent: tuple[int, int]) -> CaptureConfig:
        """Only what SeeDiff reads: self-attention at the seed side and finer (at >= 64, up-blocks only,
        as the authors do), cross-attention at the sides that seed."""
        sides = [latent[0] >> i for i in range(len(unet.config.block_out_channels))]
        seed = self.seed_side or default_seed_side(sorted(sides))
        finer = self.refine_sides if self.refine_sides is not None else [s for s in sides if s > seed]
        blocks = {seed: ("down", "mid", "up")}
        for s in finer:
            blocks[s] = ("up",) if s >= 64 else ("down", "mid", "up")
        side_steps = None if self.refine_steps is None else {s: self.refine_steps for s in finer}
        return CaptureConfig(self_blocks=blocks, cross_sides=tuple(self.cross_sides or [seed]),
                             steps=self.capture_steps, side_steps=side_steps)

    def soft_maps(self, attn: SampleAttention, classes: list[ClassSpec], hw: tuple[int, int]) -> torch.Tensor:
        """Steps 1-3 for each class, upsampled to `hw`: (K, H, W) in [0, 1]."""
        side = self._seed_side(attn)
        if side not in attn.self_attn:
            raise ValueError(f"seed side {side} has no captured self-attention (captured: {sorted(attn.self_attn)})")
        refine = self.refine_sides if self.refine_sides is not None else [s for s in sorted(attn.self_attn) if s > side]
        maps = []
        for spec in classes:
            m = expand_seeds(attn.self_attn[side], seed_map(attn, spec, side, self.cross_sides))
            for s in refine:
                m = refine_background(attn.self_attn[s], m, s)
            maps.append(minmax(resize(m, hw)))
        return torch.stack(maps) if maps else torch.zeros(0, *hw)

    def extract(self, attn: SampleAttention, classes: list[ClassSpec], image: np.ndarray) -> MaskResult:
        h, w = image.shape[:2]
        soft = self.soft_maps(attn, classes, (h, w))
        coarse = (soft > self.fg_threshold).float()
        if self.pamr_iterations and len(classes):
            img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
            refined = pamr(img, coarse, self.pamr_iterations, self.pamr_dilations)
        else:
            refined = coarse
        fg = (refined > self.final_threshold).numpy()
        # keeps attention strength inside the mask; PAMR's weighted averages can overshoot 1 by rounding
        final_soft = np.clip((refined * soft).numpy(), 0.0, 1.0).astype(np.float32)
        if self.separate_by_cross and len(classes) > 1:
            final_soft = final_soft * self.class_weights(attn, classes, (h, w)).numpy()
        labels = resolve_labels(final_soft, fg, self.margin)
        # Confidence rests on the class's own cross-attention, not on the expanded map: expansion makes a
        # crisp region out of any seeds, even those Otsu picks from a token that attends everywhere alike.
        evidence = self.evidence_maps(attn, classes, (h, w))
        confidence = np.array([_confidence(evidence[k].numpy(), labels == k + 1) for k in range(len(classes))],
                              dtype=np.float32)
        return MaskResult(labels=labels, soft=final_soft, confidence=confidence)

    def class_weights(self, attn: SampleAttention, classes: list[ClassSpec], hw: tuple[int, int]) -> torch.Tensor:
        """Each class's cross-attention times its self-attention-propagated self, normalised: (K, H, W)."""
        side = self._seed_side(attn)
        maps = []
        for spec in classes:
            ca = class_cross_map(attn, spec, side, self.cross_sides)
            prop = minmax(propagate(attn.self_attn[side], ca).reshape(side, side))
            maps.append(minmax(resize(ca * prop, hw)))
        return torch.stack(maps)

    def evidence_maps(self, attn: SampleAttention, classes: list[ClassSpec], hw: tuple[int, int]) -> torch.Tensor:
        """Each class's normalised cross-attention at the seed side (step 1 before squaring), upsampled: (K, H, W)."""
        side = self._seed_side(attn)
        maps = [minmax(resize(class_cross_map(attn, spec, side, self.cross_sides), hw)) for spec in classes]
        return torch.stack(maps) if maps else torch.zeros(0, *hw)


def _confidence(soft: np.ndarray, mask: np.ndarray) -> float:
    """High when the map is strong inside the mask and weak outside it; 0 for an empty mask.

    With the class's min-max normalised cross-attention as `soft`, a token that attends everywhere
    alike scores about 0 whatever mask the expansion produced."""
    if not mask.any():
        return 0.0
    inside = float(soft[mask].mean())
    outside = float(soft[~mask].mean()) if (~mask).any() else 0.0
    return float(np.clip(inside - outside, 0.0, 1.0))
