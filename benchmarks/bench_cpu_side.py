"""Benchmark the CPU side at 512 px: seconds per sample of everything after the UNet, beside the UNet's step.

Run from the repository root:

    python benchmarks/bench_cpu_side.py --gpu-step-ms 80        # ~5-8 min on 2 busy cores
    python benchmarks/bench_cpu_side.py --gpu-step-ms 80 --batch 8 --steps 50 --unet-steps 2

On a GPU the UNet is fast and what follows it runs on the CPU: SeeDiff from the captured maps
(seeds and expansion at 16, background refinement at 32 and 64, PAMR at 512 px), the quality
filter, PNG/JPEG encoding of image and mask, and the tar + parquet writes. This prints each per
sample, measured on the SD 1.5 UNet layout at 512 px with random weights (the work depends on the
shapes, not the weights):

1. the UNet: one guided step (batch 1, so 2 with CFG) plain and with SeeDiff's capture, CPU
   seconds, `--unet-steps` steps (default 1: ~20 s a step on this CPU); the captured maps
   (self-attention at 16/32/64, cross-attention at 16) feed part 2;
2. the CPU side per sample, medians of `--repeats`, two classes per sample, on one torch thread:
   store -> per-sample maps, SeeDiff without PAMR, PAMR, the filter, PNG image, JPEG image, PNG
   mask, and the shard writer's encoding and writing (tar + parquet + fsync + renames) of PNG
   records; the image is a synthetic 512 px scene (smooth shapes, gradients, mild noise: PNG
   sizes like a generated image's, not like noise's);
3. the share of a batch the generator would wait for, for a GPU step time `--gpu-step-ms` (one
   guided UNet step of a batch of `--batch`, `--steps` steps a batch): serial (the generator waits
   for all of the CPU side) and overlapped (produce.judged_samples: it waits only for what the CPU
   side takes beyond the batch's generation).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cpu_seconds(fn, repeats: int) -> tuple[float, object]:
    """Median CPU seconds of `fn()` over `repeats` calls, and its last result."""
    times, out = [], None
    for _ in range(repeats):
        c = time.process_time()
        out = fn()
        times.append(time.process_time() - c)
    return statistics.median(times), out


def scene(size: int, seed: int = 0):
    """A synthetic image with the statistics of a generated one: smooth regions, edges, mild noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.5 + 0.3 * np.sin(3 * x + c) * np.cos(2 * y - c) for c in range(3)], -1)
    for _ in range(6):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
        inside = (y - cy) ** 2 + (x - cx) ** 2 < r**2
        img[inside] = rng.uniform(0, 1, 3) * (0.8 + 0.2 * y[inside, None])
    img += rng.normal(0, 0.015, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def unet_part(size: int, steps: int) -> dict:
    """Plain and capture step times of the SD1.5 UNet config; the captured maps of the last capture run."""
    from bench_capture import SEEDIFF_SELF_BLOCKS, Clock, SD15Run, sd15_unet

    from maskmill.capture import CaptureConfig, capture_attention

    run = SD15Run(sd15_unet(), size, steps)
    run.warm_up()
    with Clock() as plain:
        run.generate()
    config = CaptureConfig(self_blocks=SEEDIFF_SELF_BLOCKS, cross_sides=(16,))
    with Clock() as cap:
        with capture_attention(run.unet, config, batch_size=1, cfg=True, latent_hw=(run.latent, run.latent),
                               num_steps=steps) as store:
            run.generate()
    return {"plain_step": plain.cpu / steps, "capture_step": cap.cpu / steps, "plain_wall": plain.wall / steps,
            "capture_wall": cap.wall / steps, "store": store, "record_s": store.seconds / steps}


def cpu_side(store, size: int, repeats: int) -> dict[str, float]:
    import torch

    from maskmill.config import FilterConfig
    from maskmill.extractors import ClassSpec
    from maskmill.extractors.pamr import pamr
    from maskmill.extractors.seediff import SeeDiffExtractor
    from maskmill.produce import rejection_reason
    from maskmill.shards.encode import encode_image, encode_mask
    from maskmill.shards.records import remap_labels

    image = scene(size)
    classes = [ClassSpec("thing", (4,)), ClassSpec("other", (6, 7))]
    out: dict[str, float] = {}
    t, maps = cpu_seconds(store.results, 1)
    out["store -> per-sample maps"] = t
    attn = maps[0]
    no_pamr = SeeDiffExtractor(pamr_iterations=0)
    seediff = SeeDiffExtractor()
    out["SeeDiff 16/32/64, no PAMR"], _ = cpu_seconds(lambda: no_pamr.extract(attn, classes, image), repeats)
    soft = seediff.soft_maps(attn, classes, (size, size))
    coarse = (soft > seediff.fg_threshold).float()
    img = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    out["PAMR (10 iterations, 2 classes, 512 px)"], _ = cpu_seconds(lambda: pamr(img, coarse, 10, (1, 2, 4)), repeats)
    t_full, result = cpu_seconds(lambda: seediff.extract(attn, classes, image), repeats)
    out["(SeeDiff with PAMR, whole)"] = t_full
    rules = FilterConfig(min_confidence=0.2, min_area=0.01, max_area=0.9, max_retries_factor=2.0)
    out["quality filter"], _ = cpu_seconds(lambda: rejection_reason(image, result, ["thing", "other"], rules), repeats)
    mask = remap_labels(result.labels, [1, 2])
    out["PNG image"], _ = cpu_seconds(lambda: encode_image(image, "png"), repeats)
    out["(JPEG image, instead of PNG)"], _ = cpu_seconds(lambda: encode_image(image, "jpg"), repeats)
    out["PNG mask"], _ = cpu_seconds(lambda: encode_mask(mask), repeats)

    out.update(writer_cpu(image, mask, seediff.params(), repeats))
    return out


def writer_cpu(image, mask, extractor_params: dict, repeats: int, n: int = 8) -> dict[str, float]:
    """CPU seconds per sample of the shard writer on PNG records: all of it, and the writes alone
    (all of it minus its encoding, timed on its own). CPU time: the writer's own clock is wall time."""
    from maskmill.shards.encode import encode_image, encode_mask, json_text
    from maskmill.shards.records import ACCEPTED, SampleRecord, build_meta
    from maskmill.shards.writer import write_shard

    size = image.shape[0]
    meta = build_meta(prompt="a thing and other", seed=0, classes=["thing", "other"], class_ids=[1, 2],
                      model="sd15-random", extractor="seediff", extractor_params=extractor_params,
                      confidence=[0.5, 0.5], mask_fraction=[0.1, 0.1], scores={}, width=size, height=size)
    records = [SampleRecord(index=i, key=f"{i:06d}", status=ACCEPTED, image=image, mask=mask, meta=meta)
               for i in range(n)]
    encode, _ = cpu_seconds(lambda: (encode_image(image, "png"), encode_mask(mask), json_text(meta)), repeats)
    with tempfile.TemporaryDirectory() as tmp:
        write_shard(Path(tmp) / "warm-up", 0, records[:1], image_format="png")  # imports, first files
        runs = iter(range(repeats))
        whole, _ = cpu_seconds(lambda: write_shard(Path(tmp) / str(next(runs)), 0, records, image_format="png"),
                               repeats)
    return {"(writer, whole: checks, encoding, writes)": whole / n,
            "writer: tar + parquet writes and checks": max(0.0, whole / n - encode)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu-step-ms", type=float, default=80.0,
                    help="one guided UNet step of a batch of --batch at 512 px on your GPU, in ms")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50, help="denoising steps per batch")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--unet-steps", type=int, default=1, help="UNet steps measured here (~20 s each at 512 px)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    print(f"SD 1.5 UNet layout (random weights), {args.size} px; torch threads {args.threads}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; CPU seconds", flush=True)
    u = unet_part(args.size, args.unet_steps)
    print(f"\n1. UNet, one guided step, batch 1 (2 with CFG), {args.unet_steps} step(s):\n"
          f"   plain {u['plain_step']:.2f} s (wall {u['plain_wall']:.2f}); with SeeDiff's capture "
          f"{u['capture_step']:.2f} s (x{u['capture_step'] / u['plain_step']:.3f}; recording {u['record_s']:.2f} s "
          "of it)", flush=True)
    parts = cpu_side(u["store"], args.size, args.repeats)
    print(f"\n2. CPU side per sample (medians of {args.repeats}; parenthesised rows are not added):")
    for name, s in parts.items():
        print(f"   {name:42s} {s * 1000:8.1f} ms")
    per_sample = sum(s for name, s in parts.items() if not name.startswith("("))
    print(f"   {'total per sample (PNG)':42s} {per_sample * 1000:8.1f} ms   "
          f"= {per_sample / u['plain_step']:.3f} of one CPU UNet step here", flush=True)

    gpu = args.steps * args.gpu_step_ms / 1000
    cpu = args.batch * per_sample
    serial = cpu / (gpu + cpu)
    overlapped = max(0.0, cpu - gpu) / max(gpu, cpu)
    print(f"\n3. GPU at {args.gpu_step_ms:.0f} ms per guided step of a batch of {args.batch}, {args.steps} steps: "
          f"{gpu:.2f} s of generation per batch; CPU side {cpu:.2f} s per batch (one core)")
    print(f"   share of the time the generator waits: serial {100 * serial:.1f} %, overlapped "
          f"{100 * overlapped:.1f} %   (break-even: {1000 * cpu / args.steps:.0f} ms per step)")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
