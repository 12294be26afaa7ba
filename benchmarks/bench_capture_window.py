"""Benchmark capture at 512 px by what it records: the CPU cost of each side, and SeeDiff's `refine_steps`.

Run from the repository root:

    python benchmarks/bench_capture_window.py            # ~3 min CPU: SD1.5 UNet config, 512 px, 1 step each

The SD 1.5 UNet config (random weights, bench_capture.sd15_unet) makes one guided DDIM step at
512 px (batch 1, 2 with CFG) plain, then one with SeeDiff's capture (self-attention at 16 and 32
from every block, at 64 from the up-blocks; cross-attention at 16). The capture store measures the
CPU time of this thread spent recording each kind of layer (`AttentionStore.cpu_by_kind`, one torch
thread). Printed: the plain step, the capture step and its ratio (bench_capture's "per step"
figure, which records every side every step), the recording time per kind, and the per-step
ratio over a schedule when SeeDiff records its refinement sides (32 and 64) only in the window
`refine_steps` (the steps outside it record 16 only): 1 + (recording time of the sides recorded
every step + window x that of the refinement sides) / plain step. Target: <= 1.05. The ratios
rest on the recording time the store measures inside the step, not on the difference of two
whole steps: on a shared machine that difference is mostly noise (seen: a capture step 0.5 %
*cheaper* than the plain one at load 15), while the recording time is this thread's own CPU.
Images are bitwise those of the plain pipeline whatever is recorded (tests/test_capture.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WINDOWS = [(0.0, 1.0), (0.5, 1.0), (0.7, 1.0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # the store's per-kind CPU time is this thread's
    torch.set_flush_denormal(True)
    from bench_capture import SEEDIFF_SELF_BLOCKS, SD15Run, sd15_unet

    from maskmill.capture import CaptureConfig, capture_attention

    print(f"SD 1.5 UNet config, random weights, {args.size} px, 1 guided step, torch threads 1; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; CPU seconds", flush=True)
    run = SD15Run(sd15_unet(), args.size, 1)
    run.warm_up()
    c = time.process_time()
    run.generate()
    plain = time.process_time() - c
    config = CaptureConfig(self_blocks=SEEDIFF_SELF_BLOCKS, cross_sides=(16,))
    c = time.process_time()
    with capture_attention(run.unet, config, batch_size=1, cfg=True, latent_hw=(run.latent, run.latent),
                           num_steps=1) as store:
        run.generate()
    captured = time.process_time() - c
    kinds = dict(sorted(store.cpu_by_kind.items(), key=lambda kv: -kv[1]))
    print(f"plain step {plain:.2f} s; with capture {captured:.2f} s: x{captured / plain:.3f} "
          f"(every side every step)")
    print("recording, CPU s per step: " + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items())
          + f"; total {sum(kinds.values()):.2f} (x{1 + sum(kinds.values()) / plain:.3f} from recording alone)")
    seed_side = 64 // 4 * args.size // 512
    refine = sum(v for k, v in kinds.items() if k.startswith("self") and int(k.split()[1]) > seed_side)
    rest = sum(kinds.values()) - refine
    for start, end in WINDOWS:
        ratio = 1 + (rest + (end - start) * refine) / plain
        mark = "   target <= 1.05: " + ("ok" if ratio <= 1.05 else "MISSED")
        print(f"  refine_steps [{start}, {end}): per-step ratio over the schedule x{ratio:.3f}{mark}")


if __name__ == "__main__":
    main()
