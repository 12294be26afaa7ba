"""Build (or reuse) banks from build specs (`BankBuildConfig.class_spec`) and merge them.

`build_or_reuse(class_name, cache_root, spec)` is one class's whole job, in this order:
1. the cheap key (`cache.class_cache_key`, no model load): if it recalls a bank that loads
   (sha256 and fingerprint checked), the class is reused: no pipeline, no generation, no features;
2. otherwise the pipeline is loaded (once per process), the full fingerprint is computed (the
   feature extractor's, with a sample of the weights in memory, plus the build settings) and
   `BankCache.get_or_build` reuses a bank with that fingerprint or builds it; the key is remembered.
`merge_class_banks` merges the per-class results into one bank file.
The Prefect task (tasks/prototypes.py) and flow (flows/build_prototypes.py) only call these.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..storage import join_location
from .bank import merge_banks
from .bank_files import load_bank, save_bank
from .cache import BankCache, bank_settings, class_cache_key
from .fingerprint import canonical_json, fingerprint_hash, make_fingerprint

MERGED_DIR = ".merged"  # a leading dot: safe_class_dirname never produces it, so no class can collide

_FEATURES: dict[tuple[str, str], object] = {}


def _pipeline(model: str):
    from ..run.pipelines import cached_pipeline

    return cached_pipeline(model)


def get_features(model: str, features: dict):
    """The SDQueryFeatures of `model` with these settings, one per process (its weights identity is cached)."""
    from .features import SDQueryFeatures

    if features.get("name", "sd_query") != "sd_query":
        raise ValueError(f"feature extractor {features.get('name')!r} is not supported for bank building (sd_query)")
    key = (model, canonical_json(features))
    worker = _pipeline(model)
    with worker.lock:
        if key not in _FEATURES:
            _FEATURES[key] = SDQueryFeatures(worker.pipe, layers=features.get("layers"), timestep=features["timestep"],
                                             size=features.get("size"), noise_seed=features.get("noise_seed", 0),
                                             batch_size=features.get("batch_size", 4), model_id=model)
        return _FEATURES[key]


def clear_pipelines() -> None:
    """Forget this process's pipelines and feature extractors (tests: a reuse must load nothing)."""
    from ..run.pipelines import clear_pipeline_cache

    clear_pipeline_cache()
    _FEATURES.clear()


def support_for(spec: dict, class_name: str, pipe=None):
    """The support set a spec asks for: read from a run, or generated on `pipe`."""
    from ..config import FilterConfig
    from ..extractors import get_extractor
    from .support import generate_support, support_from_run

    sup = spec["support"]
    if sup["kind"] == "run":
        return support_from_run(sup["run_dir"], class_name, spec["n_support"])
    ex = sup["extractor"]
    return generate_support(pipe, class_name, spec["n_support"], prompts=sup["prompts"], seed=sup["seed"],
                            steps=sup["steps"], guidance=sup["guidance"],
                            extractor=get_extractor(ex["name"], **ex.get("params", {})),
                            bg_soft_threshold=sup["bg_soft_threshold"], rules=FilterConfig(**sup["filter"]))


def build_or_reuse(class_name: str, cache_root: str | Path, spec: dict) -> dict:
    """One class's bank, reused when its cheap key or its full fingerprint is unchanged, else built.

    Returns {"class", "status": "built" | "reused", "key", "bank_path", "fingerprint_hash", "seconds",
    "timings", "rebuilt_after_error"}.
    """
    from .support import bank_from_support

    t0 = time.perf_counter()
    if spec.get("class") != class_name:
        raise ValueError(f"spec is for class {spec.get('class')!r}, not {class_name!r}")
    cache = BankCache(cache_root)
    key = class_cache_key(spec)
    known = cache.recall(class_name, key)
    if known is not None:
        return {"class": class_name, "status": "reused", "key": key,
                "bank_path": str(cache.entry_path(class_name, known)), "fingerprint_hash": fingerprint_hash(known),
                "seconds": time.perf_counter() - t0, "timings": {}, "rebuilt_after_error": None}

    features = get_features(spec["model"], spec["features"])
    fingerprint = make_fingerprint(features.fingerprint(), bank_settings(spec))
    worker = _pipeline(spec["model"])
    timings: dict[str, float] = {}

    def build(c: str):
        s0 = time.perf_counter()
        support = support_for(spec, c, worker.pipe if spec["support"]["kind"] == "generate" else None)
        timings["support"] = time.perf_counter() - s0
        timings["support_images"] = len(support)
        b0 = time.perf_counter()
        b = spec["bank"]
        bank = bank_from_support(support, features, k_parts=b["k_parts"], seed=b["seed"], stuff=b["stuff"],
                                 fg_min_fraction=b["fg_min_fraction"], bg_min_fraction=b["bg_min_fraction"],
                                 max_kmeans_points=b["max_kmeans_points"])
        timings["features_and_bank"] = time.perf_counter() - b0
        return bank

    with worker.lock:  # one user of the pipeline at a time (capture and hooks patch the UNet)
        result = cache.get_or_build([class_name], fingerprint, build)
    cache.remember(class_name, key, fingerprint)
    return {"class": class_name, "status": "built" if class_name in result.built else "reused", "key": key,
            "bank_path": str(cache.entry_path(class_name, fingerprint)),
            "fingerprint_hash": fingerprint_hash(fingerprint), "seconds": time.perf_counter() - t0,
            "timings": timings, "rebuilt_after_error": result.rebuilt_after_error.get(class_name)}


def merge_class_banks(results: list[dict], cache_root: str | Path, out: str | Path | None = None) -> Path | str:
    """Merge the per-class banks `build_or_reuse` returned into one bank file; returns its path.

    out: default `<cache_root>/.merged/<hash of the merged fingerprint>/bank.safetensors`.
    """
    merged = merge_banks([load_bank(r["bank_path"]) for r in results])
    fingerprint = dict(merged.fingerprint or {})
    # Per-class settings (e.g. the stuff flag) differ, so merge_banks drops "settings"; keep each
    # class's bank fingerprint hash instead, so the merged file still says exactly what it holds.
    fingerprint["class_banks"] = {r["class"]: r["fingerprint_hash"] for r in results}
    if out is None:
        out = join_location(cache_root, MERGED_DIR, fingerprint_hash(fingerprint), "bank.safetensors")
    return save_bank(merged, out, fingerprint)
