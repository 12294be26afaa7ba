"""Diagnostics of OVDiff on the shapes world: where the support masks and the features fall short.

- `recovered_support` / `rendered_support`: banks from oracle masks (colour-recovered on the
  generated images, or rendered scenes with exact masks), to separate mask quality from features;
- `colour_coded_control`: the whole method when each class has its own colour;
- `support_mask_iou`, `colour_vs_shape_similarity`: how good the support masks are and what the
  features care about;
- `support_reuse`: the time `support_from_run` saves over generating the same support sets.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..prototypes.bank import PrototypeBank, merge_banks
from ..prototypes.features import FeatureExtractor
from ..prototypes.support import SupportSet, bank_from_support, support_from_run
from .ovdiff_scoring import TEST_SEED, evaluate_bank, rendered_test_set
from .render import COLOURS, SHAPES, render, sample_scene

if TYPE_CHECKING:
    from .ovdiff_settings import BenchSettings


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
        write_shard(layout.location, shard_id, records)
    return time.perf_counter() - t0


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
