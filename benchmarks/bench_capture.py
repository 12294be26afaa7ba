"""Benchmark attention capture: time and peak memory of generate + capture + SeeDiff against plain generation.

Run from the repository root:

    python benchmarks/bench_capture.py --quick   # < 2 min on 2 busy cores: micro model + SD1.5 UNet at 256 px
    python benchmarks/bench_capture.py           # < ~10 min: + SD1.5 UNet at 512 px, more repeats

1. Micro model: `load_pipeline("shapes-sd")` when maskmill/assets/shapes-sd/model_index.json
   exists, else the random micro SD of `maskmill.toyworld.build` (the output says which).
   32 px, 25 DDIM steps, guidance 4, batch 8; plain `generate_plain` against
   `generate_with_attention` + SeeDiff on every sample (SeeDiff as configs/shapes.yaml sets it,
   capturing only what it reads), same prompts and seeds, in one process,
   order alternating, medians of `--repeats`. Target: ratio <= 1.10.
2. Memory flat in steps: peak RSS growth while a fresh process generates 10 and 50 steps with
   capture (and plain, for reference), plus the store's exact accumulator bytes. Target: equal.
3. SD 1.5 UNet config (860 M parameters, random weights): guided DDIM steps of the UNet called
   directly (no VAE or text encoder: a real pipeline adds the same time to both sides, so these
   ratios are upper bounds) at 256 and 512 px, batch 1, capture config = what SeeDiff reads,
   `CaptureConfig(self_blocks={16: all, 32: all, 64: ("up",)})`, then SeeDiff on the result.
   Two fresh processes per size: one generates plain, the other generates plain and then with
   capture (alternating when repeated). Extra peak memory = peak RSS while the second generates
   with capture + SeeDiff - peak RSS while the first generates plain (the kernel's peak mark is
   reset after the model is built: /proc/self/clear_refs). The ratio is printed as measured
   (1-2 steps, where SeeDiff's per-image cost weighs heavily) and projected to SeeDiff's 50 steps
   from the per-step and per-image parts.
   Targets at 512 px: ratio <= 1.15, extra peak <= 0.5 GB.

Times are CPU seconds of the process (robust when other jobs share the cores) and wall seconds;
ratios use CPU time. Torch runs on `--threads` threads (default 1: on 2 cores shared with a
background job, two threads spin against it and run slower, not faster). `--json PATH` writes
all figures.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ALL = ("down", "mid", "up")
SEEDIFF_SELF_BLOCKS = {16: ALL, 32: ALL, 64: ("up",)}
SEEDIFF_STEPS = 50
MICRO_PROMPTS = ["a red circle", "a blue square and a green triangle", "a yellow star", "a green circle",
                 "a red triangle and a blue star", "a blue square", "a yellow circle and a red square",
                 "a green star"]
MICRO_ASSET = ROOT / "maskmill" / "assets" / "shapes-sd" / "model_index.json"


def peak_rss_mb() -> float:
    """Peak RSS of this process (since the last `reset_peak`, where the kernel allows it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_peak_mb(fn) -> tuple[float, float]:
    """(peak RSS while `fn` runs, its growth above the RSS when `fn` started), in MB."""
    before = rss_mb()
    reset_peak()
    fn()
    peak = peak_rss_mb()
    return peak, peak - before


def setup_torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    return torch


class Clock:
    """CPU and wall seconds of a block: `with Clock() as c: ...; c.cpu, c.wall`."""

    def __enter__(self):
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu = time.process_time() - self._cpu
        self.wall = time.perf_counter() - self._wall


# --- micro model -------------------------------------------------------------------------------

def micro_pipeline():
    """(pipe, description): the trained shapes model if present, else the random micro SD."""
    if MICRO_ASSET.exists():
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        from maskmill.models import load_pipeline

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()

        return load_pipeline("shapes-sd", device="cpu"), "shapes-sd (trained, maskmill/assets/shapes-sd)"
    from maskmill.toyworld.build import build_pipeline

    pipe = build_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe, "random micro SD (shapes-sd not trained yet: no maskmill/assets/shapes-sd/model_index.json)"


def micro_classes(tokenizer, prompt: str):
    """Each 'a <colour> <shape>' phrase of a caption is a class, seeded by all its tokens."""
    from maskmill.extractors import ClassSpec
    from maskmill.tokens import phrase_token_indices

    phrases = [p.strip().removeprefix("a ").strip() for p in prompt.split(" and ")]
    return [ClassSpec(p, phrase_token_indices(tokenizer, prompt, p)) for p in phrases]


def micro_extractor(pipe):
    """(extractor, capture config): SeeDiff as the shapes-world run configures it (configs/shapes.yaml),
    capturing only what it reads."""
    from maskmill.extractors import get_extractor
    from maskmill.generate import latent_hw
    from maskmill.toyworld.bench_masks import shapes_config_params

    name, params = next(iter(shapes_config_params().items()), ("seediff", {}))
    extractor = get_extractor(name, **params)
    return extractor, extractor.capture_config(pipe.unet, latent_hw(pipe, 32, 32))


def bench_micro(repeats: int, steps: int, batch: int) -> dict:
    from maskmill.generate import GenerationSettings, generate_plain, generate_with_attention

    pipe, what = micro_pipeline()
    prompts = (MICRO_PROMPTS * (batch // len(MICRO_PROMPTS) + 1))[:batch]
    seeds = list(range(batch))
    classes = [micro_classes(pipe.tokenizer, p) for p in prompts]
    extractor, capture_config = micro_extractor(pipe)

    def plain(s):
        generate_plain(pipe, prompts, seeds, s)

    def capture(s):
        images, maps = generate_with_attention(pipe, prompts, seeds, s, capture_config)
        for m, c, im in zip(maps, classes, images):
            extractor.extract(m, c, im)

    warm = GenerationSettings(steps=2, guidance=4.0, height=32, width=32)
    plain(warm)
    capture(warm)
    settings = GenerationSettings(steps=steps, guidance=4.0, height=32, width=32)
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "capture": []}
    for r in range(repeats):
        order = ("plain", "capture") if r % 2 == 0 else ("capture", "plain")
        for name in order:
            with Clock() as c:
                (plain if name == "plain" else capture)(settings)
            times[name].append((c.cpu, c.wall))
    med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}
    return {"model": what, "extractor": {extractor.name: extractor.params()}, "steps": steps, "batch": batch,
            "times": times, "median": med,
            "ratio_cpu": med["capture"][0] / med["plain"][0], "ratio_wall": med["capture"][1] / med["plain"][1]}


def worker_micro_memory(mode: str, steps: int, batch: int) -> dict:
    """One fresh process: generate once (plain or with capture) and report peak RSS and store bytes."""
    from maskmill.capture import capture_attention
    from maskmill.generate import GenerationSettings, generate_plain, latent_hw

    pipe, _ = micro_pipeline()
    prompts = (MICRO_PROMPTS * (batch // len(MICRO_PROMPTS) + 1))[:batch]
    seeds = list(range(batch))
    settings = GenerationSettings(steps=steps, guidance=4.0, height=32, width=32)
    generate_plain(pipe, prompts, seeds, GenerationSettings(steps=1, guidance=4.0, height=32, width=32))  # warm-up
    store_bytes = 0

    def run():
        nonlocal store_bytes
        if mode == "plain":
            generate_plain(pipe, prompts, seeds, settings)
            return
        with capture_attention(pipe.unet, micro_extractor(pipe)[1], batch_size=batch, cfg=True,
                               latent_hw=latent_hw(pipe, 32, 32), num_steps=steps) as store:
            generate_plain(pipe, prompts, seeds, settings)
        tensors = [*store.cross.values(), *store.self_attn.values(), *store.features.values()]
        store_bytes = sum(t.numel() * t.element_size() for t in tensors)
        store.results()

    peak, growth = run_peak_mb(run)
    return {"mode": mode, "steps": steps, "peak_rss_mb": peak, "growth_mb": growth,
            "store_bytes": store_bytes}


# --- SD 1.5 UNet config ------------------------------------------------------------------------

def sd15_unet():
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    ).eval()


class SD15Run:
    """Guided DDIM steps of the SD1.5 UNet on random latents and text states; batch 1 (2 with CFG)."""

    def __init__(self, unet, size: int, steps: int, guidance: float = 7.0):
        import torch
        from diffusers import DDIMScheduler

        self.unet, self.size, self.steps, self.guidance = unet, size, steps, guidance
        self.latent = size // 8
        self.scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        g = torch.Generator().manual_seed(0)
        self.latents0 = torch.randn(1, 4, self.latent, self.latent, generator=g)
        self.text = torch.randn(2, 77, 768, generator=g)  # [unconditional, conditional]
        self.store_bytes = 0

    def generate(self):
        import torch

        self.scheduler.set_timesteps(self.steps)
        x = self.latents0.clone()
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                eps = self.unet(torch.cat([x, x]), t, encoder_hidden_states=self.text).sample
                uncond, cond = eps.chunk(2)
                x = self.scheduler.step(uncond + self.guidance * (cond - uncond), t, x).prev_sample
        return x

    def generate_capture_extract(self, **capture_options) -> tuple[Clock, Clock]:
        """Generate with capture, then SeeDiff; returns the clocks of both parts."""
        import numpy as np

        from maskmill.capture import CaptureConfig, capture_attention
        from maskmill.extractors import ClassSpec
        from maskmill.extractors.seediff import SeeDiffExtractor

        config = CaptureConfig(self_blocks=SEEDIFF_SELF_BLOCKS, **capture_options)
        with Clock() as gen:
            with capture_attention(self.unet, config, batch_size=1, cfg=True, latent_hw=(self.latent, self.latent),
                                   num_steps=self.steps) as store:
                self.generate()
        with Clock() as ext:
            sample = store.results()[0]
            image = np.zeros((self.size, self.size, 3), dtype=np.uint8)
            SeeDiffExtractor().extract(sample, [ClassSpec("thing", (4,)), ClassSpec("other", (6, 7))], image)
        self.store_bytes = sum(t.numel() * t.element_size() for t in [*store.cross.values(), *store.self_attn.values()])
        return gen, ext

    def warm_up(self):
        import torch

        with torch.no_grad():  # first-call set-up (kernels, allocator) at a tiny size
            self.unet(torch.randn(2, 4, 8, 8), 500, encoder_hidden_states=self.text)


def worker_sd15(mode: str, size: int, steps: int, repeats: int) -> dict:
    """plain: one plain run. capture: `repeats` pairs of (plain, capture + SeeDiff), order alternating."""
    with Clock() as build:
        run = SD15Run(sd15_unet(), size, steps)
    run.warm_up()
    out = {"mode": mode, "size": size, "steps": steps, "build_s": build.wall, "peak_after_build_mb": peak_rss_mb(),
           "plain": [], "capture": [], "extract": [], "plain_peak_mb": [], "capture_peak_mb": []}
    for r in range(repeats if mode == "capture" else 1):
        order = ("plain", "capture") if r % 2 == 0 else ("capture", "plain")
        for m in order if mode == "capture" else ("plain",):
            if m == "plain":
                with Clock() as c:
                    out["plain_peak_mb"].append(run_peak_mb(run.generate))
                out["plain"].append((c.cpu, c.wall))
            else:
                clocks = []
                out["capture_peak_mb"].append(run_peak_mb(lambda: clocks.extend(run.generate_capture_extract())))
                gen, ext = clocks
                out["capture"].append((gen.cpu, gen.wall))
                out["extract"].append((ext.cpu, ext.wall))
    out["store_bytes"] = run.store_bytes
    return out


# --- driver ------------------------------------------------------------------------------------

def in_subprocess(args: list[str], threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def med(pairs, i: int = 0) -> float:
    return statistics.median(p[i] for p in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="under 2 minutes: SD1.5 at 256 px only, fewer repeats")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="micro-model repeats (default 5, quick 3)")
    ap.add_argument("--sd15-sizes", type=int, nargs="*", default=None, help="default 256 512 (quick: 256)")
    ap.add_argument("--sd15-steps", type=int, default=1)
    ap.add_argument("--sd15-repeats", type=int, default=None, help="plain/capture pairs (default 2, quick 1)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", choices=["micro-mem", "sd15"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="capture", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=256, help=argparse.SUPPRESS)
    args = ap.parse_args()
    setup_torch(args.threads)

    if args.worker == "micro-mem":
        print(json.dumps(worker_micro_memory(args.mode, args.steps, 8)))
        return
    if args.worker == "sd15":
        print(json.dumps(worker_sd15(args.mode, args.size, args.steps, args.repeats or 1)))
        return

    t_all = time.perf_counter()
    repeats = args.repeats or (3 if args.quick else 5)
    sd15_repeats = args.sd15_repeats or (1 if args.quick else 2)
    sizes = args.sd15_sizes if args.sd15_sizes is not None else ([256] if args.quick else [256, 512])
    report: dict = {"threads": args.threads, "quick": args.quick}
    print(f"torch threads: {args.threads}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          "times are CPU s (wall s)", flush=True)

    m = bench_micro(repeats, steps=25, batch=8)
    report["micro"] = m
    (pc, pw), (cc, cw) = m["median"]["plain"], m["median"]["capture"]
    print(f"\n[1] micro model: {m['model']}\n    32 px, 25 steps, guidance 4, batch 8, medians of {repeats} "
          f"alternating repeats; extractor as configs/shapes.yaml sets it: {m['extractor']}")
    print(f"    plain {pc:.2f} s ({pw:.2f}); generate + capture + SeeDiff on 8 samples {cc:.2f} s ({cw:.2f})")
    print(f"    ratio {m['ratio_cpu']:.3f} (wall {m['ratio_wall']:.3f})   target <= 1.10: "
          f"{mark(m['ratio_cpu'] <= 1.10)}", flush=True)

    mem = {}
    for mode, steps in ([("capture", 10), ("capture", 50)] + ([] if args.quick else [("plain", 10)])):
        mem[f"{mode}-{steps}"] = in_subprocess(["--worker", "micro-mem", "--mode", mode, "--steps", str(steps)],
                                               args.threads)
    report["micro_memory"] = mem
    c10, c50 = mem["capture-10"], mem["capture-50"]
    print("\n[2] micro model, batch 8, one fresh process each: flat in steps?")
    for k, v in mem.items():
        print(f"    {k:>11}: peak RSS growth while generating {v['growth_mb']:+.1f} MB, "
              f"store {v['store_bytes'] / 1e6:.2f} MB")
    print(f"    store bytes equal at 10 and 50 steps: {mark(c10['store_bytes'] == c50['store_bytes'])}; "
          f"peak growth 50 steps - 10 steps: {c50['growth_mb'] - c10['growth_mb']:+.1f} MB", flush=True)

    report["sd15"] = {}
    n = args.sd15_steps
    for size in sizes:
        plain = in_subprocess(["--worker", "sd15", "--mode", "plain", "--size", str(size), "--steps", str(n)],
                              args.threads)
        cap = in_subprocess(["--worker", "sd15", "--mode", "capture", "--size", str(size), "--steps", str(n),
                             "--repeats", str(sd15_repeats)], args.threads)
        # peak RSS while generating (the kernel's mark reset just before the run), fresh process each
        plain_peak = max(pk for pk, _ in plain["plain_peak_mb"])
        cap_peak = max(pk for pk, _ in cap["capture_peak_mb"])
        extra_gb = (cap_peak - plain_peak) / 1024
        p, g, e = med(cap["plain"]), med(cap["capture"]), med(cap["extract"])
        measured = (g + e) / p
        per_step = g / p  # capture cost per denoising step, relative
        projected = (SEEDIFF_STEPS * g / n + e) / (SEEDIFF_STEPS * p / n)
        entry = {"plain_process": plain, "capture_process": cap, "extra_peak_gb": extra_gb,
                 "ratio_measured": measured, "ratio_per_step": per_step, "ratio_projected_50_steps": projected}
        report["sd15"][size] = entry
        print(f"\n[3] SD1.5 UNet config, {size} px, {n} guided step(s), batch 1, self-attention "
              f"{ {k: '+'.join(v) for k, v in SEEDIFF_SELF_BLOCKS.items()} }; {len(cap['plain'])} pair(s) in one "
              f"process, order alternating; model build {plain['build_s']:.0f} s")
        print(f"    plain {p:.1f} s ({med(cap['plain'], 1):.1f}); with capture {g:.1f} s ({med(cap['capture'], 1):.1f}); "
              f"SeeDiff on the sample {e:.2f} s ({med(cap['extract'], 1):.2f})")
        target = "   target <= 1.15: " + mark(projected <= 1.15) if size == 512 else ""
        print(f"    ratio measured {measured:.3f}; capture per step {per_step:.3f}; "
              f"projected to {SEEDIFF_STEPS} steps {projected:.3f}{target}")
        target = f"   target <= 0.5 GB: {mark(extra_gb <= 0.5)}" if size == 512 else ""
        print(f"    peak RSS while generating, fresh processes: plain {plain_peak / 1024:.2f} GB, capture + SeeDiff "
              f"{cap_peak / 1024:.2f} GB: extra {extra_gb:+.2f} GB (store {cap['store_bytes'] / 1e6:.0f} MB){target}")
        print(f"    (same process, growth above the resting model: plain "
              f"{max(g for _, g in cap['plain_peak_mb']):.0f} MB, capture + SeeDiff "
              f"{max(g for _, g in cap['capture_peak_mb']):.0f} MB)", flush=True)

    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
