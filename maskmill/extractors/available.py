"""Imports every extractor implementation so each registers itself."""
from . import baselines, diffcut, diffseg, seediff  # noqa: F401
