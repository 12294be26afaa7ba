"""Make one shard: generate its planned samples with capture, extract masks, filter, write.

No Prefect here: `tasks/` wraps `produce_shard`. The pipeline is passed in (loaded once per
worker process); everything else follows from the config and the shard id.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from itertools import islice

import numpy as np

from .capture import CaptureConfig
from .config import FilterConfig, RunConfig
from .extractors import ClassSpec, Extractor, MaskResult, get_extractor
from .generate import GenerationSettings, generate_with_attention, latent_hw
from .plan import PlannedSample, RunPlan
from .shards.records import ACCEPTED, REJECTED, SampleRecord, build_meta, remap_labels
from .shards.writer import ShardStats, write_shard
from .tokens import phrase_token_indices


def settings_of(cfg: RunConfig) -> GenerationSettings:
    return GenerationSettings(steps=cfg.steps, guidance=cfg.guidance, height=cfg.height, width=cfg.width)


def capture_config_for(extractor: Extractor, pipe, cfg: RunConfig) -> CaptureConfig:
    """Record only what the extractor reads (it knows), else everything."""
    wants = getattr(extractor, "capture_config", None)
    if callable(wants):
        return wants(pipe.unet, latent_hw(pipe, cfg.height, cfg.width))
    return CaptureConfig()


def mask_fractions(result: MaskResult, n_classes: int) -> list[float]:
    """Fraction of the image each class's mask covers (label k + 1 for the k-th class)."""
    area = result.labels.size
    return [round(float((result.labels == k + 1).sum()) / area, 6) for k in range(n_classes)]


def rejection_reason(image: np.ndarray, result: MaskResult, names: list[str], rules: FilterConfig) -> str:
    """'' when the sample is usable, else why not: the first rule that fails and its class.

    Reasons carry no numbers, so the shard stats count them as a histogram; the numbers are in
    the sample's metadata (`confidence`, `mask_fraction`).
    """
    if not np.isfinite(image.astype(np.float32)).all():
        return "nan image"
    if image.std() < 2.0:
        return "blank image"
    for name, conf, frac in zip(names, result.confidence, mask_fractions(result, len(names))):
        if not np.isfinite(conf) or conf < rules.min_confidence:
            return f"low confidence: {name}"
        if frac < rules.min_area:
            return f"small mask: {name}"
        if frac > rules.max_area:
            return f"mask covers the image: {name}"
    return ""


def class_specs(tokenizer, sample: PlannedSample) -> list[ClassSpec]:
    return [ClassSpec(c.name, phrase_token_indices(tokenizer, sample.prompt.text, c.phrase))
            for c in sample.prompt.classes]


def shard_records(cfg: RunConfig, plan: RunPlan, shard_id: int, pipe, extractor: Extractor,
                  progress=None, generation_gate: Callable[[], contextlib.AbstractContextManager] | None = None,
                  ) -> Iterator[SampleRecord]:
    """Records of one shard, generated batch by batch until its quota of accepted samples is met.

    Each batch asks for no more than the samples still missing, so no image is generated in vain
    and a shard's batches depend only on the config. `generation_gate()`, if given, is entered
    around each batch's generation only (not extraction or writing), e.g. a Prefect global
    concurrency slot per GPU.
    """
    gate = generation_gate or contextlib.nullcontext
    ids = plan.class_ids()
    settings = settings_of(cfg)
    capture = capture_config_for(extractor, pipe, cfg)
    need = plan.quota(shard_id)
    candidates = plan.candidates(shard_id)
    while need > 0:
        batch = list(islice(candidates, min(cfg.batch_size, need)))
        if not batch:
            break  # the shard's candidate range is used up: the stats show the shortfall
        with gate():
            images, attns = generate_with_attention(pipe, [s.prompt.text for s in batch], [s.seed for s in batch],
                                                    settings, capture)
        for sample, image, attn in zip(batch, images, attns):
            names = sample.class_names
            result = extractor.extract(attn, class_specs(pipe.tokenizer, sample), image)
            reason = rejection_reason(image, result, names, cfg.filter)
            meta = build_meta(prompt=sample.prompt.text, seed=sample.seed, classes=names,
                              class_ids=[ids[n] for n in names], model=cfg.model, extractor=extractor.name,
                              extractor_params=extractor.params(), confidence=result.confidence.tolist(),
                              mask_fraction=mask_fractions(result, len(names)), scores={"index": sample.index},
                              width=cfg.width, height=cfg.height)
            if reason:
                yield SampleRecord(index=sample.index, key=sample.key, status=REJECTED, reason=reason, meta=meta)
            else:
                need -= 1
                yield SampleRecord(index=sample.index, key=sample.key, status=ACCEPTED, image=image,
                                   mask=remap_labels(result.labels, [ids[n] for n in names]), meta=meta)
            if progress is not None:
                progress(1)


def produce_shard(cfg: RunConfig, shard_id: int, pipe, shards_dir, extractor: Extractor | None = None,
                  progress=None, generation_gate: Callable[[], contextlib.AbstractContextManager] | None = None,
                  ) -> ShardStats:
    """Generate, extract, filter and write shard `shard_id`; returns its stats (written last)."""
    plan = RunPlan(cfg)
    extractor = extractor or get_extractor(cfg.extractor.name, **cfg.extractor.params)
    records = shard_records(cfg, plan, shard_id, pipe, extractor, progress, generation_gate)
    return write_shard(shards_dir, shard_id, records, image_format=cfg.image_format, mtime=0.0)
