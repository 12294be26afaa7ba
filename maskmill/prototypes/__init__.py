"""OVDiff prototype banks: dense features -> per-class fg/bg prototypes -> open-vocabulary segmentation.

Typical use:

    extractor = SDQueryFeatures(pipe)                       # features.py
    fp = make_fingerprint(extractor.fingerprint(), settings)
    bank = BankCache(root).get_or_build(classes, fp, build_fn).bank   # cache.py, bank.py
    results = segment_images(extractor, images, bank, classes)       # segment.py

Pure library code: no Prefect, no CLI.
"""
from .bank import (
    BankCorruptedError,
    BankError,
    FingerprintMismatchError,
    PrototypeBank,
    PrototypeMeta,
    build_class_bank,
    drop_confusing_background,
    fingerprint_differences,
    fingerprint_hash,
    load_bank,
    make_fingerprint,
    merge_banks,
    save_bank,
)
from .cache import BankCache, CacheResult, UnsafeClassNameError, safe_class_dirname
from .features import CLIPPatchFeatures, FeatureExtractor, SDQueryFeatures, default_query_layers
from .segment import (
    Segmentation,
    clip_prefilter,
    make_class_prefilter,
    prototype_scores,
    save_segmentation,
    segment_image,
    segment_images,
)

__all__ = [
    "BankCache", "BankCorruptedError", "BankError", "CLIPPatchFeatures", "CacheResult", "FeatureExtractor",
    "FingerprintMismatchError", "PrototypeBank", "PrototypeMeta", "SDQueryFeatures", "Segmentation",
    "UnsafeClassNameError", "build_class_bank", "clip_prefilter", "default_query_layers",
    "drop_confusing_background", "fingerprint_differences", "fingerprint_hash", "load_bank", "make_class_prefilter",
    "make_fingerprint", "merge_banks", "prototype_scores", "safe_class_dirname", "save_bank", "save_segmentation",
    "segment_image", "segment_images",
]
