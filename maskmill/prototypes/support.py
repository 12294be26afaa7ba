"""Support sets for OVDiff prototype banks: per class, images with foreground and background masks.

Two ways to get one:

- `generate_support(pipe, "circle", 32)`: generate N images of the class with attention capture
  and let a mask extractor (SeeDiff by default) mark fg = the class mask and bg = confident
  background (label 0 *and* a low class soft score). This is OVDiff's recipe; it costs one
  generation per support image. Images are generated, extracted and filtered by the same loop
  (and rules) as a dataset run's samples (`produce.judged_samples`).
- `support_from_run(run_dir, "circle", 32)`: the efficient path. A dataset run already holds
  generated images with masks; take the first N samples whose mask contains the class:
  fg = mask == class id, bg = mask == 0 (other classes and 255 are neither). No generation.

Masks are kept at image resolution (lossless, independent of the feature extractor);
`bank_from_support` downsamples them to the feature grid by area and thresholds them, runs the
feature extractor and calls `build_class_bank` (build.py does this per class, with the cache).
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ..config import ExtractorConfig, FilterConfig
from ..prompts import Prompt
from .bank import PrototypeBank, build_class_bank, masks_at
from .features import FeatureExtractor

log = logging.getLogger(__name__)


@dataclass
class SupportSet:
    """N support images of one class with their masks at image resolution.

    images: uint8 (N, H, W, 3); fg, bg: bool (N, H, W), disjoint; keys: one id per image, recorded in
    the bank's metadata (which support regions a prototype came from); prompts/seeds: how each
    image was made when known (so a support image can be regenerated); source: "generate" | "run";
    seconds: wall time it took to obtain the set (generation + masks, or reading shards).
    """

    class_name: str
    images: np.ndarray
    fg: np.ndarray
    bg: np.ndarray
    keys: list[str]
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    source: str = ""
    seconds: float = 0.0
    generated: int = 0  # images generated to get this set (generate only)
    dropped: dict = field(default_factory=dict)  # reason -> images left out by the mask filter

    def __post_init__(self) -> None:
        n = len(self.keys)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        for name in ("fg", "bg"):
            m = getattr(self, name)
            if m.dtype != bool or m.shape != self.images.shape[:3]:
                raise ValueError(f"{name} must be bool {self.images.shape[:3]}, got {m.dtype} {m.shape}")
        if len(self.images) != n or len(set(self.keys)) != n:
            raise ValueError(f"need one distinct key per image: {len(self.images)} images, keys {self.keys[:5]}…")
        if (self.fg & self.bg).any():
            raise ValueError("fg and bg masks overlap")

    def __len__(self) -> int:
        return len(self.keys)

    def summary(self) -> dict:
        return {"class": self.class_name, "images": len(self), "source": self.source,
                "fg_fraction": float(self.fg.mean()) if len(self) else 0.0,
                "bg_fraction": float(self.bg.mean()) if len(self) else 0.0,
                "empty_fg": int((~self.fg.reshape(len(self), -1).any(1)).sum()) if len(self) else 0,
                "generated": self.generated, "dropped": dict(self.dropped), "seconds": self.seconds}


# ----------------------------------------------------------------------------------------------
# generated support sets


# OVDiff's support-set recipe: one template, 30 DDIM steps at guidance 8, and background taken
# where the class's attention score is below 0.2. No quality filter: every generated image is used.
OVDIFF_TEMPLATE = "a good picture of a {class}"
OVDIFF_STEPS = 30
OVDIFF_GUIDANCE = 8.0
BG_SOFT_THRESHOLD = 0.2
OVDIFF_FILTER = FilterConfig(min_confidence=0.0, min_area=0.0, max_area=1.0, max_retries_factor=1.0)

SHAPES_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "shapes.yaml"


@dataclass(frozen=True)
class SupportDefaults:
    """How support images are made on a model when the bank config leaves it open."""

    prompts: str
    steps: int
    guidance: float
    extractor: ExtractorConfig
    filter: FilterConfig


def support_defaults(model: str | None) -> SupportDefaults:
    """Prompts, sampler, mask extractor and mask filter for a support set on `model`.

    OVDiff's recipe everywhere except the embedded micro model, which only knows its own captions
    ("a red circle"): there everything comes from the shapes-world run config (configs/shapes.yaml:
    prompt set, steps, guidance, the extractor parameters tuned for the micro model, the
    confidence/area filter and its `max_retries_factor`), so a generated support set is made
    exactly like the samples of a dataset run and `support_from_run` is a drop-in replacement.
    """
    if model == "shapes-sd" and SHAPES_CONFIG.exists():
        from ..config import load_config

        cfg = load_config(SHAPES_CONFIG, check_files=False)
        return SupportDefaults(cfg.prompts, int(cfg.steps), float(cfg.guidance), cfg.extractor.model_copy(),
                               cfg.filter.model_copy())
    return SupportDefaults(OVDIFF_TEMPLATE, OVDIFF_STEPS, OVDIFF_GUIDANCE, ExtractorConfig(name="seediff"),
                           OVDIFF_FILTER.model_copy())


def _prompt_source(prompts):
    """A template string with a {class} slot -> a one-template PromptSet; anything else -> a prompt set."""
    from ..prompts import PromptSet, load_prompt_set, validate_template

    if isinstance(prompts, PromptSet):
        return prompts
    if isinstance(prompts, str) and "{class}" in prompts:
        validate_template(prompts, {}, multi=False, where="support prompt")
        return PromptSet("inline", {}, [prompts], [])
    return load_prompt_set(prompts)


def support_seed(class_name: str, seed: int, index: int) -> int:
    """Seed of support image `index` of a class: depends on (class, seed, index) only, never on n or batching."""
    digest = hashlib.sha256(f"{class_name}\x00{int(seed)}\x00{int(index)}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def support_prompts(class_name: str, n: int, prompts=OVDIFF_TEMPLATE, seed: int = 0):
    """The n prompts (with each class's seed phrase) of a generated support set, deterministic per index."""
    from ..prompts import fill_template

    pset = _prompt_source(prompts)
    out = []
    for i in range(n):
        rng = np.random.default_rng([support_seed(class_name, seed, i), 1])
        template = pset.single[int(rng.integers(len(pset.single)))]
        out.append(fill_template(template, [class_name], rng, pset))
    return out


@dataclass(frozen=True)
class SupportCandidate:
    """Support image `index` of a class before it is generated (a `produce.Candidate`)."""

    index: int
    prompt: Prompt
    seed: int


def generate_support(pipe, class_name: str, n: int, prompts=OVDIFF_TEMPLATE, seed: int = 0,
                     steps: int = OVDIFF_STEPS, guidance: float = OVDIFF_GUIDANCE, extractor="seediff",
                     height: int | None = None, width: int | None = None, batch_size: int = 8,
                     bg_soft_threshold: float = BG_SOFT_THRESHOLD, drop_empty: bool = True,
                     rules: FilterConfig = OVDIFF_FILTER) -> SupportSet:
    """Generate n images of `class_name` and read their fg/bg masks from attention.

    prompts: a template with a {class} slot ("a good picture of a {class}"; "[...]" marks the
        seed phrase, otherwise the class name seeds the mask) or a prompt set name/path/PromptSet
        (its single-class templates are used).
    extractor: a registered extractor name or an `Extractor` (label 0 background, k = class k).
    fg = label 1; bg = label 0 and the class's soft score < bg_soft_threshold (255 is neither).
    rules: the quality filter a dataset run applies (`filter` of configs/*.yaml), through the same
        loop (`produce.judged_samples`), so generated and run-read support sets hold comparable
        masks; up to n * rules.max_retries_factor images are generated to keep n.
    drop_empty: also leave out images whose class mask came out empty (the generator missed the
        class); their "background" would then contain the missed object.
    """
    from ..extractors import get_extractor
    from ..generate import GenerationSettings
    from ..produce import judged_samples

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ex = get_extractor(extractor) if isinstance(extractor, str) else extractor
    side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    settings = GenerationSettings(steps=int(steps), guidance=float(guidance), height=int(height or side),
                                  width=int(width or side))
    tries = max(n, int(np.ceil(n * rules.max_retries_factor)))
    candidates = [SupportCandidate(i, p, support_seed(class_name, seed, i))
                  for i, p in enumerate(support_prompts(class_name, tries, prompts, seed))]
    t0 = time.perf_counter()
    images, fgs, bgs, keys, kept_prompts, kept_seeds = [], [], [], [], [], []
    dropped: dict[str, int] = {}
    generated = 0
    for judged in judged_samples(pipe, ex, candidates, n, settings, rules, batch_size, require_mask=drop_empty):
        generated += 1
        c = judged.candidate
        if not judged.accepted:
            dropped[judged.reason] = dropped.get(judged.reason, 0) + 1
            log.info("support %s #%d (%r): %s, dropped", class_name, c.index, c.prompt.text, judged.reason)
            continue
        labels, soft = judged.result.labels, judged.result.soft[0]
        images.append(judged.image)
        fgs.append(labels == 1)
        bgs.append((labels == 0) & (soft < bg_soft_threshold))
        keys.append(f"gen-{_key_safe(class_name)}-{seed}-{c.index:05d}")
        kept_prompts.append(c.prompt.text)
        kept_seeds.append(c.seed)
    if not images:
        raise ValueError(f"class {class_name!r}: none of {generated} generated support images passed the mask "
                         f"filter (dropped: {dropped})")
    if len(images) < n:
        log.warning("class %r: kept %d of %d support images after %d tries (dropped: %s)", class_name, len(images),
                    n, generated, dropped)
    return SupportSet(class_name, np.stack(images), np.stack(fgs), np.stack(bgs), keys, kept_prompts, kept_seeds,
                      source="generate", seconds=time.perf_counter() - t0, generated=generated, dropped=dropped)


def _key_safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name)


# ----------------------------------------------------------------------------------------------
# support sets from a dataset run (no second generation)


def run_identity(run_dir: str | Path) -> dict:
    """What identifies a run's content for caching: its classes and its completed shards' stats files.

    A shard is immutable once its stats file exists; hashing the (small) stats files catches a
    rewritten shard, and new shards change the list.
    """
    from ..shards import RunLayout

    layout = RunLayout(run_dir)
    h = hashlib.sha256()
    h.update(layout.read_file("classes.json") or b"")
    shards = layout.completed_shards()
    for sid in shards:
        h.update(f"{sid}:".encode())
        h.update(layout.store.read_bytes(layout.stats_path(sid)))
    run = layout.location if layout.remote else layout.root.resolve()
    return {"run": str(run), "shards": len(shards), "content": h.hexdigest()[:16]}


def support_from_run(run_dir: str | Path, class_name: str, n: int, min_pixels: int = 1) -> SupportSet:
    """The first n samples of a run (shard order) whose mask holds `class_name`; fg = that class id,
    bg = 0. Samples of another image size than the first one found are skipped."""
    from ..shards import RunLayout, iter_samples

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    layout = RunLayout(run_dir)  # a folder or a URL
    if not layout.has_classes():
        raise FileNotFoundError(f"{run_dir} is not a dataset run: no classes.json at "
                                f"{layout.location_of(layout.classes_path)}")
    names = layout.read_classes()
    if class_name not in names:
        raise ValueError(f"class {class_name!r} is not in run {run_dir} (its classes: {', '.join(names)})")
    class_id = names.index(class_name) + 1
    t0 = time.perf_counter()
    images, fgs, bgs, keys, prompts, seeds = [], [], [], [], [], []
    skipped_size = 0
    for s in iter_samples(run_dir):
        ids = s.meta.get("class_ids")
        if ids is not None and class_id not in ids:
            continue
        fg = s.mask == class_id
        if int(fg.sum()) < min_pixels:
            continue
        if images and s.image.shape != images[0].shape:
            skipped_size += 1
            continue
        images.append(s.image)
        fgs.append(fg)
        bgs.append(s.mask == 0)
        keys.append(s.key)
        prompts.append(str(s.meta.get("prompt", "")))
        seeds.append(int(s.meta.get("seed", -1)))
        if len(images) == n:
            break
    if not images:
        raise ValueError(f"run {run_dir} has no sample whose mask holds class {class_name!r} (id {class_id})")
    if len(images) < n:
        log.warning("run %s: only %d samples hold %r (asked for %d)", run_dir, len(images), class_name, n)
    if skipped_size:
        log.warning("run %s: skipped %d samples of %r with another image size", run_dir, skipped_size, class_name)
    return SupportSet(class_name, np.stack(images), np.stack(fgs), np.stack(bgs), keys, prompts, seeds,
                      source="run", seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# support set -> bank


def bank_from_support(support: SupportSet, extractor: FeatureExtractor, k_parts: int = 32, seed: int = 0,
                      stuff: bool = False, fg_min_fraction: float = 0.5, bg_min_fraction: float = 0.5,
                      max_kmeans_points: int = 20000, fingerprint: dict | None = None) -> PrototypeBank:
    """Features of the support images -> masks at the feature grid -> `build_class_bank`."""
    features = extractor(support.images)
    hw = tuple(features.shape[-2:])
    fg = masks_at(support.fg, hw, fg_min_fraction)
    bg = masks_at(support.bg, hw, bg_min_fraction) & ~fg
    return build_class_bank(support.class_name, features, fg, bg, list(support.keys), k_parts=k_parts, seed=seed,
                            stuff=stuff, max_kmeans_points=max_kmeans_points, fingerprint=fingerprint)


__all__ = ["BG_SOFT_THRESHOLD", "OVDIFF_GUIDANCE", "OVDIFF_STEPS", "OVDIFF_TEMPLATE", "SupportSet",
           "bank_from_support", "generate_support", "masks_at", "run_identity",
           "support_defaults", "support_from_run", "support_prompts", "support_seed"]
