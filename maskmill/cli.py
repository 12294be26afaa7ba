"""maskmill command line.

    maskmill generate --config configs/shapes.yaml [--set steps=10 --set output=outputs/x]
    maskmill generate --config configs/shapes.yaml --direct [--shards 0,3] [--json]   # no Prefect
    maskmill preview outputs/shapes-demo          # contact sheet PNG of images with mask overlays
    maskmill validate outputs/shapes-demo         # reads every shard; exit 1 on any problem
    maskmill export outputs/shapes-demo --format mmseg --out exports/shapes [--val-fraction 0.1 --seed 0]
    maskmill serve --config configs/shapes.yaml --cron "0 3 * * *"
    maskmill serve --job prototypes --config configs/prototypes/shapes.yaml --cron "0 4 * * *"
    maskmill prototypes build --config configs/prototypes/shapes.yaml [--set k_parts=8]
    maskmill segment IMG... --bank BANK --classes circle,star [--out DIR]
    maskmill toyworld train --out maskmill/assets/shapes-sd
    maskmill toyworld eval [--n 64]
    maskmill toyworld bench-masks [--n 64] [--variants benchmarks/mask_sweeps.yaml]
    maskmill toyworld bench-ovdiff [--n-support 32] [--n-test 64] [--k-parts 32]
    maskmill toyworld train-clip --out maskmill/assets/shapes-clip
    maskmill toyworld eval-clip [--n 128] [--split eval|tune]
    maskmill toyworld clip-pool --n 1024 --out outputs/clip-pool.npz
    maskmill --version;  python -m maskmill ... (the same commands)

Conventions: a command that reads a run takes it as the positional RUN (the run folder); job
configs are `--config FILE` with `--set KEY=VALUE` overrides. A user error (bad flag value, bad
config, a folder that is not a run, a missing model) is one `error:` line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__

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


class UsageError(ValueError):
    """A user error the command reports as one line (exit 2)."""


def _check_run(run: str) -> str:
    """`run` (a folder or URL) if it holds a maskmill run (classes.json), else UsageError naming what is wrong."""
    from .shards.layout import RunLayout
    from .storage import is_url

    if not is_url(run) and not Path(run).is_dir():
        raise UsageError(f"run folder {run} does not exist")
    if not RunLayout(run).has_classes():
        raise UsageError(f"{run} is not a maskmill run folder (no classes.json); give the folder a run wrote, "
                         f"e.g. outputs/shapes-demo")
    return run


def _cmd_preview(a) -> int:
    from .preview import contact_sheet
    from .shards.layout import RunLayout

    run = _check_run(a.run)
    if a.max < 1:
        raise UsageError(f"--max must be >= 1, got {a.max}")
    if not RunLayout(run).completed_shards():
        raise UsageError(f"{run} has no completed shard yet: nothing to preview")
    out = a.out or f"{str(run).rstrip('/')}/contact_sheet.png"
    try:
        contact_sheet(run, out, max_samples=a.max)
    except ValueError as e:  # completed shards, but every sample was rejected
        raise UsageError(str(e)) from None
    print(out)
    return 0


def _cmd_validate(a) -> int:
    from .shards.validate import validate_run

    report = validate_run(_check_run(a.run))
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_export(a) -> int:
    from .export import ExportError, export_run

    try:
        report = export_run(_check_run(a.run), a.format, a.out, val_fraction=a.val_fraction, seed=a.seed)
    except ExportError as e:
        raise UsageError(str(e)) from None
    print(report.summary())
    return 0


def _cmd_serve(a) -> int:
    from .run.orchestrate import check_serve, serve

    try:
        check_serve(a.job, str(a.config), a.cron, a.set)  # a bad cron or config: one line, nothing served
    except ValueError as e:
        raise UsageError(str(e)) from None
    serve(config_path=str(a.config), cron=a.cron, name=a.name, overrides=list(a.set), job=a.job)
    return 0


def _cmd_prototypes(a) -> int:
    from .prototypes.build_config import config_from_namespace
    from .run.orchestrate import build_prototypes

    config = config_from_namespace(a)  # ConfigError: one line per problem
    config.check_sources()
    summary = build_prototypes(config)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_class"}, indent=1, default=str))
    return 0


def _cmd_segment(a) -> int:
    from .segment_cli import run_segment

    return run_segment(a)


def _cmd_toyworld(a) -> int:
    if a.toy == "train":
        from .toyworld.train import main as train_main

        train_main(a.args, prog="maskmill toyworld train")
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
    p.add_argument("--version", action="version", version=f"maskmill {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="run the generate_dataset flow (or, with --direct, the runner) on a config")
    g.add_argument("--config", type=Path, required=True, help="run config YAML (e.g. configs/shapes.yaml)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    g.add_argument("--shards", help="comma-separated shard ids (default: every pending shard)")
    g.add_argument("--direct", action="store_true", help="run without Prefect (same shards, same bytes)")
    g.add_argument("--ready", action="store_true", help="--direct: print READY once the pipeline is loaded")
    g.add_argument("--no-progress", action="store_true", help="--direct: no progress bar or progress lines")
    g.add_argument("--no-finalize", action="store_true",
                   help="--direct: skip validation, the contact sheet and the dataset card")
    g.add_argument("--json", action="store_true", help="print the summary as one JSON line, nothing else")
    g.add_argument("--fan-out", metavar="DEPLOYMENT",
                   help="send the pending shards, in slices, to this produce-shards deployment's work pool "
                        "(e.g. produce-shards/maskmill; needs PREFECT_API_URL)")
    g.add_argument("--slice-shards", type=int, default=2, help="--fan-out: shards per slice (default 2)")
    g.set_defaults(fn=_cmd_generate)

    v = sub.add_parser("preview", help="contact sheet of a run's samples with mask overlays")
    v.add_argument("run", metavar="RUN", help="the run folder or URL (the config's output)")  # str: Path mangles URLs
    v.add_argument("--out", help="PNG path or URL to write (default RUN/contact_sheet.png)")
    v.add_argument("--max", type=int, default=64, help="samples on the sheet, in shard order (default 64)")
    v.set_defaults(fn=_cmd_preview)

    c = sub.add_parser("validate", help="read every shard of a run and check it (exit 1 on any problem)")
    c.add_argument("run", metavar="RUN", help="the run folder or URL (the config's output)")
    c.set_defaults(fn=_cmd_validate)

    e = sub.add_parser("export", help="write a run's samples as image/mask PNG pairs for mmsegmentation or a folder")
    e.add_argument("run", type=Path, metavar="RUN", help="the run folder (the config's output)")
    e.add_argument("--format", choices=("mmseg", "folder"), required=True,
                   help="mmseg: img_dir/ ann_dir/ splits/ metainfo.json (mmsegmentation, detectron2); "
                        "folder: images/ masks/ splits/")
    e.add_argument("--out", type=Path, required=True, help="new or empty folder to write into")
    e.add_argument("--val-fraction", type=float, default=0.1, help="share of samples in the val split (default 0.1)")
    e.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    e.set_defaults(fn=_cmd_export)

    s = sub.add_parser("serve", help="serve a job (dataset generation or prototype banks) on a cron schedule")
    s.add_argument("--job", choices=("generate", "prototypes"), default="generate",
                   help="generate: the generate_dataset flow on a run config (default); "
                        "prototypes: build_prototypes on a bank config (configs/prototypes/)")
    s.add_argument("--config", type=Path, required=True, help="the job's config YAML")
    s.add_argument("--cron", default="0 3 * * *", help='cron schedule, five fields (default "0 3 * * *")')
    s.add_argument("--name", help="deployment name (default maskmill-nightly, or maskmill-banks for prototypes)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    s.set_defaults(fn=_cmd_serve)

    pr = sub.add_parser("prototypes", help="OVDiff prototype banks")
    prsub = pr.add_subparsers(dest="prototypes_command", required=True, metavar="COMMAND")
    pb = prsub.add_parser("build", help="build (or reuse from the cache) each class's bank and merge them")
    from .prototypes_cli import add_bank_build_arguments

    add_bank_build_arguments(pb)
    pb.set_defaults(fn=_cmd_prototypes)

    sg = sub.add_parser("segment", help="segment images with an OVDiff prototype bank")
    sg.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files to segment")
    sg.add_argument("--bank", type=Path, required=True, help="prototype bank (.safetensors from prototypes build)")
    sg.add_argument("--classes", required=True, help="comma-separated class names")
    sg.add_argument("--model", default="shapes-sd", help="the model the bank was built on (default shapes-sd)")
    sg.add_argument("--clip", help="CLIP for the class pre-filter: an embedded name (shapes-clip), a folder or a file")
    sg.add_argument("--clip-template", metavar="TEMPLATE",
                    help="the prompt --clip scores a class with, one '{}' for its name (default: the embedded "
                         "shapes-clip's own captions 'a {}', CLIP's 'a photo of a {}.' for any other CLIP)")
    sg.add_argument("--out", type=Path, default=Path("outputs/segment"), help="output folder (default outputs/segment)")
    sg.add_argument("--no-background", action="store_true", help="no background class: every pixel gets a class")
    sg.add_argument("--refine", choices=REFINE_CHOICES, default=REFINE_CHOICES[0],
                    help="score refinement before the argmax (default pamr: edges follow the image's colours)")
    sg.add_argument("--max-side", type=int, metavar="N",
                    help="resize larger images to this longer side to segment them, labels scaled back to the "
                         "input size (default: the model's image size, e.g. 32 for shapes-sd, 512 for SD 1.5)")
    sg.set_defaults(fn=_cmd_segment)
    from .segmenter.cli import add_segmenter_parsers

    add_segmenter_parsers(sub)  # train-segmenter, evaluate-segmenter

    t = sub.add_parser("toyworld", help="the shapes world: train, evaluate, benchmark masks")
    tsub = t.add_subparsers(dest="toy", required=True, metavar="COMMAND")
    tt = tsub.add_parser("train", add_help=False,
                         help="train the micro SD (options of python -m maskmill.toyworld.train; --help lists them)")
    tt.add_argument("args", nargs=argparse.REMAINDER, help="options passed to the trainer")
    helps = {"eval": "colour and shape accuracy, cross-attention IoU and grouping AUC on generated images",
             "bench-masks": "every extractor's mIoU against the colour-recovered masks of generated images"}
    for name in ("eval", "bench-masks"):
        te = tsub.add_parser(name, help=helps[name])
        te.add_argument("--model", default="shapes-sd", help="the model to generate with (default shapes-sd)")
        te.add_argument("--n", type=int, default=64, help="images to generate (default 64)")
        te.add_argument("--json", type=Path, help="also write the figures to this JSON file")
        te.add_argument("--split", choices=["eval", "tune"], default="eval",
                        help="eval: held-out captions (reported figures); tune: trained captions, other seeds")
        if name == "bench-masks":
            te.add_argument("--methods", help="comma-separated extractor names")
            te.add_argument("--variants", type=Path,
                            help="YAML {label: {extractor: NAME, params: {...}}}: score these instead of --methods")
    to = tsub.add_parser("bench-ovdiff", help="OVDiff banks from generated support, mIoU on rendered scenes")
    to.add_argument("--model", default="shapes-sd", help="the model to generate support with (default shapes-sd)")
    to.add_argument("--n-support", type=int, default=32, help="support images per class (default 32)")
    to.add_argument("--n-test", type=int, default=64, help="rendered test scenes (default 64)")
    to.add_argument("--k-parts", type=int, default=32, help="k-means parts per side (default 32)")
    to.add_argument("--timestep", type=int, default=200, help="UNet timestep of the features (default 200)")
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
    to.add_argument("--prefilter-clip", help="also run the full method with OVDiff's CLIP class pre-filter, "
                                            "scored by this CLIP (embedded name, folder or file; e.g. shapes-clip)")
    to.add_argument("--prefilter-template", default="a {}",
                    help="the pre-filter's text for a class (default %(default)r, the micro CLIP's captions)")
    to.add_argument("--json", type=Path, help="also write the report to this JSON file")
    t.set_defaults(fn=_cmd_toyworld)
    from .toyworld.clip_cli import add_clip_commands
    from .toyworld.downstream_cli import add_downstream_parsers

    add_clip_commands(tsub)  # train-clip, clip-pool, eval-clip
    add_downstream_parsers(tsub)  # render-testset, bench-downstream
    return p


def _user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean bad input, reported as one line: config, model, run folder, command inputs."""
    from .config import ConfigError
    from .models import ModelNotFoundError

    return UsageError, ConfigError, ModelNotFoundError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:
        if getattr(args, "toy", None) != "train":
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.args = rest + list(args.args)  # the trainer's own options (argparse leaves leading flags out)
    try:
        return args.fn(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
