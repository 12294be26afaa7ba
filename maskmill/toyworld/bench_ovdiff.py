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
   With `--prefilter-clip` (e.g. the micro CLIP, shapes-clip), the full method is also run with
   OVDiff's CLIP class pre-filter (classes of softmax p >= 1/|C| on the whole image are kept), with
   how many of the scene's classes it keeps and how many absent ones it drops.
   Plus bank build time per class, segmentation time per image, and the time `support_from_run`
   saves: the same support sets written as a dataset run and read back from its shards.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..prototypes.bank import merge_banks
from ..prototypes.fingerprint import make_fingerprint
from ..prototypes.features import FeatureExtractor, SDQueryFeatures
from ..prototypes.segment import DEFAULT_REFINER, make_refiner
from ..prototypes.support import bank_from_support, generate_support
from .ovdiff_diagnostics import (
    colour_coded_control,
    colour_vs_shape_similarity,
    recovered_support,
    rendered_support,
    support_mask_iou,
    support_reuse,
)
from .ovdiff_settings import BenchSettings
from .ovdiff_scoring import CLASS_NAMES, SCENE_SEEDS, CachedFeatures, evaluate_bank, mean_table, prefilter_figures, \
    rendered_test_set
from .render import IMAGE_SIZE, SHAPES

TARGET_FULL = 0.80


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
            sup = generate_support(pipe, c, s.n_support, rules=s.support_filter(), **common)
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
    prefilter = _prefilter(s)  # so does a missing CLIP
    features = SDQueryFeatures(pipe, layers=s.layers, timestep=s.timestep, size=s.feature_size, model_id=model_id)
    bank_settings = {k: v for k, v in vars(s).items() if not k.startswith("prefilter")}  # the bank never sees it
    fp = make_fingerprint(features.fingerprint(), {"bench": "ovdiff", **bank_settings})
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
        if prefilter is not None:
            rows[PREFILTER_ROW] = (bank, {"prefilter": prefilter})
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
        "prefilter": None if prefilter is None else {"clip": s.prefilter_clip, "template": s.prefilter_template,
                                                     **prefilter_figures(prefilter, images, labels)},
    }


PREFILTER_ROW = "full, CLIP class pre-filter"


def _prefilter(s: BenchSettings):
    """OVDiff's class pre-filter scored by the given CLIP, or None."""
    if not s.prefilter_clip:
        return None
    from ..models import resolve_clip
    from ..prototypes.clip_features import CLIPPatchFeatures
    from ..prototypes.segment import clip_prefilter

    return clip_prefilter(CLIPPatchFeatures(resolve_clip(s.prefilter_clip)), s.prefilter_template)


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
    if r.get("prefilter"):
        p = r["prefilter"]
        lines.append(f"CLIP class pre-filter ({p['clip']}, \"{p['template']}\"): {p['classes_present_per_image']:.2f} "
                     f"of {len(SHAPES)} classes present per scene, {p['classes_kept_per_image']:.2f} kept; present "
                     f"classes kept {p['present_kept']:.3f}, absent classes dropped {p['absent_dropped']:.3f}")
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
                             support_draws=getattr(a, "support_draws", BenchSettings.support_draws),
                             prefilter_clip=str(a.prefilter_clip) if getattr(a, "prefilter_clip", None) else None,
                             prefilter_template=getattr(a, "prefilter_template", BenchSettings.prefilter_template))
    if settings.prefilter_clip:
        import sys

        from ..models import ClipNotFoundError, resolve_clip

        try:
            resolve_clip(settings.prefilter_clip)  # before loading anything
        except ClipNotFoundError as e:
            print(f"error: --prefilter-clip: {e}", file=sys.stderr)
            return 2
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
