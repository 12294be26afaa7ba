"""The micro CLIP measured: zero-shot accuracy, and the consistency check against wrongly drawn objects.

    maskmill toyworld eval-clip [--clip shapes-clip] [--n 128] [--split eval|tune] [--margins -0.1,0,0.05]

Zero-shot accuracy
- rendered object regions (scenes never used in training; held-out multi-object captions): the
  best of the 16 "a {colour} {shape}" prompts gives colour and shape; the best of "a {shape}" and
  the background prompt (what the check reads) gives shape;
- rendered background regions: how often the background prompt wins;
- generated images (`evaluate.eval_items`): each object's colour-recovered region, truth = the
  shape classifier's verdict on that region (`recover.classify_shape`), not the prompted shape.

The check against wrongly drawn objects
Truth: an object is wrongly drawn when `classify_shape` of its colour-recovered region is not the
prompted shape (a missing object counts as wrong). The check sees what a run sees: the image and
the SeeDiff masks of the shapes config, prompts "a {shape}" for the run's four shapes and the
background prompt. Precision and recall over objects, and the share of samples it rejects, at each
min_margin; pick min_margin on `--split tune`, report on `--split eval`.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..atomic import atomic_save_npz
from ..clipcheck import ClipCheck, region_crop
from .clip_data import BACKGROUND, background_mask, render_pool
from .recover import MIN_REGION_PIXELS, classify_shape, recover_masks
from .render import COLOURS, SHAPES

DEFAULT_MARGINS = tuple(round(-0.2 + 0.025 * i, 3) for i in range(21))  # -0.2 .. 0.3
TARGET_PRECISION, TARGET_RECALL = 0.8, 0.8
CLEAR_IOU = 0.6


def _zero_shot(model, crops: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Index of the best prompt for each crop."""
    if not len(crops):
        return np.zeros(0, dtype=int)
    return (model.encode_images(crops) @ model.encode_texts(prompts).T).argmax(1).numpy()


def rendered_accuracy(model, n_scenes: int = 400, seed: int = 12345) -> dict:
    """Zero-shot accuracy on rendered regions of scenes never used in training (fresh seed; held-out captions)."""
    pool = render_pool(n_scenes, seed=seed, held_out=True)
    rng = np.random.default_rng(seed)
    r = model.resolution
    crops, truth, bg_crops = [], [], []
    for item in pool:
        for i, obj in enumerate(item.scene.objects):
            crops.append(region_crop(item.image, item.labels == i + 1, r))
            truth.append((obj.colour, obj.shape))
        m = background_mask(item.labels, rng)
        if m is not None:
            bg_crops.append(region_crop(item.image, m, r))
    phrases = [(c, s) for c in COLOURS for s in SHAPES]
    best = _zero_shot(model, np.stack(crops), [f"a {c} {s}" for c, s in phrases])
    shape_prompts = [f"a {s}" for s in SHAPES] + [BACKGROUND]
    best_shape = _zero_shot(model, np.stack(crops), shape_prompts)
    best_bg = _zero_shot(model, np.stack(bg_crops), shape_prompts) if bg_crops else np.zeros(0, int)
    return {
        "objects": len(crops),
        "colour": float(np.mean([phrases[b][0] == t[0] for b, t in zip(best, truth)])),
        "shape": float(np.mean([phrases[b][1] == t[1] for b, t in zip(best, truth)])),
        "shape_prompts": float(np.mean([shape_prompts[b] == f"a {t[1]}" for b, t in zip(best_shape, truth)])),
        "background_regions": len(bg_crops),
        "background": float(np.mean(best_bg == len(SHAPES))) if len(bg_crops) else 0.0,
    }


def generated_samples(pipe, n: int, split: str, batch: int = 16, cache: Path | None = None) -> dict:
    """Generate the split's captions with the shapes config's SeeDiff capture: images, masks, truth, timing.

    With `cache` (a folder), the images, masks and seconds are kept in an npz and reused when the
    split, n and SeeDiff parameters are the same: the CLIP can change without generating again.
    """
    from .bench_masks import shapes_config_params
    from .evaluate import eval_items

    items = eval_items(n, split)
    params = shapes_config_params().get("seediff", {})
    path = None if cache is None else Path(cache) / f"generated-{split}-{n}-{_params_key(params)}.npz"
    if path is not None and path.exists():
        saved = np.load(path)
        images, masks, seconds = list(saved["images"]), list(saved["masks"]), float(saved["generate_seconds"])
    else:
        images, masks, seconds = _generate_with_masks(pipe, items, params, batch)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save_npz(path, {"images": np.stack(images), "masks": np.stack(masks), "generate_seconds": seconds})
    truth, drawn, clear = [], [], []
    for image, item in zip(images, items):
        recovered, _ = recover_masks(image, list(item.colours))
        regions = [recovered == k + 1 for k in range(len(item.shapes))]
        fits = [classify_shape(m) for m in regions]
        drawn.append([(m, shape) for m, (shape, _) in zip(regions, fits)])
        truth.append([shape != want for (shape, _), want in zip(fits, item.shapes)])
        clear.append([_clear_truth(m, iou) for m, (_, iou) in zip(regions, fits)])
    return {"items": items, "images": images, "masks": masks, "wrong": truth, "drawn": drawn, "clear": clear,
            "generate_seconds": seconds, "extractor_params": params}


def _clear_truth(region: np.ndarray, iou: float) -> bool:
    """The shape classifier's verdict is clear: the object is missing, or one blob its template fits (IoU >= 0.6)."""
    from skimage.measure import label as connected_components

    if region.sum() < MIN_REGION_PIXELS:
        return True
    return iou >= CLEAR_IOU and connected_components(region, connectivity=2).max() == 1


def _params_key(params: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def _generate_with_masks(pipe, items, params: dict, batch: int) -> tuple[list, list, float]:
    """Images and SeeDiff label maps, a batch at a time (attention is dropped after each batch)."""
    from ..extractors import get_extractor
    from ..generate import latent_hw
    from .evaluate import SETTINGS, class_specs, generate_items

    extractor = get_extractor("seediff", **params)
    capture = extractor.capture_config(pipe.unet, latent_hw(pipe, SETTINGS.height, SETTINGS.width))
    images, masks, seconds = [], [], 0.0
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        t0 = time.perf_counter()
        ims, attns = generate_items(pipe, chunk, capture, batch)
        seconds += time.perf_counter() - t0
        images += ims
        masks += [extractor.extract(at, class_specs(pipe.tokenizer, it), im).labels
                  for im, at, it in zip(ims, attns, chunk)]
    return images, masks, seconds


def generated_accuracy(model, data: dict) -> dict:
    """Zero-shot shape of each drawn object's colour-recovered region against classify_shape's verdict."""
    crops, truth = [], []
    for image, drawn in zip(data["images"], data["drawn"]):
        for region, shape in drawn:
            if region.sum() >= MIN_REGION_PIXELS and shape in SHAPES:
                crops.append(region_crop(image, region, model.resolution))
                truth.append(shape)
    prompts = [f"a {s}" for s in SHAPES] + [BACKGROUND]
    best = _zero_shot(model, np.stack(crops), prompts) if crops else np.zeros(0, int)
    return {"regions": len(crops), "shape": float(np.mean([prompts[b] == f"a {t}" for b, t in zip(best, truth)]))
            if crops else 0.0}


def check_scores(check: ClipCheck, data: dict) -> tuple[list[list[float | None]], float]:
    """The check's margins on every sample (SeeDiff masks, the run's four shapes) and its seconds."""
    t0 = time.perf_counter()
    margins = check.margins(data["images"], data["masks"], [list(it.shapes) for it in data["items"]], list(SHAPES))
    return margins, time.perf_counter() - t0


def catch_rates(margins: list[list[float | None]], wrong: list[list[bool]], min_margin: float) -> dict:
    """Precision / recall of flagging wrongly drawn objects, and the share of samples rejected."""
    tp = fp = fn = 0
    rejected = 0
    for sample_margins, sample_wrong in zip(margins, wrong):
        flags = [m is not None and m < min_margin for m in sample_margins]
        rejected += any(flags)
        for f, w in zip(flags, sample_wrong):
            tp += f and w
            fp += f and not w
            fn += (not f) and w
    return {"min_margin": min_margin, "precision": tp / (tp + fp) if tp + fp else 1.0,
            "recall": tp / (tp + fn) if tp + fn else 1.0, "flagged": tp + fp, "wrong": tp + fn,
            "rejected_share": rejected / max(1, len(margins))}


def _only_clear(margins, wrong, clear):
    keep = [[(m, w) for m, w, c in zip(ms, ws, cs) if c] for ms, ws, cs in zip(margins, wrong, clear)]
    return [[m for m, _ in k] for k in keep], [[w for _, w in k] for k in keep]


def best_margin(sweep: list[dict]) -> dict:
    """The sweep row to choose (on the tune split): the highest recall at precision >= 0.8, fewest
    samples rejected among equals; if no row reaches that precision, the best F1."""
    ok = [s for s in sweep if s["precision"] >= TARGET_PRECISION and s["flagged"]]
    if ok:
        return max(ok, key=lambda s: (s["recall"], -s["rejected_share"]))
    return max(sweep, key=lambda s: 2 * s["precision"] * s["recall"] / max(1e-9, s["precision"] + s["recall"]))


def evaluate_clip(pipe, check: ClipCheck, n: int, split: str, margins: tuple[float, ...] = DEFAULT_MARGINS,
                  cache: Path | None = None) -> dict:
    """Every figure of `maskmill toyworld eval-clip` as a dict."""
    data = generated_samples(pipe, n, split, cache=cache)
    scores, check_seconds = check_scores(check, data)
    objects = sum(len(w) for w in data["wrong"])
    return {
        "split": split, "images": n, "objects": objects,
        "wrongly_drawn": sum(sum(w) for w in data["wrong"]),
        "rendered": rendered_accuracy(check.model),
        "generated": generated_accuracy(check.model, data),
        "sweep": [catch_rates(scores, data["wrong"], m) for m in margins],
        # diagnostic: only objects whose truth is clear (missing, or one blob that fits its template)
        "sweep_clear_truth": [catch_rates(*_only_clear(scores, data["wrong"], data["clear"]), m) for m in margins],
        "check_seconds_per_sample": check_seconds / n,
        "generate_seconds_per_sample": data["generate_seconds"] / n,  # wall seconds: generation + capture
        "extractor_params": data["extractor_params"],
        # per sample: (margin or None, wrongly drawn) of each object, to re-threshold without generating again
        "objects_detail": [list(zip(m, w)) for m, w in zip(scores, data["wrong"])],
    }


def format_clip_report(r: dict) -> str:
    rd, gen = r["rendered"], r["generated"]
    lines = [
        f"zero-shot, rendered object regions ({rd['objects']}): colour {rd['colour']:.3f}, shape {rd['shape']:.3f} "
        f"(16 colour+shape prompts); shape {rd['shape_prompts']:.3f} (4 shape prompts + {BACKGROUND!r})",
        f"zero-shot, rendered background regions ({rd['background_regions']}): background wins {rd['background']:.3f}",
        f"zero-shot, generated object regions ({gen['regions']}, {r['split']} split), shape vs classify_shape: "
        f"{gen['shape']:.3f}",
        f"check on {r['images']} generated images ({r['split']} split): {r['objects']} objects, "
        f"{r['wrongly_drawn']} wrongly drawn",
        f"{'min_margin':>10s} {'precision':>9s} {'recall':>7s} {'flagged':>7s} {'rejected':>8s}",
    ]
    for s in r["sweep"]:
        lines.append(f"{s['min_margin']:10.3f} {s['precision']:9.3f} {s['recall']:7.3f} {s['flagged']:7d} "
                     f"{s['rejected_share']:8.3f}")
    clear = r["sweep_clear_truth"]
    lines.append(f"diagnostic, objects whose truth is clear ({clear[0]['wrong']} wrong): " + ", ".join(
        f"{c['min_margin']:.3f}: P {c['precision']:.2f} R {c['recall']:.2f}" for c in clear[::4]))
    b = best_margin(r["sweep"])
    lines.append(f"best on this split: min_margin {b['min_margin']:.3f} (precision {b['precision']:.3f}, "
                 f"recall {b['recall']:.3f}, rejects {b['rejected_share']:.3f} of samples); choose on --split tune")
    lines.append(f"check {r['check_seconds_per_sample'] * 1000:.1f} ms/sample, generation "
                 f"{r['generate_seconds_per_sample'] * 1000:.1f} ms/sample (with capture)")
    return "\n".join(lines)
