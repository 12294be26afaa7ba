"""maskmill command line.

    maskmill generate --config configs/shapes.yaml [--set steps=10 --set output=outputs/x]
    maskmill generate --config configs/shapes.yaml --direct [--shards 0,3] [--json]   # no Prefect
    maskmill preview outputs/shapes-demo          # contact sheet PNG of images with mask overlays
    maskmill validate outputs/shapes-demo         # reads every shard; exit 1 on any problem
    maskmill serve --config configs/shapes.yaml --cron "0 3 * * *"
    maskmill segment IMG... --bank BANK --classes circle,star [--out DIR]
    maskmill toyworld train --out maskmill/assets/shapes-sd
    maskmill toyworld eval [--n 64]
    maskmill toyworld bench-masks [--n 64] [--variants benchmarks/mask_sweeps.yaml]
    maskmill toyworld bench-ovdiff [--n-support 32] [--n-test 64] [--k-parts 32]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# prototypes.segment.REFINERS, default first; written out so `--help` does not import torch
# (tests/test_segment_cli.py checks that the two agree).
REFINE_CHOICES = ("pamr", "none")

# Offline by design: never reach for the hub, never send telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


def _cmd_generate(a) -> int:
    from .config import ConfigError, load_config
    from .run.direct import world_size
    from .run.folder import check_run_folder, check_shard_ids

    if not a.direct and (a.ready or a.no_finalize or a.no_progress):
        print("error: --ready, --no-progress and --no-finalize apply to --direct runs only", file=sys.stderr)
        return 2
    if a.fan_out and a.direct:
        print("error: --fan-out sends shards to Prefect workers; it cannot be combined with --direct", file=sys.stderr)
        return 2
    if a.slice_shards < 1:
        print(f"error: --slice-shards must be >= 1, got {a.slice_shards}", file=sys.stderr)
        return 2
    try:
        shard_ids = _shard_ids(a.shards)
        cfg = load_config(a.config, a.set)  # refuse a bad config before Prefect starts
        check_run_folder(cfg)  # and a folder holding another config's run (RunConflictError)
        if shard_ids is not None:
            check_shard_ids(cfg, shard_ids)
            if world_size() > 1:
                raise ValueError("--shards cannot be used under a multi-process launch: the ranks split the "
                                 "pending shards between them")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .run.orchestrate import generate
    from .shards.validate import RunInvalidError

    ready = (lambda: print("READY", flush=True)) if a.ready else None
    try:
        summary = generate(cfg, a.config, a.set, direct=a.direct, shard_ids=shard_ids, progress=not a.no_progress,
                           finalize=not a.no_finalize, on_ready=ready, fan_out=a.fan_out, slice_shards=a.slice_shards)
    except ConfigError as e:  # e.g. another config's run started in this folder meanwhile
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunInvalidError as e:  # the flow finished the run but it does not validate
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary is None:
        return 0  # not the main process of a multi-process launch: it prints for everyone
    summary = {k: v for k, v in summary.items() if k != "per_shard"}
    if a.json:
        print(json.dumps(summary, default=str), flush=True)
    else:
        print(json.dumps(summary, indent=1, default=str))
        print(f"shards:        {summary['shards_dir']}")
        print(f"contact sheet: {summary['contact_sheet']}")
    if summary.get("valid") is False:  # the direct runner finished the run but it does not validate
        print(f"error: {summary.get('problem') or 'the run does not validate'}", file=sys.stderr)
        return 1
    return 0


def _shard_ids(text: str | None) -> list[int] | None:
    """`--shards 0,3,7` as ids; a clear error for anything else."""
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--shards takes comma-separated shard ids (e.g. 0,3,7), got {text!r}") from None


def _cmd_preview(a) -> int:
    from .preview import contact_sheet

    out = a.out or f"{str(a.run).rstrip('/')}/contact_sheet.png"
    contact_sheet(a.run, out, max_samples=a.max)
    print(out)
    return 0


def _cmd_validate(a) -> int:
    from .shards.validate import validate_run

    report = validate_run(a.run)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_serve(a) -> int:
    from .run.orchestrate import serve

    serve(config_path=str(a.config), cron=a.cron, name=a.name, overrides=list(a.set))
    return 0


def _cmd_segment(a) -> int:
    from .segment_cli import run_segment

    return run_segment(a)


def _cmd_toyworld(a) -> int:
    if a.toy == "train":
        from .toyworld.train import main as train_main

        train_main(a.args)
        return 0
    if a.toy == "bench-ovdiff":
        from .toyworld.bench_ovdiff import main_args

        return main_args(a)
    from .models import load_pipeline

    pipe = load_pipeline(a.model)
    if a.toy == "eval":
        from .toyworld.evaluate import TARGETS, evaluate, format_report

        report = evaluate(pipe, a.n, split=a.split)
        print(format_report(report))
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1))
        return 0 if all(report[k] >= t for k, t in TARGETS.items()) else 1
    from .toyworld.bench_masks import format_table, load_variants, run, run_variants

    if a.variants:
        variants = load_variants(a.variants)  # refused before any generation if malformed
        results = run_variants(pipe, a.n, variants, split=a.split)
    else:
        results = run(pipe, a.n, a.methods.split(",") if a.methods else None, split=a.split)
    print(format_table(results, a.n, a.split))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maskmill", description="Synthetic segmentation data from SD attention.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="run the generate_dataset flow (or, with --direct, the runner) on a config")
    g.add_argument("--config", type=Path, required=True)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    g.add_argument("--shards", help="comma-separated shard ids (default: every pending shard)")
    g.add_argument("--direct", action="store_true", help="run without Prefect (same shards, same bytes)")
    g.add_argument("--ready", action="store_true", help="--direct: print READY once the pipeline is loaded")
    g.add_argument("--no-progress", action="store_true", help="--direct: no progress bar")
    g.add_argument("--no-finalize", action="store_true", help="--direct: skip validation and the contact sheet")
    g.add_argument("--json", action="store_true", help="print the summary as one JSON line, nothing else")
    g.add_argument("--fan-out", metavar="DEPLOYMENT",
                   help="send the pending shards, in slices, to this produce-shards deployment's work pool "
                        "(e.g. produce-shards/maskmill; needs PREFECT_API_URL)")
    g.add_argument("--slice-shards", type=int, default=2, help="--fan-out: shards per slice (default 2)")
    g.set_defaults(fn=_cmd_generate)

    v = sub.add_parser("preview", help="contact sheet of a run's samples with mask overlays")
    v.add_argument("run", help="run folder or URL (s3://bucket/run, ...)")  # str: Path would mangle a URL
    v.add_argument("--out", help="PNG path or URL (default: RUN/contact_sheet.png)")
    v.add_argument("--max", type=int, default=64)
    v.set_defaults(fn=_cmd_preview)

    c = sub.add_parser("validate", help="read every shard of a run and check it")
    c.add_argument("run", help="run folder or URL (s3://bucket/run, ...)")
    c.set_defaults(fn=_cmd_validate)

    s = sub.add_parser("serve", help="serve the generate deployment on a cron schedule")
    s.add_argument("--config", type=Path, required=True)
    s.add_argument("--cron", default="0 3 * * *")
    s.add_argument("--name", default="maskmill-nightly")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    s.set_defaults(fn=_cmd_serve)

    sg = sub.add_parser("segment", help="segment images with an OVDiff prototype bank")
    sg.add_argument("images", nargs="+", type=Path)
    sg.add_argument("--bank", type=Path, required=True)
    sg.add_argument("--classes", required=True, help="comma-separated class names")
    sg.add_argument("--model", default="shapes-sd")
    sg.add_argument("--clip", type=Path, help="local CLIP checkpoint for the class pre-filter")
    sg.add_argument("--out", type=Path, default=Path("outputs/segment"))
    sg.add_argument("--no-background", action="store_true")
    sg.add_argument("--refine", choices=REFINE_CHOICES, default=REFINE_CHOICES[0],
                    help="score refinement before the argmax (default pamr: edges follow the image's colours)")
    sg.set_defaults(fn=_cmd_segment)

    t = sub.add_parser("toyworld", help="the shapes world: train, evaluate, benchmark masks")
    tsub = t.add_subparsers(dest="toy", required=True)
    tt = tsub.add_parser("train", help="train the micro SD (arguments of python -m maskmill.toyworld.train)")
    tt.add_argument("args", nargs=argparse.REMAINDER)
    for name in ("eval", "bench-masks"):
        te = tsub.add_parser(name)
        te.add_argument("--model", default="shapes-sd")
        te.add_argument("--n", type=int, default=64)
        te.add_argument("--json", type=Path)
        te.add_argument("--split", choices=["eval", "tune"], default="eval",
                        help="eval: held-out captions (reported figures); tune: trained captions, other seeds")
        if name == "bench-masks":
            te.add_argument("--methods", help="comma-separated extractor names")
            te.add_argument("--variants", type=Path,
                            help="YAML {label: {extractor: NAME, params: {...}}}: score these instead of --methods")
    to = tsub.add_parser("bench-ovdiff", help="OVDiff banks from generated support, mIoU on rendered scenes")
    to.add_argument("--model", default="shapes-sd")
    to.add_argument("--n-support", type=int, default=32)
    to.add_argument("--n-test", type=int, default=64)
    to.add_argument("--k-parts", type=int, default=32)
    to.add_argument("--timestep", type=int, default=200)
    to.add_argument("--layers", help="comma-separated attn2 module names for the features (default: the decoder's)")
    to.add_argument("--feature-size", type=int, help="resize images to this side before the UNet (default: as is)")
    to.add_argument("--refine", choices=REFINE_CHOICES, default=REFINE_CHOICES[0],
                    help="score refinement of every variant (default pamr, as `maskmill segment`); "
                         "with pamr, the unrefined full method is reported too")
    to.add_argument("--no-diagnostics", action="store_true", help="skip the oracle-support diagnostic rows")
    to.add_argument("--split", choices=["test", "tune"], default="test",
                    help="rendered scenes to segment: test (reported figures) or tune (choosing settings)")
    to.add_argument("--support-draws", type=int, default=6,  # = BenchSettings.support_draws (a test checks)
                    help="support sets (seeds 0, 1, ...) every mIoU is averaged over (default %(default)s)")
    to.add_argument("--threads", type=int, default=0, help="torch threads (0 = default; 1 on a busy machine)")
    to.add_argument("--json", type=Path)
    t.set_defaults(fn=_cmd_toyworld)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
