"""A per-class cache of prototype banks keyed on the fingerprint, with a cheap key index in front.

Layout: `root/<safe class name>/<fingerprint hash>/bank.{safetensors,json}`; `root` may be a
folder or a URL (s3://bucket/banks, ...). Asking for classes
{A, B} after {A} was built with the same fingerprint builds only B; changing the model, the
feature extractor or a setting changes the hash, so stale banks are never reused (and stay on
disk until someone deletes them). Class names come from users: they are percent-encoded into
one directory name, and names with path separators or '..' are refused outright.

The full fingerprint needs the loaded model (it samples the weights in memory). So each class's
JSON build spec also gets a cheap key computed *without loading the model* (`class_cache_key`:
the spec, the model files' identity, a support run's content, the code version);
`root/<class>/keys/<key>.json` records which fingerprint that key built (`BankCache.remember`),
and `BankCache.recall` finds that bank again with no model load. Caching is on paths, ids and
fingerprints, never on a pipeline object: it survives restarts and is shared by every process.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from ..storage import is_url, join_location, location_exists, read_location, write_location
from .bank import PrototypeBank, merge_banks
from .bank_files import BankError, bank_paths, load_bank, save_bank, with_fingerprint
from .fingerprint import canonical_json, fingerprint_hash, maskmill_version

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 128
BANK_FILE = "bank.safetensors"
KEYS_DIR = "keys"

Fingerprint = dict | Callable[[str], dict]  # shared by all classes, or per class (e.g. a stuff flag)


class UnsafeClassNameError(ValueError):
    """A class name that could escape the cache root (or is not a usable name at all)."""


def safe_class_dirname(class_name: str) -> str:
    """One directory name for a class, never a path: refuse separators, '..', NUL, empty names;
    percent-encode everything else that is not [A-Za-z0-9 _.-] (so distinct names stay distinct)."""
    if not isinstance(class_name, str) or not class_name.strip():
        raise UnsafeClassNameError(f"class name must be a non-empty string, got {class_name!r}")
    bad = [s for s in ("/", "\\", "\x00", "..", os.sep, os.altsep) if s and s in class_name]
    if bad:
        raise UnsafeClassNameError(f"class name {class_name!r} contains {bad[0]!r}: path separators and '..' "
                                   "are not allowed in class names")
    name = quote(class_name, safe=" _.-")
    if name.startswith("."):  # no hidden directories, and never "." itself
        name = "%2E" + name[1:]
    if len(name) > MAX_NAME_CHARS:
        raise UnsafeClassNameError(f"class name {class_name[:40]!r}… is longer than {MAX_NAME_CHARS} characters encoded")
    return name


@dataclass
class CacheResult:
    """The merged bank of the requested classes and what happened to each class."""

    bank: PrototypeBank
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    rebuilt_after_error: dict[str, str] = field(default_factory=dict)  # class -> why its cached bank was unusable


class BankCache:
    """Banks of single classes under `root`, one directory per (class, fingerprint)."""

    def __init__(self, root: str | Path):
        self.root = root.rstrip("/") if is_url(root) else Path(root)

    def entry_path(self, class_name: str, fingerprint: dict) -> Path | str:
        """`root/<class>/<hash>/bank.safetensors`, checked to lie inside root."""
        path = join_location(self.root, safe_class_dirname(class_name), fingerprint_hash(fingerprint), BANK_FILE)
        if isinstance(path, str):  # a URL: safe_class_dirname already refused separators and '..'
            return path
        # Defence in depth: even a name the checks above missed must not leave root.
        root = self.root.resolve()
        if root not in path.resolve().parents:
            raise UnsafeClassNameError(f"class name {class_name!r} resolves outside the cache root {root}")
        return path

    def load(self, class_name: str, fingerprint: dict) -> PrototypeBank | None:
        """The cached bank, None if absent; BankError if present but unusable."""
        path = self.entry_path(class_name, fingerprint)
        if not location_exists(bank_paths(path)[1]):  # the sidecar is written last: no sidecar, no bank
            return None
        bank = load_bank(path, expected_fingerprint=fingerprint)
        if bank.classes != [class_name]:
            raise BankError(f"{path} holds classes {bank.classes}, expected [{class_name!r}]")
        return bank

    def store(self, class_name: str, fingerprint: dict, bank: PrototypeBank) -> Path:
        if bank.classes != [class_name]:
            raise ValueError(f"build_fn for {class_name!r} returned a bank of classes {bank.classes}")
        return save_bank(bank, self.entry_path(class_name, fingerprint), fingerprint)

    def key_path(self, class_name: str, key: str) -> Path | str:
        return join_location(self.root, safe_class_dirname(class_name), KEYS_DIR, f"{key}.json")

    def remember(self, class_name: str, key: str, fingerprint: dict) -> None:
        """Record that cheap key `key` built the bank with this fingerprint."""
        entry = {"class": class_name, "key": key, "fingerprint": json.loads(canonical_json(fingerprint)),
                 "fingerprint_hash": fingerprint_hash(fingerprint)}
        write_location(self.key_path(class_name, key), json.dumps(entry, indent=1, sort_keys=True).encode())

    def recall(self, class_name: str, key: str) -> dict | None:
        """The fingerprint cheap key `key` built, if its bank is still there and loads; else None."""
        path = self.key_path(class_name, key)
        if not location_exists(path):
            return None
        try:
            fingerprint = json.loads(read_location(path))["fingerprint"]
            return fingerprint if self.load(class_name, fingerprint) is not None else None
        except (BankError, KeyError, ValueError, OSError) as e:
            log.warning("cache key %s unusable, checking the full fingerprint: %s", path, e)
            return None

    def get_or_build(self, classes: list[str], fingerprint: Fingerprint,
                     build_fn: Callable[[str], PrototypeBank]) -> CacheResult:
        """Merged bank of `classes`: cached banks with this fingerprint are reused, the others are
        built with `build_fn(class_name)` (a bank of that class only) and stored.

        fingerprint: one dict for every class, or a function class -> dict for per-class
        settings. A cached bank that fails to load (corrupted, mismatched) is rebuilt, and the
        reason is reported.
        """
        fingerprint_of = fingerprint if callable(fingerprint) else (lambda _c: fingerprint)
        for c in classes:  # refuse bad names before any work is done
            safe_class_dirname(c)
        if len(set(classes)) != len(classes):
            raise ValueError(f"duplicate class names in {classes}")
        result = CacheResult(bank=None)  # type: ignore[arg-type]
        banks = []
        for c in classes:
            fp = fingerprint_of(c)
            try:
                bank = self.load(c, fp)
            except BankError as e:
                log.warning("cached bank of %r unusable, rebuilding: %s", c, e)
                result.rebuilt_after_error[c] = str(e)
                bank = None
            if bank is None:
                bank = with_fingerprint(build_fn(c), fp)
                self.store(c, fp, bank)
                result.built.append(c)
            else:
                result.reused.append(c)
            banks.append(bank)
        result.bank = merge_banks(banks)
        return result


# ----------------------------------------------------------------------------------------------
# cheap keys: no model load


def bank_settings(spec: dict) -> dict:
    """The part of a build spec that goes into the bank's fingerprint as "settings" (model and
    features are already in the feature extractor's fingerprint); a support run adds its identity."""
    settings = {k: v for k, v in spec.items() if k not in ("model", "features")}
    if spec["support"]["kind"] == "run":
        from .support import run_identity

        settings["support"] = dict(spec["support"], identity=run_identity(spec["support"]["run_dir"]))
    return settings


def class_cache_key(spec: dict) -> str:
    """The cheap per-class key: spec + the model files' identity + run identity + code version."""
    from ..models import model_identity

    payload = {"spec": spec, "model": model_identity(spec["model"]), "settings": bank_settings(spec),
               "maskmill_version": maskmill_version()}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:24]
