"""Choose bench-downstream's segmenter recipe on the TUNE split only.

Run from the repository root (WORK: a bench-downstream work folder whose pool.npz exists):

    python benchmarks/tune_segmenter.py --work outputs/downstream --candidates base,s1-1500 \
        [--methods oracle,seediff] [--n 128] [--seeds 1] [--jobs 2] [--json benchmarks/results/downstream_tune.json]

Each candidate is a set of train-segmenter settings (SegFormer size, steps, lr, batch, crop
scale) over the current defaults. Every (candidate, method, seed) trains through bench-downstream's
own code (`_train_and_score`: the run's shards through the loader, one torch thread) and is scored
on rendered TUNE scenes (`testset.py` split "tune", plain and hard), never on the test scenes.
Prints tune plain/hard mIoU and seconds per training; results are appended to --json as they land
(a candidate already there is not trained again).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Overrides of TrainConfig (and of its SegmenterSize under "size"); the defaults are the base.
WIDE = {"hidden_sizes": (32, 64, 128, 256), "num_attention_heads": (1, 2, 4, 8), "decoder_hidden_size": 128}
S1 = {"strides": (1, 2, 2, 2), "sr_ratios": (8, 4, 2, 1)}  # full-resolution first stage: 32 x 32 logits
CANDIDATES: dict[str, dict] = {
    "base": {},
    "s2-600-crop05": {"size": {"strides": (2, 2, 2, 2), "sr_ratios": (4, 2, 1, 1), "hidden_sizes": (16, 32, 64, 128),
                     "decoder_hidden_size": 64}, "steps": 600, "lr": 4e-3, "batch_size": 8, "crop_scale": (0.5, 1.0)},
    "s2-1500-crop05": {"size": {"strides": (2, 2, 2, 2), "sr_ratios": (4, 2, 1, 1)}, "steps": 1500, "crop_scale": (0.5, 1.0)},
    "s2-1500-crop08": {"size": {"strides": (2, 2, 2, 2), "sr_ratios": (4, 2, 1, 1)}, "steps": 1500,
                        "crop_scale": (0.8, 1.0)},
    "s2-1500-crop1": {"size": {"strides": (2, 2, 2, 2), "sr_ratios": (4, 2, 1, 1)}, "steps": 1500,
                       "crop_scale": (1.0, 1.0)},
    "s2-2500-crop08": {"size": {"strides": (2, 2, 2, 2), "sr_ratios": (4, 2, 1, 1)}, "steps": 2500,
                        "crop_scale": (0.8, 1.0)},
    "s2-1500-crop08-lr2e-3": {"size": {"strides": (2, 2, 2, 2), "sr_ratios": (4, 2, 1, 1)}, "steps": 1500,
                               "lr": 2e-3, "crop_scale": (0.8, 1.0)},
    "s1-1500": {"size": S1, "steps": 1500, "crop_scale": (0.8, 1.0)},
    "s1-1500-crop05": {"size": S1, "steps": 1500, "crop_scale": (0.5, 1.0)},
    "s1-1500-lr2e-3": {"size": S1, "steps": 1500, "lr": 2e-3, "crop_scale": (0.8, 1.0)},
    "s1-1500-lr8e-3": {"size": S1, "steps": 1500, "lr": 8e-3, "crop_scale": (0.8, 1.0)},
    "s1-3000": {"size": S1, "steps": 3000, "crop_scale": (0.8, 1.0)},
    "s1-wide-1500": {"size": {**S1, **WIDE}, "steps": 1500, "crop_scale": (0.8, 1.0)},
    "s1-b16-1000": {"size": S1, "steps": 1000, "batch_size": 16, "crop_scale": (0.8, 1.0)},
}


def train_settings(overrides: dict) -> dict:
    """bench-downstream's train settings with a candidate's overrides, validated."""
    from maskmill.segmenter.config import SegmenterSize
    from maskmill.toyworld.bench_downstream import DownstreamConfig

    base = DownstreamConfig()
    size = SegmenterSize(**{**base.size.model_dump(), **overrides.get("size", {})})
    rest = {k: v for k, v in overrides.items() if k != "size"}
    return DownstreamConfig(**{**base.model_dump(include={"steps", "lr", "batch_size", "crop_scale"}), **rest},
                            size=size).train_settings()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="bench-downstream work folder (pool.npz)")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help=f"from: {', '.join(CANDIDATES)}")
    p.add_argument("--methods", default="oracle", help="labellings to train on (oracle, seediff, ...)")
    p.add_argument("--n", type=int, default=128, help="training images")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--n-test", type=int, default=128, help="rendered tune scenes per test set")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/downstream_tune.json")
    a = p.parse_args()
    names = a.candidates.split(",")
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown:
        print(f"error: unknown candidates {unknown}; choose from {', '.join(CANDIDATES)}", file=sys.stderr)
        return 2
    if not (a.work / "pool.npz").is_file():
        print(f"error: {a.work}/pool.npz: no pool there (run bench-downstream first)", file=sys.stderr)
        return 2

    from maskmill.toyworld.bench_downstream import _train_and_score, labelling, write_run
    from maskmill.toyworld.downstream_pool import Pool
    from maskmill.toyworld.render import SHAPES
    from maskmill.toyworld.testset import rendered_scenes, write_labelled_folder

    os.environ["OMP_NUM_THREADS"] = "1"
    tests = {}
    for kind in ("plain", "hard"):
        folder = a.work / "testsets" / f"tune-{kind}-{a.n_test}"
        if not (folder / "classes.json").is_file():
            write_labelled_folder(folder, *rendered_scenes(a.n_test, "tune", kind == "hard"), list(SHAPES))
        tests[kind] = str(folder)
    results = json.loads(a.json.read_text()) if a.json.is_file() else {}
    results.setdefault("what", "bench-downstream's segmenter recipe chosen on the TUNE split: rendered tune scenes "
                               f"({a.n_test} plain + {a.n_test} hard), one torch thread per training, {a.jobs} at once "
                               "on the shared 2-core CPU (benchmarks/tune_segmenter.py)")
    runs = results.setdefault("runs", [])
    done = {(r["candidate"], r["method"], r["n"], r["seed"]) for r in runs}
    pool = None
    jobs = []
    for method in a.methods.split(","):
        run_dir = a.work / "runs" / f"{method}-{a.n}"
        if not (run_dir / "classes.json").is_file():
            pool = pool or Pool(a.work / "pool.npz")
            data = labelling(pool, method, a.n)
            if data is None:
                print(f"error: the pool cannot supply {method} N={a.n}", file=sys.stderr)
                return 2
            write_run(run_dir, *data, list(SHAPES), shard_size=max(8, a.n // 8))
        for seed in range(a.seeds):
            for name in names:
                if (name, method, a.n, seed) not in done:
                    jobs.append(dict(candidate=name, method=method, n=a.n, seed=seed, run=str(run_dir), tests=tests,
                                     train=train_settings(CANDIDATES[name]),
                                     out=str(a.work / "models" / "tune" / f"{name}-{method}-{a.n}-s{seed}")))
    print(f"{len(jobs)} trainings, {a.jobs} at once")
    with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        futures = {ex.submit(_train_and_score, j): j for j in jobs}
        for fut in as_completed(futures):
            j, r = futures[fut], fut.result()
            row = {"candidate": j["candidate"], "method": r["method"], "n": r["n"], "seed": r["seed"],
                   "train": j["train"], "seconds": r["seconds"], "loss_last": round(r["loss_last"], 4),
                   "tune_plain_miou": round(r["plain"]["miou"], 4), "tune_hard_miou": round(r["hard"]["miou"], 4),
                   "tune_plain_per_class": {k: round(v, 3) for k, v in r["plain"]["per_class_iou"].items()
                                            if v is not None}}
            runs.append(row)
            a.json.write_text(json.dumps(results, indent=1) + "\n")
            print(f"{row['candidate']:18s} {row['method']:12s} N={row['n']} seed {row['seed']}: tune plain "
                  f"{row['tune_plain_miou']:.3f} hard {row['tune_hard_miou']:.3f} ({row['seconds']:.0f} s, "
                  f"loss {row['loss_last']:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
