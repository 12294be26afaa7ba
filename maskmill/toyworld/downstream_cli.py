"""`maskmill toyworld render-testset` and `maskmill toyworld bench-downstream` (parsers import nothing heavy)."""
from __future__ import annotations

import sys
from pathlib import Path


def _render_testset(a) -> int:
    from .testset import render_testset

    if a.n <= 0:
        print(f"error: --n must be positive, got {a.n}", file=sys.stderr)
        return 2
    out = render_testset(a.n, a.out, hard=a.hard, split=a.split)
    print(f"{a.n} {'hard' if a.hard else 'plain'} {a.split} scenes: {out}")
    return 0


def _bench_downstream(a) -> int:
    from pydantic import ValidationError

    from .bench_downstream import ALL_METHODS, QUICK, DownstreamConfig, run

    fields = dict(QUICK) if a.quick else {}
    for name in ("work", "results", "table", "model", "split", "seeds", "n_test", "steps", "lr", "jobs"):
        if getattr(a, name) is not None:
            fields[name] = getattr(a, name)
    for name in ("sizes", "big_sizes", "clean_sizes"):
        if getattr(a, name) is not None:
            fields[name] = [int(v) for v in getattr(a, name).split(",") if v]
    if a.wait_for_pool:
        fields["grow"] = False
    if a.methods:
        fields["methods"] = a.methods.split(",")
        unknown = set(fields["methods"]) - set(ALL_METHODS)
        if unknown:
            print(f"error: unknown methods {sorted(unknown)}; choose from {', '.join(ALL_METHODS)}", file=sys.stderr)
            return 2
    if a.quick and a.results is None:  # a quick run never overwrites the full results
        fields.update(results=Path("outputs/downstream/quick.json"), table=Path("outputs/downstream/quick.md"))
    try:
        cfg = DownstreamConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        print(f"error: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}", file=sys.stderr)
        return 2
    if a.report_only:  # tables again from the results file, no training
        import json

        from .downstream_report import write_report

        write_report(json.loads(Path(cfg.results).read_text()), cfg)
    else:
        run(cfg)
    print(f"results: {cfg.results}\ntable:   {cfg.table}")
    return 0


def add_downstream_parsers(tsub) -> None:
    """Register render-testset and bench-downstream on `maskmill toyworld`'s subparsers."""
    r = tsub.add_parser("render-testset", help="rendered scenes with exact masks as a labelled folder")
    r.add_argument("--n", type=int, required=True, help="scenes to render")
    r.add_argument("--out", type=Path, required=True, help="folder for images/, masks/ and classes.json")
    r.add_argument("--hard", action="store_true",
                   help="3-4 smaller, often touching objects on background textures unseen in training")
    r.add_argument("--split", choices=["test", "tune"], default="test",
                   help="test: reported figures; tune: choosing settings (disjoint seeds)")
    r.set_defaults(fn=_render_testset)
    b = tsub.add_parser("bench-downstream", help="train a segmenter on each labelling, score on rendered scenes")
    b.add_argument("--quick", action="store_true",
                   help="N=32, 4 methods, 2 seeds, 128 test scenes (8 trainings of the full recipe)")
    b.add_argument("--split", choices=["test", "tune"], help="rendered scenes scored (tune: for choosing settings)")
    b.add_argument("--methods", help="comma-separated labellings (default: all)")
    b.add_argument("--sizes", help="comma-separated N for every method (default 32,128)")
    b.add_argument("--big-sizes", help="comma-separated N for oracle, ceiling, seediff, seediff_clip only (default 512,2000)")
    b.add_argument("--clean-sizes", help="N for the ceiling without mis-drawn samples (default 128,512)")
    b.add_argument("--wait-for-pool", action="store_true",
                   help="another process grows WORK/pool.npz: wait for it instead of generating")
    b.add_argument("--report-only", action="store_true", help="rewrite the table from --results, train nothing")
    b.add_argument("--seeds", type=int, help="training seeds per cell (default 3)")
    b.add_argument("--n-test", type=int, help="scenes per test set (default 256)")
    b.add_argument("--steps", type=int, help="segmenter training steps per cell (default: the bench's)")
    b.add_argument("--lr", type=float, help="segmenter learning rate (default: the bench's)")
    b.add_argument("--jobs", type=int, help="trainings in parallel, one thread each (default 2)")
    b.add_argument("--model", help="diffusion model (default shapes-sd)")
    b.add_argument("--work", type=Path, help="pool, runs, models (default outputs/downstream)")
    b.add_argument("--results", type=Path, help="JSON (default benchmarks/results/downstream.json)")
    b.add_argument("--table", type=Path, help="markdown (default docs/downstream.md)")
    b.set_defaults(fn=_bench_downstream)
