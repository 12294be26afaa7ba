"""Data that trains: one segmenter per labelling of the same generated images, tested on rendered scenes.

    maskmill toyworld bench-downstream [--quick] [--split test|tune] [--jobs 2]

1. Generate images once from the shapes-world run's plan (`downstream_pool.py`) and label them
   with every method; render as many oracle scenes holding the same prompted objects.
2. For every (labelling, N, training seed): write the first N samples as a maskmill run, train
   the same SegFormer for the same steps through `train-segmenter`'s code (the loader reads the
   run's shards), and score it on the plain and hard rendered test sets (`testset.py`).
3. Results go to a JSON file after every training (a long run can be stopped and resumed: cells
   already in the file are kept) and to a markdown table (`downstream_report.py`).

Training settings (steps, lr) are chosen with `--split tune` (rendered tune scenes), never on the
test scenes.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..config import ClipCheckConfig
from ..segmenter.config import SegmenterSize, TrainConfig
from ..shards import RunLayout, SampleRecord, build_meta, sample_key, write_shard
from .render import SHAPES, render
from .testset import class_labels, oracle_scene, rendered_scenes, split_rng, write_labelled_folder

ORACLE, CEILING, CLEAN = "oracle", "ceiling", "ceiling_clean"
CLIPPED, CLIP_IGNORED = "seediff_clip", "seediff_clip_ignore"  # the CLIP check's two actions
ALL_METHODS = (ORACLE, CEILING, "seediff", CLIPPED, CLIP_IGNORED, "cross", "propagated", "cross_x_propagated",
               "diffseg", "diffcut")
# the pool's own labellings (every accepted sample has them); the others label a prefix of the pool
POOL_WIDE = (ORACLE, CEILING, CLEAN, "seediff", CLIPPED, CLIP_IGNORED)
# the grid's lists: a run of a subset of them adds to a results file, the file's record keeps the union
GRID_KEYS = ("methods", "sizes", "big_sizes", "clean_sizes")
# results of other values of these cannot share a results file
SETTING_KEYS = {"split", "steps", "lr", "batch_size", "n_test", "size", "crop_scale", "clip"}
TRAIN_DEFAULTS = {k: f.default for k, f in TrainConfig.model_fields.items()}


class DownstreamConfig(BaseModel):
    """The benchmark's grid and training settings (steps and lr chosen on the tune split)."""

    model_config = ConfigDict(extra="forbid")
    work: Path = Path("outputs/downstream")
    results: Path = Path("benchmarks/results/downstream.json")
    table: Path = Path("docs/downstream.md")
    model: str = "shapes-sd"
    split: str = Field("test", pattern="^(test|tune)$")
    methods: list[str] = list(ALL_METHODS)
    sizes: list[int] = [32, 128]  # every method
    big_sizes: list[int] = [512, 2000]  # big_methods only
    big_methods: list[str] = [ORACLE, CEILING, "seediff", CLIPPED]
    clean_sizes: list[int] = [128, 512]  # the ceiling without mis-drawn samples, same N
    seeds: int = Field(3, gt=0)
    n_test: int = Field(256, gt=0)
    # The segmenter recipe: train-segmenter's defaults, chosen on the tune split (docs/downstream.md).
    size: SegmenterSize = SegmenterSize()
    steps: int = Field(TRAIN_DEFAULTS["steps"], gt=0)
    lr: float = Field(TRAIN_DEFAULTS["lr"], gt=0)
    batch_size: int = Field(TRAIN_DEFAULTS["batch_size"], gt=0)
    crop_scale: tuple[float, float] = TRAIN_DEFAULTS["crop_scale"]
    # seediff_clip: SeeDiff samples that pass the CLIP check as a run's filter.clip would apply it (README);
    # seediff_clip_ignore: the same check with action "ignore" (every sample kept, flagged classes 255)
    clip: ClipCheckConfig = ClipCheckConfig(model="shapes-clip", min_margin=0.05, action="reject")
    jobs: int = Field(2, gt=0)  # trainings in parallel, one torch thread each
    grow: bool = True  # False: another process grows the pool; wait for it

    def train_settings(self) -> dict:
        """The TrainConfig fields every cell shares."""
        return self.model_dump(mode="json", include={"size", "steps", "lr", "batch_size", "crop_scale"})

    def cells(self) -> list[tuple[str, int]]:
        """(method, N) in the order they run: small N for everyone first, then the big ones."""
        out = [(m, n) for n in self.sizes for m in self.methods]  # sizes in the given order
        out += [(CLEAN, n) for n in self.clean_sizes]
        out += [(m, n) for n in self.big_sizes for m in self.big_methods if m in self.methods]
        return sorted(set(out), key=out.index)


QUICK = dict(methods=[ORACLE, CEILING, "seediff", "cross"], sizes=[32], big_sizes=[], clean_sizes=[], seeds=2,
             n_test=128)


def write_run(root: Path, images: np.ndarray, masks: np.ndarray, classes: list[str], shard_size: int = 64,
              prompts: list[str] | None = None) -> RunLayout:
    """A maskmill run of labelled images (masks in run ids): classes.json + webdataset shards."""
    layout = RunLayout(root).create()
    layout.write_classes(classes)
    for sid, lo in enumerate(range(0, len(images), shard_size)):
        records = []
        for j, i in enumerate(range(lo, min(lo + shard_size, len(images)))):
            present = [int(c) for c in np.unique(masks[i]) if 0 < c < 255]
            meta = build_meta(prompt=prompts[i] if prompts else "", seed=i, classes=[classes[c - 1] for c in present],
                              class_ids=present, model="bench-downstream", extractor="", extractor_params={})
            records.append(SampleRecord(i, sample_key(sid, j, 5), "accepted", image=images[i], mask=masks[i],
                                        meta=meta))
        write_shard(layout.root, sid, records)
    return layout


def oracle_data(objects: list[list[tuple[str, str]]]) -> tuple[np.ndarray, np.ndarray]:
    """Rendered scenes with exact masks holding the same (colour, shape) objects as the generated ones."""
    rng = split_rng("oracle", False)
    images, masks = [], []
    for objs in objects:
        scene = oracle_scene(rng, objs)
        image, instances = render(scene)
        images.append(image)
        masks.append(class_labels(scene, instances))
    return np.stack(images), np.stack(masks)


def ignoring(clip: ClipCheckConfig) -> ClipCheckConfig:
    """The check `clip` with action "ignore": what seediff_clip_ignore applies."""
    return clip.model_copy(update={"action": "ignore"})


def labelling(pool, method: str, n: int, clip: ClipCheckConfig | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The first n training pairs of a method, or None when the pool cannot supply them.

    ceiling_clean and seediff_clip skip samples (mis-drawn ones; those the CLIP check `clip`
    rejects) and take the first n of the rest; seediff_clip_ignore keeps the first n SeeDiff
    samples with the classes that check flags set to 255 (its action "ignore")."""
    if method == ORACLE:
        return oracle_data(pool.objects[:n]) if len(pool) >= n else None
    if method == CLIP_IGNORED:
        from .downstream_pool import clip_verdicts

        if len(pool) < n:
            return None
        return np.stack(pool.images[:n]), np.stack([v.labels for v in clip_verdicts(pool, ignoring(clip))[:n]])
    if method in (CLEAN, CLIPPED):
        if method == CLEAN:
            source, keep = CEILING, [i for i in range(len(pool)) if not pool.misdrawn[i]][:n]
        else:
            from .downstream_pool import clip_kept

            source, keep = "seediff", [i for i, ok in enumerate(clip_kept(pool, clip)) if ok][:n]
        if len(keep) < n:
            return None
        return np.stack([pool.images[i] for i in keep]), np.stack([pool.labels[source][i] for i in keep])
    if pool.n_labelled(method) < n:
        return None
    return np.stack(pool.images[:n]), np.stack(pool.labels[method][:n])


def _train_and_score(job: dict) -> dict:
    """One training (in a worker process, one torch thread) and its scores on both test sets."""
    import torch

    torch.set_num_threads(1)
    from ..segmenter.evaluate import evaluate_folder
    from ..segmenter.train import train_segmenter

    cfg = TrainConfig(data=[job["run"]], out=job["out"], classes=list(SHAPES), seed=job["seed"], progress=False,
                      **job["train"])
    t0 = time.perf_counter()
    metrics = train_segmenter(cfg, log=lambda *_: None)
    from ..segmenter.model import load_model

    model = load_model(Path(job["out"]) / "model")
    scores = {name: evaluate_folder(model, folder) for name, folder in job["tests"].items()}
    return {"method": job["method"], "n": job["n"], "seed": job["seed"], "seconds": round(time.perf_counter() - t0, 1),
            "loss_last": metrics["loss_last"], **scores}


def _key(r: dict) -> tuple:
    return r["method"], r["n"], r["seed"]


def run(cfg: DownstreamConfig, log=print) -> dict:
    """Grow the pool, train every cell not yet in cfg.results, write results + table after each."""
    from .downstream_pool import Pool, grow_pool
    from .downstream_report import write_report

    t_start = time.time()
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the training processes
    work = Path(cfg.work)
    tests = {}
    for kind in ("plain", "hard"):
        folder = work / "testsets" / f"{cfg.split}-{kind}-{cfg.n_test}"
        if not (folder / "classes.json").is_file():
            write_labelled_folder(folder, *rendered_scenes(cfg.n_test, cfg.split, kind == "hard"), list(SHAPES))
        tests[kind] = str(folder)
    results = json.loads(Path(cfg.results).read_text()) if Path(cfg.results).is_file() else {}
    if results.get("settings", {}) and {k: v for k, v in results["settings"].items() if k in SETTING_KEYS} \
            != cfg.model_dump(mode="json", include=SETTING_KEYS):
        raise ValueError(f"{cfg.results} holds results of other settings; choose another --results path")
    done = {_key(r) for r in results.get("runs", [])}
    wall_before = results.get("wall_seconds", 0.0)  # a resumed benchmark adds up its sessions
    results.update(settings=merged_settings(results.get("settings", {}), cfg), runs=results.get("runs", []))
    # the table lists every labelling of the file, not only the ones of this run
    report_cfg = cfg.model_copy(update={"methods": results["settings"]["methods"]})
    pool_path = work / "pool.npz"
    pool = Pool(pool_path)
    cells = cfg.cells()
    # sizes in the order cells() lists them (--sizes 128,32 runs N=128 first)
    pending_sizes = [n for n in dict.fromkeys(n for _, n in cells)
                     if any((m, n, s) not in done for m, n2 in cells if n2 == n for s in range(cfg.seeds))]
    for n_target in pending_sizes:  # grow the pool only as far as the next size needs
        need_all = max([n for m, n in cells if m not in POOL_WIDE and n <= n_target], default=0)
        # about 18 % of the samples are mis-drawn or fail the CLIP check (140 of 782): a quarter more
        need = n_target + (n_target // 4 if any(m in (CLEAN, CLIPPED) and n == n_target for m, n in cells) else 0)
        while not cfg.grow and (len(pool) < need or pool.n_labelled("cross") < need_all):
            log(f"waiting for the pool to reach {need} samples ({len(pool)} now)")
            time.sleep(60)
            pool = Pool.reload(pool_path)
        if len(pool) < need or pool.n_labelled("cross") < need_all:
            from ..models import load_pipeline

            pipe = load_pipeline(cfg.model)
            pipe.set_progress_bar_config(disable=True)
            pool = grow_pool(pipe, pool, need, need_all, log=log)
            del pipe
        jobs = []
        for method, n in cells:
            if n != n_target:
                continue
            data = labelling(pool, method, n, cfg.clip)
            if data is None:
                log(f"skip {method} N={n}: the pool cannot supply it")
                continue
            run_dir = work / "runs" / f"{method}-{n}"
            if not (run_dir / "classes.json").is_file():
                write_run(run_dir, *data, list(SHAPES), shard_size=max(8, n // 8))
            for seed in range(cfg.seeds):
                if (method, n, seed) not in done:
                    jobs.append(dict(method=method, n=n, seed=seed, run=str(run_dir), tests=tests,
                                     train=cfg.train_settings(),
                                     out=str(work / "models" / cfg.split / f"{method}-{n}-s{seed}")))
        # spawn, not fork: the parent ran the diffusion model, and OpenMP does not survive a fork
        jobs.sort(key=lambda j: j["seed"])  # seed by seed: a run stopped early still covers every method
        with ProcessPoolExecutor(cfg.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            for fut in as_completed([ex.submit(_train_and_score, j) for j in jobs]):
                r = fut.result()
                results["runs"].append(r)
                results["pool"] = pool_summary(pool, *clip_checks_of(results["settings"]["methods"], cfg.clip))
                results["wall_seconds"] = round(time.time() - t_start + wall_before, 1)
                write_report(results, report_cfg)
                log(f"{r['method']:20s} N={r['n']:5d} seed {r['seed']}: plain {r['plain']['miou']:.3f} "
                    f"hard {r['hard']['miou']:.3f} ({r['seconds']:.0f} s)")
    results["wall_seconds"] = round(time.time() - t_start + wall_before, 1)
    write_report(results, report_cfg)
    return results


def merged_settings(previous: dict, cfg: DownstreamConfig) -> dict:
    """cfg's settings, its grid lists joined with those of the results file it adds to."""
    out = cfg.model_dump(mode="json")
    for key in GRID_KEYS:
        joined = {*previous.get(key, []), *out[key]}
        out[key] = [m for m in ALL_METHODS if m in joined] if key == "methods" else sorted(joined)
    return out


def clip_checks_of(methods: list[str], clip: ClipCheckConfig) -> tuple[ClipCheckConfig | None, ClipCheckConfig | None]:
    """The rejecting and the ignoring check the pool summary reports on (None: no such labelling)."""
    return clip if CLIPPED in methods else None, ignoring(clip) if CLIP_IGNORED in methods else None


def pool_summary(pool, clip: ClipCheckConfig | None = None, clip_ignore: ClipCheckConfig | None = None) -> dict:
    """How the generated images were made, how many are mis-drawn, per prefix size; with `clip`, how
    many that check rejects; with `clip_ignore`, how many classes and pixels that check sets to 255."""
    mis = np.array(pool.misdrawn)
    sizes = [n for n in (32, 128, 512, 2000) if n <= len(pool)]
    out = {"accepted": len(pool), "generated": pool.candidates, "misdrawn": {str(n): int(mis[:n].sum()) for n in sizes},
           "misdrawn_total": int(mis.sum())}
    if clip is not None:
        from .downstream_pool import clip_kept

        rejected = ~np.array(clip_kept(pool, clip))
        out["clip_rejected"] = {str(n): int(rejected[:n].sum()) for n in sizes}
        out["clip_rejected_total"] = int(rejected.sum())
        out["clip_rejected_misdrawn"] = int((rejected & mis).sum())
    if clip_ignore is not None:
        out["clip_ignored"] = {str(n): ignored_share(pool, clip_ignore, n) for n in sizes}
        out["clip_ignored_total"] = ignored_share(pool, clip_ignore, len(pool))
    return out


def ignored_share(pool, clip_ignore: ClipCheckConfig, n: int) -> dict:
    """What the ignoring check does to the first n samples: classes flagged (of all prompted ones),
    samples touched, and pixels turned to 255 (of all pixels, of SeeDiff's class pixels)."""
    from .downstream_pool import PRODUCT, clip_verdicts

    verdicts = clip_verdicts(pool, clip_ignore)[:n]
    before, after = np.stack(pool.labels[PRODUCT][:n]), np.stack([v.labels for v in verdicts])
    turned = (after == 255) & (before != 255)
    classes = (before > 0) & (before < 255)
    return {"classes": sum(len(v.flagged) for v in verdicts), "of_classes": sum(len(o) for o in pool.objects[:n]),
            "samples": sum(1 for v in verdicts if v.flagged), "samples_misdrawn":
                sum(1 for v, m in zip(verdicts, pool.misdrawn[:n]) if v.flagged and m),
            "pixel_share": float(turned.mean()), "class_pixel_share": float(turned.sum() / max(1, classes.sum()))}
