"""OVDiff prototype banks: dense features -> per-class fg/bg prototypes -> open-vocabulary segmentation.

Typical use:

    extractor = SDQueryFeatures(pipe)                       # features.py, clip_features.py
    fp = make_fingerprint(extractor.fingerprint(), settings)           # fingerprint.py
    bank = BankCache(root).get_or_build(classes, fp, build_fn).bank   # cache.py, bank.py, bank_files.py
    results = segment_images(extractor, images, bank, classes)       # segment.py

Support sets (support.py) come from a dataset run or are generated; build_config.py describes a
whole bank build (`BankBuildConfig`) and build.py runs it class by class through the cache.
Pure library code: no Prefect, no CLI.
"""
from .bank import PrototypeBank, PrototypeMeta, build_class_bank, drop_confusing_background, merge_banks
from .bank_files import BankCorruptedError, BankError, FingerprintMismatchError, load_bank, save_bank
from .fingerprint import fingerprint_differences, fingerprint_hash, make_fingerprint
from .cache import BankCache, CacheResult, UnsafeClassNameError, safe_class_dirname
from .clip_features import CLIPPatchFeatures
from .features import FeatureExtractor, SDQueryFeatures, default_query_layers
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
