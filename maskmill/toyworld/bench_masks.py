"""Score every mask extractor on the same generated shapes-world images, side by side.

    maskmill toyworld bench-masks [--model shapes-sd] [--n 64] [--methods cross,propagated,...]
    maskmill toyworld bench-masks --variants benchmarks/mask_sweeps.yaml --split tune   # choose settings

Ground truth is recovered from each generated image's own colours (`recover.py`); images are
generated from the evaluation captions (held-out multi-object captions, fresh seeds for single
objects). mIoU per image = mean IoU over background and each named object; pixels the
extractor marks 255 count as wrong, pixels of colours the caption does not name are not scored.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..capture import CaptureConfig
from ..extractors import extractor_names, get_extractor
from ..extractors.base import IGNORE
from ..generate import latent_hw
from .evaluate import class_specs, eval_items, generate_items
from .recover import recover_masks

DEFAULT_METHODS = ["cross", "propagated", "cross_x_propagated", "seediff", "diffseg", "diffcut"]


def image_scores(pred: np.ndarray, gt: np.ndarray, n_objects: int) -> tuple[float, float]:
    """(mIoU over background + objects, pixel accuracy) on pixels whose truth is known."""
    valid = gt != IGNORE
    ious = []
    for k in range(n_objects + 1):
        p, g = (pred == k) & valid, (gt == k) & valid
        union = (p | g).sum()
        if union:
            ious.append((p & g).sum() / union)
    return float(np.mean(ious)), float((pred[valid] == gt[valid]).mean())


def shapes_config_params() -> dict[str, dict]:
    """The extractor parameters the shapes-world run uses (configs/shapes.yaml), so the table measures them."""
    from ..config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / "shapes.yaml"
    if not path.exists():
        return {}
    ex = load_config(path, check_files=False).extractor
    return {ex.name: dict(ex.params)}


def run(pipe, n: int = 64, methods: list[str] | None = None, params: dict[str, dict] | None = None,
        batch: int = 16, split: str = "eval") -> dict[str, dict]:
    """{method: {"miou_single", "miou_multi", "pixel_acc", "seconds_per_image"}} on one image set."""
    methods = [m for m in (methods or DEFAULT_METHODS) if m in extractor_names()]
    params = shapes_config_params() if params is None else params
    return run_variants(pipe, n, {m: (m, params.get(m, {})) for m in methods}, batch, split)


def load_variants(path: Path) -> dict[str, tuple[str, dict]]:
    """{label: (extractor, params)} from a YAML file of {label: {extractor: NAME, params: {...}}}.

    Every variant is built once here, so a wrong name or parameter is refused before generation.
    """
    import yaml

    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a mapping of variant labels to {{extractor, params}}")
    variants = {}
    for label, v in raw.items():
        if not isinstance(v, dict) or set(v) - {"extractor", "params"} or "extractor" not in v:
            raise ValueError(f"{path}: variant {label!r} must have `extractor` and optional `params`, got {v!r}")
        name, params = v["extractor"], v.get("params") or {}
        if name not in extractor_names():
            raise ValueError(f"{path}: variant {label!r}: unknown extractor {name!r}; "
                             f"available: {', '.join(extractor_names())}")
        try:
            get_extractor(name, **params)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: variant {label!r}: bad params for {name}: {e}") from e
        variants[str(label)] = (name, dict(params))
    return variants


def run_variants(pipe, n: int, variants: dict[str, tuple[str, dict]], batch: int = 16,
                 split: str = "eval") -> dict[str, dict]:
    """Like `run`, for named (extractor, parameters) variants, e.g. a threshold sweep on one image set.

    split "tune" scores on trained captions with other seeds: choose settings there, report "eval".
    """
    unknown = {name for name, _ in variants.values()} - set(extractor_names())
    if unknown:
        raise ValueError(f"unknown extractors {sorted(unknown)}; available: {', '.join(extractor_names())}")
    extractors = {label: get_extractor(name, **p) for label, (name, p) in variants.items()}
    # Capture everything each extractor reads (plus DiffCut's UNet features), once per window of
    # recorded steps: capture never changes the images, so every window scores the same images.
    wanted = {label: e.capture_config(pipe.unet, latent_hw(pipe, 32, 32)) for label, e in extractors.items()
              if callable(getattr(e, "capture_config", None))}
    def window(c: CaptureConfig):
        return c.steps, tuple(sorted((c.side_steps or {}).items()))

    windows = {window(w) for w in wanted.values()}
    if len(wanted) < len(extractors):  # extractors without a capture config read everything, every step
        windows.add(((0.0, 1.0), ()))
    captures = {w: CaptureConfig(steps=w[0], side_steps=dict(w[1]) or None) for w in sorted(windows)}
    for w in wanted.values():
        captures[window(w)].feature_modules.update(w.feature_modules)
    items = eval_items(n, split)
    attns_by_window = {}
    for key, capture in captures.items():  # `window` is the function that names a capture's key
        images, attns_by_window[key] = generate_items(pipe, items, capture, batch)
    truths = [recover_masks(img, list(it.colours))[0] for img, it in zip(images, items)]
    results = {}
    for m, ex in extractors.items():
        rows = {"single": [], "multi": []}
        accs, seconds = [], 0.0
        attns = attns_by_window[window(wanted[m]) if m in wanted else ((0.0, 1.0), ())]
        for img, it, attn, gt in zip(images, items, attns, truths):
            specs = class_specs(pipe.tokenizer, it)
            t0 = time.perf_counter()
            res = ex.extract(attn, specs, img)
            seconds += time.perf_counter() - t0
            miou, acc = image_scores(res.labels, gt, len(specs))
            rows[it.kind].append(miou)
            accs.append(acc)
        results[m] = {"miou_single": float(np.mean(rows["single"])) if rows["single"] else float("nan"),
                      "miou_multi": float(np.mean(rows["multi"])) if rows["multi"] else float("nan"),
                      "pixel_acc": float(np.mean(accs)), "seconds_per_image": seconds / len(items)}
        if callable(getattr(ex, "segment", None)):  # class-agnostic extractors: quality of the segments alone
            results[m]["best_match_iou"] = float(np.mean([
                best_match_iou(ex.segment(attn, img.shape[:2]), gt, len(it.colours))
                for img, it, attn, gt in zip(images, items, attns, truths)]))
    return results


def best_match_iou(segments: np.ndarray, gt: np.ndarray, n_objects: int) -> float:
    """Mean over the true objects of the best IoU any single segment reaches with it."""
    scores = []
    for k in range(1, n_objects + 1):
        obj = gt == k
        if not obj.any():
            continue
        best = 0.0
        for s in np.unique(segments[obj]):
            seg = segments == s
            best = max(best, float((seg & obj).sum() / (seg | obj).sum()))
        scores.append(best)
    return float(np.mean(scores)) if scores else float("nan")


def format_table(results: dict[str, dict], n: int, split: str = "eval") -> str:
    captions = "held-out multi-object captions" if split == "eval" else "TUNE split: trained captions, other seeds"
    lines = [f"mask quality on {n} generated shapes-world images ({captions}; truth recovered from the image's "
             f"colours)",
             "| method | mIoU single | mIoU multi | pixel acc | s / image | segments best-match IoU |",
             "|---|---|---|---|---|---|"]
    for m, r in results.items():
        agnostic = f"{r['best_match_iou']:.3f}" if "best_match_iou" in r else "-"
        lines.append(f"| {m} | {r['miou_single']:.3f} | {r['miou_multi']:.3f} | {r['pixel_acc']:.3f} | "
                     f"{r['seconds_per_image']:.4f} | {agnostic} |")
    return "\n".join(lines)
