"""Prefect task: one class's OVDiff prototype bank, built or reused from the on-disk cache.

The library does the work (`maskmill.prototypes.build.build_or_reuse`); the disk cache is the one
source of truth, so Prefect's own result cache is off (`NO_CACHE`).
"""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from maskmill.prototypes.build import build_or_reuse


@task(name="build-class-prototypes", task_run_name="prototypes-{class_name}", cache_policy=NO_CACHE)
def build_class_prototypes(class_name: str, cache_root: str, spec: dict) -> dict:
    """One class's bank from its build spec (`BankBuildConfig.class_spec`): reused from the disk cache
    when its cheap key or fingerprint is unchanged, else built.

    Returns {"class", "status": "built" | "reused", "bank_path", "fingerprint_hash", "key", "seconds", "timings"}.
    """
    return build_or_reuse(class_name, cache_root, spec)
