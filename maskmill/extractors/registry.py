"""Every extractor, by the name a config gives it: the one list of what `extractor.name` may be."""
from __future__ import annotations

from .base import Extractor
from .baselines import CrossAttentionBaseline, ProductBaseline, PropagatedBaseline
from .diffcut import DiffCutExtractor
from .diffseg import DiffSegExtractor
from .seediff import SeeDiffExtractor

EXTRACTORS: dict[str, type[Extractor]] = {cls.name: cls for cls in (
    SeeDiffExtractor, DiffSegExtractor, DiffCutExtractor,
    CrossAttentionBaseline, PropagatedBaseline, ProductBaseline,
)}


def get_extractor(name: str, **params) -> Extractor:
    """Instantiate an extractor by name with its parameters; a clear error for an unknown name or parameter."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown extractor {name!r}; available: {', '.join(extractor_names())}")
    try:
        return EXTRACTORS[name](**params)
    except TypeError as e:
        raise ValueError(f"bad parameters for extractor {name!r}: {e}") from None


def extractor_names() -> list[str]:
    return sorted(EXTRACTORS)
