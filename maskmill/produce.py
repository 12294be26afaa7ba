"""Generate -> extract -> filter: the one loop that turns prompts into judged samples.

`judged_samples` generates candidates batch by batch with attention capture, extracts their
masks and judges each with the run's filter rules until enough are accepted. Two callers:
`produce_shard` (a dataset shard: every judged sample becomes a shard record) and
`prototypes.support.generate_support` (an OVDiff support set: accepted samples become fg/bg
masks). No Prefect here: `tasks/` wraps `produce_shard`. The pipeline is passed in (loaded
once per worker process); everything else follows from the config and the shard id.

On a GPU, generation runs one batch ahead on a thread of its own (`batch_feed`): while batch k
is extracted, judged, encoded and written, batch k+1 is generated, so the GPU does not idle on
the CPU side. The batches and the output bytes are those of the serial loop (`overlap_for`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Generic, Protocol, TypeVar

import numpy as np

from .capture import CaptureConfig
from .config import ClipCheckConfig, FilterConfig, RunConfig
from .extractors import ClassSpec, Extractor, MaskResult, get_extractor
from .batch_feed import BatchFeed, Budget
from .capture import SampleAttention
from .generate import GenerationSettings, generate_with_attention, latent_hw
from .plan import RunPlan
from .prompts import Prompt
from .shards.records import ACCEPTED, REJECTED, SampleRecord, build_meta, remap_labels
from .shards.timing import StageClock
from .shards.writer import ShardStats, write_shard
from .tokens import phrase_token_indices

GenerationGate = Callable[[], contextlib.AbstractContextManager]


class Candidate(Protocol):
    """What the loop generates: a prompt (text + classes with their seed phrases) and a seed."""

    prompt: Prompt
    seed: int


C = TypeVar("C", bound=Candidate)


@dataclass(frozen=True)
class Judged(Generic[C]):
    """One generated candidate with its extracted masks and verdict ('' = accepted)."""

    candidate: C
    image: np.ndarray
    result: MaskResult
    reason: str

    @property
    def accepted(self) -> bool:
        return not self.reason


def overlap_for(pipe, setting: str = "auto") -> bool:
    """Generate one batch ahead? "on"/"off" as said; "auto": only when the pipeline is on an accelerator.

    On a CPU the generating thread and the consumer share the cores and the interpreter lock: the
    overlap then costs more than it hides (bench_overlap.py: slower than serial in 7 rounds of 8)."""
    if setting != "auto":
        return setting == "on"
    device = getattr(pipe, "device", None)
    return device is not None and device.type != "cpu"


def settings_of(cfg: RunConfig) -> GenerationSettings:
    return GenerationSettings(steps=cfg.steps, guidance=cfg.guidance, height=cfg.height, width=cfg.width)


def capture_config_for(extractor: Extractor, pipe, height: int, width: int) -> CaptureConfig:
    """Record only what the extractor reads (it knows), else everything."""
    wants = getattr(extractor, "capture_config", None)
    if callable(wants):
        return wants(pipe.unet, latent_hw(pipe, height, width))
    return CaptureConfig()


def mask_fractions(result: MaskResult, n_classes: int) -> list[float]:
    """Fraction of the image each class's mask covers (label k + 1 for the k-th class)."""
    area = result.labels.size
    return [round(float((result.labels == k + 1).sum()) / area, 6) for k in range(n_classes)]


def rejection_reason(image: np.ndarray, result: MaskResult, names: list[str], rules: FilterConfig,
                     require_mask: bool = False) -> str:
    """'' when the sample is usable, else why not: the first rule that fails and its class.

    require_mask: also refuse a class whose mask is empty (the generator missed the class),
    whatever min_area says. Reasons carry no numbers, so stats count them as a histogram; the
    numbers are in the sample's metadata (`confidence`, `mask_fraction`).
    """
    if not np.isfinite(image.astype(np.float32)).all():
        return "nan image"
    if image.std() < 2.0:
        return "blank image"
    for k, (name, conf, frac) in enumerate(zip(names, result.confidence, mask_fractions(result, len(names)))):
        if require_mask and not (result.labels == k + 1).any():
            return f"empty mask: {name}"
        if not np.isfinite(conf) or conf < rules.min_confidence:
            return f"low confidence: {name}"
        if frac < rules.min_area:
            return f"small mask: {name}"
        if frac > rules.max_area:
            return f"mask covers the image: {name}"
    return ""


def class_specs(tokenizer, prompt: Prompt) -> list[ClassSpec]:
    return [ClassSpec(c.name, phrase_token_indices(tokenizer, prompt.text, c.phrase)) for c in prompt.classes]


@dataclass
class GeneratedBatch(Generic[C]):
    """One generation call's output: per candidate its classes, image and captured attention."""

    candidates: list[C]
    specs: list[list[ClassSpec]]
    images: list[np.ndarray]
    attns: list[SampleAttention]

    def __len__(self) -> int:
        return len(self.candidates)


def judged_samples(pipe, extractor: Extractor, candidates: Iterable[C], need: int, settings: GenerationSettings,
                   rules: FilterConfig, batch_size: int, generation_gate: GenerationGate | None = None,
                   require_mask: bool = False, overlap: bool | None = None,
                   clock: StageClock | None = None, prompt_classes: list[str] | None = None) -> Iterator[Judged[C]]:
    """Judged candidates, in order, until `need` are accepted or the candidates run out.

    Each batch asks for no more than the samples still missing, so no image is generated in vain
    and the batches depend only on the inputs. `generation_gate()`, if given, is entered around
    each batch's generation only (not extraction), e.g. a Prefect global concurrency slot per GPU.

    overlap: generate the next batch on a thread of its own while this one is extracted, judged
    and consumed (written) by the caller (batch_feed.BatchFeed: the same batches as without, at
    most two batches of maps in memory); None: `overlap_for(pipe)`. `clock` gets the generation
    and extraction seconds.
    With `rules.clip` set, each batch's accepted samples also pass the CLIP check (`clip_judged`);
    `prompt_classes` are the texts their regions are scored against (default: the batch's classes).
    """
    gate = generation_gate or contextlib.nullcontext
    overlap = overlap_for(pipe) if overlap is None else overlap
    capture = capture_config_for(extractor, pipe, settings.height, settings.width)
    candidates = iter(candidates)
    clock = clock or StageClock()
    clock.overlapped_run = overlap

    def make_batch(size: int) -> GeneratedBatch[C] | None:
        batch = list(islice(candidates, size))
        if not batch:
            return None  # the candidates are used up: the caller reports the shortfall
        # the tokenizer on the generating thread only (a fast tokenizer is not to be shared between threads)
        specs = [class_specs(pipe.tokenizer, c.prompt) for c in batch]
        with gate():
            started, timing = time.perf_counter(), {}
            images, attns = generate_with_attention(pipe, [c.prompt.text for c in batch], [c.seed for c in batch],
                                                    settings, capture, timing=timing)
            clock.add_generation(time.perf_counter() - started, timing.get("capture", 0.0))
        return GeneratedBatch(batch, specs, images, attns)

    budget = Budget(need, batch_size)
    feed = BatchFeed(make_batch, budget, ahead=overlap, on_wait=clock.add_wait)
    clip = clip_check_for(rules.clip) if rules.clip is not None else None
    try:
        for generated in feed:
            verdicts = []
            for k, (candidate, image) in enumerate(zip(generated.candidates, generated.images)):
                with clock.timed("capture_extraction"):
                    result = extractor.extract(generated.attns[k], generated.specs[k], image)
                    generated.attns[k] = None  # this sample's maps are done with
                    names = [c.name for c in candidate.prompt.classes]
                    verdicts.append(Judged(candidate, image, result,
                                           rejection_reason(image, result, names, rules, require_mask)))
            if clip is not None:
                with clock.timed("capture_extraction"):
                    verdicts = clip_judged(clip, verdicts, prompt_classes)
            for judged in verdicts:
                budget.judged(accepted=judged.accepted)
                yield judged
            del generated, verdicts
    finally:
        feed.close()


@functools.lru_cache(maxsize=2)
def clip_check_for(config: ClipCheckConfig):
    """The CLIP check of a config, its model loaded once per process."""
    from .clipcheck import ClipCheck

    return ClipCheck(config)


def clip_judged(clip, verdicts: list[Judged[C]], prompt_classes: list[str] | None) -> list[Judged[C]]:
    """The batch's verdicts after the CLIP check of every accepted sample's class regions (one batch
    through the image encoder): a mismatch rejects the sample (`clip mismatch: <class>`) or, with
    action "ignore", turns that class's pixels to 255."""
    todo = [i for i, j in enumerate(verdicts) if j.accepted]
    if not todo:
        return verdicts
    decisions = clip.check([verdicts[i].image for i in todo], [verdicts[i].result.labels for i in todo],
                           [[c.name for c in verdicts[i].candidate.prompt.classes] for i in todo], prompt_classes)
    out = list(verdicts)
    for i, d in zip(todo, decisions):
        j = verdicts[i]
        out[i] = Judged(j.candidate, j.image, dataclasses.replace(j.result, labels=d.labels), "" if d.keep else d.reason)
    return out


def shard_records(cfg: RunConfig, plan: RunPlan, shard_id: int, pipe, extractor: Extractor,
                  progress=None, generation_gate: GenerationGate | None = None, overlap: bool | None = None,
                  clock: StageClock | None = None) -> Iterator[SampleRecord]:
    """Records of one shard, accepted and rejected, until its quota of accepted samples is met."""
    ids = plan.class_ids()
    for judged in judged_samples(pipe, extractor, plan.candidates(shard_id), plan.quota(shard_id), settings_of(cfg),
                                 cfg.filter, cfg.batch_size, generation_gate, overlap=overlap, clock=clock,
                                 prompt_classes=list(cfg.classes)):
        sample, result = judged.candidate, judged.result
        names = sample.class_names
        meta = build_meta(prompt=sample.prompt.text, seed=sample.seed, classes=names,
                          class_ids=[ids[n] for n in names], model=cfg.model, extractor=extractor.name,
                          extractor_params=extractor.params(), confidence=result.confidence.tolist(),
                          mask_fraction=mask_fractions(result, len(names)), scores={"index": sample.index},
                          width=cfg.width, height=cfg.height)
        if judged.accepted:
            yield SampleRecord(index=sample.index, key=sample.key, status=ACCEPTED, image=judged.image,
                               mask=remap_labels(result.labels, [ids[n] for n in names]), meta=meta)
        else:
            yield SampleRecord(index=sample.index, key=sample.key, status=REJECTED, reason=judged.reason, meta=meta)
        if progress is not None:
            progress(1)


def produce_shard(cfg: RunConfig, shard_id: int, pipe, run_dir, extractor: Extractor | None = None,
                  progress=None, generation_gate: GenerationGate | None = None,
                  overlap: bool | None = None) -> ShardStats:
    """Generate, extract, filter and write shard `shard_id`; returns its stats (written last).

    overlap: the next batch is generated while this one is extracted, encoded and written (same
    bytes as without; see judged_samples); None: the config's `overlap` ("auto": on a GPU only).
    The stats' `time_split` says where the time went.
    """
    if overlap is None:
        overlap = overlap_for(pipe, cfg.overlap)
    clock = StageClock()
    plan = RunPlan(cfg)
    extractor = extractor or get_extractor(cfg.extractor.name, **cfg.extractor.params)
    records = shard_records(cfg, plan, shard_id, pipe, extractor, progress, generation_gate, overlap, clock)
    return write_shard(run_dir, shard_id, records, image_format=cfg.image_format, mtime=0.0, clock=clock)
