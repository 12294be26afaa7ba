"""The shard-writing stage: records in, WebDataset tars (shards/) + parquet manifests (manifests/) + stats (stats/) out.

Plain Python (no Prefect, no torch): flows call `write_shard` once per shard and use
`RunLayout` to resume; `validate_run` checks a finished run.
"""
from .layout import RunLayout, ShardPaths, shard_paths
from .reader import DecodedSample, decode_image, decode_mask, decoded_samples, iter_samples, raw_samples
from .records import (
    ACCEPTED,
    IGNORE,
    REJECTED,
    SampleRecord,
    build_meta,
    check_key,
    key_digits,
    remap_labels,
    sample_key,
    shard_name,
)
from .validate import ValidationReport, validate_run
from .manifest import MANIFEST_SCHEMA
from .stats import ShardStats
from .writer import ShardWriter, write_shard

__all__ = [
    "ACCEPTED", "IGNORE", "REJECTED", "MANIFEST_SCHEMA",
    "SampleRecord", "build_meta", "check_key", "key_digits", "remap_labels", "sample_key", "shard_name",
    "RunLayout", "ShardPaths", "shard_paths",
    "ShardStats", "ShardWriter", "write_shard",
    "DecodedSample", "decode_image", "decode_mask", "decoded_samples", "iter_samples", "raw_samples",
    "ValidationReport", "validate_run",
]
