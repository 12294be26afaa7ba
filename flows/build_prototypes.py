"""Prefect flow: OVDiff prototype banks for a list of classes, cached per class, merged into one bank.

    from flows.build_prototypes import build_prototypes
    summary = build_prototypes(["circle", "square"], cache_root="outputs/banks", out="outputs/banks/shapes.safetensors")
    # {"built": [...], "reused": [...], "bank_path": ".../shapes.safetensors", ...}

    python -m flows.build_prototypes --classes circle,square --cache-root outputs/banks [--support RUN_DIR]

One mapped task per class (`tasks.prototypes.build_class_prototypes`); each caches on its class's
fingerprint in the on-disk `BankCache` (see tasks/prototypes.py), so a scheduled rebuild with
nothing changed loads no model and builds nothing, and changing one class's settings
(`class_overrides`, `stuff_classes`) rebuilds that class only.

support: "generate" (OVDiff: generate n_support images per class, masks from the extractor) or
the path of a dataset run (reuse its shards' images and masks: no second generation).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from prefect import flow, unmapped  # noqa: E402

from maskmill.prototypes.bank import fingerprint_hash, load_bank, merge_banks, save_bank  # noqa: E402
from maskmill.prototypes.cache import safe_class_dirname  # noqa: E402
from tasks.prototypes import build_class_prototypes  # noqa: E402

FILTER_KEYS = ("min_confidence", "min_area", "max_area", "max_tries_factor")
OVERRIDABLE = {"n_support", "k_parts", "prompts", "steps", "guidance", "seed", "fg_min_fraction", "bg_min_fraction",
               "bg_soft_threshold", "extractor", "extractor_params", *FILTER_KEYS}
MERGED_DIR = ".merged"  # a leading dot: safe_class_dirname never produces it, so no class can collide


def class_spec(class_name: str, model: str, support: str, *, n_support: int = 32, k_parts: int = 32,
               stuff: bool = False, prompts: str | None = None, steps: int | None = None,
               guidance: float | None = None, seed: int = 0, extractor: str | None = None,
               extractor_params: dict | None = None, timestep: int = 200, layers: list[str] | None = None,
               feature_size: int | None = None, fg_min_fraction: float = 0.5, bg_min_fraction: float = 0.5,
               bg_soft_threshold: float = 0.2, max_kmeans_points: int = 20000, min_confidence: float | None = None,
               min_area: float | None = None, max_area: float | None = None,
               max_tries_factor: float | None = None) -> dict:
    """The JSON build spec of one class: everything that changes its bank, and nothing else.

    None for prompts/steps/guidance, the extractor (and its params) and the mask filter
    (min_confidence, min_area, max_area, max_tries_factor) means the model's defaults
    (`support_defaults`: configs/shapes.yaml for "shapes-sd", OVDiff's recipe otherwise)."""
    from maskmill.prototypes.support import support_defaults

    if support == "generate":
        d = support_defaults(model)
        sup = {"kind": "generate", "prompts": prompts if prompts is not None else d["prompts"],
               "steps": int(steps if steps is not None else d["steps"]),
               "guidance": float(guidance if guidance is not None else d["guidance"]), "seed": int(seed),
               "extractor": {"name": extractor or d["extractor"],
                             "params": dict(extractor_params if extractor_params is not None
                                            else (d["extractor_params"] if extractor is None else {}))},
               "bg_soft_threshold": float(bg_soft_threshold)}
        given = {"min_confidence": min_confidence, "min_area": min_area, "max_area": max_area,
                 "max_tries_factor": max_tries_factor}
        sup["filter"] = {k: float(given[k] if given[k] is not None else d[k]) for k in FILTER_KEYS}
    else:
        sup = {"kind": "run", "run_dir": str(Path(support).resolve())}
    return {
        "class": class_name,
        "model": model,
        "support": sup,
        "n_support": int(n_support),
        "bank": {"k_parts": int(k_parts), "seed": int(seed), "stuff": bool(stuff),
                 "fg_min_fraction": float(fg_min_fraction), "bg_min_fraction": float(bg_min_fraction),
                 "max_kmeans_points": int(max_kmeans_points)},
        "features": {"name": "sd_query", "layers": list(layers) if layers else None, "timestep": int(timestep),
                     "size": feature_size, "noise_seed": 0},
    }


def check_inputs(classes: list[str], model: str, support: str, stuff_classes: list[str],
                 class_overrides: dict[str, dict]) -> None:
    """Refuse bad input before any task runs, naming what is wrong."""
    from maskmill.models import resolve_model

    if not classes:
        raise ValueError("no classes given")
    if len(set(classes)) != len(classes):
        raise ValueError(f"duplicate class names in {classes}")
    for c in classes:
        safe_class_dirname(c)
    extra = [c for c in stuff_classes if c not in classes]
    if extra:
        raise ValueError(f"stuff_classes {extra} are not in classes {classes}")
    for c, over in class_overrides.items():
        if c not in classes:
            raise ValueError(f"class_overrides names {c!r}, which is not in classes {classes}")
        bad = set(over) - OVERRIDABLE
        if bad:
            raise ValueError(f"class_overrides[{c!r}]: cannot override {sorted(bad)}; allowed: {sorted(OVERRIDABLE)}")
    resolve_model(model)  # ModelNotFoundError says where it looked
    if support != "generate":
        from maskmill.shards import RunLayout

        layout = RunLayout(support)
        if not layout.classes_path.exists():
            raise FileNotFoundError(f"support must be 'generate' or a dataset run folder; {support} has no classes.json")
        missing = [c for c in classes if c not in layout.read_classes()]
        if missing:
            raise ValueError(f"classes {missing} are not in run {support} (its classes: {layout.read_classes()})")


@flow(name="build-prototypes")
def build_prototypes(classes: list[str], cache_root: str, model: str = "shapes-sd", support: str = "generate",
                     n_support: int = 32, k_parts: int = 32, stuff_classes: list[str] | None = None,
                     out: str | None = None, prompts: str | None = None, steps: int | None = None,
                     guidance: float | None = None, seed: int = 0, extractor: str | None = None,
                     extractor_params: dict | None = None, timestep: int = 200, layers: list[str] | None = None,
                     feature_size: int | None = None, fg_min_fraction: float = 0.5, bg_min_fraction: float = 0.5,
                     bg_soft_threshold: float = 0.2, min_confidence: float | None = None,
                     min_area: float | None = None, max_area: float | None = None,
                     max_tries_factor: float | None = None, class_overrides: dict[str, dict] | None = None) -> dict:
    """Build or reuse each class's bank, merge them, write the merged bank to `out`.

    prompts/steps/guidance default to OVDiff's recipe, or to the micro model's own captions and
    sampler settings for "shapes-sd" (see `maskmill.prototypes.support.support_defaults`); so do
    the support mask filter's min_confidence / min_area / max_area / max_tries_factor.
    class_overrides: per-class changes of n_support, k_parts, prompts, steps, guidance, seed, ...
    out: merged bank path (default `<cache_root>/.merged/<hash of the class fingerprints>/bank.safetensors`).

    Returns {"built": [classes], "reused": [classes], "bank_path": str, "classes": [...],
    "per_class": {class: task result}, "seconds": float}.
    """
    t0 = time.perf_counter()
    stuff_classes = list(stuff_classes or [])
    class_overrides = dict(class_overrides or {})
    check_inputs(classes, model, support, stuff_classes, class_overrides)
    common = dict(n_support=n_support, k_parts=k_parts, prompts=prompts, steps=steps, guidance=guidance, seed=seed,
                  extractor=extractor, extractor_params=extractor_params, timestep=timestep, layers=layers,
                  feature_size=feature_size, fg_min_fraction=fg_min_fraction, bg_min_fraction=bg_min_fraction,
                  bg_soft_threshold=bg_soft_threshold, min_confidence=min_confidence, min_area=min_area,
                  max_area=max_area, max_tries_factor=max_tries_factor)
    specs = [class_spec(c, model, support, stuff=c in stuff_classes, **{**common, **class_overrides.get(c, {})})
             for c in classes]
    futures = build_class_prototypes.map(classes, unmapped(str(cache_root)), specs)
    results = [f.result() for f in futures]
    banks = [load_bank(r["bank_path"]) for r in results]
    merged = merge_banks(banks)
    fingerprint = dict(merged.fingerprint or {})
    # Per-class settings (e.g. the stuff flag) differ, so merge_banks drops "settings"; keep each
    # class's bank fingerprint hash instead, so the merged file still says exactly what it holds.
    fingerprint["class_banks"] = {r["class"]: r["fingerprint_hash"] for r in results}
    if out is None:
        out = str(Path(cache_root) / MERGED_DIR / fingerprint_hash(fingerprint) / "bank.safetensors")
    bank_path = save_bank(merged, out, fingerprint)
    summary = {
        "built": [r["class"] for r in results if r["status"] == "built"],
        "reused": [r["class"] for r in results if r["status"] == "reused"],
        "bank_path": str(bank_path),
        "classes": list(classes),
        "per_class": {r["class"]: r for r in results},
        "seconds": time.perf_counter() - t0,
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Build OVDiff prototype banks (cached per class).")
    p.add_argument("--classes", required=True, help="comma-separated class names")
    p.add_argument("--cache-root", required=True)
    p.add_argument("--model", default="shapes-sd")
    p.add_argument("--support", default="generate", help="'generate' or a dataset run folder")
    p.add_argument("--n-support", type=int, default=32)
    p.add_argument("--k-parts", type=int, default=32)
    p.add_argument("--stuff", default="", help="comma-separated stuff classes (no background prototypes)")
    p.add_argument("--out")
    a = p.parse_args(argv)
    summary = build_prototypes([c.strip() for c in a.classes.split(",") if c.strip()], a.cache_root, model=a.model,
                               support=a.support, n_support=a.n_support, k_parts=a.k_parts,
                               stuff_classes=[c.strip() for c in a.stuff.split(",") if c.strip()], out=a.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_class"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
