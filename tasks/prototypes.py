"""Prefect task: build (or reuse) one class's OVDiff prototype bank in the on-disk `BankCache`.

Caching is on paths, ids and fingerprints, never on a pipeline object (ANCHORS §3):

1. `class_cache_key(spec)`: a cheap key computed *without loading the model*: the class's JSON
   build spec (model name, support source, counts, extractor/feature/bank settings), a stamp of
   the model's files (`maskmill.models.model_fingerprint` + weight files' sizes and mtimes) and,
   for run-based support, the run's identity. `<cache_root>/<class>/keys/<key>.json` points at
   the bank entry that key produced.
2. If that index exists and its bank loads (sha256 and fingerprint checked), the class is
   reused: no pipeline load, no generation, no features.
3. Otherwise the pipeline is loaded (once per process: `maskmill.runner.cached_pipeline`), the
   full fingerprint is computed (`SDQueryFeatures.fingerprint()`: configs + a weights digest,
   `make_fingerprint` adds the settings and the code version) and `BankCache.get_or_build`
   reuses a bank with that fingerprint or builds it; then the index is written.

The Prefect cache itself is off (`NO_CACHE`): the disk cache is the one source of truth, it
survives a reset Prefect database and is shared by the CLI and library calls.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from maskmill.prototypes.bank import (
    BankError,
    canonical_json,
    fingerprint_hash,
    make_fingerprint,
    maskmill_version,
)
from maskmill.prototypes.cache import BankCache, safe_class_dirname
from maskmill.run.pipelines import cached_pipeline, clear_pipeline_cache

log = logging.getLogger(__name__)

KEYS_DIR = "keys"

# ----------------------------------------------------------------------------------------------
# one feature extractor per (model, settings) per process, on the process's shared pipeline

_FEATURES: dict[tuple[str, str], object] = {}


def get_features(model: str, features: dict):
    """The SDQueryFeatures of `model` with these settings, one per process (its weights digest is cached)."""
    from maskmill.prototypes.features import SDQueryFeatures

    key = (model, canonical_json(features))
    worker = cached_pipeline(model)
    with worker.lock:
        if key not in _FEATURES:
            if features.get("name", "sd_query") != "sd_query":
                raise ValueError(f"feature extractor {features.get('name')!r} is not supported by the flow (sd_query)")
            _FEATURES[key] = SDQueryFeatures(worker.pipe, layers=features.get("layers"), timestep=features["timestep"],
                                             size=features.get("size"), noise_seed=features.get("noise_seed", 0),
                                             batch_size=features.get("batch_size", 4), model_id=model)
        return _FEATURES[key]


def clear_pipelines() -> None:
    """Forget this process's pipelines and feature extractors (tests: a reuse must load nothing)."""
    clear_pipeline_cache()
    _FEATURES.clear()


# ----------------------------------------------------------------------------------------------
# keys and fingerprints


def model_stamp(model: str) -> dict:
    """`model_fingerprint(model)` plus the weight files' sizes and mtimes.

    model_fingerprint hashes configs and file *sizes*: a retrained model of the same architecture
    (the toy world retrains its micro SD) keeps both. A rewritten file gets a new mtime, so the
    cheap key changes and the full fingerprint (which samples the weights) decides.
    """
    from maskmill.models import model_fingerprint, resolve_model

    stamp = dict(model_fingerprint(model))
    src = resolve_model(model)
    h = hashlib.sha256()
    if isinstance(src, Path):
        for f in sorted(p for ext in ("*.safetensors", "*.bin", "*.ckpt") for p in src.rglob(ext)):
            st = f.stat()
            h.update(f"{f.relative_to(src).as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:  # a hub id in the local cache: the snapshot revision the refs point at
        from maskmill.models import hf_cache_dir

        refs = hf_cache_dir() / ("models--" + src.replace("/", "--")) / "refs"
        for f in sorted(refs.glob("*")) if refs.exists() else []:
            h.update(f.name.encode() + f.read_bytes())
    stamp["files"] = h.hexdigest()[:16]
    return stamp


def bank_settings(spec: dict) -> dict:
    """The part of a build spec that goes into the bank's fingerprint as "settings" (model and
    features are already in the feature extractor's fingerprint)."""
    settings = {k: v for k, v in spec.items() if k not in ("model", "features")}
    if spec["support"]["kind"] == "run":
        from maskmill.prototypes.support import run_identity

        settings["support"] = dict(spec["support"], identity=run_identity(spec["support"]["run_dir"]))
    return settings


def class_cache_key(spec: dict) -> str:
    """The cheap per-class key: spec + model files stamp + run identity + code version; no model load."""
    payload = {"spec": spec, "model": model_stamp(spec["model"]), "settings": bank_settings(spec),
               "maskmill_version": maskmill_version()}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:24]


def key_index_path(cache_root: str | Path, class_name: str, key: str) -> Path:
    return Path(cache_root) / safe_class_dirname(class_name) / KEYS_DIR / f"{key}.json"


def _write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# building one class


def support_for(spec: dict, class_name: str, pipe=None):
    """The support set a spec asks for."""
    from maskmill.prototypes.support import generate_support, support_from_run

    sup = spec["support"]
    if sup["kind"] == "run":
        return support_from_run(sup["run_dir"], class_name, spec["n_support"])
    ex = sup["extractor"]
    from maskmill.extractors import get_extractor

    return generate_support(pipe, class_name, spec["n_support"], prompts=sup["prompts"], seed=sup["seed"],
                            steps=sup["steps"], guidance=sup["guidance"],
                            extractor=get_extractor(ex["name"], **ex.get("params", {})),
                            bg_soft_threshold=sup["bg_soft_threshold"], batch_size=sup.get("batch_size", 8),
                            **sup.get("filter", {}))


def build_or_reuse(class_name: str, cache_root: str, spec: dict) -> dict:
    """Plain-Python body of the task (callable without Prefect)."""
    from maskmill.prototypes.support import bank_from_support

    t0 = time.perf_counter()
    if spec.get("class") != class_name:
        raise ValueError(f"spec is for class {spec.get('class')!r}, not {class_name!r}")
    cache = BankCache(cache_root)
    key = class_cache_key(spec)
    index = key_index_path(cache_root, class_name, key)
    if index.exists():
        try:
            entry = json.loads(index.read_text())
            if cache.load(class_name, entry["fingerprint"]) is not None:
                return {"class": class_name, "status": "reused", "key": key,
                        "bank_path": str(cache.entry_path(class_name, entry["fingerprint"])),
                        "fingerprint_hash": entry["fingerprint_hash"], "seconds": time.perf_counter() - t0,
                        "timings": {}}
        except (BankError, KeyError, ValueError, OSError) as e:
            log.warning("cache index %s unusable, checking the full fingerprint: %s", index, e)

    model = spec["model"]
    features = get_features(model, spec["features"])
    fingerprint = make_fingerprint(features.fingerprint(), bank_settings(spec))
    timings: dict[str, float] = {}

    worker = cached_pipeline(model)

    def build(c: str):
        pipe = worker.pipe if spec["support"]["kind"] == "generate" else None
        s0 = time.perf_counter()
        support = support_for(spec, c, pipe)
        timings["support"] = time.perf_counter() - s0
        timings["support_images"] = len(support)
        b0 = time.perf_counter()
        bank = bank_from_support(support, features, k_parts=spec["bank"]["k_parts"], seed=spec["bank"]["seed"],
                                 stuff=spec["bank"]["stuff"], fg_min_fraction=spec["bank"]["fg_min_fraction"],
                                 bg_min_fraction=spec["bank"]["bg_min_fraction"],
                                 max_kmeans_points=spec["bank"]["max_kmeans_points"])
        timings["features_and_bank"] = time.perf_counter() - b0
        return bank

    with worker.lock:  # one user of the pipeline at a time (capture and hooks patch the UNet)
        result = cache.get_or_build([class_name], fingerprint, build)
    status = "built" if class_name in result.built else "reused"
    fp_hash = fingerprint_hash(fingerprint)
    _write_json_atomic(index, {"class": class_name, "key": key, "fingerprint": json.loads(canonical_json(fingerprint)),
                               "fingerprint_hash": fp_hash})
    return {"class": class_name, "status": status, "key": key,
            "bank_path": str(cache.entry_path(class_name, fingerprint)), "fingerprint_hash": fp_hash,
            "seconds": time.perf_counter() - t0, "timings": timings,
            "rebuilt_after_error": result.rebuilt_after_error.get(class_name)}


@task(name="build-class-prototypes", task_run_name="prototypes-{class_name}", cache_policy=NO_CACHE)
def build_class_prototypes(class_name: str, cache_root: str, spec: dict) -> dict:
    """One class's bank: reused from the disk cache when its key or fingerprint is unchanged, else built.

    Returns {"class", "status": "built" | "reused", "bank_path", "fingerprint_hash", "key", "seconds", "timings"}.
    """
    return build_or_reuse(class_name, cache_root, spec)
