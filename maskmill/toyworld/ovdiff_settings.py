"""Settings of the OVDiff shapes-world benchmark (`bench_ovdiff.run`): support, features, prototypes, scoring."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import FilterConfig
from ..models import EMBEDDED_CLIP_TEMPLATE
from ..prototypes.segment import DEFAULT_REFINER


@dataclass
class BenchSettings:
    n_support: int = 32
    n_test: int = 64
    k_parts: int = 32
    seed: int = 0
    # Sampler, extractor (+ parameters) and mask filter: None = the shapes-world run's own
    # (configs/shapes.yaml via `support_defaults("shapes-sd")`), so support images are made like
    # a dataset run's samples.
    steps: int | None = None
    guidance: float | None = None
    extractor: str | None = None
    extractor_params: dict | None = None
    bg_soft_threshold: float = 0.2
    min_confidence: float | None = None
    min_area: float | None = None
    max_area: float | None = None
    max_retries_factor: float | None = None
    # OVDiff features and prototypes
    timestep: int = 200
    layers: list[str] | None = None  # None: every decoder cross-attention (OVDiff)
    feature_size: int | None = None  # None: the image's own size (32 px -> 16x16 features on the micro SD)
    fg_min_fraction: float = 0.5
    bg_min_fraction: float = 0.5
    confusing_bg_threshold: float | None = 0.85
    refine: str = DEFAULT_REFINER  # score refinement of every variant (`segment.REFINERS`), as `maskmill segment`
    diagnostics: bool = True  # also banks from oracle support masks (`recovered_support`, `rendered_support`)
    split: str = "test"  # which rendered scenes are segmented (SCENE_SEEDS)
    support_draws: int = 6  # support sets (seeds seed, seed + 1, ...) every mIoU is averaged over
    # OVDiff's CLIP class pre-filter: with a CLIP (name, folder or file), the full method is also
    # reported with it; the template is what the CLIP was trained on ("a circle" for the micro CLIP)
    prefilter_clip: str | None = None
    prefilter_template: str = EMBEDDED_CLIP_TEMPLATE

    def resolved(self) -> "BenchSettings":
        from ..prototypes.support import support_defaults

        d = support_defaults("shapes-sd")
        defaults = {"steps": d.steps, "guidance": d.guidance, "extractor": d.extractor.name,
                    "extractor_params": dict(d.extractor.params), **d.filter.model_dump(exclude={"clip"})}
        out = BenchSettings(**vars(self))
        for k, v in defaults.items():
            if getattr(out, k) is None:
                setattr(out, k, v)
        return out

    def support_filter(self) -> FilterConfig:
        return FilterConfig(min_confidence=self.min_confidence, min_area=self.min_area, max_area=self.max_area,
                            max_retries_factor=self.max_retries_factor)
