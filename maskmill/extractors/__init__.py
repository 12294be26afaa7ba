"""Mask extractors: SeeDiff (default), DiffSeg, DiffCut, and the attention baselines."""
from .base import IGNORE, ClassSpec, Extractor, MaskResult, SampleAttention, resolve_labels
from .registry import EXTRACTORS, extractor_names, get_extractor

__all__ = ["EXTRACTORS", "IGNORE", "ClassSpec", "Extractor", "MaskResult", "SampleAttention", "extractor_names",
           "get_extractor", "resolve_labels"]
