"""What a prototype bank was built with: its fingerprint, a stable hash of it, and readable differences.

A fingerprint holds the model, the feature extractor's own fingerprint, the build settings and
the maskmill version; banks built with different fingerprints are never mixed or reused.
"""
from __future__ import annotations

import hashlib
import json


def maskmill_version() -> str:
    import maskmill

    return str(getattr(maskmill, "__version__", "0"))


def make_fingerprint(extractor_fingerprint: dict, settings: dict) -> dict:
    """What identifies a bank: model, feature extractor, build settings, maskmill code version."""
    return {
        "model": extractor_fingerprint.get("model"),
        "feature_extractor": extractor_fingerprint,
        "settings": settings,
        "maskmill_version": maskmill_version(),
    }


def canonical_json(obj) -> str:
    # Round-trip through JSON first so tuples and lists (and int keys) compare alike.
    return json.dumps(json.loads(json.dumps(obj, default=str)), sort_keys=True, separators=(",", ":"))


def fingerprint_hash(fingerprint: dict) -> str:
    return hashlib.sha256(canonical_json(fingerprint).encode()).hexdigest()[:16]


def fingerprint_differences(stored, expected, prefix: str = "") -> list[str]:
    """Human-readable list of the keys whose values differ, e.g. "feature_extractor.timestep: 200 != 300"."""
    stored, expected = json.loads(canonical_json(stored)), json.loads(canonical_json(expected))
    if isinstance(stored, dict) and isinstance(expected, dict):
        out = []
        for k in sorted(set(stored) | set(expected)):
            key = f"{prefix}{k}"
            if k not in stored:
                out.append(f"{key}: missing in bank (expected {expected[k]!r})")
            elif k not in expected:
                out.append(f"{key}: not expected (bank has {stored[k]!r})")
            else:
                out += fingerprint_differences(stored[k], expected[k], key + ".")
        return out
    return [] if stored == expected else [f"{prefix.rstrip('.')}: bank has {stored!r}, expected {expected!r}"]


def _leaves(obj, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, dict) and obj:
        out: dict[str, object] = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def fingerprint_key_hashes(fingerprint: dict) -> dict[str, str]:
    """A short hash of each leaf ("feature_extractor.timestep"): what lets an edit of a saved
    fingerprint be named, where the whole `fingerprint_hash` only says that something changed."""
    leaves = _leaves(json.loads(canonical_json(fingerprint)))
    return {k: hashlib.sha256(canonical_json(v).encode()).hexdigest()[:12] for k, v in sorted(leaves.items())}


def edited_keys(fingerprint: dict, key_hashes: dict[str, str]) -> list[str]:
    """Leaves of `fingerprint` that differ from the ones `key_hashes` was made of (changed, added, removed)."""
    now = fingerprint_key_hashes(fingerprint)
    return [f"{k} {'added' if k not in key_hashes else 'removed' if k not in now else 'changed'}"
            for k in sorted(set(now) | set(key_hashes)) if now.get(k) != key_hashes.get(k)]
