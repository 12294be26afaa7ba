"""Imports every extractor implementation so each registers itself."""
from . import seediff  # noqa: F401
