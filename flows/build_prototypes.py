"""Prefect flow: OVDiff prototype banks for a list of classes, cached per class, merged into one bank.

    from flows.build_prototypes import build_prototypes
    from maskmill.prototypes.build_config import load_bank_build_config
    summary = build_prototypes(load_bank_build_config("configs/prototypes/shapes.yaml", ["k_parts=8"]))
    # {"built": [...], "reused": [...], "bank_path": ".../bank.safetensors", ...}

    python -m flows.build_prototypes --config configs/prototypes/shapes.yaml [--classes circle,square]
        [--cache-root DIR] [--support RUN_DIR] [--set k_parts=8 --set class_overrides.star.n_support=64]

One mapped task per class (`tasks.prototypes.build_class_prototypes`); each caches on its class's
fingerprint in the on-disk `BankCache` (maskmill/prototypes/cache.py), so a scheduled rebuild with
nothing changed loads no model and builds nothing, and changing one class's settings
(`class_overrides`, `stuff_classes`) rebuilds that class only.
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from prefect import flow, unmapped  # noqa: E402

from maskmill.config import ConfigError  # noqa: E402
from maskmill.prototypes.build import merge_class_banks  # noqa: E402
from maskmill.prototypes.build_config import BankBuildConfig, config_from_args  # noqa: E402
from tasks.prototypes import build_class_prototypes  # noqa: E402


@flow(name="build-prototypes")
def build_prototypes(config: BankBuildConfig) -> dict:
    """Build or reuse each class's bank, merge them, write the merged bank to `config.out`.

    Returns {"built": [classes], "reused": [classes], "bank_path": str, "classes": [...],
    "per_class": {class: task result}, "seconds": float}.
    """
    t0 = time.perf_counter()
    config.check_sources()  # a missing model or support run is refused before any task runs
    specs = [config.class_spec(c) for c in config.classes]
    futures = build_class_prototypes.map(config.classes, unmapped(config.cache_root), specs)
    results = [f.result() for f in futures]
    bank_path = merge_class_banks(results, config.cache_root, config.out)
    return {
        "built": [r["class"] for r in results if r["status"] == "built"],
        "reused": [r["class"] for r in results if r["status"] == "reused"],
        "bank_path": str(bank_path),
        "classes": list(config.classes),
        "per_class": {r["class"]: r for r in results},
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
        config.check_sources()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = build_prototypes(config)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_class"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
