"""One generated sample on its way to a shard: `SampleRecord`, its key, and its shard's name.

Keys follow img2dataset: key = shard_id × 10^digits + index_in_shard, zero-padded, so
they are unique across shards, sort in generation order, and are free of dots (webdataset
splits a tar member name at the first dot into key and field).

Masks follow the extractor contract (maskmill/extractors/base.py): uint8 (H, W),
0 background, k > 0 a class, 255 ignore. In shards, k is the *run's* class id, i.e. the
1-based position in the run's classes.json; `remap_labels` turns an extractor's
prompt-local labels (k = k-th class of the prompt) into run ids.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

# Same value as maskmill.extractors.base.IGNORE; repeated here so that writing shards
# never imports torch (the extractors package does).
IGNORE = 255
BACKGROUND = 0

ACCEPTED = "accepted"
REJECTED = "rejected"
Status = Literal["accepted", "rejected"]

SHARD_DIGITS = 5
# Letters, digits, '_' and '-': no dots (webdataset's key/field separator), no '/' (tar directories).
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


def shard_name(shard_id: int) -> str:
    """"00000" style name of a shard (5 digits; wider only past 99,999 shards)."""
    if not isinstance(shard_id, (int, np.integer)) or shard_id < 0:
        raise ValueError(f"shard_id must be a non-negative int, got {shard_id!r}")
    return f"{int(shard_id):0{SHARD_DIGITS}d}"


def key_digits(samples_per_shard: int) -> int:
    """How many digits `sample_key` needs for an index within a shard of this size."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    return len(str(samples_per_shard - 1))


def sample_key(shard_id: int, index_in_shard: int, digits: int) -> str:
    """Deterministic sample key: shard_id × 10^digits + index_in_shard, zero-padded to 5 + digits.

    sample_key(3, 7, 4) == "000030007". Unique across shards as long as every shard uses
    the same `digits` and index_in_shard < 10^digits.
    """
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    if shard_id < 0:
        raise ValueError(f"shard_id must be >= 0, got {shard_id}")
    if not 0 <= index_in_shard < 10**digits:
        raise ValueError(f"index_in_shard {index_in_shard} does not fit in {digits} digits")
    return f"{int(shard_id) * 10**digits + int(index_in_shard):0{SHARD_DIGITS + digits}d}"


def check_key(key: str) -> None:
    """Raise ValueError unless `key` is a usable webdataset key (no dots, no slashes, not empty)."""
    if not isinstance(key, str) or not _KEY_PATTERN.match(key):
        raise ValueError(f"bad sample key {key!r}: use letters, digits, '_' or '-' only (no dots, no '/')")


def remap_labels(labels: np.ndarray, class_ids: list[int]) -> np.ndarray:
    """Prompt-local labels (k = k-th class of the prompt) -> run class ids; 0 and 255 kept.

    class_ids[k - 1] is the run id of the prompt's k-th class. Labels with no entry raise.
    """
    lut = np.full(256, -1, dtype=np.int32)  # -1 marks labels that have no mapping
    lut[BACKGROUND] = BACKGROUND
    lut[IGNORE] = IGNORE
    for local, run_id in enumerate(class_ids, start=1):
        if not 0 < run_id < IGNORE:
            raise ValueError(f"run class id must be in 1..254, got {run_id}")
        lut[local] = run_id
    out = lut[labels]
    if (out < 0).any():
        bad = sorted(set(np.unique(labels[out < 0]).tolist()))
        raise ValueError(f"labels {bad} have no class id (prompt has {len(class_ids)} classes)")
    return out.astype(np.uint8)


def build_meta(
    *,
    prompt: str,
    seed: int,
    classes: list[str],
    class_ids: list[int],
    model: str,
    extractor: str,
    extractor_params: dict[str, Any],
    confidence: list[float] | None = None,
    mask_fraction: list[float] | None = None,
    scores: dict[str, float] | None = None,
    width: int | None = None,
    height: int | None = None,
) -> dict[str, Any]:
    """The metadata every sample carries, always with the same keys.

    Using this for every record keeps the `json` field's structure identical across
    samples, which Hugging Face `datasets` needs (it infers the features from the first ones).
    classes[i] has run id class_ids[i]; confidence[i] is the extractor's score for it and
    mask_fraction[i] the share of the image its mask covers.
    """
    if len(classes) != len(class_ids):
        raise ValueError(f"{len(classes)} classes but {len(class_ids)} class ids")
    if confidence is not None and len(confidence) != len(classes):
        raise ValueError(f"{len(confidence)} confidences for {len(classes)} classes")
    return {
        "prompt": prompt,
        "seed": int(seed),
        "classes": list(classes),
        "class_ids": [int(i) for i in class_ids],
        "model": model,
        "extractor": extractor,
        "extractor_params": dict(extractor_params),
        "confidence": [float(c) for c in confidence] if confidence is not None else [],
        "mask_fraction": [float(f) for f in mask_fraction] if mask_fraction is not None else [],
        "scores": {k: float(v) for k, v in (scores or {}).items()},
        "width": width,
        "height": height,
    }


@dataclass
class SampleRecord:
    """One sample's outcome. Accepted records carry an image and a mask; rejected ones a reason.

    index:  global sample index (seeds and keys derive from it, never from a worker's rank).
    key:    the sample's key in its shard (see `sample_key`).
    status: "accepted" (goes into the tar) or "rejected" (listed in the manifest only).
    reason: why it was rejected; "" when accepted.
    image:  uint8 (H, W, 3), or None when rejected.
    mask:   uint8 (H, W) run class ids, 0 background, 255 ignore; None when rejected.
    meta:   JSON-serialisable dict (see `build_meta`).
    """

    index: int
    key: str
    status: Status
    reason: str = ""
    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

    @property
    def accepted(self) -> bool:
        return self.status == ACCEPTED

    def check(self) -> None:
        """Raise ValueError naming the record if it is malformed (cheap: no pass over pixels)."""
        where = f"record {self.index} ({self.key!r})"
        if not isinstance(self.index, (int, np.integer)) or self.index < 0:
            raise ValueError(f"{where}: index must be a non-negative int")
        try:
            check_key(self.key)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if not isinstance(self.meta, dict):
            raise ValueError(f"{where}: meta must be a dict, got {type(self.meta).__name__}")
        if self.status == REJECTED:
            if not self.reason:
                raise ValueError(f"{where}: a rejected record needs a reason")
            return
        if self.status != ACCEPTED:
            raise ValueError(f"{where}: status must be 'accepted' or 'rejected', got {self.status!r}")
        if self.reason:
            raise ValueError(f"{where}: an accepted record has no reason, got {self.reason!r}")
        img, mask = self.image, self.mask
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"{where}: image must be a uint8 (H, W, 3) array, got {_describe(img)}")
        if not isinstance(mask, np.ndarray) or mask.dtype != np.uint8 or mask.ndim != 2:
            raise ValueError(f"{where}: mask must be a uint8 (H, W) array, got {_describe(mask)}")
        if mask.shape != img.shape[:2]:
            raise ValueError(f"{where}: mask size {mask.shape} differs from image size {img.shape[:2]}")
        if min(mask.shape) == 0:
            raise ValueError(f"{where}: empty image {img.shape}")


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__
