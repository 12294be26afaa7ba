"""Benchmark the CLIP consistency check: its cost per sample against the run's own cost per sample.

Run from the repository root:

    python benchmarks/bench_clipcheck.py [--batch 16] [--repeats 3] [--threads 1] [--clip shapes-clip]

The shapes world as configs/shapes.yaml runs it: the micro SD (maskmill/assets/shapes-sd), 32 px,
25 DDIM steps, guidance 4, a batch of the shapes config's prompts, capture of what SeeDiff reads
and SeeDiff masks (the run's work per sample), then `ClipCheck.check` on the same batch with the
micro CLIP (maskmill/assets/shapes-clip) against the four shapes and the background prompt.
Times are CPU seconds of the process (robust when other jobs share the cores), medians of
`--repeats`; the text embeddings are cached after the first batch, as in a run.
Target: check / (generation + capture + masks) <= 0.05.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = 0.05


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clip", default="shapes-clip")
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from maskmill.clipcheck import ClipCheck, ClipCheckConfig
    from maskmill.extractors import get_extractor
    from maskmill.generate import generate_with_attention, latent_hw
    from maskmill.models import load_pipeline
    from maskmill.toyworld.bench_masks import shapes_config_params
    from maskmill.toyworld.evaluate import SETTINGS, class_specs, eval_items
    from maskmill.toyworld.render import SHAPES

    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    extractor = get_extractor("seediff", **shapes_config_params()["seediff"])
    capture = extractor.capture_config(pipe.unet, latent_hw(pipe, SETTINGS.height, SETTINGS.width))
    check = ClipCheck(ClipCheckConfig(model=a.clip))
    items = eval_items(a.batch * a.repeats, "tune")
    run_s, check_s = [], []
    for r in range(a.repeats):
        batch = items[r * a.batch : (r + 1) * a.batch]
        t0 = time.process_time()
        images, attns = generate_with_attention(pipe, [it.caption for it in batch], [it.seed for it in batch],
                                                SETTINGS, capture)
        masks = [extractor.extract(at, class_specs(pipe.tokenizer, it), im).labels
                 for im, at, it in zip(images, attns, batch)]
        t1 = time.process_time()
        check.check(images, masks, [list(it.shapes) for it in batch], list(SHAPES))
        t2 = time.process_time()
        run_s.append((t1 - t0) / len(batch))
        check_s.append((t2 - t1) / len(batch))
    run_ms, check_ms = statistics.median(run_s) * 1000, statistics.median(check_s) * 1000
    ratio = check_ms / run_ms
    print(f"generation + capture + SeeDiff: {run_ms:.1f} ms/sample (CPU, median of {a.repeats} batches of {a.batch})")
    print(f"CLIP check:                     {check_ms:.2f} ms/sample")
    print(f"ratio check / run: {ratio:.4f}  (target <= {TARGET}: {'ok' if ratio <= TARGET else 'MISSED'})")
    if a.json:
        a.json.write_text(json.dumps({"run_ms_per_sample": run_ms, "check_ms_per_sample": check_ms,
                                      "ratio": ratio, "batch": a.batch, "repeats": a.repeats}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
