"""`maskmill train-segmenter` and `maskmill evaluate-segmenter`.

    maskmill train-segmenter --data RUN [RUN ...] --out DIR [--val DIR] [--steps 400] [--init CKPT]
    maskmill evaluate-segmenter --ckpt DIR/model --data DIR [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train(a) -> int:
    from pydantic import ValidationError

    from .config import TrainConfig

    fields = {k: v for k, v in dict(data=a.data, out=a.out, val=a.val, init=a.init, steps=a.steps,
                                      batch_size=a.batch_size, lr=a.lr, schedule=a.schedule, seed=a.seed,
                                      workers=a.workers, classes=a.classes.split(",") if a.classes else None,
                                      progress=not a.no_progress).items() if v is not None}
    try:
        cfg = TrainConfig(**fields)  # every check before any data is read
    except ValidationError as e:
        err = e.errors()[0]
        print(f"error: {'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}", file=sys.stderr)
        return 2
    from .train import train_segmenter

    metrics = train_segmenter(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if k != "losses"}, indent=1))
    print(f"checkpoint: {Path(cfg.out) / 'model'}")
    return 0


def _evaluate(a) -> int:
    from .evaluate import evaluate_folder
    from .model import load_model

    try:
        model = load_model(a.ckpt)
        result = evaluate_folder(model, a.data)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"mIoU {result['miou']:.4f} on {result['images']} images")
    for name, iou in result["per_class_iou"].items():
        print(f"  {name:20s} {'-' if iou is None else f'{iou:.4f}'}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def add_segmenter_parsers(sub) -> None:
    """Register train-segmenter and evaluate-segmenter on maskmill's top-level subparsers."""
    t = sub.add_parser("train-segmenter", help="train a SegFormer on runs' shards")
    t.add_argument("--data", nargs="+", type=Path, required=True, metavar="RUN", help="run folders")
    t.add_argument("--out", type=Path, required=True, help="folder for the checkpoint (safetensors + config) and metrics.json")
    t.add_argument("--val", type=Path, help="labelled folder (images/, masks/, classes.json) scored at the end")
    t.add_argument("--init", help="local checkpoint folder to start from (e.g. a MiT-B0), loaded offline")
    t.add_argument("--classes", help="comma-separated label space (default: union of the runs' classes)")
    t.add_argument("--steps", type=int, help="optimiser steps (default: the config's)")
    t.add_argument("--batch-size", type=int, help="images per step (default: the config's)")
    t.add_argument("--lr", type=float, help="peak AdamW learning rate (default: the config's)")
    t.add_argument("--schedule", choices=["poly", "cosine"], help="learning-rate decay (default: the config's)")
    t.add_argument("--seed", type=int, help="seed of the initial weights, crops and shuffling")
    t.add_argument("--workers", type=int, help="DataLoader workers")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=_train)
    e = sub.add_parser("evaluate-segmenter", help="mIoU and per-class IoU of a segmenter on a labelled folder")
    e.add_argument("--ckpt", type=Path, required=True, help="the model folder train-segmenter wrote (OUT/model)")
    e.add_argument("--data", type=Path, required=True, help="labelled folder: images/, masks/, classes.json")
    e.add_argument("--json", type=Path, help="also write mIoU and per-class IoU to this JSON file")
    e.set_defaults(fn=_evaluate)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="maskmill-segmenter")
    add_segmenter_parsers(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(argv)
    return a.fn(a)
