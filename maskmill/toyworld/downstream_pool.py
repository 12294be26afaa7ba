"""The generated images of `bench-downstream`, made once and labelled by every method.

Samples follow the shapes-world run's own plan (configs/shapes.yaml: prompts, seeds, SeeDiff
with its parameters and its filter): candidate indices 0, 1, ... are generated in order and the
accepted ones form the pool, so a pool of N is the first N samples a `maskmill generate` run of
that config accepts. Each pooled sample carries, as run class ids (0 background, 255 ignore):
- "seediff": the product's mask (the one the filter judged);
- "ceiling": truth recovered from the image's own colours (`recover.py`; other colours 255);
- the other extractors' masks, for the first `n_all_methods` samples only (they need other
  capture windows, so those images are generated again: capture never changes an image);
and `misdrawn`: some prompted object is drawn as another shape (or not at all), which the
colour-recovered truth cannot see. `clip_verdicts` says what a run's CLIP check (`filter.clip`)
makes of each sample: kept or rejected, and its labels as the check's action leaves them.

The pool is saved after every batch (pool.npz) and extended on the next call, so a long
benchmark can grow it step by step.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_save_npz, atomic_write_bytes
from ..capture import CaptureConfig
from ..config import ClipCheckConfig, load_config
from ..extractors import get_extractor
from ..generate import generate_with_attention
from ..plan import RunPlan
from ..produce import capture_config_for, class_specs, clip_check_for, rejection_reason, settings_of
from ..shards.records import remap_labels
from .recover import MIN_REGION_PIXELS, classify_shape, recover_masks
from .render import SHAPES

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "shapes.yaml"
PRODUCT = "seediff"
OTHER_METHODS = ("cross", "propagated", "cross_x_propagated", "diffseg", "diffcut")


def shapes_run_config():
    return load_config(CONFIG, check_files=False)


def misdrawn(image: np.ndarray, colours: list[str], shapes: list[str]) -> bool:
    """Some prompted object is missing or its recovered region fits another shape best."""
    labels, _ = recover_masks(image, colours)
    for k, shape in enumerate(shapes):
        region = labels == k + 1
        if region.sum() < MIN_REGION_PIXELS or classify_shape(region)[0] != shape:
            return True
    return False


class Pool:
    """Arrays of the pooled samples; `labels[method]` is (n, H, W) uint8 run ids."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.images: list[np.ndarray] = []
        self.labels: dict[str, list[np.ndarray]] = {PRODUCT: [], "ceiling": [], **{m: [] for m in OTHER_METHODS}}
        self.prompts: list[str] = []
        self.objects: list[list[tuple[str, str]]] = []  # (colour, shape) per prompted object
        self.misdrawn: list[bool] = []
        self.indices: list[int] = []  # each sample's candidate index in the plan
        self.next_index = 0  # next candidate index of the plan
        self.candidates = 0  # generated (accepted + rejected)
        # clip_verdicts', per check config (its action included); in memory only: 2 ms a sample
        self.clip_verdicts: dict[ClipCheckConfig, list[ClipVerdict]] = {}
        if self.path.exists():
            self._load()

    @classmethod
    def reload(cls, path: Path, tries: int = 5) -> "Pool":
        """Read a pool another process is growing (its two files may be caught between writes)."""
        for _ in range(tries - 1):
            try:
                return cls(path)
            except (RuntimeError, OSError, ValueError, KeyError):
                time.sleep(5)
        return cls(path)

    def __len__(self) -> int:
        return len(self.images)

    def n_labelled(self, method: str) -> int:
        return len(self.labels[method])

    def _load(self) -> None:
        with np.load(self.path) as z:
            self.images = list(z["images"])
            for m in self.labels:
                self.labels[m] = list(z[f"labels_{m}"]) if z[f"labels_{m}"].size else []
            self.misdrawn = [bool(v) for v in z["misdrawn"]]
        info = json.loads(self.path.with_suffix(".json").read_text())
        self.prompts, self.indices = info["prompts"], info["indices"]
        self.next_index, self.candidates = info["next_index"], info["candidates"]
        self.objects = [[tuple(o) for o in objs] for objs in info["objects"]]
        if len(self.prompts) != len(self.images):
            raise RuntimeError(f"{self.path}: images and their records differ in length (being written?)")

    def save(self) -> None:
        arrays = {"images": np.stack(self.images), "misdrawn": np.array(self.misdrawn)}
        for m, v in self.labels.items():
            arrays[f"labels_{m}"] = np.stack(v) if v else np.zeros((0,), np.uint8)
        atomic_save_npz(self.path, arrays)
        atomic_write_bytes(self.path.with_suffix(".json"), json.dumps(
            {"prompts": self.prompts, "indices": self.indices, "objects": self.objects, "next_index": self.next_index,
             "candidates": self.candidates}).encode())


@dataclass(frozen=True)
class ClipVerdict:
    """A pooled sample under a CLIP check: kept or rejected, the classes it flagged, and its SeeDiff
    labels (run ids) as the check's action leaves them (flagged classes at 255 under "ignore")."""

    keep: bool
    flagged: tuple[str, ...]
    labels: np.ndarray


def clip_verdicts(pool: Pool, config: ClipCheckConfig) -> list[ClipVerdict]:
    """Per pooled sample: what the CLIP check `config` makes of its SeeDiff mask, as a run's filter.clip
    judges it (every prompted class's region scored against the run's classes). Cached on the pool."""
    done = pool.clip_verdicts.setdefault(config, [])
    todo = range(len(done), len(pool))
    if todo:
        names = [[shape for _, shape in pool.objects[i]] for i in todo]
        # the pool holds run ids (1 + SHAPES index); the check reads 1..K in the prompt's class order
        local = [_prompt_ids(pool.labels[PRODUCT][i], n) for i, n in zip(todo, names)]
        decisions = clip_check_for(config).check([pool.images[i] for i in todo], local, names, list(SHAPES))
        for i, d in zip(todo, decisions):
            # the check's 255s (its "ignore" action) laid over the run ids it was given
            labels = np.where(d.labels == 255, 255, pool.labels[PRODUCT][i]).astype(np.uint8)
            done.append(ClipVerdict(d.keep, tuple(d.flagged), labels))
    return done


def clip_kept(pool: Pool, config: ClipCheckConfig) -> list[bool]:
    """Per pooled sample: does it pass the CLIP check `config`?"""
    return [v.keep for v in clip_verdicts(pool, config)]


def _prompt_ids(run_labels: np.ndarray, names: list[str]) -> np.ndarray:
    out = np.where(run_labels == 255, 255, 0).astype(np.uint8)
    for k, name in enumerate(names, 1):
        out[run_labels == SHAPES.index(name) + 1] = k
    return out


def grow_pool(pipe, pool: Pool, n: int, n_all_methods: int, batch: int = 16, log=print) -> Pool:
    """Generate until the pool holds `n` accepted samples, the first `n_all_methods` labelled by every method."""
    cfg = shapes_run_config()
    plan = RunPlan(cfg)
    ids = plan.class_ids()
    settings = settings_of(cfg)
    product = get_extractor(cfg.extractor.name, **cfg.extractor.params)
    others = {m: get_extractor(m) for m in OTHER_METHODS}
    product_capture = capture_config_for(product, pipe, cfg.height, cfg.width)
    windows: dict[tuple, CaptureConfig] = {}
    for m, ex in others.items():  # one generation per capture window, as bench-masks does
        c = capture_config_for(ex, pipe, cfg.height, cfg.width)
        w = windows.setdefault(c.steps, CaptureConfig(steps=c.steps))
        w.feature_modules.update(c.feature_modules)
    while len(pool) < n or pool.n_labelled("cross") < min(n_all_methods, len(pool)):
        if len(pool) < n:
            samples = [plan.sample(i) for i in range(pool.next_index, pool.next_index + batch)]
            images, attns = generate_with_attention(pipe, [s.prompt.text for s in samples],
                                                    [s.seed for s in samples], settings, product_capture)
            for s, image, attn in zip(samples, images, attns):
                result = product.extract(attn, class_specs(pipe.tokenizer, s.prompt), image)
                pool.candidates += 1
                if not rejection_reason(image, result, s.class_names, cfg.filter):
                    _add(pool, s, image, result.labels, ids)
            pool.next_index += batch
        for lo in range(pool.n_labelled("cross"), min(n_all_methods, len(pool)), batch):
            todo = list(range(lo, min(lo + batch, n_all_methods, len(pool))))
            _label_others(pipe, pool, todo, windows, others, ids, settings, plan)
        pool.save()
        log(f"pool: {len(pool)} accepted of {pool.candidates} generated "
            f"({sum(pool.misdrawn)} mis-drawn), {pool.n_labelled('cross')} labelled by every method")
    pool.save()
    return pool


def _add(pool: Pool, s, image: np.ndarray, product_labels: np.ndarray, ids: dict[str, int]) -> None:
    run_ids = [ids[c] for c in s.class_names]
    colours = [c.phrase.split()[0] for c in s.prompt.classes]  # seed phrases are "<colour> <shape>"
    pool.images.append(image)
    pool.prompts.append(s.prompt.text)
    pool.indices.append(s.index)
    pool.objects.append(list(zip(colours, s.class_names)))
    pool.labels[PRODUCT].append(remap_labels(product_labels, run_ids).astype(np.uint8))
    pool.labels["ceiling"].append(remap_labels(recover_masks(image, colours)[0], run_ids).astype(np.uint8))
    pool.misdrawn.append(misdrawn(image, colours, s.class_names))


def _label_others(pipe, pool: Pool, todo: list[int], windows, others, ids, settings, plan) -> None:
    """Label pooled samples `todo` (the next ones in order) with every other method."""
    assert todo and todo[0] == pool.n_labelled("cross"), "other methods label the pool in order"
    samples = [plan.sample(pool.indices[i]) for i in todo]
    prompts, seeds = [s.prompt.text for s in samples], [s.seed for s in samples]
    out: dict[str, list[np.ndarray]] = {m: [] for m in others}
    for window, capture in windows.items():
        images, attns = generate_with_attention(pipe, prompts, seeds, settings, capture)
        for i, image in zip(todo, images):
            if not np.array_equal(image, pool.images[i]):
                raise RuntimeError(f"pooled sample {i} came out different when generated again")
        for m, ex in others.items():
            if capture_config_for(ex, pipe, settings.height, settings.width).steps != window:
                continue
            for s, image, attn in zip(samples, images, attns):
                res = ex.extract(attn, class_specs(pipe.tokenizer, s.prompt), image)
                out[m].append(remap_labels(res.labels, [ids[c] for c in s.class_names]).astype(np.uint8))
    for m, v in out.items():
        pool.labels[m] += v

