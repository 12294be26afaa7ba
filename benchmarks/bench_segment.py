"""Benchmark OVDiff segmentation: peak memory of `prototype_scores` is flat in the bank size.

Run from the repository root:

    python benchmarks/bench_segment.py           # ~40 s on 2 busy cores; ~1.3 GB peak (65,536 unchunked)
    python benchmarks/bench_segment.py --sizes 4096 16384 --repeats 1   # quicker

Synthetic banks of P random unit prototypes (C = 512 channels, 20 classes, half foreground and half
background, kinds class/instance/part, merged with `merge_banks` as real per-class banks are) score
one random 64x64 feature map, SD's query-feature grid at 512 px. Each (P, chunk) pair runs in a
fresh process, once with the default chunk (4,096 prototypes) and once with chunk = P (one matmul:
the unchunked baseline). The (chunk, h*w) float32 similarity buffer grows with P unchunked; chunked,
one buffer of at most `chunk` rows is alive at a time. Peak = the kernel's peak-RSS mark (reset just
before the call) minus the RSS before it, with glibc's mmap threshold fixed at 1 MB so RSS follows
live tensors (the default allocator adds 0-20 MB of heap fragments, bounded in P). Times: CPU s per
call (robust when other jobs share the cores), median of `--repeats`.
Target: chunked peak ~x1 from the smallest bank of >= 1 chunk to the largest.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_capture import run_peak_mb  # noqa: E402 - the peak-RSS helpers every benchmark here shares

DEFAULT_CHUNK = 4096
N_CLASSES = 20


def synthetic_bank(size: int, channels: int, seed: int = 0):
    """`size` random unit prototypes over N_CLASSES classes, built per class and merged like a real bank."""
    import torch

    from maskmill.prototypes.bank import PrototypeBank, PrototypeMeta, merge_banks

    g = torch.Generator().manual_seed(seed)
    banks = []
    for k in range(N_CLASSES):
        n = size // N_CLASSES + (k < size % N_CLASSES)
        v = torch.randn(n, channels, generator=g)
        v /= v.norm(dim=1, keepdim=True)  # in place: no second copy of the bank
        # Half fg, half bg (>= 1 fg: segmentation refuses a class without one); per side one
        # "class" mean, up to 8 "instance" means, the rest k-means "part"s, as build_class_bank keeps.
        n_fg = max(1, n // 2)
        meta = [PrototypeMeta(f"class{k:02d}", side, "class" if j == 0 else "instance" if j <= 8 else "part", ("s0",))
                for side, m in (("fg", n_fg), ("bg", n - n_fg)) for j in range(m)]
        banks.append(PrototypeBank(v, meta))
    return merge_banks(banks)


def worker(size: int, chunk: int, channels: int, grid: int, repeats: int, threads: int) -> dict:
    """In a fresh process: peak memory of one call, then CPU time of `repeats` more."""
    import torch

    from maskmill.prototypes.segment import prototype_scores

    torch.set_num_threads(threads)
    bank = synthetic_bank(size, channels)
    classes = bank.classes
    features = torch.randn(channels, grid, grid, generator=torch.Generator().manual_seed(1))
    # Warm-up on a small bank: BLAS/OpenMP start-up and allocator pools are not the chunking's cost.
    prototype_scores(features, synthetic_bank(4 * N_CLASSES, channels), classes, chunk=chunk)
    # Building the bank peaks higher than scoring it (randn + merge copies): run_peak_mb resets the
    # kernel's peak mark first, so the call's own peak is what is measured.
    _, growth_mb = run_peak_mb(lambda: prototype_scores(features, bank, classes, chunk=chunk))
    times = []
    for _ in range(max(1, repeats)):
        t = time.process_time()
        prototype_scores(features, bank, classes, chunk=chunk)
        times.append(time.process_time() - t)
    return {"growth_mb": growth_mb, "cpu_s": statistics.median(times)}


def in_subprocess(args, size: int, chunk: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(size), str(chunk),
           "--channels", str(args.channels), "--grid", str(args.grid), "--threads", str(args.threads),
           "--repeats", str(args.repeats)]
    # glibc raises its mmap threshold as big blocks are freed, so later 8 MB chunk buffers land in
    # the heap and leave 0-20 MB of fragments in RSS depending on the order of frees; a fixed 1 MB
    # threshold gives every tensor its own mapping, unmapped when freed: RSS growth = live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker P={size} chunk={chunk} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536], help="bank sizes (prototypes)")
    ap.add_argument("--channels", type=int, default=512, help="feature channels C")
    ap.add_argument("--grid", type=int, default=64, help="feature grid side h = w")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per worker (median)")
    ap.add_argument("--worker", type=int, nargs=2, default=None, metavar=("SIZE", "CHUNK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.channels, args.grid, args.repeats, args.threads)))
        return

    t0 = time.perf_counter()
    sizes = sorted(args.sizes)
    hw = args.grid * args.grid
    print(f"prototype_scores: C={args.channels}, {args.grid}x{args.grid} grid, {N_CLASSES} classes, "
          f"{args.threads} thread(s), fresh process per row; peak = RSS growth during one call\n")
    print("| prototypes | chunk | sims buffer (MB) | peak RSS growth (MB) | CPU s / call |")
    print("|---:|---:|---:|---:|---:|")
    peak: dict[tuple[int, str], float] = {}
    for size in sizes:
        for mode, chunk in (("chunked", DEFAULT_CHUNK), ("unchunked", size)):
            r = in_subprocess(args, size, chunk)
            peak[size, mode] = r["growth_mb"]
            buffer_mb = min(chunk, size) * hw * 4 / 2**20  # the (chunk, h*w) float32 similarities
            print(f"| {size:,} | {chunk:,} ({mode}) | {buffer_mb:.0f} | {peak[size, mode]:.0f} | {r['cpu_s']:.2f} |",
                  flush=True)
    # Below one chunk the buffer itself grows with P, so flatness is judged from one chunk on.
    base = next((x for x in sizes if x >= DEFAULT_CHUNK), sizes[-1])
    large = sizes[-1]
    print()
    if base < large:
        print(f"chunked peak, {large:,} / {base:,} prototypes: "
              f"x{peak[large, 'chunked'] / peak[base, 'chunked']:.2f}   (target ~x1)")
    print(f"unchunked / chunked peak at {large:,} prototypes: x{peak[large, 'unchunked'] / peak[large, 'chunked']:.1f}"
          f"   ({peak[large, 'unchunked']:.0f} MB vs {peak[large, 'chunked']:.0f} MB)")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
