"""OVDiff on the shapes world: banks from generated support sets, scored on *rendered* scenes.

    maskmill toyworld bench-ovdiff [--model shapes-sd] [--n-support 32] [--n-test 64] [--k-parts 32]
                                   [--refine {pamr,none}] [--split {test,tune}] [--support-draws 6]
                                   [--threads 2]

1. Per class (circle, square, triangle, star): generate n_support images from "a {colour} {class}"
   with the micro model, masks from SeeDiff (fg = the class mask, bg = label 0 with a low class
   score), SD query features, prototypes (class mean, instances, k-means parts; fg and bg).
2. Render n_test scenes (`render.sample_scene` + `render`): exact ground truth, label = run class
   id of each object's shape (1 + index in SHAPES), 0 background. The generator never saw them.
3. Segment them with the merged bank and print mIoU (IoU per class incl. background, accumulated
   over the whole test set, then averaged) for the full method and the ablations: without
   background prototypes, without parts, without instance prototypes. Every row is refined as
   `maskmill segment` refines by default (PAMR), and the unrefined full method is reported too.
   Steps 1 and 3 repeat for `--support-draws` support sets (seeds 0, 1, ...) and every mIoU is their
   mean: one draw moves the full method by several points on this world.
   Plus bank build time per class, segmentation time per image, and the time `support_from_run`
   saves: the same support sets written as a dataset run and read back from its shards.
"""
from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..prototypes.bank import PrototypeBank, make_fingerprint, merge_banks
from ..prototypes.features import FeatureExtractor, SDQueryFeatures
from ..prototypes.segment import DEFAULT_REFINER, make_refiner, segment_images
from ..prototypes.support import SupportSet, bank_from_support, generate_support, support_from_run
from .render import COLOURS, IMAGE_SIZE, SHAPES, render, sample_scene

TARGET_FULL = 0.80
TEST_SEED = 20261123
# Rendered scenes per split: "test" for every reported figure, "tune" for choosing feature
# settings without looking at the test scenes.
SCENE_SEEDS = {"test": TEST_SEED, "tune": 11}
CLASS_NAMES = ["background", *SHAPES]


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
    max_tries_factor: float | None = None
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

    def resolved(self) -> "BenchSettings":
        from ..prototypes.support import support_defaults

        d = support_defaults("shapes-sd")
        out = BenchSettings(**vars(self))
        for k in ("steps", "guidance", "extractor", "extractor_params", "min_confidence", "min_area", "max_area",
                  "max_tries_factor"):
            if getattr(out, k) is None:
                setattr(out, k, d[k])
        return out


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


def prompt_colour(prompt: str) -> str | None:
    """The colour word of a support prompt ("a red circle" -> "red"), None when it names none."""
    return next((w for w in prompt.split() if w in COLOURS), None)


def colour_vs_shape_similarity(bank: PrototypeBank, supports: list[SupportSet]) -> dict[str, float]:
    """Mean cosine between fg instance prototypes (one per support image), grouped by whether the two
    images show the same shape and the same colour.

    Why: in this world colour is spread evenly over the classes, so features that a pixel's colour
    dominates cannot tell a red circle from a red square; per-image and part prototypes then carry
    one colour each and match other classes of that colour. This says how much the features care.
    """
    colour_of = {k: prompt_colour(p) for sup in supports for k, p in zip(sup.keys, sup.prompts)}
    rows = [(i, m.class_name, colour_of.get(m.support_keys[0])) for i, m in enumerate(bank.meta)
            if m.side == "fg" and m.kind == "instance"]
    rows = [r for r in rows if r[2] is not None]
    if len(rows) < 2:
        return {}
    idx = torch.tensor([r[0] for r in rows])
    sims = bank.vectors[idx] @ bank.vectors[idx].T
    shape = np.array([r[1] for r in rows])
    colour = np.array([r[2] for r in rows])
    same_shape = torch.from_numpy(shape[:, None] == shape[None, :])
    same_colour = torch.from_numpy(colour[:, None] == colour[None, :])
    pairs = torch.triu(torch.ones_like(same_shape), diagonal=1)
    out = {}
    for ss, sc, name in [(True, True, "same shape, same colour"), (True, False, "same shape, other colour"),
                         (False, True, "other shape, same colour"), (False, False, "other shape, other colour")]:
        sel = pairs & (same_shape == ss) & (same_colour == sc)
        if sel.any():
            out[name] = float(sims[sel].mean())
    return out


def recovered_support(sup: SupportSet) -> SupportSet:
    """Diagnostic: the same generated images with masks recovered from their colours instead of the
    extractor's (fg = pixels of the prompt's colour, bg = unsaturated background)."""
    from .recover import recover_masks

    keep, fgs, bgs = [], [], []
    for i, prompt in enumerate(sup.prompts):
        colour = prompt_colour(prompt)
        if colour is None:
            continue
        labels, _ = recover_masks(sup.images[i], [colour])
        if (labels == 1).sum() == 0:
            continue
        keep.append(i)
        fgs.append(labels == 1)
        bgs.append(labels == 0)
    if not keep:
        raise ValueError(f"no colour-recoverable object in the support images of {sup.class_name!r}")
    return SupportSet(sup.class_name, sup.images[keep], np.stack(fgs), np.stack(bgs), [sup.keys[i] for i in keep],
                      [sup.prompts[i] for i in keep], [sup.seeds[i] for i in keep], source="recovered")


def rendered_support(class_name: str, n: int, seed: int = 0) -> SupportSet:
    """Diagnostic: n rendered one-object scenes of the class with exact masks (no generation at all)."""
    from dataclasses import replace

    from .render import Scene

    rng = np.random.default_rng([seed, SHAPES.index(class_name), 7])
    images, fgs, bgs = [], [], []
    for _ in range(n):
        base = sample_scene(rng, n_objects=1)
        scene = Scene(objects=[replace(base.objects[0], shape=class_name)], background_value=base.background_value,
                      background_period=base.background_period, background_offset=base.background_offset,
                      size=base.size)
        image, inst = render(scene)
        images.append(image)
        fgs.append(inst == 1)
        bgs.append(inst == 0)
    return SupportSet(class_name, np.stack(images), np.stack(fgs), np.stack(bgs),
                      [f"rendered-{class_name}-{i}" for i in range(n)], source="rendered")


def colour_coded_control(features: FeatureExtractor, s: "BenchSettings") -> dict:
    """Control: the same bank building and segmentation when class identity is visible locally, i.e.
    every shape is drawn in its own colour (circle red, square yellow, ...) in rendered support
    sets (exact masks) and rendered test scenes. What the pixel-prototype machinery reaches at this
    feature resolution when the features carry the class."""
    from dataclasses import replace

    from .render import Scene

    colours = list(COLOURS)

    def recoloured(scene, shape=None):
        objs = [replace(o, shape=shape or o.shape) for o in scene.objects]
        objs = [replace(o, colour=colours[SHAPES.index(o.shape)]) for o in objs]
        return Scene(objects=objs, background_value=scene.background_value,
                     background_period=scene.background_period, background_offset=scene.background_offset,
                     size=scene.size)

    banks = []
    for c in SHAPES:
        rng = np.random.default_rng([s.seed, SHAPES.index(c), 11])
        rendered = [render(recoloured(sample_scene(rng, n_objects=1), c)) for _ in range(s.n_support)]
        sup = SupportSet(c, np.stack([im for im, _ in rendered]), np.stack([i == 1 for _, i in rendered]),
                         np.stack([i == 0 for _, i in rendered]), [f"control-{c}-{i}" for i in range(len(rendered))])
        banks.append(bank_from_support(sup, features, k_parts=s.k_parts, seed=s.seed,
                                       fg_min_fraction=s.fg_min_fraction, bg_min_fraction=s.bg_min_fraction))
    images, labels = rendered_test_set(s.n_test, TEST_SEED + 1, transform=recoloured)
    table, _ = evaluate_bank(features, merge_banks(banks), images, labels, s)
    return table


def support_mask_iou(sup: SupportSet) -> dict:
    """How good the extractor's support masks are: IoU of fg with the colour-recovered object mask, and
    the fraction of bg pixels that are really background (mean over images)."""
    from .recover import recover_masks

    ious, bg_ok = [], []
    for i, prompt in enumerate(sup.prompts):
        colour = prompt_colour(prompt)
        if colour is None:
            continue
        gt = recover_masks(sup.images[i], [colour])[0] == 1
        fg = sup.fg[i]
        ious.append(float((fg & gt).sum() / max(1, (fg | gt).sum())))
        if sup.bg[i].any():
            bg_ok.append(float((sup.bg[i] & ~gt).sum() / sup.bg[i].sum()))
    return {"fg_iou": float(np.mean(ious)) if ious else float("nan"),
            "bg_precision": float(np.mean(bg_ok)) if bg_ok else float("nan")}


def write_support_run(supports: list[SupportSet], root: Path) -> float:
    """The support sets as a dataset run (what a `generate` run of these prompts leaves): one shard per
    class, masks = run class id on fg, 0 on bg, 255 elsewhere. Returns seconds spent writing."""
    from ..shards import RunLayout, SampleRecord, build_meta, key_digits, sample_key, write_shard

    t0 = time.perf_counter()
    layout = RunLayout(root).create()
    layout.write_classes(list(SHAPES))
    index = 0
    for shard_id, sup in enumerate(supports):
        cid = SHAPES.index(sup.class_name) + 1
        digits = key_digits(max(1, len(sup)))
        records = []
        for i in range(len(sup)):
            mask = np.full(sup.fg[i].shape, 255, np.uint8)
            mask[sup.bg[i]] = 0
            mask[sup.fg[i]] = cid
            meta = build_meta(prompt=sup.prompts[i], seed=sup.seeds[i], classes=[sup.class_name], class_ids=[cid],
                              model="bench", extractor="seediff", extractor_params={})
            records.append(SampleRecord(index=index, key=sample_key(shard_id, i, digits), status="accepted",
                                        image=sup.images[i], mask=mask, meta=meta))
            index += 1
        write_shard(layout.root, shard_id, records)
    return time.perf_counter() - t0


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


def build_draw(pipe, features: FeatureExtractor, s: BenchSettings, seed: int, fp: dict, log=print):
    """One support draw: per class, generate the support set with this seed and build its bank.
    Returns (support sets, merged bank, per-class build figures)."""
    from ..extractors import get_extractor

    supports, banks, per_class = [], [], {}
    for c in SHAPES:
        common = dict(prompts="shapes", seed=seed, steps=s.steps, guidance=s.guidance,
                      extractor=get_extractor(s.extractor, **(s.extractor_params or {})),
                      bg_soft_threshold=s.bg_soft_threshold)
        filter_relaxed = False
        try:
            sup = generate_support(pipe, c, s.n_support, min_confidence=s.min_confidence, min_area=s.min_area,
                                   max_area=s.max_area, max_tries_factor=s.max_tries_factor, **common)
        except ValueError as e:  # no image passed the mask filter: keep the class, say so in the report
            log(f"  {c}: {e}; retrying without the confidence/area filter")
            filter_relaxed = True
            sup = generate_support(pipe, c, s.n_support, **common)
        t0 = time.perf_counter()
        bank = bank_from_support(sup, features, k_parts=s.k_parts, seed=seed, fg_min_fraction=s.fg_min_fraction,
                                 bg_min_fraction=s.bg_min_fraction, fingerprint=fp)
        bank_s = time.perf_counter() - t0
        counts = bank.counts()[c]
        per_class[c] = {"support_images": len(sup), "generated": sup.generated, "dropped": sup.dropped,
                        "filter_relaxed": filter_relaxed,
                        "generate_seconds": sup.seconds, "bank_seconds": bank_s,
                        "build_seconds": sup.seconds + bank_s, "fg_prototypes": counts["fg"],
                        "bg_prototypes": counts["bg"], "fg_fraction": float(sup.fg.mean()),
                        "bg_fraction": float(sup.bg.mean())}
        log(f"  {c} (draw {seed}): {len(sup)} support images kept of {sup.generated} (dropped: {sup.dropped}), "
            f"generated in {sup.seconds:.1f} s, bank in {bank_s:.1f} s")
        supports.append(sup)
        banks.append(bank)
    return supports, merge_banks(banks), per_class


def support_reuse(supports: list[SupportSet], per_class: dict, n_support: int) -> dict:
    """The efficient path: the same support sets written as a dataset run and read back from its shards."""
    with tempfile.TemporaryDirectory(prefix="bench-ovdiff-run-") as tmp:
        write_s = write_support_run(supports, Path(tmp))
        read = {}
        same = True
        for sup in supports:
            t0 = time.perf_counter()
            again = support_from_run(tmp, sup.class_name, n_support)
            read[sup.class_name] = time.perf_counter() - t0
            same &= bool(np.array_equal(again.images, sup.images) and np.array_equal(again.fg, sup.fg)
                         and np.array_equal(again.bg, sup.bg))
    gen_total = sum(p["generate_seconds"] for p in per_class.values())
    read_total = sum(read.values())
    return {"generate_seconds": gen_total, "read_seconds": read_total, "saved_seconds": gen_total - read_total,
            "speedup": gen_total / max(read_total, 1e-9), "write_seconds_not_counted": write_s,
            "identical_support": same, "read_per_class": read}


VARIANTS = {"full": {}, "no background prototypes": {"use_background": False},
            "no parts": {"use_parts": False}, "no instance prototypes": {"use_instances": False}}


def run(pipe, settings: BenchSettings | None = None, model_id: str = "shapes-sd", log=print) -> dict:
    """Everything `bench-ovdiff` prints, as a dict.

    Every mIoU is the mean over `support_draws` support sets (seeds seed, seed + 1, ...): on this
    world one draw moves the full method's mIoU by several points, more than the ablations differ.
    Build times and the support-reuse timing are the first draw's.
    """
    s = (settings or BenchSettings()).resolved()
    if s.split not in SCENE_SEEDS:
        raise ValueError(f"unknown split {s.split!r}; choose one of: {', '.join(SCENE_SEEDS)}")
    if s.support_draws < 1:
        raise ValueError(f"support_draws must be at least 1, got {s.support_draws}")
    make_refiner(s.refine)  # an unknown name fails here, before any generation
    features = SDQueryFeatures(pipe, layers=s.layers, timestep=s.timestep, size=s.feature_size, model_id=model_id)
    fp = make_fingerprint(features.fingerprint(), {"bench": "ovdiff", **vars(s)})
    images, labels = rendered_test_set(s.n_test, SCENE_SEEDS[s.split])
    cached = CachedFeatures(features)
    diag_names = {"recovered": "diagnostic: generated support, masks recovered from colours",
                  "rendered": "diagnostic: rendered support, exact masks"}
    tables: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    for draw in range(s.support_draws):
        seed = s.seed + draw
        supports, bank, per_class_draw = build_draw(pipe, features, s, seed, fp, log)
        if draw == 0:
            per_class, first_supports, first_bank = per_class_draw, supports, bank
            reuse = support_reuse(supports, per_class, s.n_support)
        rows = {name: (bank, kw) for name, kw in VARIANTS.items()}
        if s.diagnostics:
            sets = {"recovered": [recovered_support(x) for x in supports],
                    "rendered": [rendered_support(c, s.n_support, seed) for c in SHAPES]}
            for key, support_sets in sets.items():
                rows[diag_names[key]] = (merge_banks([bank_from_support(
                    x, features, k_parts=s.k_parts, seed=seed, fg_min_fraction=s.fg_min_fraction,
                    bg_min_fraction=s.bg_min_fraction, fingerprint=fp) for x in support_sets]), {})
        if s.refine != "none":
            rows["full, no refinement"] = (bank, {"refine": None})
        for name, (b, kw) in rows.items():
            table, secs = evaluate_bank(cached, b, images, labels, s, **kw)
            tables.setdefault(name, []).append(table)
            if draw == 0:
                seconds[name] = secs
        log(f"  draw {seed}: " + ", ".join(f"{n} {tables[n][-1]['miou']:.3f}" for n in VARIANTS))
    table = {name: mean_table(tables[name]) for name in VARIANTS}
    extra = {name: mean_table(ts) for name, ts in tables.items() if name not in VARIANTS}
    if s.diagnostics:
        name = "control: classes coded by colour (rendered support + test, exact masks)"
        extra[name] = colour_coded_control(features, s)
        log(f"  {name}: mIoU {extra[name]['miou']:.3f}")
    full = table["full"]["miou"]
    checks = {"full >= 0.80": full >= TARGET_FULL}
    checks.update({f"{k} <= full": v["miou"] <= full + 1e-9 for k, v in table.items() if k != "full"})
    return {
        "settings": vars(s), "classes": CLASS_NAMES, "table": table, "extra": extra, "checks": checks,
        "per_class_build": per_class, "support_reuse": reuse,
        "segment_seconds_per_image": seconds["full"] / len(images),  # features + scoring, first pass
        "score_seconds_per_image": {k: v / len(images) for k, v in seconds.items() if k != "full"},
        "support_mask_quality": {sup.class_name: support_mask_iou(sup) for sup in first_supports},
        "instance_similarity": colour_vs_shape_similarity(first_bank, first_supports),
        "bank_prototypes": len(first_bank), "feature_grid": list(cached(images[:1]).shape[-2:]),
        "image_size": IMAGE_SIZE,
    }


def format_report(r: dict) -> str:
    s = r["settings"]
    lines = [f"OVDiff on the shapes world: banks from {s['n_support']} generated support images per class "
             f"(\"a {{colour}} {{class}}\", {s['extractor']} {s['extractor_params']} masks, K = {s['k_parts']} parts, t = {s['timestep']}), "
             f"{r['bank_prototypes']} prototypes; {s['n_test']} rendered {s.get('split', 'test').upper()} scenes (exact truth); "
             f"features {r['feature_grid'][0]}x{r['feature_grid'][1]} for {r['image_size']} px images; "
             f"scores refined with {s.get('refine', 'none')} in every row unless it says otherwise; "
             f"mean over {s.get('support_draws', 1)} support draws (seeds {s['seed']}..{s['seed'] + s.get('support_draws', 1) - 1})",
             "| variant | mIoU (± std over draws) | per draw | " + " | ".join(r["classes"]) + " | pixel acc |",
             "|---" * (len(r["classes"]) + 4) + "|"]
    for name, t in list(r["table"].items()) + list(r["extra"].items()):
        cells = " | ".join(f"{t['per_class'][c]:.3f}" for c in r["classes"])
        draws = " ".join(f"{m:.3f}" for m in t.get("miou_per_draw", []))
        spread = f" ± {t['miou_std']:.3f}" if len(t.get("miou_per_draw", [])) > 1 else ""
        lines.append(f"| {name} | {t['miou']:.3f}{spread} | {draws} | {cells} | {t['pixel_acc']:.3f} |")
    lines.append("checks: " + "; ".join(f"{k}: {'ok' if v else 'MISSED'}" for k, v in r["checks"].items()))
    if r.get("support_mask_quality"):
        lines.append("support masks vs colour-recovered truth: " + "; ".join(
            f"{c} fg IoU {q['fg_iou']:.2f}, bg precision {q['bg_precision']:.2f}"
            for c, q in r["support_mask_quality"].items()))
    if r.get("instance_similarity"):
        lines.append("mean cosine of fg instance prototypes (what the features care about): " + "; ".join(
            f"{k} {v:.2f}" for k, v in r["instance_similarity"].items()))
    lines += ["", "bank build per class, first draw (generate support + features + prototypes):",
              "| class | support images kept / generated | generate s | features+prototypes s | total s | "
              "fg / bg prototypes |",
              "|---|---|---|---|---|---|"]
    for c, p in r["per_class_build"].items():
        relaxed = " (filter relaxed)" if p.get("filter_relaxed") else ""
        lines.append(f"| {c} | {p['support_images']} / {p['generated']}{relaxed} | {p['generate_seconds']:.2f} | {p['bank_seconds']:.2f} | "
                     f"{p['build_seconds']:.2f} | {p['fg_prototypes']} / {p['bg_prototypes']} |")
    lines.append(f"segmentation: {r['segment_seconds_per_image'] * 1000:.1f} ms/image (features + scores + "
                 f"upsampling + argmax); scoring alone with cached features: "
                 + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in r["score_seconds_per_image"].items()))
    u = r["support_reuse"]
    lines.append(f"support_from_run: reading the 4 support sets from a run's shards took {u['read_seconds']:.2f} s "
                 f"vs {u['generate_seconds']:.2f} s generating them: {u['saved_seconds']:.2f} s saved "
                 f"(x{u['speedup']:.0f}); identical support sets: {u['identical_support']}")
    return "\n".join(lines)


def checkpoint_note(model: str) -> str:
    """A warning when the toy model folder holds an intermediate training checkpoint (training writes
    one every 1000 steps into the same folder; `training_summary.json` appears when it is final)."""
    import json

    from ..models import resolve_model

    src = resolve_model(model)
    if not isinstance(src, Path) or not (src / "training_log.json").exists():
        return ""
    try:
        tag = json.loads((src / "training_log.json").read_text()).get("tag", "")
    except (OSError, ValueError):
        return ""
    if tag != "final" or not (src / "training_summary.json").exists():
        return f"note: {src} holds an intermediate training checkpoint ({tag or 'unknown'}), not the final model"
    return ""


def main_args(a) -> int:
    """`maskmill toyworld bench-ovdiff` body (cli.py)."""
    import json

    from ..models import load_pipeline

    if getattr(a, "threads", 0):
        torch.set_num_threads(int(a.threads))  # OpenMP spin-waits make 2 threads far slower on a shared 2-core box
    settings = BenchSettings(n_support=a.n_support, n_test=a.n_test, k_parts=a.k_parts,
                             timestep=getattr(a, "timestep", 200), feature_size=getattr(a, "feature_size", None),
                             layers=a.layers.split(",") if getattr(a, "layers", None) else None,
                             refine=getattr(a, "refine", DEFAULT_REFINER),
                             diagnostics=not getattr(a, "no_diagnostics", False),
                             split=getattr(a, "split", "test"),
                             support_draws=getattr(a, "support_draws", BenchSettings.support_draws))
    pipe = load_pipeline(a.model)
    note = checkpoint_note(a.model)
    if note:
        print(note)
    report = run(pipe, settings, model_id=a.model)
    report["model_note"] = note
    print(format_report(report))
    if getattr(a, "json", None):
        Path(a.json).write_text(json.dumps(report, indent=1, default=str))
    return 0 if all(report["checks"].values()) else 1
