"""`maskmill toyworld train-clip`, `clip-pool` and `eval-clip`: the micro CLIP's commands."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parse_margins(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--margins must be comma-separated numbers, got {text!r}") from None
    return tuple(sorted(values))


def _cmd_train_clip(a) -> int:
    from .clip_train import run_args

    return run_args(a)


def _cmd_eval_clip(a) -> int:
    import torch

    from ..clip_model import load_clip
    from ..models import ClipNotFoundError
    from ..clipcheck import ClipCheck, ClipCheckConfig

    if a.n < 2:
        print(f"error: --n must be >= 2, got {a.n}", file=sys.stderr)
        return 2
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    try:
        model = load_clip(a.clip)  # a missing or unreadable CLIP fails before any generation
    except (ClipNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ..models import load_pipeline
    from .clip_eval import DEFAULT_MARGINS, evaluate_clip, format_clip_report

    pipe = load_pipeline(a.model)
    pipe.set_progress_bar_config(disable=True)
    check = ClipCheck(ClipCheckConfig(model=str(a.clip)), model)
    report = evaluate_clip(pipe, check, a.n, a.split, a.margins or DEFAULT_MARGINS, a.cache)
    print(format_clip_report(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


# = clip_train.ClipTrainSettings' defaults, written out so `--help` does not import torch (a test checks).
TRAIN_DEFAULTS = {"steps": 1500, "batch": 128, "lr": 1e-3, "warmup": 100, "seed": 0, "pool_scenes": 6000, "threads": 1}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TRAIN_DEFAULTS
    p.add_argument("--out", type=Path, required=True, help="folder for model.safetensors, config.json, README.md")
    p.add_argument("--steps", type=int, default=d["steps"], help=f"optimiser steps (default {d['steps']})")
    p.add_argument("--batch", type=int, default=d["batch"], help=f"image-caption pairs per step (default {d['batch']})")
    p.add_argument("--lr", type=float, default=d["lr"], help=f"peak AdamW learning rate (default {d['lr']})")
    p.add_argument("--warmup", type=int, default=d["warmup"], help=f"linear warm-up steps (default {d['warmup']})")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of the rendered pool and the initial weights")
    p.add_argument("--pool-scenes", type=int, default=d["pool_scenes"], help="rendered scenes to draw items from")
    p.add_argument("--threads", type=int, default=d["threads"], help="torch threads (the machine is shared)")
    p.add_argument("--distort", action="store_true", help="warp half the scenes and roughen mask outlines")
    p.add_argument("--init", type=Path, help="continue from these CLIP weights (file or folder) instead of scratch")
    p.add_argument("--generated", type=Path, help="also train on this pool of generated images (clip-pool's npz)")
    p.add_argument("--generated-share", type=float, default=0.4,
                   help="share of items cut from --generated images (default 0.4)")


def _cmd_clip_pool(a) -> int:
    import torch

    if a.n < 2:
        print(f"error: --n must be >= 2, got {a.n}", file=sys.stderr)
        return 2
    if a.out.suffix != ".npz":
        print(f"error: --out must name an .npz file, got {a.out}", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    from ..models import load_pipeline
    from .clip_generated import make_pool

    pipe = load_pipeline(a.model)
    pipe.set_progress_bar_config(disable=True)
    try:
        print(json.dumps(make_pool(pipe, a.n, a.out, a.batch)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def add_clip_commands(toyworld_sub) -> None:
    """Add train-clip, clip-pool and eval-clip to the `maskmill toyworld` subcommands."""
    t = toyworld_sub.add_parser("train-clip", help="train the micro CLIP of the shapes world")
    add_train_arguments(t)
    t.set_defaults(fn=_cmd_train_clip)
    g = toyworld_sub.add_parser("clip-pool", help="generate the micro CLIP's training images (own seed stream)")
    g.add_argument("--out", type=Path, required=True, help="the pool's .npz file (continued if it exists)")
    g.add_argument("--n", type=int, default=1024, help="generated images (half single objects)")
    g.add_argument("--model", default="shapes-sd", help="the SD that generates the images")
    g.add_argument("--batch", type=int, default=16, help="images per pipeline call")
    g.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    g.set_defaults(fn=_cmd_clip_pool)
    e = toyworld_sub.add_parser("eval-clip", help="micro CLIP zero-shot accuracy and the CLIP check's catch rates")
    e.add_argument("--clip", default="shapes-clip", help="CLIP weights: embedded name, folder or file")
    e.add_argument("--model", default="shapes-sd", help="the SD that generates the images")
    e.add_argument("--n", type=int, default=128, help="generated images (half single objects)")
    e.add_argument("--split", choices=["eval", "tune"], default="eval",
                   help="eval: held-out captions (reported figures); tune: trained captions, other seeds (choose min_margin)")
    e.add_argument("--margins", type=_parse_margins, default=None,
                   help="comma-separated min_margin values to report (default: a grid from -0.2 to 0.3)")
    e.add_argument("--threads", type=int, default=1, help="torch threads (0 = default)")
    e.add_argument("--cache", type=Path, help="folder keeping the generated images and masks for reuse")
    e.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    e.set_defaults(fn=_cmd_eval_clip)
