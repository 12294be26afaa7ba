"""The options of a bank build (`maskmill prototypes build`, `python -m flows.build_prototypes`).

Kept apart from maskmill.prototypes (which imports torch) so that building the command line, and
`--help`, stay light; `prototypes.build_config.config_from_namespace` turns them into a
validated `BankBuildConfig`.
"""
from __future__ import annotations


def add_bank_build_arguments(p) -> None:
    """The bank build options on an argparse parser (`maskmill prototypes build`, `python -m flows.build_prototypes`)."""
    p.add_argument("--config", help="YAML file of BankBuildConfig keys (e.g. configs/prototypes/shapes.yaml)")
    p.add_argument("--classes", help="comma-separated class names (replaces the config's)")
    p.add_argument("--cache-root", help="folder of the per-class bank cache (default outputs/banks)")
    p.add_argument("--model", help="generating model: embedded name, local folder or cached hub id")
    p.add_argument("--support", help="'generate' (generate support images) or a dataset run folder (reuse its samples)")
    p.add_argument("--n-support", type=int, help="support images per class")
    p.add_argument("--k-parts", type=int, help="k-means parts per side (foreground, background)")
    p.add_argument("--stuff", help="comma-separated stuff classes (no background prototypes)")
    p.add_argument("--out", help="merged bank path (.safetensors; default under the cache root)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
