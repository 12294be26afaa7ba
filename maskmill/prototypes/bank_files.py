"""Prototype banks on disk: `<stem>.safetensors` (the vectors) + `<stem>.json` (metadata, fingerprint).

The sidecar is written last, both atomically (whole objects at a URL: s3://, memory://, ...): its
presence marks a complete bank. It records a
sha256 of the tensor bytes, so `load_bank` refuses a corrupted file, and the fingerprint, so it
refuses a bank built with other features than the caller expects. The fingerprint's hash (and one
per key) is recomputed on load: a sidecar edited by hand (a timestep changed) is refused, the
edited key named, since its prototypes would be compared with features they were not built from.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..storage import is_url, read_location, write_location
from .bank import PrototypeBank, PrototypeMeta
from .fingerprint import (canonical_json, edited_keys, fingerprint_differences, fingerprint_hash,
                          fingerprint_key_hashes)

FORMAT_VERSION = 1


class BankError(ValueError):
    """A bank file cannot be used."""


class BankCorruptedError(BankError):
    """Unreadable files, a tensor hash that does not match, or inconsistent metadata."""


class FingerprintMismatchError(BankError):
    """The bank was built with other features/settings than the caller expects."""


def bank_paths(path: str | Path) -> tuple[Path, Path] | tuple[str, str]:
    """`x/bank.safetensors` (or `x/bank`) -> (tensor file, JSON sidecar); strings for a URL."""
    if is_url(path):
        stem = str(path).removesuffix(".safetensors").removesuffix(".json")
        return f"{stem}.safetensors", f"{stem}.json"
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _tensor_sha256(vectors: torch.Tensor) -> str:
    return hashlib.sha256(vectors.contiguous().numpy().tobytes()).hexdigest()


def save_bank(bank: PrototypeBank, path: str | Path, fingerprint: dict | None = None) -> Path:
    """Write `<stem>.safetensors` then `<stem>.json` (last: its presence marks a complete bank)."""
    from safetensors.torch import save

    tensor_path, meta_path = bank_paths(path)
    fingerprint = fingerprint if fingerprint is not None else bank.fingerprint
    if fingerprint is None:
        raise ValueError("a bank is saved with a fingerprint: pass one or set bank.fingerprint")
    vectors = bank.vectors.float().contiguous()
    write_location(tensor_path, save({"vectors": vectors}))
    sidecar = {
        "format_version": FORMAT_VERSION,
        "fingerprint": json.loads(canonical_json(fingerprint)),
        "fingerprint_hash": fingerprint_hash(fingerprint),
        "fingerprint_key_hashes": fingerprint_key_hashes(fingerprint),
        "tensor_file": str(tensor_path).rsplit("/", 1)[-1],
        "tensor_sha256": _tensor_sha256(vectors),
        "shape": list(vectors.shape),
        "classes": bank.classes,
        "prototypes": [asdict(m) for m in bank.meta],
    }
    write_location(meta_path, json.dumps(sidecar, indent=1).encode())
    return tensor_path


def load_bank(path: str | Path, expected_fingerprint: dict | None = None) -> PrototypeBank:
    """Read a bank; refuse unreadable/corrupted files and (if given) a different fingerprint."""
    from safetensors.torch import load

    tensor_path, meta_path = bank_paths(path)
    try:
        sidecar = json.loads(read_location(meta_path))
        meta = [PrototypeMeta(p["class_name"], p["side"], p["kind"], tuple(p["support_keys"]))
                for p in sidecar["prototypes"]]
        stored_hash, fingerprint = sidecar["tensor_sha256"], sidecar["fingerprint"]
    except Exception as e:  # noqa: BLE001
        raise BankCorruptedError(f"bank metadata {meta_path} is unreadable: {type(e).__name__}: {e}") from None
    if sidecar.get("format_version") != FORMAT_VERSION:
        raise BankCorruptedError(f"bank {meta_path} has format {sidecar.get('format_version')}, "
                                 f"this maskmill reads {FORMAT_VERSION}")
    recorded, actual = sidecar.get("fingerprint_hash"), fingerprint_hash(fingerprint)
    if recorded != actual:
        keys = sidecar.get("fingerprint_key_hashes")
        named = edited_keys(fingerprint, keys) if isinstance(keys, dict) else []
        raise BankCorruptedError(
            f"bank metadata {meta_path} was edited after the bank was built: its fingerprint hashes to {actual}, "
            f"not to the recorded fingerprint_hash {recorded}"
            + (f" ({', '.join(named)})" if named else "") + "; rebuild the bank instead of editing it")
    try:
        vectors = load(read_location(tensor_path))["vectors"]
    except Exception as e:  # noqa: BLE001
        raise BankCorruptedError(f"bank tensors {tensor_path} are unreadable: {type(e).__name__}: {e}") from None
    actual_hash = _tensor_sha256(vectors)
    if actual_hash != stored_hash:
        raise BankCorruptedError(f"bank tensors {tensor_path} are corrupted: sha256 {actual_hash[:16]}… "
                                 f"!= recorded {stored_hash[:16]}…")
    if vectors.ndim != 2 or len(meta) != vectors.shape[0]:
        raise BankCorruptedError(f"bank {tensor_path}: {len(meta)} metadata rows for tensor {tuple(vectors.shape)}")
    if expected_fingerprint is not None:
        diffs = fingerprint_differences(fingerprint, expected_fingerprint)
        if diffs:
            raise FingerprintMismatchError(f"bank {tensor_path} was built with a different fingerprint: "
                                           + "; ".join(diffs))
    return PrototypeBank(vectors, meta, fingerprint)


def with_fingerprint(bank: PrototypeBank, fingerprint: dict) -> PrototypeBank:
    return replace(bank, fingerprint=fingerprint)
