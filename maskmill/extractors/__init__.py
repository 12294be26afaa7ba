"""Mask extractors: SeeDiff (default), DiffSeg, DiffCut, and the attention baselines."""
from .base import IGNORE, ClassSpec, Extractor, MaskResult, SampleAttention, get_extractor, extractor_names, resolve_labels

__all__ = ["IGNORE", "ClassSpec", "Extractor", "MaskResult", "SampleAttention", "get_extractor", "extractor_names",
           "resolve_labels"]
